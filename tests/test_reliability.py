"""Hardening: malformed manifests (property-based), corrupted artefacts, interrupted writes, Hub faults on pull,
and security (tokens, pickle, paths)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from erasepro_hub.adapters import load_erasure, read_adapter, save_adapter
from erasepro_hub.errors import (
    AdapterFormatError,
    BaseMismatchError,
    HubError,
    ManifestError,
    VerificationError,
)
from erasepro_hub.manifest import Manifest, parse_manifest
from erasepro_hub.models.loading import load_builtin

from conftest import DEMO, TOKENS

VALID = yaml.safe_load(DEMO.read_text())
REQUIRED = [("schema_version",), ("base_model",), ("base_model", "id"), ("concepts",), ("concepts", 0, "target"),
            ("concepts", 0, "anchor"), ("prompts",), ("prompts", "templates")]
ENUMS = [("method",), ("solver", "token_policy"), ("preserve", "mode"), ("text_encoder", "site"),
         ("text_encoder", "target_mode"), ("text_encoder", "pooled"), ("adapter", "format"), ("adapter", "dtype"),
         ("solver", "dtype")]
NUMBERS = [("preserve", "weight"), ("solver", "rank_rtol"), ("solver", "residual_tol"), ("solver", "ridge"),
           ("text_encoder", "depth"), ("uce", "lam"), ("uce", "erase_scale"), ("uce", "preserve_scale")]
FLOATS = NUMBERS + [("preserve", "caption_weight"), ("prompts", "misspelling_weight"), ("prompts", "bank_size"),
                    ("text_encoder", "first_layer")]
NON_FINITE = st.sampled_from([float("inf"), float("-inf"), float("nan")])
#: (path, limit, what goes over it): every capped string and list of docs/design.md §4.2 "Input limits"
TEXTS = [(("concepts", 0, "target"), 1000), (("concepts", 0, "anchor"), 1000), (("preserve", "concepts", 0), 1000),
         (("evaluation", "preserve_prompts", 0), 1000), (("description",), 10_000)]
TEMPLATE_TEXTS = [("prompts", "templates", 0), ("evaluation", "heldout_templates", 0), ("preserve", "templates", 0)]
LISTS = [(("concepts",), 256, lambda i: {"target": f"concept {i}", "anchor": "a"}),
         (("prompts", "templates"), 256, lambda i: f"t{i} {{}}"),
         (("preserve", "templates"), 256, lambda i: f"t{i} {{}}"),
         (("evaluation", "heldout_templates"), 256, lambda i: f"t{i} {{}}"),
         (("preserve", "concepts"), 2048, lambda i: f"p{i}"),
         (("evaluation", "preserve_prompts"), 2048, lambda i: f"p{i}"),
         (("evaluation", "heldout_prompts"), 2048, lambda i: {"target": f"t{i}", "anchor": "a"})]


def paths(node, prefix=()):
    """Every path (tuple of keys/indices) into the manifest."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, prefix + (index,))


def ensure(data, path):
    """The parent node of ``path``, creating the mappings on the way."""
    node = data
    for part in path[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    return node


ALL_PATHS = [p for p in paths(VALID) if p]
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def malformed(draw):
    """(manifest data, the path the mutation touched)."""
    data = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["delete", "unknown", "retype", "enum", "number", "template", "empty", "concept",
                                 "over"]))
    if kind == "delete":
        path = draw(st.sampled_from(REQUIRED))
        parent = ensure(data, path)
        del parent[path[-1]]
    elif kind == "unknown":
        mappings = [p for p in paths(data) if isinstance(_get(data, p), dict)]
        parent_path = draw(st.sampled_from(mappings))
        key = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10))
        parent = _get(data, parent_path)
        assume(key not in parent and key not in _allowed(parent_path))
        parent[key] = draw(ODD_VALUES)
        path = parent_path + (key,)
    elif kind == "retype":
        path = draw(st.sampled_from(ALL_PATHS))
        ensure(data, path)[path[-1]] = draw(ODD_VALUES)
    elif kind == "enum":
        path = draw(st.sampled_from(ENUMS))
        ensure(data, path)[path[-1]] = draw(st.text(max_size=15))
    elif kind == "number":
        path = draw(st.sampled_from(NUMBERS))
        ensure(data, path)[path[-1]] = draw(st.sampled_from([-1, -0.5, -1e9, "NaN", "fast", [], {}]))
    elif kind == "template":
        path = ("prompts", "templates", 0)
        data["prompts"]["templates"][0] = draw(st.sampled_from(["no placeholder", "{} and {}", "{0}", "a\n{}", ""]))
    elif kind == "empty":
        path = draw(st.sampled_from([("concepts",), ("prompts", "templates")]))
        ensure(data, path)[path[-1]] = []
    elif kind == "over":
        data, path = draw(over_limits())
    else:
        path = ("concepts", 0, "target")
        data["concepts"][0]["target"] = draw(st.sampled_from(["", "   ", "two\nlines", 7, None]))
    return data, path


