"""Downloading the parts of a base model the solver reads, pinned to a commit."""

from __future__ import annotations

from pathlib import Path

from ..errors import BaseModelError, HubError

#: Files the solver reads from a diffusers repository (the VAE and safety checker are never fetched).
BASE_MODEL_PATTERNS = [
    "model_index.json",
    "README.md",
    "tokenizer/*",
    "tokenizer_2/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-*.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*.safetensors",
]


def resolve_revision(repo_id: str, revision: str | None = None, *, repo_type: str = "model") -> str:
    """The 40-hex commit sha a branch, tag or sha names on the Hub."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().repo_info(repo_id, revision=revision or "main", repo_type=repo_type)
    except RepositoryNotFoundError:
        raise BaseModelError(
            f"base_model.id: Hub repository {repo_id!r} not found (or private: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise BaseModelError(f"base_model.revision: {revision!r} is not a branch, tag or commit of {repo_id}") from None
    except OfflineModeIsEnabled:
        raise HubError(f"cannot resolve {repo_id}@{revision or 'main'}: HF_HUB_OFFLINE is set") from None
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"cannot reach the Hub to resolve {repo_id}@{revision or 'main'}: {exc}") from None
    return str(info.sha)


def download_base_model(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """Download what the solver needs of a diffusers repository; returns ``(folder, commit sha)``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    sha = resolve_revision(repo_id, revision)
    try:
        folder = snapshot_download(repo_id, revision=sha, allow_patterns=BASE_MODEL_PATTERNS)
    except (HfHubHTTPError, OSError) as exc:
        raise HubError(f"downloading {repo_id}@{sha[:12]} failed: {exc}") from None
    return Path(folder), sha
