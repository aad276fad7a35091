"""Push an erasure folder to the Hub in one commit; pull it back by revision, pinned to a commit.

* :func:`push` checks the folder against its manifest's hashes, renders the model
  card for the target repository, then ``create_repo(exist_ok=True)`` and **one**
  ``create_commit`` with every file. Unchanged content makes no new commit (the
  client skips files whose remote oid matches). The commit sha is printed by the
  CLI and recorded in ``DIR/.erasepro/pushes.json`` (not uploaded).
* :func:`pull` resolves any revision to a commit sha, downloads that commit,
  checks every file against the manifest's hashes, and only then moves the folder
  into place (atomically); a tampered download fails and leaves nothing behind.

Tokens come from the usual ``huggingface_hub`` sources (``HF_TOKEN``, the token
file of ``hf auth login``) or the ``token`` argument; they are never printed,
logged or written anywhere by this module.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..adapters.folder import ErasureFolder, open_folder
from ..errors import EraseProError, HubError, ManifestError
from ..fsutil import atomic_folder, check_output
from ..layout import CARD_FILE, MANIFEST_FILE, PLOT_FILE
from ..manifest.schema import HUB_ID_RE, SHA_RE

RECORD_DIR = ".erasepro"


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit: str
    url: str
    branch: str
    tag: str | None
    new_commit: bool


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str
    commit: str
    folder: Path


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"user/repo@rev"`` → ``("user/repo", "rev")``; ``"user/repo"`` → ``("user/repo", None)``."""
    repo_id, _, revision = ref.partition("@")
    if not HUB_ID_RE.match(repo_id):
        raise ManifestError(f"{ref!r} is not a Hub repository id 'user/name' (optionally '@revision')")
    if "@" in ref and not revision:
        raise ManifestError(f"{ref!r}: nothing after '@'; give a branch, tag or commit sha")
    return repo_id, revision or None


@contextmanager
def hub_errors(step: str, repo_id: str) -> Iterator[None]:
    """Translate client errors into :class:`HubError` messages that say what happened and what to do."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    retry = "run the same command again (a push of unchanged content makes no new commit)"
    try:
        yield
    except EraseProError:
        raise
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id}: repository not found, or private and not visible with this token ({step})", bad_input=True
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{repo_id}: revision not found ({step}); give an existing branch, tag or commit sha", bad_input=True
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"could not download from {repo_id} ({step}): the connection failed or timed out and the files are not "
            f"in the local cache; {retry}"
        ) from None
    except EntryNotFoundError:
        raise HubError(
            f"{repo_id}: a file is missing at that revision ({step}); is it an erasure repository?", bad_input=True
        ) from None
    except OfflineModeIsEnabled:
        raise HubError(f"{step} needs the Hub, but HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError(
                f"authentication failed during {step}: the token is missing or invalid "
                "(set HF_TOKEN or run `hf auth login`)",
                bad_input=True,
            ) from None
        if status == 403:
            namespace = repo_id.split("/")[0]
            raise HubError(
                f"the token may not write to {namespace!r} ({step}); use your own namespace or an organisation "
                "you belong to",
                bad_input=True,
            ) from None
        raise HubError(f"the Hub failed during {step} (HTTP {status}); {retry}") from None
    except (OSError, ValueError, RuntimeError) as exc:  # transport failures (dropped connection, timeout, ...)
        raise HubError(f"the connection to the Hub failed during {step} ({type(exc).__name__}); {retry}") from None
    except Exception as exc:  # noqa: BLE001 - the transport library's own exception types
        if type(exc).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "ssl"):
            raise HubError(f"the connection to the Hub failed during {step} ({type(exc).__name__}); {retry}") from None
        raise


def publish_files(opened: ErasureFolder) -> list[str]:
    """The files of a release: the manifest, every file it hashes, the card and its plot."""
    assert opened.manifest.outputs is not None
    names = [MANIFEST_FILE, *opened.manifest.outputs.files, CARD_FILE, PLOT_FILE]
    return list(dict.fromkeys(names))


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    tag: str | None = None,
    token: str | None = None,
    message: str | None = None,
) -> PushResult:
    """Publish an erasure folder, its card already rendered, as one commit (see the module docs).

    ``erasepro_hub.push`` renders the card for this repository and revision first; this function
    uploads the folder as it is.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    repo_id, _ = parse_ref(repo_id)
    opened = open_folder(folder)  # refuses a folder whose files do not match the manifest's hashes
    branch = branch or "main"
    api = HfApi(token=token)
    names = publish_files(opened)
    with hub_errors("create_repo", repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        before = api.repo_info(repo_id, revision=branch).sha
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in names]
    summary = message or f"erasepro: {opened.manifest.name or folder.name} ({opened.manifest.method})"
    with hub_errors("commit", repo_id):
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=summary,
            commit_description=f"recipe sha256 {opened.manifest.outputs.recipe_sha256}",
            revision=branch,
        )
    commit = str(info.oid)
    if tag:
        with hub_errors("create_tag", repo_id):
            refs = api.list_repo_refs(repo_id)
            existing = {t.name: t.target_commit for t in refs.tags}
            if tag in existing and existing[tag] != commit:
                raise HubError(f"tag {tag!r} of {repo_id} already points to {existing[tag][:12]}; choose a new tag")
            if tag not in existing:
                api.create_tag(repo_id, tag=tag, revision=commit)
    result = PushResult(repo_id, commit, f"{api.endpoint}/{repo_id}/tree/{commit}", branch, tag, commit != before)
    _record(folder, "pushes.json", asdict(result))
    return result


