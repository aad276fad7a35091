"""The command line: exit codes, messages, and that bad input leaves nothing behind."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
    "unknown builtin": (edited(lambda d: d["base_model"].update(id="builtin:tiny-kandinsky")), "base_model.id"),
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
    out = capsys.readouterr().out  # the verdict is the command's result: text by default
    assert out.startswith("verified: max |ΔW_stored − ΔW_regenerated| = ") and len(out.splitlines()) == 1


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
    assert main(["regenerate", str(folder), "--verify", "--json"]) == 1
    captured = capsys.readouterr()
    assert "exceeds the tolerance" in captured.err  # the reasons stay on stderr
    import json

    verdict = json.loads(captured.out)
    assert verdict["ok"] is False and verdict["max_abs_diff"] > verdict["atol"] and verdict["folder"] == str(folder)


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


# ----------------------------------------------------------------------------- output: text, or --json
class FakeBar:
    """Stands in for tqdm: records what the command's progress bar was told."""

    bars: list[FakeBar] = []

    def __init__(self, *args, desc=None, total=None, **kwargs):
        self.desc, self.total, self.n, self.closed = desc, total, 0, False
        self.steps: list[tuple[str, int | None]] = []
        FakeBar.bars.append(self)

    def reset(self, total=None):
        self.n = 0

    def set_description_str(self, desc):
        self.desc = desc
        self.steps.append((desc, self.total))

    def update(self, n=1):
        self.n += n

    def close(self):
        self.closed = True


@pytest.fixture
def fake_bar(monkeypatch):
    import tqdm.auto

    FakeBar.bars = []
    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    return FakeBar


