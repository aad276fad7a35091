"""Push an erasure folder to the Hub in one commit.

:func:`push` checks the folder against its manifest's hashes, checks the tag and branch
preconditions (a tag that exists must already name exactly what this push would commit), then
``create_repo(exist_ok=True)`` and **one** ``create_commit`` with every file. A failed precondition
makes no commit. Unchanged content makes no new commit (the client skips files whose remote oid
matches). The commit sha is printed by the CLI and recorded in ``DIR/.erasepro/pushes.json`` (not
uploaded; a record that cannot be written is a warning, never a failed push). Pulling is
:mod:`.pull`.

``create_pr=True`` opens a pull request against ``branch`` instead: the commit lands on the
pull request's ref (``refs/pr/N``), the branch does not move, and no tag is made (a tag with a pull
request is refused). Unchanged content opens no pull request.

Tokens come from the usual ``huggingface_hub`` sources (``HF_TOKEN``, the token
file of ``hf auth login``) or the ``token`` argument; they are never printed,
logged or written anywhere by this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..adapters.folder import ErasureFolder, open_folder
from ..errors import HubError, warn
from ..fsutil import replacing
from ..layout import CARD_FILE, MANIFEST_FILE, PLOT_FILE
from .client import hub_errors, parse_ref

RECORD_DIR = ".erasepro"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit: str
    url: str
    branch: str  # the branch committed to, or the one a pull request targets
    tag: str | None
    new_commit: bool
    pr_revision: str | None = None  # "refs/pr/N" when a pull request was opened
    pr_url: str | None = None


def publish_files(opened: ErasureFolder) -> list[str]:
    """The files of a release: the manifest, every file it hashes, the card and its plot."""
    assert opened.manifest.outputs is not None
    names = [MANIFEST_FILE, *opened.manifest.outputs.files, CARD_FILE, PLOT_FILE]
    return list(dict.fromkeys(names))


def _same_content(remote, path: Path) -> bool:
    """Whether a remote file entry (``blob_id``, LFS ``sha256``) holds exactly the local file's bytes."""
    data = path.read_bytes()
    if getattr(remote, "lfs", None) is not None:
        return remote.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return remote.blob_id == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _unchanged(api, repo_id: str, commit: str, folder: Path, names: list[str]) -> bool:
    """Whether committing ``names`` onto ``commit`` would change nothing (so no new commit would be made)."""
    remote = {entry.path: entry for entry in api.get_paths_info(repo_id, names, revision=commit)}
    return all(name in remote and _same_content(remote[name], folder / name) for name in names)


def check_push_options(*, tag: str | None, create_pr: bool) -> None:
    """Refuse option combinations a push cannot honour, before anything is written or sent."""
    if create_pr and tag is not None:
        raise HubError(
            f"a pull request does not move any ref, so it cannot be tagged ({tag!r}); push without the tag, "
            "and tag the merged commit once the pull request is merged",
            bad_input=True,
        )


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    tag: str | None = None,
    token: str | None = None,
    message: str | None = None,
    create_pr: bool = False,
) -> PushResult:
    """Publish an erasure folder, its card already rendered, as one commit (see the module docs).

    ``erasepro_hub.push`` renders the card for this repository and revision first; this function
    uploads the folder as it is. ``create_pr``: open a pull request against ``branch`` (which must
    exist) instead of committing to it.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    check_push_options(tag=tag, create_pr=create_pr)
    folder = Path(folder)
    repo_id, _ = parse_ref(repo_id)
    opened = open_folder(folder)  # refuses a folder whose files do not match the manifest's hashes
    branch = branch or "main"
    api = HfApi(token=token)
    names = publish_files(opened)
    with hub_errors("create_repo", repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        refs = api.list_repo_refs(repo_id)
        heads = {b.name: b.target_commit for b in refs.branches}
        tags = {t.name: t.target_commit for t in refs.tags}
        before = heads.get(branch) or heads["main"]
        if tag is not None and tag in tags:
            # a tag is never moved: pushing to an existing tag is fine only when it already names what we would push
            if tags[tag] != before or not _unchanged(api, repo_id, before, folder, names):
                raise HubError(
                    f"tag {tag!r} of {repo_id} already points to {tags[tag][:12]}, and this push would make a new "
                    f"commit on {branch}; nothing was committed. Choose a new tag",
                    bad_input=True,
                )
        if tag is not None and tag in heads:
            raise HubError(f"{tag!r} is a branch of {repo_id}; a tag of the same name would be ambiguous", bad_input=True)
        if branch not in heads and create_pr:
            raise HubError(
                f"{repo_id} has no branch {branch!r} for a pull request to target; nothing was committed. Give an "
                f"existing branch ({', '.join(sorted(heads))}) or push to the new branch without --create-pr",
                bad_input=True,
            )
        if branch not in heads:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    summary = message or f"erasepro: {opened.manifest.name or folder.name} ({opened.manifest.method})"
    with hub_errors("commit", repo_id):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=summary,
            commit_description=f"recipe sha256 {opened.manifest.outputs.recipe_sha256}",
            revision=branch,
            create_pr=create_pr,
        )
    commit = str(info.oid)
    if tag is not None and tag not in tags:
        with hub_errors("create_tag", repo_id):
            api.create_tag(repo_id, tag=tag, revision=commit)
    result = PushResult(
        repo_id, commit, f"{api.endpoint}/{repo_id}/tree/{commit}", branch, tag, commit != before,
        pr_revision=info.pr_revision if create_pr else None, pr_url=info.pr_url if create_pr else None,
    )
    record(folder, "pushes.json", asdict(result))
    return result


def record(folder: Path, name: str, entry: dict) -> None:
    """Append ``entry`` to ``folder/.erasepro/NAME`` (a JSON list), written atomically.

    The record is bookkeeping beside an operation that already succeeded: a record that cannot be read
    (an empty or cut file left by a killed run) starts a new list, and one that cannot be written is a
    warning.
    """
    path = folder / RECORD_DIR / name
    try:
        path.parent.mkdir(exist_ok=True)
        try:
            entries = json.loads(path.read_text())
        except FileNotFoundError:
            entries = []
        except (OSError, ValueError):
            warn(f"{path} was unreadable (an interrupted run?); starting a new record")
            entries = []
        if not isinstance(entries, list):
            entries = []
        entries.append({k: (str(v) if isinstance(v, Path) else v) for k, v in entry.items()})
        with replacing(path) as tmp:
            tmp.write_text(json.dumps(entries, indent=2) + "\n")
    except OSError as exc:
        warn(f"could not record the result in {path} ({exc})")