def _record(folder: Path, name: str, entry: dict) -> None:
    record_dir = folder / RECORD_DIR
    record_dir.mkdir(exist_ok=True)
    path = record_dir / name
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append({k: (str(v) if isinstance(v, Path) else v) for k, v in entry.items()})
    path.write_text(json.dumps(entries, indent=2) + "\n")


def resolve(repo_id: str, revision: str | None, *, token: str | None = None, repo_type: str = "model") -> str:
    """The commit sha of ``repo_id@revision`` (a model repository unless ``repo_type`` says otherwise)."""
    from huggingface_hub import HfApi

    if revision is not None and SHA_RE.match(revision):
        return revision
    with hub_errors("resolve revision", repo_id):
        return str(HfApi(token=token).repo_info(repo_id, revision=revision or "main", repo_type=repo_type).sha)


def download(repo_id: str, revision: str | None = None, *, token: str | None = None) -> tuple[Path, str]:
    """Download an erasure repository at a commit into the Hub cache; returns ``(folder, commit sha)``."""
    from huggingface_hub import snapshot_download

    commit = resolve(repo_id, revision, token=token)
    with hub_errors("download", repo_id):
        path = snapshot_download(repo_id, revision=commit, token=token)
    return Path(path), commit


def fetch_verified(repo_id: str, revision: str | None = None, *, token: str | None = None) -> tuple[Path, str]:
    """Download and check against the manifest's hashes; a tampered file raises ``VerificationError``."""
    folder, commit = download(repo_id, revision, token=token)
    try:
        open_folder(folder)
    except EraseProError:
        # a corrupted download must not be reused from the cache next time: drop its blobs and the snapshot
        for item in folder.iterdir():
            if item.is_symlink():
                item.resolve().unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder, commit


def pull(ref: str, out: str | Path | None = None, *, overwrite: bool = False, token: str | None = None) -> PullResult:
    """Copy ``REPO_ID[@REV]`` into ``out`` (default: the repository name), verified, atomically."""
    repo_id, revision = parse_ref(ref)
    out = Path(out) if out is not None else Path(repo_id.split("/")[1])
    check_output(out, overwrite=overwrite)
    folder, commit = fetch_verified(repo_id, revision, token=token)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for item in folder.iterdir():
            if item.name.startswith("."):
                continue
            shutil.copy2(item.resolve(), tmp / item.name)
        open_folder(tmp)
        result = PullResult(repo_id, revision or "main", commit, Path(out))
        _record(tmp, "pull.json", asdict(result))
    return result


def looks_like_repo(ref: str | Path) -> bool:
    """Whether ``ref`` names a Hub repository (``user/name``, optionally ``@revision``) rather than a local path.

    The one test every command and loader uses: a repository id by the manifest's rule (``HUB_ID_RE``)
    that is not an existing path.
    """
    text = str(ref)
    return bool(HUB_ID_RE.match(text.split("@", 1)[0])) and not Path(text).exists() and not Path(text.split("@", 1)[0]).exists()
