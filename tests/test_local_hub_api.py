"""The local Hub answers the rest of the client's repository API as the real Hub does, driven by ``HfApi``:
branch and tag deletion, repository settings, model listing, card metadata in ``model_info``, file copies
inside a commit, and pull requests (``create_pr=True``, ``refs/pr/N`` readable as a revision).

Each test checks the server's store afterwards, not only what the client reports.
"""

from __future__ import annotations

import hashlib
import itertools
import os

import pytest

from conftest import TOKENS

_names = itertools.count()

CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
license: mit
base_model: runwayml/stable-diffusion-v1-5
tags:
- lora
- concept-erasure
---
# An erasure
"""


@pytest.fixture(autouse=True, scope="module")
def contract(hub):
    """Every request the client made during this module hit a route the server knows."""
    start = len(hub.requests)
    yield
    unknown = [r for r in hub.requests[start:] if r.route == "UNKNOWN"]
    assert not unknown, f"the client called routes the test Hub does not know: {unknown}"


@pytest.fixture
def login(monkeypatch):
    """``login("alice")`` makes the client act as alice; ``login(None)`` anonymously."""

    def as_user(user: str | None) -> None:
        if user is None:
            monkeypatch.delenv("HF_TOKEN", raising=False)
        else:
            monkeypatch.setenv("HF_TOKEN", TOKENS[user])

    as_user("alice")
    return as_user


@pytest.fixture
def api():
    from huggingface_hub import HfApi

    return HfApi()


def new_repo(api, *, private: bool = False, prefix: str = "api") -> str:
    repo_id = f"alice/{prefix}-{next(_names)}"
    api.create_repo(repo_id, private=private)
    return repo_id


def stored(hub, repo_id: str):
    return hub.store.repos[("model", repo_id)]


def add(path: str, data: bytes):
    from huggingface_hub import CommitOperationAdd

    return CommitOperationAdd(path_in_repo=path, path_or_fileobj=data)


def status_of(excinfo) -> int:
    return excinfo.value.response.status_code


# ----------------------------------------------------------------------------- branches and tags
def test_delete_branch(hub, api, login):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = new_repo(api)
    api.create_branch(repo_id, branch="dev")
    api.create_branch(repo_id, branch="release/v1")
    repo = stored(hub, repo_id)
    main = repo.branches["main"]
    assert {"dev", "release/v1"} <= set(repo.branches)

    api.delete_branch(repo_id, branch="dev")
    api.delete_branch(repo_id, branch="release/v1")  # a name with a slash, sent percent-encoded
    assert set(repo.branches) == {"main"} and repo.branches["main"] == main
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]

    with pytest.raises(RevisionNotFoundError):
        api.delete_branch(repo_id, branch="dev")  # gone
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.delete_branch(repo_id, branch="main")  # the default branch stays
    assert status_of(excinfo) == 403 and repo.branches["main"] == main

    api.create_branch(repo_id, branch="keep")
    login("bob")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.delete_branch(repo_id, branch="keep")
    assert status_of(excinfo) == 403
    login(None)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.delete_branch(repo_id, branch="keep")
    assert status_of(excinfo) == 401
    assert "keep" in repo.branches

    login("alice")
    private = new_repo(api, private=True)
    api.create_branch(private, branch="keep")
    login("bob")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_branch(private, branch="keep")
    assert "keep" in stored(hub, private).branches


def test_delete_tag(hub, api, login):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = new_repo(api)
    api.create_tag(repo_id, tag="v1")
    api.create_tag(repo_id, tag="v2")
    repo = stored(hub, repo_id)
    api.delete_tag(repo_id, tag="v1")
    assert set(repo.tags) == {"v2"}
    assert [t.name for t in api.list_repo_refs(repo_id).tags] == ["v2"]
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(repo_id, tag="v1")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="v1")

    login("bob")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.delete_tag(repo_id, tag="v2")
    assert status_of(excinfo) == 403
    login(None)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.delete_tag(repo_id, tag="v2")
    assert status_of(excinfo) == 401
    assert set(repo.tags) == {"v2"}

    login("alice")
    private = new_repo(api, private=True)
    api.create_tag(private, tag="v1")
    login("bob")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_tag(private, tag="v1")
    assert set(stored(hub, private).tags) == {"v1"}


# ----------------------------------------------------------------------------- settings
def test_update_repo_settings_visibility_and_gating(hub, api, login, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    from erasepro_hub.testing.store import Store

    repo_id = new_repo(api)
    api.create_commit(repo_id, [add("weights.txt", b"payload\n")], commit_message="add")
    repo = stored(hub, repo_id)

    api.update_repo_settings(repo_id, private=True)
    assert repo.private is True
    assert api.model_info(repo_id).private is True
    login("bob")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):  # a private repository stays invisible to its settings too
        api.update_repo_settings(repo_id, private=False)
    assert repo.private is True

    login("alice")
    api.update_repo_settings(repo_id, private=False, gated="manual")
    assert repo.private is False and repo.gated == "manual"
    assert api.model_info(repo_id).gated == "manual"
    reloaded = Store(hub.store.root, users={}).repos[("model", repo_id)]  # written to disk
    assert reloaded.private is False and reloaded.gated == "manual"

    # a gated repository: its metadata is public, its files are for those with access
    assert hf_hub_download(repo_id, "weights.txt", cache_dir=tmp_path / "alice") is not None
    login("bob")
    assert api.model_info(repo_id).gated == "manual"
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "weights.txt", cache_dir=tmp_path / "bob")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.update_repo_settings(repo_id, gated=False)
    assert status_of(excinfo) == 403
    login(None)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.update_repo_settings(repo_id, gated=False)
    assert status_of(excinfo) == 401
    assert repo.gated == "manual"

    login("alice")
    api.update_repo_settings(repo_id, gated=False)
    assert repo.gated is False
    login("bob")
    assert hf_hub_download(repo_id, "weights.txt", cache_dir=tmp_path / "bob2") is not None


# ----------------------------------------------------------------------------- card metadata and listing
def test_model_info_reads_the_card_of_that_revision(hub, api, login):
    repo_id = new_repo(api)
    before = api.model_info(repo_id)
    assert before.library_name is None and before.pipeline_tag is None and before.card_data is None
    first = api.create_commit(repo_id, [add("README.md", CARD.encode())], commit_message="card")
    plain = CARD.replace("library_name: diffusers", "library_name: peft").replace("- lora\n", "")
    api.create_commit(repo_id, [add("README.md", plain.encode())], commit_message="card 2")

    info = api.model_info(repo_id, revision=first.oid)
    assert info.sha == first.oid
    assert info.library_name == "diffusers" and info.pipeline_tag == "text-to-image"
    assert {"lora", "concept-erasure", "diffusers", "text-to-image", "license:mit"} <= set(info.tags)
    assert info.card_data.base_model == "runwayml/stable-diffusion-v1-5" and info.card_data.license == "mit"
    latest = api.model_info(repo_id)
    assert latest.sha == stored(hub, repo_id).branches["main"]
    assert latest.library_name == "peft" and "lora" not in latest.tags


def test_list_models_author_search_limit_and_visibility(hub, api, login):
    prefix = f"listing{next(_names)}"
    public = [new_repo(api, prefix=prefix) for _ in range(2)]
    private = new_repo(api, prefix=prefix, private=True)
    api.create_commit(public[0], [add("README.md", CARD.encode())], commit_message="card")
    login("bob")
    api.create_repo(f"bob/{prefix}-of-bob")
    assert ("model", f"bob/{prefix}-of-bob") in hub.store.repos

    def ids(**kwargs) -> set[str]:
        return {m.id for m in api.list_models(**kwargs)}

    # bob sees alice's public repositories, not her private one
    assert ids(author="alice", search=prefix) == set(public)
    assert ids(search=prefix) == set(public) | {f"bob/{prefix}-of-bob"}
    login(None)
    assert ids(author="alice", search=prefix) == set(public)
    login("alice")
    assert ids(author="alice", search=prefix) == set(public) | {private}
    assert ids(author="alice", search=prefix.upper()) == set(public) | {private}  # search ignores case
    assert len(list(api.list_models(author="alice", search=prefix, limit=2))) == 2
    assert ids(author="nobody-here", search=prefix) == set()

    entry = next(m for m in api.list_models(author="alice", search=prefix) if m.id == public[0])
    assert entry.library_name == "diffusers" and entry.pipeline_tag == "text-to-image"
    assert {"lora", "concept-erasure"} <= set(entry.tags)
    assert entry.card_data is not None and entry.card_data.base_model == "runwayml/stable-diffusion-v1-5"
    assert entry.private is False
    assert hub.store.repos[("model", private)].private is True


# ----------------------------------------------------------------------------- copies
def test_commit_operation_copy_within_the_repository(hub, api, login):
    from huggingface_hub import CommitOperationCopy, hf_hub_download

    repo_id = new_repo(api)
    weights = os.urandom(4096)
    first = api.create_commit(
        repo_id, [add("config.json", b'{"rank": 4}\n'), add("model.safetensors", weights)], commit_message="v1"
    )
    api.create_commit(repo_id, [add("config.json", b'{"rank": 8}\n')], commit_message="v2")
    repo = stored(hub, repo_id)
    assert repo.commits[first.oid].files["model.safetensors"].lfs

    copied = api.create_commit(
        repo_id,
        [
            CommitOperationCopy(src_path_in_repo="config.json", path_in_repo="old/config.json", src_revision=first.oid),
            CommitOperationCopy(src_path_in_repo="model.safetensors", path_in_repo="backup/model.safetensors"),
        ],
        commit_message="copy",
    )
    files = repo.commits[copied.oid].files
    assert repo.branches["main"] == copied.oid
    old, backup = files["old/config.json"], files["backup/model.safetensors"]
    assert not old.lfs and hub.store.read_blob(old.sha256) == b'{"rank": 4}\n'
    assert backup.lfs and backup.sha256 == hashlib.sha256(weights).hexdigest() and backup.size == len(weights)
    assert files["config.json"].sha256 == hashlib.sha256(b'{"rank": 8}\n').hexdigest()
    path = hf_hub_download(repo_id, "backup/model.safetensors", revision=copied.oid)
    assert open(path, "rb").read() == weights


# ----------------------------------------------------------------------------- pull requests
def test_create_pr_lands_on_a_pr_ref_and_main_does_not_move(hub, api, login, tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    from erasepro_hub.testing.store import Store

    repo_id = new_repo(api)
    repo = stored(hub, repo_id)
    main = repo.branches["main"]
    weights = os.urandom(2048)
    first = api.create_commit(
        repo_id, [add("notes.txt", b"proposal\n"), add("model.safetensors", weights)],
        commit_message="proposal", create_pr=True,
    )
    assert first.pr_num == 1 and first.pr_revision == "refs/pr/1"
    assert first.pr_url.endswith(f"/{repo_id}/discussions/1")
    assert repo.branches["main"] == main  # main did not move
    assert repo.pull_requests == {1: first.oid}
    assert repo.commits[first.oid].parents == [main]

    # the PR ref is a revision like any other
    assert api.repo_info(repo_id, revision="refs/pr/1").sha == first.oid
    path = hf_hub_download(repo_id, "notes.txt", revision="refs/pr/1", cache_dir=tmp_path)
    assert open(path, "rb").read() == b"proposal\n"
    path = hf_hub_download(repo_id, "model.safetensors", revision="refs/pr/1", cache_dir=tmp_path)
    assert open(path, "rb").read() == weights
    assert "notes.txt" in api.list_repo_files(repo_id, revision="refs/pr/1")
    assert "notes.txt" not in api.list_repo_files(repo_id)

    # a commit to refs/pr/1 adds to that pull request; a second create_pr opens number 2
    more = api.create_commit(repo_id, [add("more.txt", b"more\n")], commit_message="more", revision="refs/pr/1")
    assert more.pr_num is None and repo.pull_requests[1] == more.oid
    assert repo.commits[more.oid].parents == [first.oid]
    second = api.create_commit(repo_id, [add("other.txt", b"x\n")], commit_message="other", create_pr=True)
    assert second.pr_num == 2 and repo.pull_requests == {1: more.oid, 2: second.oid}
    assert repo.branches["main"] == main

    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    pulls = {(r.ref, r.target_commit) for r in refs.pull_requests}
    assert pulls == {("refs/pr/1", more.oid), ("refs/pr/2", second.oid)}
    assert [b.name for b in refs.branches] == ["main"]
    assert api.list_repo_refs(repo_id).pull_requests is None
    with pytest.raises(HfHubHTTPError) as excinfo:  # a branch may not shadow a pull request's ref
        api.create_branch(repo_id, branch="refs/pr/1")
    assert status_of(excinfo) == 400 and repo.pull_requests[1] == more.oid and set(repo.branches) == {"main"}
    assert Store(hub.store.root, users={}).repos[("model", repo_id)].pull_requests == repo.pull_requests


def test_pull_requests_need_write_access_and_a_branch(hub, api, login):
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = new_repo(api)
    repo = stored(hub, repo_id)
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(repo_id, [add("a.txt", b"a\n")], commit_message="x", revision="refs/pr/7")
    login("bob")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(repo_id, [add("a.txt", b"a\n")], commit_message="x", create_pr=True)
    assert status_of(excinfo) == 403
    assert repo.pull_requests == {} and len(repo.commits) == 1

    login("alice")
    private = new_repo(api, private=True)
    api.create_commit(private, [add("a.txt", b"a\n")], commit_message="x", create_pr=True)
    login("bob")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info(private, revision="refs/pr/1")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs(private, include_pull_requests=True)
