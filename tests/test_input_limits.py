"""Hostile and oversized inputs: each is refused with a typed error (exit 2) and a one-line reason, never a
traceback, a runaway solve or a runaway parse.

Every test builds its hostile file inside the test. The limits are those of docs/design.md §4.2 ("Input limits").
"""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
import yaml

from erasepro_hub.adapters import read_adapter
from erasepro_hub.cli import main
from erasepro_hub.errors import AdapterFormatError, BaseModelError, ManifestError
from erasepro_hub.manifest import dump_yaml, load_manifest, parse_manifest, to_data
from erasepro_hub.manifest.schema import Manifest

from conftest import DEMO, TOKENS

ADAPTER = "pytorch_lora_weights.safetensors"


def demo_data() -> dict:
    return yaml.safe_load(DEMO.read_text())


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as exc:
        parse_manifest(text, source="hostile.yaml")
    return [path for path, _ in exc.value.problems]


def run_cli(args, capsys) -> tuple[int, str]:
    """Run the command line in this process; an exception escaping ``main`` fails the test by itself."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def with_adapter(demo_folder, tmp_path, blob: bytes):
    """A copy of the demo folder whose adapter is ``blob``, its sha256 recorded so only the format is wrong."""
    from erasepro_hub.adapters.lora import file_sha256

    folder = tmp_path / "hostile"
    shutil.copytree(demo_folder, folder)
    (folder / ADAPTER).write_bytes(blob)
    data = to_data(load_manifest(folder))
    data["outputs"]["files"][ADAPTER] = file_sha256(folder / ADAPTER)
    (folder / "erasepro.yaml").write_text(dump_yaml(Manifest.model_validate(data)))
    return folder


# ----------------------------------------------------------------------------- non-finite numbers
FLOAT_FIELDS = [
    ("preserve", "weight"), ("preserve", "caption_weight"), ("prompts", "misspelling_weight"),
    ("solver", "rank_rtol"), ("solver", "ridge"), ("solver", "residual_tol"),
    ("uce", "lam"), ("uce", "erase_scale"), ("uce", "preserve_scale"),
]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
@pytest.mark.parametrize("field", FLOAT_FIELDS, ids=".".join)
def test_non_finite_numbers_are_refused_in_every_recipe_float(field, value):
    data = demo_data()
    data.setdefault(field[0], {})[field[1]] = "PLACEHOLDER"
    text = yaml.safe_dump(data).replace("PLACEHOLDER", value)
    assert ".".join(field) in problems_of(text)


@pytest.mark.parametrize(
    "path",
    [("outputs", "regenerate_atol"), ("outputs", "sites", 0, "residual"), ("outputs", "sites", 0, "condition"),
     ("outputs", "sites", 0, "delta_norm"), ("provenance", "solve_seconds"), ("metrics", "anchor_similarity"),
     ("metrics", "delta_norm_rel", "FIRST")],
    ids=lambda p: ".".join(map(str, p)),
)
def test_non_finite_numbers_are_refused_in_a_finished_manifest(demo_folder, path):
    data = to_data(load_manifest(demo_folder))
    node = data
    for part in path[:-1]:
        node = node[part]
    key = next(iter(node)) if path[-1] == "FIRST" else path[-1]
    node[key] = float("nan")
    problems = problems_of(yaml.safe_dump(data, sort_keys=False))
    expected = ".".join(map(str, path[:2])) if path[0] == "metrics" else ".".join(map(str, path))
    assert any(p == expected or p == "metrics" for p in problems), problems


@pytest.mark.parametrize("field, value", [(("solver", "residual_tol"), ".inf"), (("preserve", "weight"), ".nan")])
def test_erase_refuses_a_non_finite_setting_before_solving(tmp_path, capsys, field, value):
    data = demo_data()
    data.setdefault(field[0], {})[field[1]] = "PLACEHOLDER"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data).replace("PLACEHOLDER", value))
    code, err = run_cli(["erase", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 2 and ".".join(field) in err and "finite" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- adapter headers
def test_deeply_nested_adapter_header_is_a_format_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    path.write_bytes(safetensors_bytes(b"[" * 100_000 + b"]" * 100_000))
    with pytest.raises(AdapterFormatError, match="header"):
        read_adapter(path)


@pytest.mark.parametrize(
    "entry, reason",
    [
        ({"dtype": "F32", "shape": [1, 1], "data_offsets": 5}, "data_offsets"),
        ({"dtype": "F32", "shape": [1, 1], "data_offsets": [0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1, 1], "data_offsets": [4, 0]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1, 1], "data_offsets": ["0", "4"]}, "data_offsets"),
        ({"dtype": "F32", "shape": [1, -1], "data_offsets": [0, 4]}, "shape"),
        ({"dtype": "F32", "shape": "1x1", "data_offsets": [0, 4]}, "shape"),
        ({"dtype": 7, "shape": [1, 1], "data_offsets": [0, 4]}, "dtype"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}, "bytes"),
        ([0, 4], "entry"),
    ],
)
def test_malformed_header_entries_are_format_errors(tmp_path, entry, reason):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({"site.lora_A.weight": entry}, b"\0" * 4))
    with pytest.raises(AdapterFormatError, match=reason) as exc:
        read_adapter(path)
    assert "\n" not in str(exc.value)


def test_malformed_header_metadata_is_a_format_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(safetensors_bytes({"__metadata__": 5}))
    with pytest.raises(AdapterFormatError, match="__metadata__"):
        read_adapter(path)


@pytest.mark.parametrize(
    "blob",
    [safetensors_bytes(b"[" * 100_000 + b"]" * 100_000),
     safetensors_bytes({"x.lora_A.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": 5}}, b"\0" * 4)],
    ids=["deep", "offsets"],
)
def test_inspect_answers_a_hostile_adapter_without_a_traceback(demo_folder, tmp_path, capsys, blob):
    folder = with_adapter(demo_folder, tmp_path, blob)
    code, err = run_cli(["inspect", folder], capsys)
    # a format error is bad input (exit 2); an inspect that reports it as a failed integrity check exits 1
    assert (code == 2 and "error:" in err) or (code == 1 and "integrity" in err), (code, err)
    assert "header" in err


# ----------------------------------------------------------------------------- corrupt base-model folders
@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    from erasepro_hub.models.builtin import build_builtin

    folder = tmp_path_factory.mktemp("saved") / "tiny-sd"
    build_builtin("tiny-sd").save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize(
    "name, content, shown",
    [
        ("tokenizer/tokenizer.json", b"{not json", "tokenizer.json"),
        ("tokenizer/tokenizer.json", b"\xff\xfe\x00 binary", "tokenizer.json"),
        ("tokenizer/tokenizer.json", b"[" * 100_000 + b"]" * 100_000, "tokenizer.json"),
        # valid JSON that the tokenizer library cannot use: the message names the folder and its files
        ("tokenizer/tokenizer.json", b'{"model": 5}', "tokenizer.json"),
        ("tokenizer/tokenizer_config.json", b"[1, 2]", "tokenizer_config.json"),
        ("text_encoder/config.json", b"[1]", "config.json"),
        ("model_index.json", b"[1]", "model_index.json"),
        ("text_encoder/model.safetensors", b"not a safetensors file", "model.safetensors"),
        ("unet/diffusion_pytorch_model.safetensors", b"not a safetensors file", "diffusion_pytorch_model.safetensors"),
    ],
)
def test_corrupt_base_model_files_are_a_base_model_error(saved_sd, tmp_path, capsys, name, content, shown):
    from erasepro_hub.models.loading import load_edit_model

    folder = tmp_path / "corrupt"
    shutil.copytree(saved_sd, folder)
    (folder / name).write_bytes(content)
    with pytest.raises(BaseModelError, match=shown) as exc:
        load_edit_model(folder)
    assert "\n" not in str(exc.value)
    data = demo_data()
    data["base_model"] = {"id": str(folder)}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    code, err = run_cli(["erase", manifest, "--out", tmp_path / "out"], capsys)
    assert code == 2 and shown in err


# ----------------------------------------------------------------------------- YAML bombs, size, depth
def billion_laughs(levels: int, width: int) -> str:
    lines = ["  lol0: &l0 [lol]"]
    for level in range(1, levels):
        refs = ", ".join([f"*l{level - 1}"] * width)
        lines.append(f"  lol{level}: &l{level} [{refs}]")
    return "metrics:\n" + "\n".join(lines) + "\n"


def test_yaml_aliases_are_refused_quickly():
    text = DEMO.read_text() + billion_laughs(levels=9, width=10)  # 10^8 nodes once expanded
    start = time.perf_counter()
    with pytest.raises(ManifestError, match="alias|anchor"):
        parse_manifest(text)
    assert time.perf_counter() - start < 10  # refused while composing, never expanded


def test_inspect_refuses_aliases_in_a_finished_folder(demo_folder, tmp_path, capsys):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    text = (folder / "erasepro.yaml").read_text()
    assert "\nmetrics:\n" in text
    (folder / "erasepro.yaml").write_text(text.replace("\nmetrics:\n", "\n" + billion_laughs(3, 3), 1))
    code, err = run_cli(["inspect", folder, "--json"], capsys)
    assert code == 2 and ("alias" in err or "anchor" in err)
    assert len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize("snippet", ["metrics: {when: 2024-01-01}", "metrics: {scores: {1: 0.5}}",
                                     "metrics: {blob: !!binary aGVsbG8=}"])
def test_metrics_must_be_json_data(snippet):
    assert "metrics" in problems_of(DEMO.read_text() + snippet + "\n")


def test_oversized_manifest_file_is_refused(tmp_path, capsys):
    path = tmp_path / "big.yaml"
    path.write_text(DEMO.read_text() + "# " + "x" * (5 * 2**20) + "\n")
    with pytest.raises(ManifestError, match="MiB"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="MiB"):
        parse_manifest(path.read_text())
    code, err = run_cli(["inspect", path], capsys)
    assert code == 2 and "MiB" in err


def test_deeply_nested_yaml_is_refused():
    with pytest.raises(ManifestError, match="nest"):
        parse_manifest(DEMO.read_text() + "metrics: " + "[" * 5000 + "]" * 5000 + "\n")


# ----------------------------------------------------------------------------- list and string caps
def test_ten_thousand_templates_are_refused(tmp_path, capsys):
    data = demo_data()
    data["prompts"]["templates"] = [f"picture {i} of {{}}" for i in range(10_000)]
    assert "prompts.templates" in problems_of(yaml.safe_dump(data))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    code, err = run_cli(["inspect", manifest], capsys)
    assert code == 2 and "prompts.templates" in err


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda d: d["concepts"][0].update(target="x" * 1001), "concepts.0.target"),
        (lambda d: d["concepts"][0].update(anchor="x" * 1001), "concepts.0.anchor"),
        (lambda d: d["prompts"]["templates"].append("{} " + "x" * 1000), "prompts.templates.4"),
        (lambda d: d["preserve"]["concepts"].append("x" * 1001), "preserve.concepts.3"),
        (lambda d: d["evaluation"]["preserve_prompts"].append("x" * 1001), "evaluation.preserve_prompts.3"),
        (lambda d: d["evaluation"].update(heldout_prompts=[{"target": "x" * 1001, "anchor": "a"}]),
         "evaluation.heldout_prompts.0.target"),
        (lambda d: d.update(description="x" * 10_001), "description"),
        (lambda d: d.update(concepts=[{"target": f"c{i}", "anchor": "a"} for i in range(257)]), "concepts"),
        (lambda d: d["preserve"].update(templates=["{}"] * 257), "preserve.templates"),
        (lambda d: d["evaluation"].update(heldout_templates=["{}"] * 257), "evaluation.heldout_templates"),
        (lambda d: d["preserve"].update(concepts=[f"p{i}" for i in range(2049)]), "preserve.concepts"),
        (lambda d: d["evaluation"].update(preserve_prompts=["p"] * 2049), "evaluation.preserve_prompts"),
        (lambda d: d["evaluation"].update(heldout_prompts=[{"target": f"t{i}", "anchor": "a"} for i in range(2049)]),
         "evaluation.heldout_prompts"),
        # 254 own templates and a bank of 3 new ones resolve to 257
        (lambda d: d["prompts"].update(templates=[f"t{i} {{}}" for i in range(254)], kind="style"), "prompts"),
    ],
)
def test_list_and_string_caps_name_the_field(edit, field):
    data = demo_data()
    edit(data)
    assert field in problems_of(yaml.safe_dump(data))


def test_the_total_number_of_prompts_is_capped():
    data = demo_data()
    data["concepts"] = [{"target": f"concept {i}", "anchor": "a"} for i in range(200)]
    data["prompts"]["templates"] = [f"t{i} {{}}" for i in range(40)]  # 8,000 pairs, each cap respected
    with pytest.raises(ManifestError, match="4096|4,096") as exc:
        parse_manifest(yaml.safe_dump(data))
    assert "prompts" in str(exc.value)


def test_a_resolved_manifest_at_the_template_cap_reads_back():
    from erasepro_hub.banks import bank

    data = demo_data()
    data["prompts"] = {"templates": list(bank("style")[:3]) + [f"t{i} {{}}" for i in range(253)], "kind": "style"}
    assert len(parse_manifest(yaml.safe_dump(data)).prompts.templates) == 256


# ----------------------------------------------------------------------------- evaluation prompt sets
@pytest.fixture(scope="module")
def prompt_repo(hub):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=TOKENS["alice"])
    api.create_repo("alice/split-prompts", repo_type="dataset", exist_ok=True)
    api.create_commit("alice/split-prompts", [CommitOperationAdd("prompts.csv", b"prompt\na cat\n")],
                      commit_message="v1", repo_type="dataset")
    return "alice/split-prompts"


def test_unknown_dataset_split_names_the_available_ones(prompt_repo):
    from erasepro_hub.metrics.prompt_sets import load_prompt_set

    with pytest.raises(ManifestError, match=r"'nosuch'.*train") as exc:
        load_prompt_set(f"{prompt_repo}:nosuch", [("Vincent van Gogh", "a painting")])
    assert "\n" not in str(exc.value)
    assert [p.text for p in load_prompt_set(f"{prompt_repo}:train", []).preserve] == ["a cat"]


def test_eval_answers_an_unknown_split_with_exit_2(prompt_repo, demo_folder, tmp_path, capsys):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    code, err = run_cli(["eval", folder, "--prompts", f"{prompt_repo}:nosuch"], capsys)
    assert code == 2 and "nosuch" in err and "train" in err


@pytest.mark.parametrize("suffix, content", [(".json", b'{"prompt": "a", '), (".csv", b'prompt\n"a\n'),
                                             (".parquet", b"PAR1garbage")])
def test_corrupt_prompt_files_are_manifest_errors(tmp_path, suffix, content):
    from erasepro_hub.metrics.prompt_sets import load_prompt_set

    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(content)
    with pytest.raises(ManifestError, match=path.name):
        load_prompt_set(str(path), [])
