"""What each check proves, tried as a hostile user would: forged folders, repositories and pipelines.

Every refusal leaves the pipeline as it was: its outputs before and after the refused call are compared.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import forge, read_tensors
from erasepro_hub import load_erasure, unload_erasure
from erasepro_hub.api import push
from erasepro_hub.cli import main
from erasepro_hub.errors import BaseMismatchError, HubError, UnsafePathError, VerificationError
from erasepro_hub.hub.client import hub_errors
from erasepro_hub.hub.pull import pull
from erasepro_hub.models.loading import load_builtin

_names = itertools.count()
ADAPTER = "pytorch_lora_weights.safetensors"


def repo() -> str:
    return f"alice/trust-{next(_names)}"


@pytest.fixture
def own_cache(monkeypatch, tmp_path):
    """A Hub cache of this test's own (so that what it deletes or keeps is its own)."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def copy(folder: Path, tmp_path: Path, name: str = "g") -> Path:
    out = tmp_path / name
    shutil.copytree(folder, out)
    return out


def outputs_of(pipe) -> torch.Tensor:
    """What the text encoder and one cross-attention key make of a prompt (the pipeline's state, observed)."""
    ids = pipe.tokenizer(["a painting by Vincent van Gogh"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = pipe.text_encoder(ids)[0]
        attn = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2"))
        return torch.cat([embeds.flatten(), attn.to_k(embeds).flatten()])


def assert_refused_untouched(pipe, folder, error, match):
    before = outputs_of(pipe)
    with pytest.raises(error, match=match):
        load_erasure(pipe, folder)
    assert torch.equal(outputs_of(pipe), before)


# ----------------------------------------------------------------------------- the folder's own claims
def test_verify_takes_its_tolerance_from_code_not_from_the_folder(demo_folder, tmp_path, capsys):
    folder = copy(demo_folder, tmp_path)
    tensors, _ = read_tensors(folder / ADAPTER)
    forged = {k: v * 10 if ".lora_B." in k or k.endswith(".up.weight") else v for k, v in tensors.items()}

    def loosen(data):  # a folder that says its check may be loose has no say
        data["outputs"].pop("regenerate_atol", None)

    forge(folder, tensors=forged, edit_manifest=loosen, restamp=True)
    assert main(["inspect", str(folder)]) == 0  # consistent files: integrity holds ...
    capsys.readouterr()
    assert main(["regenerate", str(folder), "--verify"]) == 1  # ... but recomputation does not
    err = capsys.readouterr().err
    assert "verified" not in err.splitlines()[-1] and "tolerance" in err


def test_a_folder_cannot_carry_its_own_tolerance(demo_folder, tmp_path, capsys):
    folder = copy(demo_folder, tmp_path)
    data = yaml.safe_load((folder / "erasepro.yaml").read_text())
    data["outputs"]["regenerate_atol"] = 1e9
    (folder / "erasepro.yaml").write_text(yaml.safe_dump(data))
    assert main(["regenerate", str(folder), "--verify"]) == 2
    assert "regenerate_atol" in capsys.readouterr().err


def test_edited_metrics_fail_inspect_and_the_loader(demo_folder, tmp_path, capsys):
    folder = copy(demo_folder, tmp_path)
    text = (folder / "erasepro.yaml").read_text()
    data = yaml.safe_load(text)
    data["metrics"]["residual_train"] = 0.5
    (folder / "erasepro.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["inspect", str(folder)]) == 1
    assert "integrity check failed" in capsys.readouterr().err
    pipe, _ = load_builtin("tiny-sd")
    assert_refused_untouched(pipe, folder, VerificationError, "outputs or metrics were edited")


def test_edited_outputs_fail_even_when_the_file_hashes_are_updated(demo_folder, tmp_path):
    folder = copy(demo_folder, tmp_path)

    def shrink(data):
        data["outputs"]["sites"][0]["residual"] = 0.0

    forge(folder, edit_manifest=shrink)
    pipe, _ = load_builtin("tiny-sd")
    assert_refused_untouched(pipe, folder, VerificationError, "outputs or metrics were edited")


@pytest.mark.parametrize("site", ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "vae.decoder.mid_block.attentions.0.to_q"])
def test_sites_the_manifest_does_not_record_are_refused(demo_folder, tmp_path, site, capsys):
    folder = copy(demo_folder, tmp_path)
    tensors, _ = read_tensors(folder / ADAPTER)
    pipe, _ = load_builtin("tiny-sd")
    from erasepro_hub.adapters.apply import resolve_site

    try:
        width = resolve_site(pipe, site).weight.shape
    except BaseMismatchError:
        width = (32, 32)
    tensors[f"{site}.lora_A.weight"] = torch.ones(1, width[1])
    tensors[f"{site}.lora_B.weight"] = torch.ones(width[0], 1)
    forge(folder, tensors=tensors)
    assert_refused_untouched(pipe, folder, VerificationError, "does not record")
    assert main(["inspect", str(folder)]) == 1


# ----------------------------------------------------------------------------- the loader
def test_the_loader_refuses_to_stack_on_a_diffusers_lora(demo_folder):
    pipe, _ = load_builtin("tiny-sd")
    pipe.load_lora_weights(demo_folder, weight_name=ADAPTER)
    assert_refused_untouched(pipe, demo_folder, BaseMismatchError, "unload_lora_weights")
    pipe.unload_lora_weights()
    applied = load_erasure(pipe, demo_folder)  # once the first is gone, the verified loader applies it once
    applied.remove()


def test_the_loader_refuses_to_apply_an_erasure_twice(demo_folder, demo_uce_folder):
    pipe, _ = load_builtin("tiny-sd")
    load_erasure(pipe, demo_folder)
    assert_refused_untouched(pipe, demo_folder, BaseMismatchError, "already carries the erasure")
    assert_refused_untouched(pipe, demo_uce_folder, BaseMismatchError, "already carries the erasure")
    assert unload_erasure(pipe) == 1
    load_erasure(pipe, demo_uce_folder).remove()


# ----------------------------------------------------------------------------- pull
def _add_files(repo_id: str, files: dict[str, bytes]) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
    return HfApi().create_commit(repo_id, ops, commit_message="extra").oid


@pytest.mark.parametrize("extra", [{"evil.sh": b"#!/bin/sh\nrm -rf ~\n", "big.bin": b"\0" * 3_000_000}, {"sub/x": b"x"}])
def test_pull_refuses_a_repository_with_unexpected_entries(demo_folder, tmp_path, as_alice, own_cache, hub, extra, capsys):
    repo_id = repo()
    push(copy(demo_folder, tmp_path), repo_id)
    _add_files(repo_id, extra)
    start = len(hub.requests)
    assert main(["pull", repo_id, "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "not part of the erasure" in err and "Traceback" not in err and "verified" not in err
    assert not (tmp_path / "out").exists()
    fetched = [r.path for r in hub.requests[start:] if r.route in ("resolve", "blob")]
    assert not [p for p in fetched if any(name in p for name in extra)], fetched  # never downloaded
    assert not list(own_cache.rglob("evil.sh")) and not list(own_cache.rglob("big.bin"))


def test_pull_refuses_names_that_leave_the_folder(demo_folder, tmp_path, as_alice, own_cache, capsys):
    repo_id = repo()
    folder = copy(demo_folder, tmp_path)
    push(folder, repo_id)
    data = yaml.safe_load((folder / "erasepro.yaml").read_text())
    data["outputs"]["files"]["../escape"] = "0" * 64
    _add_files(repo_id, {"erasepro.yaml": yaml.safe_dump(data).encode()})
    with pytest.raises(UnsafePathError):
        pull(repo_id, tmp_path / "out")
    assert main(["pull", repo_id, "--out", str(tmp_path / "out")]) == 2
    assert "connection" not in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_commit_never_damages_a_good_one_in_the_cache(demo_folder, tmp_path, as_alice, own_cache, monkeypatch):
    repo_id = repo()
    good = push(copy(demo_folder, tmp_path), repo_id).commit
    pull(f"{repo_id}@{good}", tmp_path / "a")
    bad = _add_files(repo_id, {"metrics.json": b'{"residual_train": 0.0}\n'})
    with pytest.raises(VerificationError):
        pull(f"{repo_id}@{bad}", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert pull(f"{repo_id}@{good}", tmp_path / "a-again").commit == good  # from the cache, offline


# ----------------------------------------------------------------------------- push
def test_a_push_that_fails_its_tag_precondition_makes_no_commit(demo_folder, tmp_path, as_alice, hub, capsys):
    repo_id = repo()
    folder = copy(demo_folder, tmp_path)
    assert main(["push", str(folder), repo_id, "--tag", "v1"]) == 0
    assert main(["push", str(folder), repo_id]) == 0  # the card now names main: a new commit
    stored = hub.store.repos[("model", repo_id)]
    before = (dict(stored.branches), dict(stored.tags), len(stored.commits))
    capsys.readouterr()
    assert main(["push", str(folder), repo_id, "--tag", "v1"]) == 2
    assert "nothing was committed" in capsys.readouterr().err
    assert (dict(stored.branches), dict(stored.tags), len(stored.commits)) == before


def test_the_same_push_to_the_same_tag_is_idempotent(demo_folder, tmp_path, as_alice, hub):
    repo_id = repo()
    folder = copy(demo_folder, tmp_path)
    first = push(folder, repo_id, tag="v1")
    again = push(folder, repo_id, tag="v1")
    assert again.commit == first.commit and not again.new_commit


def test_an_unreadable_push_record_never_fails_a_push(demo_folder, tmp_path, as_alice, capsys):
    folder = copy(demo_folder, tmp_path)
    (folder / ".erasepro").mkdir(exist_ok=True)
    (folder / ".erasepro" / "pushes.json").write_text("")  # left by a push killed mid-write
    assert main(["push", str(folder), repo()]) == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "unreadable" in captured.err and "Traceback" not in captured.err
    sha = captured.out.strip()
    assert len(sha) == 40
    assert json.loads((folder / ".erasepro" / "pushes.json").read_text())[-1]["commit"] == sha


def test_programming_errors_are_not_reported_as_connection_failures():
    with pytest.raises(ValueError, match="a bug"):
        with hub_errors("commit", "alice/x"):
            raise ValueError("a bug")
    with pytest.raises(KeyError):
        with hub_errors("commit", "alice/x"):
            raise KeyError("a bug")
    with pytest.raises(HubError, match="connection to the Hub failed"):
        with hub_errors("commit", "alice/x"):
            raise ConnectionResetError("peer reset")


def test_a_connection_failure_never_drops_a_good_cached_commit(demo_folder, tmp_path, as_alice, own_cache, hub, monkeypatch, no_backoff):
    repo_id = repo()
    good = push(copy(demo_folder, tmp_path), repo_id).commit
    pull(f"{repo_id}@{good}", tmp_path / "a")
    hub.faults.add("tree", "500", match=None)
    try:
        with pytest.raises(HubError, match="run the same command again"):
            pull(f"{repo_id}@{good}", tmp_path / "b")
    finally:
        hub.faults.clear()
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert pull(f"{repo_id}@{good}", tmp_path / "c").commit == good  # still whole in the cache
