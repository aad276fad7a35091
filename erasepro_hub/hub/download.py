"""Downloading the parts of a base model the solver reads, pinned to a commit.

SD 1.x/2.x/XL: tokenizers, text encoders and the UNet's safetensors (its ``to_k``/``to_v`` are spread over
every shard). SD 3 / FLUX.1: tokenizers, text encoders (T5 shards included) and the transformer's config,
single safetensors file or sharded index — of a sharded transformer only the shards that hold the tensors the
solve reads (:data:`TRANSFORMER_TENSORS`) are fetched, in a second pass once the index is there. The VAE,
safety checker and the repositories' single-file checkpoints are never fetched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import BaseModelError, HubError
from .client import hub_errors, resolve_revision

_TEXT_ENCODER_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors")

#: Files the solver reads from a diffusers repository (the VAE and safety checker are never fetched).
BASE_MODEL_PATTERNS = [
    "model_index.json",
    "README.md",
    "tokenizer/*",
    "tokenizer_2/*",
    "tokenizer_3/*",  # SD 3's T5 tokenizer (FLUX.1's is tokenizer_2)
    *(f"{te}/{name}" for te in ("text_encoder", "text_encoder_2", "text_encoder_3") for name in _TEXT_ENCODER_FILES),
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-*.safetensors",
    # SD 3 / FLUX.1: single tensors are read from the transformer's weights; its shards: see TRANSFORMER_TENSORS
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
]

#: The transformer tensors the solve reads (``erasepro_hub.models.conditioning.CONDITIONING``'s ``sequence_sites`` and
#: ``pooled_sites`` of sd3 and flux, as ``<site>.weight``); only the shards holding them are downloaded.
TRANSFORMER_TENSORS = ("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight")
TRANSFORMER_INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
#: the largest shard index read (FLUX.1's is about 100 KiB)
MAX_INDEX_BYTES = 16 * 2**20
_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors$")


def transformer_shards(folder: Path) -> list[str]:
    """The transformer shard files (repository paths) that hold :data:`TRANSFORMER_TENSORS`, read from the
    downloaded index; none when the transformer is one file, has no index, or the index is unusable (the
    loader then says what is wrong with it)."""
    index = folder / TRANSFORMER_INDEX
    if (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file() or not index.is_file():
        return []
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            return []
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, RecursionError, AttributeError):
        return []
    if not isinstance(weight_map, dict):
        return []
    names = {weight_map.get(key) for key in TRANSFORMER_TENSORS}
    return sorted(f"transformer/{name}" for name in names if isinstance(name, str) and _SHARD_NAME.match(name))


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
            shards = transformer_shards(Path(folder))
            if shards:  # a sharded transformer: only the shards that hold the tensors read
                folder = snapshot_download(repo_id, revision=sha, allow_patterns=shards)
    except HubError as exc:
        if exc.exit_code == 2:
            raise BaseModelError(f"base_model: {exc}") from None
        raise
    return Path(folder), sha
