"""Downloading the parts of a base model the solver reads, pinned to a commit."""

from __future__ import annotations

from pathlib import Path

from ..errors import BaseModelError, HubError
from .client import hub_errors, resolve_revision

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


def download_base_model(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """Download what the solver needs of a diffusers repository; returns ``(folder, commit sha)``.

    A repository or revision that does not exist is a :class:`BaseModelError` naming the manifest field;
    a connection failure stays a :class:`HubError` (running again can help).
    """
    from huggingface_hub import snapshot_download

    try:
        sha = resolve_revision(repo_id, revision)
        with hub_errors("download the base model", repo_id):
            folder = snapshot_download(repo_id, revision=sha, allow_patterns=BASE_MODEL_PATTERNS)
    except HubError as exc:
        if exc.exit_code == 2:
            raise BaseModelError(f"base_model: {exc}") from None
        raise
    return Path(folder), sha