@st.composite
def over_limits(draw):
    """(manifest data, path) over one input limit: a non-finite number, a long string, a long list, too many prompts."""
    data = copy.deepcopy(VALID)
    kind = draw(st.sampled_from(["nonfinite", "long", "many", "prompts"]))
    if kind == "nonfinite":
        # anywhere: a float field, or any other field (where a number of any kind is already wrong)
        path = draw(st.sampled_from(FLOATS + ALL_PATHS))
        ensure(data, path)[path[-1]] = draw(NON_FINITE)
    elif kind == "long":
        over = draw(st.integers(1, 40))
        filler = draw(st.sampled_from(["x", "é", " a", "字"]))
        if draw(st.booleans()):
            path, limit = draw(st.sampled_from(TEXTS))
            value = (filler * (limit + over))[: limit + over]
        else:
            path, limit = draw(st.sampled_from(TEMPLATE_TEXTS)), 1000
            value = "{}" + (filler * limit)[: limit - 2 + over]
        put(data, path, value)
    elif kind == "many":
        path, limit, item = draw(st.sampled_from(LISTS))
        ensure(data, path)[path[-1]] = [item(i) for i in range(limit + draw(st.integers(1, 20)))]
    else:  # each list within its cap, their product over the prompt budget (4,096)
        concepts = draw(st.integers(40, 256))
        templates = 4096 // concepts + draw(st.integers(1, 8))
        data["concepts"] = [{"target": f"concept {i}", "anchor": "a"} for i in range(concepts)]
        data["prompts"]["templates"] = [f"t{i} {{}}" for i in range(templates)]
        path = ()
    return data, path


def put(data, path, value):
    """Set ``path`` to ``value``, creating mappings (and lists, for an index) on the way."""
    node = data
    for part, after in zip(path[:-1], path[1:]):
        if isinstance(node, dict) and node.get(part) is None:
            node[part] = [] if isinstance(after, int) else {}
        node = node[part]
    if isinstance(node, list) and path[-1] >= len(node):
        node.append(value)
    else:
        node[path[-1]] = value


def _get(data, path):
    node = data
    for part in path:
        node = node[part]
    return node


def _allowed(parent_path) -> set:
    from erasepro_hub.manifest.io import _known_keys
    from erasepro_hub.manifest.schema import Manifest

    return set(_known_keys(Manifest, tuple(parent_path)) or [])


def _named(problem_path: str, path) -> bool:
    target = ".".join(str(p) for p in path)
    return (
        problem_path == target
        or problem_path.startswith(target + ".")
        or target.startswith(problem_path + ".")
        or problem_path == "(top level)"
    )


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(malformed())
def test_malformed_manifests_give_a_typed_error_naming_the_field(case):
    data, path = case
    try:
        text = yaml.safe_dump(data, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    try:
        parse_manifest(text, source="fuzz.yaml")
    except ManifestError as exc:
        assert exc.problems, str(exc)
        assert any(_named(p, path) for p, _ in exc.problems), (path, exc.problems)
        assert "invalid manifest fuzz.yaml" in str(exc)
        return
    except Exception as exc:  # noqa: BLE001 - anything else is a defect
        pytest.fail(f"{type(exc).__name__} instead of a ManifestError for {path}: {exc}")
    assume(False)  # the mutation happened to produce a valid manifest: not a malformed example


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(over_limits())
def test_values_over_the_input_limits_are_always_refused(case):
    data, path = case
    try:
        parse_manifest(yaml.safe_dump(data, allow_unicode=True), source="fuzz.yaml")
    except ManifestError as exc:
        assert any(_named(p, path) for p, _ in exc.problems), (path, exc.problems)
    except Exception as exc:  # noqa: BLE001 - anything else is a defect
        pytest.fail(f"{type(exc).__name__} instead of a ManifestError for {path}: {exc}")
    else:
        pytest.fail(f"a manifest over an input limit at {'.'.join(map(str, path)) or 'the top level'} was accepted")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300))
def test_arbitrary_bytes_never_crash_the_reader(blob):
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    # the reader answers with a validated manifest or a ManifestError; anything else escapes and fails the test
    try:
        manifest = parse_manifest(text)
    except ManifestError as exc:
        assert str(exc)
    else:
        assert isinstance(manifest, Manifest)


