"""The public, Hub-aware entry points: the one place that joins ``adapters/``, ``cards/`` and ``hub/``.

``adapters/`` applies local folders and never imports ``hub/``; ``hub/`` uploads a folder as it is and
never imports ``cards/``. This module puts Hub repositories (``user/name`` at a branch, tag or commit)
in front of the loader, and renders the card for the repository before a push.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import warnings

from .adapters.apply import AppliedAdapter, AppliedErasure, unload_erasure
from .adapters.apply import load_erasure as load_folder

__all__ = ["AppliedAdapter", "AppliedErasure", "load_adapter", "load_erasure", "push", "unload_adapter", "unload_erasure"]


def load_erasure(
    pipe: Any,
    path: str | Path,
    *,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    revision: str | None = None,
    token: str | None = None,
    fuse: bool = False,
    verify_base: bool = True,
) -> AppliedErasure:
    """Apply an erasure to a diffusers pipeline, verified; returns a handle whose ``remove()`` undoes it.

    On SD 1.x/2.x/XL pipelines the erasure becomes a diffusers LoRA adapter named ``adapter_name``
    (``pipe.get_list_adapters()`` lists it, ``pipe.unload_lora_weights()`` removes it), loaded only after
    every check passed; BERT text encoders, which diffusers cannot load, get forward hooks.

    Args:
        pipe: a loaded SD 1.x/2.x/XL, SD 3 or FLUX.1 diffusers pipeline (or any object with its components as
            attributes: ``unet`` or ``transformer``, ``text_encoder``, ...).
        path: an erasure folder written by ``erasepro erase``, or a Hub repository ``user/name`` (then
            ``revision`` — branch, tag or commit — is resolved to a commit sha and that commit is downloaded
            and checked like a folder; ``applied.source`` names the commit).
        adapter_name: the diffusers adapter name (default: from the erasure's name).
        weight_name: the adapter file, as in ``load_lora_weights``; must be the one the manifest checks.
        revision: branch, tag or commit of a Hub repository.
        token: a Hub token for a private repository.
        fuse: fuse the erasure into the weights (no inference overhead); ``remove()`` restores them bit for bit.
        verify_base: compare the pipeline's weights with the fingerprints recorded at erase time and refuse a
            mismatch; ``False`` skips only this check.

    Raises:
        VerificationError: a file was modified, or the manifest was edited after the erasure was made.
        BaseMismatchError: the pipeline lacks a site, has other shapes, already carries an erasure or LoRA on
            those modules, or (``verify_base``) other weights.
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
    return load_folder(
        pipe, path, adapter_name=adapter_name, weight_name=weight_name, fuse=fuse, verify_base=verify_base, source=source
    )


def load_adapter(pipe: Any, path: str | Path, **kwargs) -> AppliedErasure:
    """Renamed :func:`load_erasure` (``model.load_adapter`` means something else in peft and transformers)."""
    warnings.warn(
        "erasepro_hub.load_adapter is renamed load_erasure; the old name will be removed in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return load_erasure(pipe, path, **kwargs)


def unload_adapter(pipe: Any) -> int:
    """Renamed :func:`unload_erasure`."""
    warnings.warn(
        "erasepro_hub.unload_adapter is renamed unload_erasure; the old name will be removed in the next release",
        FutureWarning,
        stacklevel=2,
    )
    return unload_erasure(pipe)


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
):
    """Render the card for ``repo_id`` at ``tag`` (or ``branch``), then publish the folder as one commit.

    ``create_pr``: open a pull request against ``branch`` (default main) instead of committing to it; the
    branch does not move, and a ``tag`` is refused. ``message``: the commit's summary line.

    Returns the :class:`~erasepro_hub.hub.publish.PushResult` (its ``commit`` is the sha to pin; with
    ``create_pr``, ``pr_revision`` is the pull request's ``refs/pr/N`` and ``pr_url`` its page).
    """
    from .adapters.folder import open_folder
    from .cards import write_card
    from .hub.client import parse_ref
    from .hub.publish import check_push_options
    from .hub.publish import push as push_folder

    check_push_options(tag=tag, create_pr=create_pr)  # before the card is rewritten
    opened = open_folder(folder)  # refuses a folder whose files do not match the manifest's hashes
    name, _ = parse_ref(repo_id)
    # the card names this repository and the revision to load; it is not among the hashed files
    write_card(opened.path, opened.manifest, repo_id=name, revision=tag or branch or "main", revision_kind="tag" if tag else "branch")
    return push_folder(
        opened.path, repo_id, private=private, branch=branch, tag=tag, token=token, message=message, create_pr=create_pr
    )
