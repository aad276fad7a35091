"""The command line: exit codes, messages, and that bad input leaves nothing behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from erasepro_hub.cli import main

from conftest import DEMO

BASE = yaml.safe_load(DEMO.read_text())


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def edited(change) -> dict:
    data = yaml.safe_load(DEMO.read_text())
    change(data)
    return data


BAD = {
    "unknown key": (edited(lambda d: d.setdefault("solver", {}).update(token_polcy="eos")), "solver.token_polcy"),
    "missing anchor": (edited(lambda d: d["concepts"][0].pop("anchor")), "concepts.0.anchor"),
    "empty targets": (edited(lambda d: d.update(concepts=[])), "concepts"),
    "blank target": (edited(lambda d: d["concepts"][0].update(target="  ")), "concepts.0.target"),
    "wrong type": (edited(lambda d: d["preserve"].update(weight="heavy")), "preserve.weight"),
    "wrong type list": (edited(lambda d: d["prompts"].update(templates="a painting by {}")), "prompts.templates"),
    "unknown method": (edited(lambda d: d.update(method="esd")), "method"),
    "unknown builtin": (edited(lambda d: d["base_model"].update(id="builtin:tiny-flux")), "base_model.id"),
    "missing base path": (edited(lambda d: d["base_model"].update(id="./no/such/folder")), "base_model.id"),
    "bad template": (edited(lambda d: d["prompts"].update(templates=["no placeholder"])), "prompts.templates.0"),
    "revision on builtin": (edited(lambda d: d["base_model"].update(revision="main")), "base_model"),
    "depth too deep": (edited(lambda d: d.update(text_encoder={"depth": 9})), "text_encoder.depth"),
    "stream on fc1": (edited(lambda d: d.update(text_encoder={"site": "mlp.fc1", "target_mode": "stream"})), "text_encoder"),
    "schema version": (edited(lambda d: d.update(schema_version=2)), "schema_version"),
    "not a mapping": ("- just\n- a list\n", "top level"),
    "not yaml": ("concepts: [unclosed\n", "not valid YAML"),
    "duplicate key": ("schema_version: 1\nschema_version: 1\n", "duplicate key"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_naming_the_field(case, tmp_path, capsys):
    data, field = BAD[case]
    manifest = write(tmp_path, data)
    out = tmp_path / "out"
    code = main(["erase", str(manifest), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert field in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]  # nothing half-written


def test_missing_manifest_file(tmp_path, capsys):
    assert main(["erase", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(demo_folder, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(demo_folder, out)
    assert main(["erase", str(DEMO), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["erase", str(DEMO), "--out", str(out), "--overwrite"]) == 0
    assert capsys.readouterr().out.strip() == str(out)  # data (the folder) on stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_regenerate_verify_passes_on_untouched_folder(demo_folder, capsys):
    assert main(["regenerate", str(demo_folder), "--verify"]) == 0
    assert "verified" in capsys.readouterr().err


def test_verify_and_regenerate_are_two_verbs_with_one_return_type_each(demo_folder, tmp_path):
    from erasepro_hub import regenerate, verify

    report = verify(demo_folder)
    assert report.ok and report.problems == [] and report.max_abs_diff <= report.atol
    out = regenerate(demo_folder, out=tmp_path / "again")
    assert out == tmp_path / "again" and (out / "erasepro.yaml").is_file()


def test_regenerate_verify_fails_after_one_flipped_byte(demo_folder, tmp_path, capsys):
    folder = tmp_path / "tampered"
    shutil.copytree(demo_folder, folder)
    adapter = folder / "pytorch_lora_weights.safetensors"
    data = bytearray(adapter.read_bytes())
    data[len(data) // 2] ^= 0x01
    adapter.write_bytes(bytes(data))
    assert main(["regenerate", str(folder), "--verify"]) == 1
    err = capsys.readouterr().err
    assert "pytorch_lora_weights.safetensors was modified" in err and "sha256" in err


def test_regenerate_verify_fails_after_editing_the_manifest(demo_folder, tmp_path, capsys):
    folder = tmp_path / "edited"
    shutil.copytree(demo_folder, folder)
    manifest = folder / "erasepro.yaml"
    manifest.write_text(manifest.read_text().replace("anchor: a painting", "anchor: a photograph"))
    assert main(["regenerate", str(folder), "--verify"]) == 1
    assert "erasepro.yaml was edited" in capsys.readouterr().err


def test_regenerate_verify_fails_when_outputs_are_rewritten_consistently(demo_folder, tmp_path, capsys):
    """Even a forger who edits the recipe and re-hashes it (recipe, manifest, files) is caught by recomputing."""
    from erasepro_hub.adapters.folder import manifest_sha256
    from erasepro_hub.adapters.lora import HEADER_RECIPE, file_sha256, read_adapter, save_adapter
    from erasepro_hub.manifest import dump_yaml, load_manifest, recipe_sha256, to_data
    from erasepro_hub.manifest.schema import Manifest

    folder = tmp_path / "forged"
    shutil.copytree(demo_folder, folder)
    manifest = load_manifest(folder / "erasepro.yaml")
    data = to_data(manifest)
    data["concepts"][0]["anchor"] = "a photograph"
    forged = Manifest.model_validate(data)
    new_hash = recipe_sha256(forged)
    adapter = read_adapter(folder / "pytorch_lora_weights.safetensors")
    data["outputs"]["recipe_sha256"] = new_hash
    sha = save_adapter(
        folder / "pytorch_lora_weights.safetensors", adapter.deltas, recipe_sha256=new_hash, version="x",
        manifest_sha256=manifest_sha256(Manifest.model_validate(data)),
    )
    data["outputs"]["files"]["pytorch_lora_weights.safetensors"] = sha
    (folder / "erasepro.yaml").write_text(dump_yaml(Manifest.model_validate(data)))
    assert read_adapter(folder / "pytorch_lora_weights.safetensors").metadata[HEADER_RECIPE] == new_hash
    assert file_sha256(folder / "pytorch_lora_weights.safetensors") == sha
    assert main(["regenerate", str(folder), "--verify"]) == 1
    assert "exceeds the tolerance" in capsys.readouterr().err


def test_regenerate_rebuilds_the_adapter_bit_for_bit(demo_folder, tmp_path, capsys):
    out = tmp_path / "again"
    assert main(["regenerate", str(demo_folder), "--out", str(out)]) == 0
    for name in ("pytorch_lora_weights.safetensors", "metrics.json"):
        assert (out / name).read_bytes() == (demo_folder / name).read_bytes(), name
    from erasepro_hub.manifest import load_manifest

    assert load_manifest(out).outputs == load_manifest(demo_folder).outputs


def test_inspect(demo_folder, capsys):
    assert main(["inspect", str(demo_folder)]) == 0
    out = capsys.readouterr().out
    assert "builtin:tiny-sd" in out and "'Vincent van Gogh' → 'a painting'" in out and "integrity    ok" in out
    assert main(["inspect", str(demo_folder), "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    # 3 text-encoder stages (layers 1-3) carry the exact update; the K/V sites store only the soft
    # misspelling terms (their exact targets already hold)
    assert summary["sites"] == 11 and summary["text_encoder_sites"] == 3 and summary["integrity"] == "ok"


def test_inspect_reports_tampering(demo_folder, tmp_path, capsys):
    folder = tmp_path / "t"
    shutil.copytree(demo_folder, folder)
    (folder / "metrics.json").write_text("{}")
    assert main(["inspect", str(folder)]) == 1
    assert "metrics.json was modified" in capsys.readouterr().err


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "erasepro_hub" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["erase"])  # missing argument: argparse's usage error
    assert exc.value.code == 2


def test_unusable_device_and_output_paths(tmp_path, capsys):
    assert main(["erase", str(DEMO), "--out", str(tmp_path / "o"), "--device", "cuda:7"]) == 2
    assert "CUDA" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["erase", str(DEMO), "--out", str(tmp_path / "o"), "--device", "toaster"]) == 2
    assert "not a torch device" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["erase", str(DEMO), "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