@settings(max_examples=40, deadline=None)
@given(malformed())
def test_the_command_line_answers_malformed_manifests_with_exit_2(tmp_path_factory, case):
    from erasepro_hub.cli import main

    data, path = case
    folder = tmp_path_factory.mktemp("cli")
    manifest = folder / "m.yaml"
    try:
        manifest.write_text(yaml.safe_dump(data, allow_unicode=True))
        parse_manifest(manifest.read_text())
    except ManifestError:
        pass
    except yaml.YAMLError:
        assume(False)
    else:
        assume(False)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["erase", str(manifest), "--out", str(folder / "out")])
    assert code == 2 and "Traceback" not in err.getvalue() and "invalid manifest" in err.getvalue()
    assert not (folder / "out").exists()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_non_finite_numbers_anywhere_in_a_finished_manifest_are_refused(demo_folder, data):
    from erasepro_hub.manifest import load_manifest, to_data

    manifest = to_data(load_manifest(demo_folder))
    numbers = [p for p in paths(manifest) if p and isinstance(_get(manifest, p), (int, float))
               and not isinstance(_get(manifest, p), bool)]
    path = data.draw(st.sampled_from(numbers))
    ensure(manifest, path)[path[-1]] = data.draw(NON_FINITE)
    try:
        parse_manifest(yaml.safe_dump(manifest, sort_keys=False), source="fuzz.yaml")
    except ManifestError as exc:
        assert any(_named(p, path) for p, _ in exc.problems), (path, exc.problems)
    except Exception as exc:  # noqa: BLE001 - anything else is a defect
        pytest.fail(f"{type(exc).__name__} instead of a ManifestError for {path}: {exc}")
    else:
        pytest.fail(f"a non-finite number at {'.'.join(map(str, path))} was accepted")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 3000), st.sampled_from(["[", "{\"a\": ", "- ", "x: &a\n"]))
def test_deep_or_aliased_yaml_is_refused_without_a_crash(depth, opener):
    text = DEMO.read_text() + "metrics:\n  deep: " + opener * depth + "\n"
    try:
        parse_manifest(text)
    except ManifestError as exc:
        assert str(exc).count("\n") <= 1 or exc.problems, str(exc)


# ----------------------------------------------------------------------------- safetensors headers
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "f32", "float32", ""])
SMALL = st.integers(-3, 6)


@st.composite
def header_entries(draw):
    """A tensor entry: mostly well-formed, with any one part possibly replaced by arbitrary JSON."""
    entry = {
        "dtype": draw(DTYPES),
        "shape": draw(st.lists(SMALL, max_size=3)),
        "data_offsets": draw(st.lists(st.integers(-4, 80), min_size=0, max_size=3)),
    }
    spoil = draw(st.sampled_from([None, "dtype", "shape", "data_offsets", "extra", "missing", "whole"]))
    if spoil == "whole":
        return draw(JSON)
    if spoil == "extra":
        entry[draw(st.text(max_size=5))] = draw(JSON)
    elif spoil == "missing":
        del entry[draw(st.sampled_from(sorted(entry)))]
    elif spoil is not None:
        entry[spoil] = draw(JSON)
    return entry


@st.composite
def safetensors_files(draw):
    """The bytes of a file that claims to be safetensors: a length, a header, then data."""
    form = draw(st.sampled_from(["entries", "valid-ish", "json", "raw", "deep"]))
    if form == "entries":
        keys = st.sampled_from(["s.lora_A.weight", "s.lora_B.weight", "__metadata__", "x"]) | st.text(max_size=6)
        header = json.dumps(draw(st.dictionaries(keys, header_entries() | JSON, max_size=4))).encode()
    elif form == "valid-ish":
        r, m, n = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
        a, b = r * n * 4, m * r * 4
        metadata = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4) | JSON, max_size=2))
        header_data = {"__metadata__": metadata,
                       "s.lora_A.weight": {"dtype": "F32", "shape": [r, n], "data_offsets": [0, a]},
                       "s.lora_B.weight": {"dtype": "F32", "shape": [m, r], "data_offsets": [a, a + b]}}
        key = draw(st.sampled_from(["s.lora_A.weight", "s.lora_B.weight", None]))
        if key is not None:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header_data[key][field] = draw(JSON | st.lists(SMALL, max_size=3))
        header = json.dumps(header_data).encode()
    elif form == "json":
        header = json.dumps(draw(JSON)).encode()
    elif form == "raw":
        header = draw(st.binary(max_size=64))
    else:
        depth = draw(st.integers(1, 200_000))
        header = draw(st.sampled_from([b"[", b'{"a":'])) * depth
    data = draw(st.binary(max_size=96))
    length = len(header) if draw(st.integers(0, 3)) else draw(st.integers(0, 2**64 - 1))  # mostly the true length
    return struct.pack("<Q", length) + header + data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(safetensors_files())
