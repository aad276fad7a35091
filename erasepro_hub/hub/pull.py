"""Pull an erasure from the Hub, pinned to a commit, bringing only the files it checked.

:func:`fetch_verified` resolves any revision to a commit sha, downloads the manifest of that commit
first, and from it the list of files the release consists of (the manifest, every file it hashes, the
card and its plot). The repository's listing at that commit must hold every hashed file and nothing
else besides ``.gitattributes``: a repository with extra entries (a script, a large blob, a folder) is
refused before anything but the manifest is downloaded. Then exactly the listed files are downloaded
(through the Hub cache) and checked against the manifest (:func:`~erasepro_hub.adapters.open_folder`).

A download that fails its checks is removed from the cache together with the blobs that only it uses;
blobs another cached commit references stay, so a good commit pulled before keeps working offline.

:func:`pull` copies the checked files into ``--out`` atomically.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..adapters.folder import open_folder, safe_relative
from ..errors import AdapterFormatError, ManifestError, UnsafePathError, VerificationError
from ..fsutil import atomic_folder, check_output
from ..layout import CARD_FILE, MANIFEST_FILE, PLOT_FILE
from ..manifest import Manifest, load_manifest
from .client import hub_errors, parse_ref, resolve_revision
from .publish import record

#: Entries a repository may hold besides the release's files (the Hub adds ``.gitattributes``).
ALLOWED_EXTRAS = (".gitattributes",)


@dataclass(frozen=True)
class PullResult:
    repo_id: str
    revision: str
    commit: str
    folder: Path


def release_files(manifest: Manifest) -> tuple[list[str], list[str]]:
    """``(required, optional)`` file names of a release: the manifest and its hashed files; the card and plot."""
    if manifest.outputs is None:
        raise AdapterFormatError(f"the repository's {MANIFEST_FILE} is a recipe, not a finished erasure")
    required = list(dict.fromkeys([MANIFEST_FILE, *(safe_relative(name) for name in manifest.outputs.files)]))
    optional = [name for name in (CARD_FILE, PLOT_FILE) if name not in required]
    return required, optional


def _listing(repo_id: str, commit: str, token: str | None) -> set[str] | None:
    """Every entry of the repository at ``commit`` (files by path, folders with a trailing ``/``).

    ``None`` offline (``HF_HUB_OFFLINE``): only cached files of the commit are read then, and of those
    only the ones the manifest lists and checks.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import RepoFolder

    if constants.HF_HUB_OFFLINE:
        return None

    with hub_errors("list files", repo_id):
        entries = HfApi(token=token).list_repo_tree(repo_id, revision=commit, recursive=True)
        return {entry.path + "/" if isinstance(entry, RepoFolder) else entry.path for entry in entries}


def _drop_snapshot(snapshot: Path) -> None:
    """Remove a cached snapshot that failed its checks and the blobs only it references."""
    if snapshot.parent.name != "snapshots":  # not a Hub cache layout: nothing shared to protect
        shutil.rmtree(snapshot, ignore_errors=True)
        return

    def blobs(folder: Path) -> set[Path]:
        return {link.resolve() for link in folder.rglob("*") if link.is_symlink()}

    others = set()
    for other in snapshot.parent.iterdir():
        if other != snapshot and other.is_dir():
            others |= blobs(other)
    for blob in blobs(snapshot) - others:
        blob.unlink(missing_ok=True)
    shutil.rmtree(snapshot, ignore_errors=True)


def fetch_verified(repo_id: str, revision: str | None = None, *, token: str | None = None) -> tuple[Path, str]:
    """Download the release files of ``repo_id@revision`` into the Hub cache and check them.

    Returns ``(snapshot folder, commit sha)``. Raises :class:`VerificationError` for a repository whose
    listing lacks a hashed file or holds unexpected entries, or whose files fail the manifest's checks.
    """
    from huggingface_hub import hf_hub_download

    commit = resolve_revision(repo_id, revision, token=token)
    with hub_errors("download", repo_id):
        manifest_path = Path(hf_hub_download(repo_id, MANIFEST_FILE, revision=commit, token=token))
    snapshot = manifest_path.parent
    try:
        required, optional = release_files(load_manifest(manifest_path))
        listed = _listing(repo_id, commit, token)
        if listed is None:  # offline: the cached files of this commit, checked below like any download
            listed = set(required) | {name for name in optional if (snapshot / name).is_file()}
        missing = [name for name in required if name not in listed]
        if missing:
            raise VerificationError(f"{repo_id}@{commit[:12]} lacks {missing[0]}, which its manifest lists")
        unexpected = sorted(listed - set(required) - set(optional) - set(ALLOWED_EXTRAS))
        if unexpected:
            shown = ", ".join(unexpected[:3]) + (f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else "")
            raise VerificationError(
                f"{repo_id}@{commit[:12]} holds entries that are not part of the erasure ({shown}); pull brings only "
                "files its manifest checks and refuses such a repository"
            )
        for name in required[1:] + [name for name in optional if name in listed]:
            with hub_errors("download", repo_id):
                hf_hub_download(repo_id, name, revision=commit, token=token)
        open_folder(snapshot)
    except (VerificationError, AdapterFormatError, ManifestError, UnsafePathError):
        # the content failed its checks; a connection failure (HubError) leaves the cache as it is
        _drop_snapshot(snapshot)
        raise
    return snapshot, commit


def pull(ref: str, out: str | Path | None = None, *, overwrite: bool = False, token: str | None = None) -> PullResult:
    """Copy ``REPO_ID[@REV]`` into ``out`` (default: the repository name), verified, atomically."""
    repo_id, revision = parse_ref(ref)
    out = Path(out) if out is not None else Path(repo_id.split("/")[1])
    check_output(out, overwrite=overwrite)
    snapshot, commit = fetch_verified(repo_id, revision, token=token)
    required, optional = release_files(load_manifest(snapshot / MANIFEST_FILE))  # checked by fetch_verified
    with atomic_folder(out, overwrite=overwrite) as tmp:
        for name in required + optional:
            source = snapshot / name
            if source.is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.resolve(), tmp / name)
        open_folder(tmp)
        result = PullResult(repo_id, revision or "main", commit, Path(out))
        record(tmp, "pull.json", asdict(result))
    return result