def test_erase_json_and_a_progress_bar_with_a_total(tmp_path, capsys, fake_bar, monkeypatch):
    import json

    import erasepro_hub.erase as erase_module

    load_base = erase_module.load_base
    seen_while_loading = []

    def recording_load_base(*args, **kwargs):
        seen_while_loading.append(fake_bar.bars[-1].desc)
        return load_base(*args, **kwargs)

    monkeypatch.setattr(erase_module, "load_base", recording_load_base)
    out = tmp_path / "out"
    assert main(["erase", str(DEMO), "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # one JSON object, nothing else on stdout
    assert result["folder"] == str(out) and result["name"] == "demo-van-gogh" and result["method"] == "erasepro"
    assert result["sites"] == 11 and result["metrics"]["residual_train"] <= 1e-5
    assert result["concepts"] == [{"target": "Vincent van Gogh", "anchor": "a painting"}]
    assert "wrote" not in captured.err  # the human summary is for text mode
    # the bar names the loading step before the base model is loaded, then counts the stages
    (bar,) = fake_bar.bars
    assert seen_while_loading == ["erase: loading base weights"]
    assert bar.steps == [("erase: loading base weights", None), ("erase: solving", 4)]  # 3 text-encoder stages + K/V
    assert bar.n == bar.total == 4 and bar.closed


def test_solve_announces_its_stage_count_first():
    from erasepro_hub.computation import LOADING_STEP, SOLVING_STEP, Progress

    class Recorder:
        def __init__(self):
            self.events = []

        def __call__(self, stage):
            self.events.append(("done", stage))

        def start(self, step, total=None):
            self.events.append(("start", step, total))

    from erasepro_hub.erase import compute
    from erasepro_hub.manifest import load_manifest

    recipe = load_manifest(DEMO).recipe()
    recipe = recipe.model_copy(update={"method": "erasepro-kv"})  # one stage: quick
    recorder = Recorder()
    assert isinstance(recorder, Progress) and not isinstance(print, Progress)
    comp = compute(recipe, progress=recorder)
    assert recorder.events == [("start", LOADING_STEP, None), ("start", SOLVING_STEP, 1), ("done", "unet.cross_attention")]
    plain = []
    compute(recipe, progress=plain.append, base=comp.base)  # a plain callable still hears each stage
    assert plain == ["unet.cross_attention"]


def test_regenerate_json(demo_folder, tmp_path, capsys):
    import json

    out = tmp_path / "again"
    assert main(["regenerate", str(demo_folder), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folder"] == str(out) and result["sites"] == 11


def test_eval_prints_a_summary_and_json_on_request(demo_folder, tmp_path, capsys):
    import json

    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    assert main(["eval", str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"evaluated {folder} (erasepro;") and "UCE baseline" in text
    assert [line for line in text.splitlines() if line.split()[:1] == ["residual_train"]]
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert main(["eval", str(folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["residual_train"] <= 1e-5 and summary["baseline_uce"]["residual_train"] > 1e-3


def test_compare_card_and_inspect_json(demo_folder, tmp_path, capsys, fake_bar):
    import json

    assert main(["compare", str(DEMO), "--methods", "none"]) == 0
    assert capsys.readouterr().out.startswith("### demo-van-gogh")
    assert fake_bar.bars[-1].total == 1 and fake_bar.bars[-1].n == 1  # one manifest × one variant
    assert main(["compare", str(DEMO), "--methods", "none", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["variant"] for r in rows] == ["none"] and rows[0]["residual_train"] > 0.05
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    assert main(["card", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines() == [str(folder / "README.md"), str(folder / "delta_norms.png")]
    assert main(["card", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == [str(folder / "README.md"), str(folder / "delta_norms.png")]
    assert main(["inspect", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["integrity"] == "ok"


def test_combine_is_wired_like_erase(demo_folder, tmp_path, capsys, monkeypatch):
    """The command passes its options to ``erasepro_hub.combine.combine`` and reports the folder it wrote."""
    import json
    import sys
    import types

    calls = []

    def combine(sources, out, *, name=None, overwrite=False, device="cpu", progress=None, command=None):
        calls.append(dict(sources=sources, out=out, name=name, overwrite=overwrite, device=device, command=command))
        assert callable(progress) and callable(progress.start)
        folder = Path(out)
        shutil.copytree(demo_folder, folder, dirs_exist_ok=True)
        return folder

    monkeypatch.setitem(sys.modules, "erasepro_hub.combine", types.SimpleNamespace(combine=combine))
    out = tmp_path / "both"
    argv = ["combine", str(DEMO), str(demo_folder), "--out", str(out), "--name", "both", "--overwrite"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and f"wrote {out}" in captured.err
    assert calls == [dict(sources=[str(DEMO), str(demo_folder)], out=str(out), name="both", overwrite=True,
                          device="cpu", command=["erasepro", *argv])]
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folder"] == str(out)
    with pytest.raises(SystemExit) as exc:
        main(["combine", str(DEMO)])  # --out is required
    assert exc.value.code == 2


def test_combine_solves_two_manifests_as_one_erasure(tmp_path, capsys):
    import json

    second = write(tmp_path, edited(lambda d: (d["concepts"][0].update(target="Claude Monet"), d.update(name="monet"))))
    out = tmp_path / "both"
    assert main(["combine", str(DEMO), str(second), "--out", str(out), "--name", "both", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["folder"] == str(out) and result["name"] == "both"
    assert [c["target"] for c in result["concepts"]] == ["Vincent van Gogh", "Claude Monet"]
    assert result["metrics"]["residual_train"] <= 1e-5
    assert main(["inspect", str(out)]) == 0


@pytest.fixture(scope="module")
def prompt_dataset(hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    from conftest import TOKENS

    api = HfApi(token=TOKENS["alice"])
    api.create_repo("alice/cli-split-prompts", repo_type="dataset", exist_ok=True)
    api.create_commit("alice/cli-split-prompts", [CommitOperationAdd("prompts.csv", b"prompt\na cat\n")],
                      commit_message="v1", repo_type="dataset")
    return "alice/cli-split-prompts"


@pytest.mark.parametrize("command", ["eval", "compare"])
def test_an_unknown_dataset_split_exits_2_naming_the_splits(command, prompt_dataset, demo_folder, capsys):
    target = str(demo_folder) if command == "eval" else str(DEMO)
    assert main([command, target, "--prompts", f"{prompt_dataset}:nosuch", "--json"]) == 2
    captured = capsys.readouterr()
    assert "no split 'nosuch'" in captured.err and "available: train" in captured.err
    assert captured.out == "" and "Traceback" not in captured.err


CONSOLE = """
import atexit, pathlib, shutil, sys, weakref
marker, scratch = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
atexit.register(marker.write_text, "ran")
scratch.mkdir()
owner = type("Owner", (), {})()
weakref.finalize(owner, shutil.rmtree, str(scratch))  # pending at exit: run by the exit handlers
sys.argv = ["erasepro", *sys.argv[3:]]
from erasepro_hub.cli import run
run()
"""


def test_the_console_command_runs_the_exit_handlers_and_keeps_the_exit_code(demo_folder, tmp_path):
    """``erasepro`` (``cli.run``) ends without the interpreter's teardown, not without its exit handlers: output
    piped to another process arrives whole, ``atexit`` hooks and pending finalizers run, the code is main's."""

    def console(*args: str) -> subprocess.CompletedProcess:
        marker, scratch = tmp_path / "atexit-ran", tmp_path / "scratch"
        marker.unlink(missing_ok=True)
        command = [sys.executable, "-c", CONSOLE, str(marker), str(scratch), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert marker.read_text() == "ran" and not scratch.exists(), result.stderr
        return result

    ok = console("inspect", str(demo_folder), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["name"] == "demo-van-gogh"
    bad = console("inspect", str(tmp_path / "no-such-folder"))
    assert bad.returncode == 2 and bad.stderr.startswith("error:")
