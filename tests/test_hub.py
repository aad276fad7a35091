"""Publishing against the local Hub-compatible server, driven by the real huggingface_hub client."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import kv_residuals

from erasepro_hub.cli import main
from erasepro_hub.errors import HubError, VerificationError
from erasepro_hub.api import push
from erasepro_hub.hub.publish import PushResult
from erasepro_hub.hub.pull import pull
from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.loading import load_builtin

from conftest import TOKENS

_names = itertools.count()


def repo(user: str = "alice") -> str:
    return f"{user}/erasure-{next(_names)}"


@pytest.fixture(autouse=True, scope="module")
def contract(hub):
    """Every request the client made during this module hit a route the server knows."""
    start = len(hub.requests)
    yield
    unknown = [r for r in hub.requests[start:] if r.route == "UNKNOWN"]
    assert not unknown, f"the client called routes the test Hub does not know: {unknown}"


def published(folder: Path) -> dict[str, bytes]:
    names = ["erasepro.yaml", "pytorch_lora_weights.safetensors", "metrics.json", "README.md", "delta_norms.png"]
    return {name: (folder / name).read_bytes() for name in names}


def remote_state(hub, repo_id: str):
    repo = hub.store.repos[("model", repo_id)]
    return dict(repo.branches), dict(repo.tags), len(repo.commits)


# ----------------------------------------------------------------------------- push / pull
def test_push_pull_round_trip_and_old_revisions(demo_folder, demo_uce_folder, tmp_path, as_alice):
    repo_id = repo()
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    shutil.copytree(demo_folder, first_dir)
    shutil.copytree(demo_uce_folder, second_dir)
    first = push(first_dir, repo_id)
    assert first.new_commit and len(first.commit) == 40
    pulled = pull(repo_id, tmp_path / "pulled")
    assert pulled.commit == first.commit
    assert published(tmp_path / "pulled") == published(first_dir)  # byte-identical
    second = push(second_dir, repo_id)
    assert second.commit != first.commit
    again = pull(f"{repo_id}@{first.commit}", tmp_path / "old")
    assert published(tmp_path / "old") == published(first_dir)
    latest = pull(repo_id, tmp_path / "new")
    assert latest.commit == second.commit and published(tmp_path / "new") == published(second_dir)
    # every revision is recorded as the commit sha it resolved to
    record = json.loads((tmp_path / "old" / ".erasepro" / "pull.json").read_text())
    assert record[-1]["commit"] == first.commit and again.commit == first.commit


def test_repushing_unchanged_content_makes_no_new_commit(demo_folder, tmp_path, as_alice, hub):
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    first = push(folder, repo_id)
    state = remote_state(hub, repo_id)
    second = push(folder, repo_id)
    assert second.commit == first.commit and not second.new_commit
    assert remote_state(hub, repo_id) == state
    pushes = json.loads((folder / ".erasepro" / "pushes.json").read_text())
    assert [p["commit"] for p in pushes] == [first.commit, first.commit]


def test_push_is_one_commit_with_every_file(demo_folder, tmp_path, as_alice, hub):
    from huggingface_hub import HfApi

    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    result = push(folder, repo_id, tag="v1", branch="release")
    api = HfApi()
    commits = api.list_repo_commits(repo_id, revision="release")
    assert len(commits) == 2  # the repository's initial commit, then ours
    files = set(api.list_repo_files(repo_id, revision=result.commit))
    assert {"erasepro.yaml", "pytorch_lora_weights.safetensors", "metrics.json", "README.md", "delta_norms.png"} <= files
    assert {t.name: t.target_commit for t in api.list_repo_refs(repo_id).tags} == {"v1": result.commit}
    assert api.repo_info(repo_id, revision="v1").sha == result.commit
    assert not [p for p in files if p.startswith(".erasepro")]


def test_push_refuses_a_folder_that_does_not_match_its_manifest(demo_folder, tmp_path, as_alice):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    (folder / "metrics.json").write_text("{}")
    with pytest.raises(VerificationError, match="metrics.json was modified"):
        push(folder, repo())


def test_cli_push_pull_regenerate(demo_folder, tmp_path, as_alice, capsys):
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    assert main(["push", str(folder), repo_id, "--tag", "v1"]) == 0
    sha = capsys.readouterr().out.strip()
    assert len(sha) == 40
    assert main(["pull", f"{repo_id}@v1", "--out", str(tmp_path / "p")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "p")
    assert main(["regenerate", f"{repo_id}@{sha}", "--verify", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["pull", f"{repo_id}@no-such-tag", "--out", str(tmp_path / "q")]) == 2
    assert "revision not found" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# ----------------------------------------------------------------------------- loading from the Hub
def test_plain_diffusers_loads_from_the_hub_by_commit(demo_folder, tmp_path, as_alice):
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    sha = push(folder, repo_id).commit
    original, edited = load_builtin("tiny-sd")[0], load_builtin("tiny-sd")[0]
    edited.load_lora_weights(repo_id, weight_name="pytorch_lora_weights.safetensors", revision=sha)
    residuals, _ = kv_residuals(demo_folder, edited, original)
    assert max(residuals.values()) <= 1e-5


def test_load_adapter_from_the_hub_is_verified(demo_folder, tmp_path, as_alice, hub):
    from erasepro_hub import load_erasure

    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    sha = push(folder, repo_id, tag="v1").commit
    pipe = load_builtin("tiny-sd")[0]
    handle = load_erasure(pipe, repo_id, revision="v1")
    assert handle.source == f"{repo_id}@{sha}"
    residuals, _ = kv_residuals(demo_folder, pipe, load_builtin("tiny-sd")[0])
    assert max(residuals.values()) <= 1e-5
    handle.remove()
    # a pipeline with other weights is refused before anything changes, as for folders
    other = load_builtin("tiny-sd")[0]
    with torch.no_grad():
        other.text_encoder.get_submodule("encoder.layers.1.mlp.fc2").weight[0, 0] += 1.0
    from erasepro_hub.errors import BaseMismatchError

    with pytest.raises(BaseMismatchError, match="layers.1.mlp.fc2"):
        load_erasure(other, repo_id, revision=sha)


def test_tampered_download_fails_the_checksum(demo_folder, tmp_path, as_alice, hub, no_backoff):
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    sha = push(folder, repo_id).commit
    adapter_oid = load_manifest(folder).outputs.files["pytorch_lora_weights.safetensors"]
    hub.faults.add("blob", "tamper", times=1, match=adapter_oid)
    try:
        with pytest.raises(VerificationError, match="pytorch_lora_weights.safetensors was modified"):
            pull(f"{repo_id}@{sha}", tmp_path / "bad")
    finally:
        hub.faults.clear()
    assert not (tmp_path / "bad").exists()
    # the corrupted copy was dropped from the cache: the next pull downloads it again and succeeds
    assert pull(f"{repo_id}@{sha}", tmp_path / "good").commit == sha


# ----------------------------------------------------------------------------- hub models as base
@pytest.fixture(scope="module")
def hub_base(tmp_path_factory, hub):
    """builtin:tiny-sd saved as a diffusers folder (with a licence in its card) and pushed to the local Hub."""
    from huggingface_hub import HfApi

    from erasepro_hub.models.builtin import build_builtin

    folder = tmp_path_factory.mktemp("base") / "tiny-sd"
    build_builtin("tiny-sd").save_pretrained(folder, safe_serialization=True)
    (folder / "README.md").write_text("---\nlicense: creativeml-openrail-m\n---\n# tiny sd\n")
    api = HfApi(token=TOKENS["alice"])
    api.create_repo("alice/tiny-sd-base", exist_ok=True)
    api.upload_folder(repo_id="alice/tiny-sd-base", folder_path=str(folder), commit_message="base")
    return "alice/tiny-sd-base", api.repo_info("alice/tiny-sd-base").sha


def test_erase_a_hub_base_model_pins_the_commit(hub_base, erase_variant, as_alice, tmp_path):
    from huggingface_hub import ModelCard

    repo_id, base_sha = hub_base
    folder = erase_variant("hub-base", lambda d: d.update(base_model={"id": repo_id, "revision": "main"}))
    manifest = load_manifest(folder)
    assert manifest.base_model.revision == base_sha
    assert manifest.outputs.base_license == "creativeml-openrail-m"
    card = ModelCard((folder / "README.md").read_text())
    assert card.data.base_model == repo_id and card.data.base_model_relation == "adapter"
    assert card.data.license == "creativeml-openrail-m"
    assert {"lora", "diffusers", "text-to-image", "stable-diffusion", "concept-erasure", "erasepro"} <= set(card.data.tags)
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["residual_train"] == pytest.approx(manifest.metrics["residual_train"])
    assert f'revision="{base_sha}"' in card.text
    assert main(["regenerate", str(folder), "--verify"]) == 0
    # pushed, the card names the repository and the revision to load
    target = repo()
    push(folder, target, tag="v1")
    pushed = ModelCard.load(target)
    assert f'"{target}"' in pushed.text and 'revision="v1"' in pushed.text
    assert pushed.data.base_model == repo_id


# ----------------------------------------------------------------------------- failures
FAULT_STEPS = ["preupload", "lfs-batch", "lfs-upload", "commit"]


@pytest.mark.parametrize("step", FAULT_STEPS)
@pytest.mark.parametrize("kind", ["500", "drop"])
def test_a_failing_server_leaves_no_partial_commit(step, kind, demo_folder, tmp_path, as_alice, hub, no_backoff, capsys):
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    from huggingface_hub import HfApi

    HfApi().create_repo(repo_id)
    before = remote_state(hub, repo_id)
    hub.faults.add(step, kind)  # until cleared: the client's retries fail too
    try:
        assert main(["push", str(folder), repo_id]) == 1
    finally:
        hub.faults.clear()
    err = capsys.readouterr().err
    assert "error:" in err and ("HTTP 500" in err or "connection to the Hub failed" in err)
    assert "run the same command again" in err and "Traceback" not in err
    assert remote_state(hub, repo_id) == before  # nothing was committed
    assert main(["push", str(folder), repo_id]) == 0
    sha = capsys.readouterr().out.strip()
    assert remote_state(hub, repo_id)[0]["main"] == sha


def test_answer_lost_after_the_commit_then_retry_makes_no_second_commit(demo_folder, tmp_path, as_alice, hub, no_backoff):
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    hub.faults.add("commit", "drop-after", times=1)
    try:
        with pytest.raises(HubError, match="run the same command again"):
            push(folder, repo_id)
    finally:
        hub.faults.clear()
    committed = remote_state(hub, repo_id)
    result = push(folder, repo_id)
    assert not result.new_commit and remote_state(hub, repo_id) == committed


def test_wrong_or_missing_token(demo_folder, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_valid_token")
    assert main(["push", str(folder), repo()]) == 2
    err = capsys.readouterr().err
    assert "authentication failed" in err and "token is missing or invalid" in err
    assert "hf_not_a_valid_token" not in err
    monkeypatch.delenv("HF_TOKEN")
    assert main(["push", str(folder), repo()]) == 2
    assert "authentication failed" in capsys.readouterr().err


def test_writing_to_another_namespace_is_refused(demo_folder, tmp_path, monkeypatch):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    monkeypatch.setenv("HF_TOKEN", TOKENS["bob"])
    with pytest.raises(HubError, match="may not write to 'alice'"):
        push(folder, repo("alice"))
    # an organisation the user belongs to is fine
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    assert isinstance(push(folder, f"erasepro-org/erasure-{next(_names)}"), PushResult)


def test_private_repositories_are_invisible_to_others(demo_folder, tmp_path, monkeypatch):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    sha = push(folder, repo_id, private=True).commit
    assert pull(f"{repo_id}@{sha}", tmp_path / "mine").commit == sha
    monkeypatch.setenv("HF_TOKEN", TOKENS["bob"])
    with pytest.raises(HubError, match="not found"):
        pull(repo_id, tmp_path / "theirs")
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="not found"):
        pull(repo_id, tmp_path / "anonymous")
    assert not (tmp_path / "theirs").exists() and not (tmp_path / "anonymous").exists()


def test_the_token_is_never_written_or_printed(demo_folder, tmp_path, as_alice, capsys, caplog):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    caplog.set_level("DEBUG")
    assert main(["-v", "push", str(folder), repo_id]) == 0
    assert main(["-v", "pull", repo_id, "--out", str(tmp_path / "p")]) == 0
    captured = capsys.readouterr()
    texts = [captured.out, captured.err, caplog.text]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert not [t for t in texts if as_alice in t]


def test_contract_check_catches_unknown_routes(hub):
    import urllib.error
    import urllib.request

    start = len(hub.requests)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{hub.endpoint}/api/models/alice/x/some-new-route")
    assert exc.value.code == 404 and exc.value.headers["X-Error-Code"] == "RouteNotFound"
    assert [r.route for r in hub.requests[start:]] == ["UNKNOWN"]
    hub.requests[start:] = []  # this one was on purpose


@pytest.mark.parametrize("step", ["preupload", "lfs-batch", "lfs-upload", "commit"])
def test_a_slow_server_delays_a_push_but_never_splits_it(step, demo_folder, tmp_path, as_alice, hub):
    """The client sets no timeout on Hub API calls: a slow answer delays the push, which stays one commit."""
    repo_id = repo()
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    hub.faults.slow_seconds = 1.5
    hub.faults.add(step, "slow", times=1)
    try:
        result = push(folder, repo_id)
    finally:
        hub.faults.clear()
    branches, _, commits = remote_state(hub, repo_id)
    assert branches["main"] == result.commit and commits == 2  # the initial commit and ours


def test_one_rule_says_what_is_a_hub_repository(tmp_path, monkeypatch):
    from erasepro_hub.hub.client import looks_like_repo

    monkeypatch.chdir(tmp_path)
    assert looks_like_repo("demo/van-gogh") and looks_like_repo("demo/van-gogh@v1")
    assert not looks_like_repo("demo/a/b") and not looks_like_repo("./demo") and not looks_like_repo("-x/y")
    (tmp_path / "demo" / "local").mkdir(parents=True)
    assert not looks_like_repo("demo/local") and not looks_like_repo(tmp_path / "demo" / "local")


# ----------------------------------------------------------------------------- command-line output and push options
def test_hub_requests_are_logged_only_with_verbose(demo_folder, tmp_path, as_alice, capfd, caplog):
    import logging

    caplog.set_level(logging.DEBUG)  # the root accepts everything: only the command's own levels filter
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    assert main(["push", str(folder), repo_id]) == 0
    assert main(["pull", repo_id, "--out", str(tmp_path / "p")]) == 0
    captured = capfd.readouterr()
    assert not [text for text in (captured.out, captured.err, caplog.text) if "HTTP Request" in text]
    caplog.clear()
    assert main(["-v", "push", str(folder), repo_id]) == 0
    captured = capfd.readouterr()
    assert "HTTP Request: POST" in caplog.text + captured.err
    assert "connect_tcp" not in caplog.text + captured.err  # the transport's internals stay out even then


def test_cli_push_and_pull_json(demo_folder, tmp_path, as_alice, capsys):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    assert main(["push", str(folder), repo_id, "--tag", "v1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["repo_id"] == repo_id and len(result["commit"]) == 40 and result["tag"] == "v1"
    assert result["new_commit"] is True and result["pr_revision"] is None and result["folder"] == str(folder)
    assert main(["pull", f"{repo_id}@v1", "--out", str(tmp_path / "p"), "--json"]) == 0
    pulled = json.loads(capsys.readouterr().out)
    assert pulled == {"repo_id": repo_id, "revision": "v1", "commit": result["commit"], "folder": str(tmp_path / "p"),
                      "verified": True}


def test_push_create_pr_moves_no_branch_and_no_tag(demo_folder, tmp_path, as_alice, hub, capsys):
    from huggingface_hub import HfApi

    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    assert main(["push", str(folder), repo_id, "--tag", "v1"]) == 0
    capsys.readouterr()
    before = remote_state(hub, repo_id)[:2]
    # the card now names main instead of v1: there is something to propose
    assert main(["push", str(folder), repo_id, "--create-pr", "--commit-message", "Propose the erasure"]) == 0
    captured = capsys.readouterr()
    sha = captured.out.strip()
    assert len(sha) == 40  # the commit sha stays the one line on stdout
    assert "refs/pr/1" in captured.err and f"{repo_id}/discussions/1" in captured.err
    assert remote_state(hub, repo_id)[:2] == before  # the branch did not move, no tag was made
    api = HfApi()
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests] == [("refs/pr/1", sha)]
    assert api.list_repo_commits(repo_id, revision="refs/pr/1")[0].title == "Propose the erasure"
    assert pull(f"{repo_id}@refs/pr/1", tmp_path / "review").commit == sha
    records = json.loads((folder / ".erasepro" / "pushes.json").read_text())
    assert records[-1]["pr_revision"] == "refs/pr/1" and records[-1]["pr_url"].endswith("/discussions/1")
    # content the branch already holds opens no pull request
    merged = push(folder, repo_id)
    again = push(folder, repo_id, create_pr=True)
    assert again.pr_revision is None and not again.new_commit and again.commit == merged.commit
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]


def test_push_refuses_a_tag_or_a_missing_branch_with_create_pr(demo_folder, tmp_path, as_alice, hub, capsys):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    card = (folder / "README.md").read_bytes()
    repo_id = repo()
    assert main(["push", str(folder), repo_id, "--create-pr", "--tag", "v1"]) == 2
    captured = capsys.readouterr()
    assert "cannot be tagged" in captured.err and captured.out == ""
    assert ("model", repo_id) not in hub.store.repos  # refused before anything was sent
    assert (folder / "README.md").read_bytes() == card  # or rewritten
    with pytest.raises(HubError, match="cannot be tagged") as exc:
        push(folder, repo_id, tag="v1", create_pr=True)
    assert exc.value.exit_code == 2
    assert main(["push", str(folder), repo_id]) == 0
    capsys.readouterr()
    before = remote_state(hub, repo_id)
    assert main(["push", str(folder), repo_id, "--create-pr", "--branch", "no-such-branch"]) == 2
    assert "no branch 'no-such-branch'" in capsys.readouterr().err
    assert remote_state(hub, repo_id) == before


def test_push_token_and_commit_message_options(demo_folder, tmp_path, monkeypatch, capfd):
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_TOKEN", raising=False)
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    token = TOKENS["alice"]
    assert main(["push", str(folder), repo_id, "--token", token, "--commit-message", "First release"]) == 0
    captured = capfd.readouterr()
    assert HfApi(token=token).list_repo_commits(repo_id)[0].title == "First release"
    assert main(["pull", repo_id, "--out", str(tmp_path / "p"), "--token", token]) == 0
    captured_pull = capfd.readouterr()
    texts = [captured.out, captured.err, captured_pull.out, captured_pull.err]
    texts += [p.read_bytes().decode("latin-1") for p in tmp_path.rglob("*") if p.is_file()]
    assert not [t for t in texts if token in t]
    assert main(["push", str(folder), repo(), "--token", "hf_not_a_valid_token"]) == 2
    assert "authentication failed" in capfd.readouterr().err
