"""Evaluation prompt sets from local files and from a Hub dataset pinned to a commit."""

from __future__ import annotations

import json

import pytest

from erasepro_hub.errors import ManifestError
from erasepro_hub.metrics.prompt_sets import load_prompt_set, parse_dataset_ref, rows_to_prompt_set

from conftest import TOKENS

CONCEPTS = [("Vincent van Gogh", "a painting"), ("parachute", "")]
ROWS = [
    {"prompt": "The Starry Night by VINCENT VAN GOGH"},
    {"prompt": "a photo of a parashute", "anchor_prompt": "a photo of a"},
    {"prompt": "a bowl of ramen"},
    {"prompt": "a parachute in the sky", "set": "preserve"},
]


def test_rows_are_classified():
    result = rows_to_prompt_set(ROWS, CONCEPTS)
    assert [(p.target, p.anchor) for p in result.heldout] == [
        ("The Starry Night by VINCENT VAN GOGH", "The Starry Night by a painting"),
        ("a photo of a parashute", "a photo of a"),
    ]
    assert [p.text for p in result.preserve] == ["a bowl of ramen", "a parachute in the sky"]


def test_bad_rows_name_the_row():
    with pytest.raises(ManifestError, match="row 0: held-out prompt"):
        rows_to_prompt_set([{"prompt": "Van Gog", "set": "heldout"}], CONCEPTS)
    with pytest.raises(ManifestError, match="row 1: 'prompt'"):
        rows_to_prompt_set([{"prompt": "ok"}, {"prompt": ""}], CONCEPTS)
    with pytest.raises(ManifestError, match="set must be"):
        rows_to_prompt_set([{"prompt": "ok", "set": "train"}], CONCEPTS)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path, suffix):
    import datasets

    path = tmp_path / f"prompts{suffix}"
    rows = [{"prompt": r["prompt"], "anchor_prompt": r.get("anchor_prompt"), "set": r.get("set")} for r in ROWS]
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        table = datasets.Dataset.from_list(rows)
        table.to_csv(str(path), index=False) if suffix == ".csv" else table.to_parquet(str(path))
    result = load_prompt_set(str(path), CONCEPTS)
    assert len(result.heldout) == 2 and len(result.preserve) == 2


def test_unsupported_and_missing(tmp_path):
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(ManifestError, match="unsupported file type"):
        load_prompt_set(str(tmp_path / "p.txt"), CONCEPTS)
    with pytest.raises(ManifestError, match="not a file"):
        load_prompt_set(str(tmp_path / "missing.json"), CONCEPTS)
    (tmp_path / "q.json").write_text(json.dumps([{"text": "x"}]))
    with pytest.raises(ManifestError, match="'prompt' column"):
        load_prompt_set(str(tmp_path / "q.json"), CONCEPTS)


def test_dataset_refs():
    assert parse_dataset_ref("org/prompts@v1:test") == ("org/prompts", "v1", "test")
    assert parse_dataset_ref("org/prompts") == ("org/prompts", None, "train")


def test_hub_dataset_pinned_to_a_commit(hub, monkeypatch, tmp_path):
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(token=TOKENS["alice"])
    api.create_repo("alice/eval-prompts", repo_type="dataset", exist_ok=True)
    first = api.create_commit(
        "alice/eval-prompts", [CommitOperationAdd("prompts.csv", b"prompt\nThe Starry Night by Vincent van Gogh\na cat\n")],
        commit_message="v1", repo_type="dataset",
    ).oid
    api.create_commit(
        "alice/eval-prompts", [CommitOperationAdd("prompts.csv", b"prompt\na dog\n")], commit_message="v2",
        repo_type="dataset",
    )
    start = len(hub.requests)
    result = load_prompt_set(f"alice/eval-prompts@{first}", CONCEPTS)
    assert result.revision == first
    assert [p.target for p in result.heldout] == ["The Starry Night by Vincent van Gogh"]
    assert [p.text for p in result.preserve] == ["a cat"]
    latest = load_prompt_set("alice/eval-prompts", CONCEPTS)
    assert [p.text for p in latest.preserve] == ["a dog"] and latest.revision != first
    assert not [r for r in hub.requests[start:] if r.route == "UNKNOWN"]
