"""The public, Hub-aware entry points: the one place that joins ``adapters/``, ``cards/`` and ``hub/``.

``adapters/`` applies local folders and never imports ``hub/``; ``hub/`` uploads a folder as it is and
never imports ``cards/``. This module puts Hub repositories (``user/name`` at a branch, tag or commit)
in front of the loader, and renders the card for the repository before a push.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapters.apply import AppliedAdapter, unload_adapter
from .adapters.apply import load_adapter as load_folder

__all__ = ["AppliedAdapter", "load_adapter", "push", "unload_adapter"]


def load_adapter(
    pipe: Any,
    path: str | Path,
    *,
    fuse: bool = False,
    verify_base: bool = True,
    revision: str | None = None,
    token: str | None = None,
) -> AppliedAdapter:
    """Apply an erasure to a diffusers pipeline, verified; returns a handle whose ``remove()`` undoes it.

    Args:
        pipe: a loaded ``StableDiffusion[XL]Pipeline`` (or any object with ``unet``/``text_encoder`` attributes).
        path: an erasure folder written by ``erasepro erase``, or a Hub repository ``user/name`` (then
            ``revision`` — branch, tag or commit — is resolved to a commit sha and that commit is downloaded
            and checked like a folder; ``applied.source`` names the commit).
        fuse: add ``B A`` into the weights (no inference overhead) instead of using forward hooks.
        verify_base: compare the pipeline's weights with the fingerprints recorded at erase time and refuse a
            mismatch; ``False`` skips only this check.
        token: a Hub token for a private repository.

    Raises:
        VerificationError: a file was modified, or the manifest was edited after the erasure was made.
        BaseMismatchError: the pipeline lacks a site, has other shapes, or (``verify_base``) other weights.
        AdapterFormatError, ManifestError: the folder is not a readable erasure.
    """
    from .hub.client import looks_like_repo, parse_ref

    if looks_like_repo(path):
        from .hub.pull import fetch_verified

        repo_id, pinned = parse_ref(str(path))
        if pinned is not None and revision is not None and pinned != revision:
            raise ValueError(f"{path!r} names revision {pinned!r} and revision={revision!r} another; give one")
        path, commit = fetch_verified(repo_id, pinned or revision, token=token)
        source = f"{repo_id}@{commit}"
    elif revision is not None:
        raise ValueError("revision applies to Hub repositories; a local folder has no revisions")
    else:
        source = str(path)
    return load_folder(pipe, path, fuse=fuse, verify_base=verify_base, source=source)


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    tag: str | None = None,
    token: str | None = None,
    message: str | None = None,
):
    """Render the card for ``repo_id`` at ``tag`` (or ``branch``), then publish the folder as one commit.

    Returns the :class:`~erasepro_hub.hub.publish.PushResult` (its ``commit`` is the sha to pin).
    """
    from .adapters.folder import open_folder
    from .cards import write_card
    from .hub.client import parse_ref
    from .hub.publish import push as push_folder

    opened = open_folder(folder)  # refuses a folder whose files do not match the manifest's hashes
    name, _ = parse_ref(repo_id)
    # the card names this repository and the revision to load; it is not among the hashed files
    write_card(opened.path, opened.manifest, repo_id=name, revision=tag or branch or "main", revision_kind="tag" if tag else "branch")
    return push_folder(opened.path, repo_id, private=private, branch=branch, tag=tag, token=token, message=message)
