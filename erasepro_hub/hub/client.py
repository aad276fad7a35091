"""What every Hub call shares: repository references, revision → commit sha, and transport errors.

* :func:`parse_ref` / :func:`looks_like_repo` — the one rule for ``user/name[@revision]``.
* :func:`resolve_revision` — the one way a branch, tag or sha becomes a commit sha (base models,
  erasure repositories and prompt datasets alike).
* :func:`hub_errors` — turns the client's errors and *transport* failures into :class:`HubError` messages
  that say what happened and whether running the command again helps. Anything else (a programming
  error, a bad file) passes through untouched.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import EraseProError, HubError, ManifestError
from ..manifest.schema import HUB_ID_RE, SHA_RE

RETRY = "run the same command again (a push of unchanged content makes no new commit)"
#: Modules whose exceptions are connection failures (the HTTP stack under ``huggingface_hub``).
_TRANSPORT_MODULES = ("httpx", "httpx2", "httpcore", "httpcore2", "h11", "h2", "ssl", "urllib3", "requests")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"user/repo@rev"`` → ``("user/repo", "rev")``; ``"user/repo"`` → ``("user/repo", None)``."""
    repo_id, _, revision = ref.partition("@")
    if not HUB_ID_RE.fullmatch(repo_id):
        raise ManifestError(f"{ref!r} is not a Hub repository id 'user/name' (optionally '@revision')")
    if "@" in ref and not revision:
        raise ManifestError(f"{ref!r}: nothing after '@'; give a branch, tag or commit sha")
    return repo_id, revision or None


def looks_like_repo(ref: str | Path) -> bool:
    """Whether ``ref`` names a Hub repository (``user/name``, optionally ``@revision``) rather than a local path.

    The one test every command and loader uses: a repository id by the manifest's rule (``HUB_ID_RE``)
    that is not an existing path.
    """
    text = str(ref)
    return bool(HUB_ID_RE.fullmatch(text.split("@", 1)[0])) and not Path(text).exists() and not Path(text.split("@", 1)[0]).exists()


def _is_transport_failure(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if type(exc) is OSError:  # raised by the client itself (e.g. a size check after a cut transfer)
        return True
    return type(exc).__module__.split(".")[0] in _TRANSPORT_MODULES


def _as_hub_error(exc: BaseException, step: str, repo_id: str) -> HubError | None:
    """The :class:`HubError` for a client error or a transport failure; ``None`` for anything else."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, RepositoryNotFoundError):
        return HubError(
            f"{repo_id}: repository not found, or private and not visible with this token ({step})", bad_input=True
        )
    if isinstance(exc, RevisionNotFoundError):
        return HubError(f"{repo_id}: revision not found ({step}); give an existing branch, tag or commit sha", bad_input=True)
    if isinstance(exc, LocalEntryNotFoundError):
        return HubError(
            f"could not download from {repo_id} ({step}): the connection failed or timed out and the files are not "
            f"in the local cache; {RETRY}"
        )
    if isinstance(exc, EntryNotFoundError):
        return HubError(f"{repo_id}: a file is missing at that revision ({step}); is it an erasure repository?", bad_input=True)
    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"{step} needs the Hub, but HF_HUB_OFFLINE is set")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            return HubError(
                f"authentication failed during {step}: the token is missing or invalid (set HF_TOKEN or run "
                "`hf auth login`)",
                bad_input=True,
            )
        if status == 403:
            namespace = repo_id.split("/")[0]
            return HubError(
                f"the token may not write to {namespace!r} ({step}); use your own namespace or an organisation you "
                "belong to",
                bad_input=True,
            )
        if status is not None and 400 <= status < 500:
            return HubError(f"the Hub refused {step} (HTTP {status}): {exc}", bad_input=True)
        return HubError(f"the Hub failed during {step} (HTTP {status}); {RETRY}")
    if _is_transport_failure(exc):
        return HubError(f"the connection to the Hub failed during {step} ({type(exc).__name__}); {RETRY}")
    if isinstance(exc, RuntimeError) and exc.__cause__ is not None:
        # the client wraps a failed upload ("Error while uploading ...") around the HTTP or transport error
        return _as_hub_error(exc.__cause__, step, repo_id)
    return None


@contextmanager
def hub_errors(step: str, repo_id: str) -> Iterator[None]:
    """Translate client errors and transport failures into :class:`HubError`; let everything else through."""
    try:
        yield
    except EraseProError:
        raise
    except Exception as exc:
        translated = _as_hub_error(exc, step, repo_id)
        if translated is None:
            raise
        raise translated from None


def resolve_revision(repo_id: str, revision: str | None = None, *, token: str | None = None, repo_type: str = "model") -> str:
    """The commit sha a branch, tag or sha of ``repo_id`` names (``main`` when ``revision`` is ``None``).

    A full 40-hex sha is a commit already and is returned as it is (a pinned commit also works offline,
    from the cache); anything else asks the Hub.
    """
    from huggingface_hub import HfApi

    if revision is not None and SHA_RE.fullmatch(revision):
        return revision
    with hub_errors("resolve revision", repo_id):
        return str(HfApi(token=token).repo_info(repo_id, revision=revision or "main", repo_type=repo_type).sha)