def test_every_safetensors_header_gives_an_adapter_or_a_format_error(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("st") / "a.safetensors"
    path.write_bytes(blob)
    try:
        adapter = read_adapter(path)
    except AdapterFormatError as exc:
        assert str(exc) and "\n" not in str(exc), str(exc)
    except Exception as exc:  # noqa: BLE001 - anything else is a defect
        pytest.fail(f"{type(exc).__name__} instead of an AdapterFormatError: {exc}")
    else:
        assert all(d.A.ndim == 2 and d.B.ndim == 2 for d in adapter.deltas.values())


# ----------------------------------------------------------------------------- corrupted artefacts
def _snapshot(pipe):
    state = {f"{c}.{n}": p.detach().clone() for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters()}
    return state


def _untouched(pipe, state) -> bool:
    now = _snapshot(pipe)
    hooks = [m for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules() if m._forward_hooks]
    return not hooks and all(torch.equal(now[k], v) for k, v in state.items())


def _truncate(folder):
    path = folder / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def _flip(folder):
    path = folder / "pytorch_lora_weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(bytes(data))


def _header(folder):
    """Rewrite the adapter with another recipe hash in its header, and record the new file hash."""
    from erasepro_hub.adapters.lora import file_sha256
    from erasepro_hub.manifest import dump_yaml, load_manifest, to_data
    from erasepro_hub.manifest.schema import Manifest

    path = folder / "pytorch_lora_weights.safetensors"
    save_adapter(path, read_adapter(path).deltas, recipe_sha256="a" * 64, version="x")
    data = to_data(load_manifest(folder))
    data["outputs"]["files"]["pytorch_lora_weights.safetensors"] = file_sha256(path)
    (folder / "erasepro.yaml").write_text(dump_yaml(Manifest.model_validate(data)))


def _recipe(folder):
    path = folder / "erasepro.yaml"
    path.write_text(path.read_text().replace("target: Vincent van Gogh", "target: Claude Monet"))


def _other_weights(pipe):
    with torch.no_grad():
        pipe.text_encoder.get_submodule("encoder.layers.2.mlp.fc2").weight[5, 5] += 0.01


@pytest.mark.parametrize(
    "name, damage, error, message",
    [
        ("truncated", _truncate, VerificationError, "was modified"),
        ("bit flip", _flip, VerificationError, "was modified"),
        ("tampered header", _header, VerificationError, "made from another recipe"),
        ("edited manifest", _recipe, VerificationError, "was edited after"),
    ],
)
def test_corrupted_artefacts_leave_the_pipeline_untouched(demo_folder, tmp_path, name, damage, error, message):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    damage(folder)
    pipe = load_builtin("tiny-sd")[0]
    state = _snapshot(pipe)
    with pytest.raises(error, match=message):
        load_erasure(pipe, folder)
    assert _untouched(pipe, state)


def test_truncated_file_read_directly_is_a_format_error(demo_folder, tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes((demo_folder / "pytorch_lora_weights.safetensors").read_bytes()[:1000])
    with pytest.raises(AdapterFormatError, match="truncated"):
        read_adapter(path)


@pytest.mark.parametrize("other", ["shape", "weights"])
def test_adapter_for_another_base_is_refused_before_anything_changes(demo_folder, other):
    if other == "shape":
        pipe = load_builtin("tiny-sdxl")[0]
        match = "shape|no module|another"
    else:
        pipe = load_builtin("tiny-sd")[0]
        _other_weights(pipe)
        match = "layers.2.mlp.fc2"
    components = ("unet", "text_encoder")
    state = {f"{c}.{n}": p.detach().clone() for c in components for n, p in getattr(pipe, c).named_parameters()}
    with pytest.raises(BaseMismatchError, match=match):
        load_erasure(pipe, demo_folder)
    assert _untouched(pipe, state)


# ----------------------------------------------------------------------------- interrupted writes
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import erasepro_hub.output as E
    real = E.write_card
    def die(*args, **kwargs):
        real(*args, **kwargs)            # every file of the folder is written ...
        os.kill(os.getpid(), signal.SIGKILL)   # ... and the process dies before the folder is moved into place
    E.write_card = die
    from erasepro_hub.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_killing_erase_mid_write_never_leaves_a_complete_looking_folder(demo_folder, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-c", KILLER, "erase", str(DEMO), "--out", str(out)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(name.startswith(".out.erasepro-tmp-") for name in leftovers), leftovers
    # with --overwrite, the existing complete folder survives a kill untouched
    shutil.copytree(demo_folder, out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = subprocess.run([sys.executable, "-c", KILLER, "erase", str(DEMO), "--out", str(out), "--overwrite"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


# ----------------------------------------------------------------------------- Hub faults on pull
@pytest.fixture(scope="module")
def pushed(demo_folder, tmp_path_factory):
    from erasepro_hub.api import push

    folder = tmp_path_factory.mktemp("pushed") / "f"
    shutil.copytree(demo_folder, folder)
    old = os.environ.get("HF_TOKEN")
    os.environ["HF_TOKEN"] = TOKENS["alice"]
    try:
        return "alice/pull-faults", push(folder, "alice/pull-faults", tag="v1").commit
    finally:
        os.environ.pop("HF_TOKEN") if old is None else os.environ.__setitem__("HF_TOKEN", old)


@pytest.mark.parametrize(
    "step, kind",
    # the routes a pull by tag calls, in order: resolve the tag, list the tree, HEAD/GET each file, the blob
    [("repo-info-rev", "500"), ("repo-info-rev", "drop"), ("tree", "500"), ("tree", "drop"), ("resolve", "500"),
     ("resolve", "drop"), ("resolve", "slow"), ("blob", "500"), ("blob", "drop"), ("blob", "slow")],
)
def test_pull_faults_give_a_clear_error_and_the_retry_succeeds(pushed, hub, step, kind, tmp_path, monkeypatch, no_backoff):
    from erasepro_hub.hub.pull import pull

    repo_id, sha = pushed
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # nothing cached: every file comes from the server
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    hub.faults.slow_seconds = 5.0
    hub.faults.add(step, kind, match=None)
    try:
        with pytest.raises(HubError) as exc:
            pull(f"{repo_id}@v1", tmp_path / "out")
    finally:
        hub.faults.clear()
    message = str(exc.value)
    assert "run the same command again" in message
    assert TOKENS["alice"] not in message
    assert not (tmp_path / "out").exists()
    assert pull(f"{repo_id}@v1", tmp_path / "out").commit == sha


# ----------------------------------------------------------------------------- security
def test_no_pickle_is_loaded_during_erase_load_push_and_pull(demo_folder, tmp_path, monkeypatch):
    import pickle

    from erasepro_hub.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle loading was attempted")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    out = tmp_path / "e"
    assert main(["erase", str(DEMO), "--out", str(out)]) == 0
    load_erasure(load_builtin("tiny-sd")[0], out)
    assert main(["push", str(out), "alice/no-pickle"]) == 0
    assert main(["pull", "alice/no-pickle", "--out", str(tmp_path / "p")]) == 0


def test_every_output_is_free_of_the_token(demo_folder, tmp_path, monkeypatch, capfd):
    from erasepro_hub.cli import main

    token = TOKENS["alice"]
    monkeypatch.setenv("HF_TOKEN", token)
    folder = tmp_path / "f"
    assert main(["-v", "erase", str(DEMO), "--out", str(folder)]) == 0
    assert main(["-v", "push", str(folder), "alice/token-scan", "--tag", "v1"]) == 0
    assert main(["-v", "pull", "alice/token-scan@v1", "--out", str(tmp_path / "p")]) == 0
    assert main(["-v", "card", str(folder), "--repo-id", "alice/token-scan"]) == 0
    assert main(["-v", "inspect", str(folder)]) == 0
    captured = capfd.readouterr()
    outputs = [captured.out, captured.err]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            outputs.append(path.read_bytes().decode("latin-1"))
    assert not [text for text in outputs if token in text]


def test_templates_never_evaluate_user_strings():
    from test_cards import fixed_manifest

    from erasepro_hub.cards.render import render_card

    payload = "{{ ''.__class__.__mro__ }} {% for x in range(3) %}X{{x}}Y{% endfor %}"
    manifest = fixed_manifest(concepts=[{"target": payload, "anchor": "art"}], description=payload)
    text = render_card(manifest)
    # verbatim in the manifest block (data, not template source): the YAML there reads back to the payload
    block = text.split("yaml\n", 1)[1].split("\n```", 1)[0]
    recipe = yaml.safe_load(block)
    assert recipe["description"] == payload and recipe["concepts"][0]["target"] == payload
    assert "X0Y" not in text and "<class" not in text
