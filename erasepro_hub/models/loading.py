"""Loading just enough of a Stable Diffusion model to solve an erasure.

From a diffusers folder this reads ``model_index.json``, the tokenizer(s), the
text encoder(s), and *single tensors* of the UNet (the cross-attention
``to_k``/``to_v`` weights) out of its safetensors file(s): the UNet is never
instantiated and the VAE never touched. Weights are read from safetensors only;
a folder that holds only pickle (``.bin``) weights is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BaseModelError, UnsupportedModelError
from ..layout import front_matter
from .base import FAMILIES, KV_SUFFIXES, EditModel, TextEncoder, sd_family, sort_sites
from .builtin import build_builtin, builtin_spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_builtin(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(pipeline, EditModel)`` of an embedded model."""
    spec = builtin_spec(name)
    pipe = build_builtin(name, dtype).to(device)
    return pipe, EditModel.from_pipeline(pipe, family=spec.family, source=f"builtin:{name}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaseModelError(f"base_model.id: {path.parent} has no {path.name}; is it a diffusers folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BaseModelError(f"base_model.id: {path} is not valid JSON ({exc})") from None


def read_card_license(folder: str | Path) -> str | None:
    """The ``license`` of a model folder's README.md front matter, if it has one."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    data = front_matter(card.read_text(encoding="utf-8", errors="replace")) or {}
    value = data.get("license")
    return str(value) if value else None


def detect_family(folder: Path) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from a diffusers folder's ``model_index.json``."""
    index = _read_json(folder / "model_index.json")
    class_name = str(index.get("_class_name", ""))
    if "text_encoder_2" in index and index.get("text_encoder_2") and index["text_encoder_2"][0] is not None:
        return "sdxl"
    if not class_name.startswith("StableDiffusion") or "text_encoder" not in index:
        raise UnsupportedModelError(
            f"base_model.id: {folder} holds a {class_name or 'unknown'} pipeline; erasepro_hub edits "
            "Stable Diffusion 1.x, 2.x and XL pipelines"
        )
    te_config = _read_json(folder / "text_encoder" / "config.json")
    tok_config_path = folder / "tokenizer" / "special_tokens_map.json"
    pad = None
    if tok_config_path.exists():
        pad_entry = _read_json(tok_config_path).get("pad_token")
        pad = pad_entry.get("content") if isinstance(pad_entry, dict) else pad_entry
    return sd_family(te_config.get("hidden_size"), pad)


def _unet_weight_files(unet_dir: Path) -> dict[str, Path]:
    """Map each UNet tensor name to the safetensors file that holds it."""
    single = unet_dir / "diffusion_pytorch_model.safetensors"
    index = unet_dir / "diffusion_pytorch_model.safetensors.index.json"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {key: single for key in handle.keys()}
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        return {key: unet_dir / name for key, name in weight_map.items()}
    if any(unet_dir.glob("*.bin")):
        raise BaseModelError(
            f"base_model.id: {unet_dir} holds only pickle (.bin) weights; erasepro_hub reads safetensors only. "
            "Convert the folder with diffusers (`pipe.save_pretrained(dir, safe_serialization=True)`)."
        )
    raise BaseModelError(f"base_model.id: no UNet weights (diffusion_pytorch_model.safetensors) in {unet_dir}")


def read_kv_weights(unet_dir: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read only the cross-attention ``to_k``/``to_v`` weights of a diffusers UNet folder."""
    from safetensors import safe_open

    files = _unet_weight_files(unet_dir)
    wanted = [key for key in files if key.endswith(tuple(f"{s}.weight" for s in KV_SUFFIXES))]
    by_file: dict[Path, list[str]] = {}
    for key in wanted:
        by_file.setdefault(files[key], []).append(key)
    weights: dict[str, torch.Tensor] = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in keys:
                tensor = handle.get_tensor(key).to(device=device, dtype=dtype)
                weights[f"unet.{key[: -len('.weight')]}"] = tensor
    return {key: weights[key] for key in sort_sites(weights)}


def _from_pretrained(cls, path: Path, dtype: torch.dtype):
    try:
        return cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, local_files_only=True)
    except TypeError:  # transformers 4 spells it torch_dtype
        return cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True, local_files_only=True)


def load_edit_model(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", source: str | None = None
) -> EditModel:
    """Load tokenizers, text encoders and cross-attention weights from a diffusers folder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    given = str(folder)
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise BaseModelError(
            f"base_model.id: the local base model folder {given!r} does not exist; give the path of a diffusers "
            "folder (one with model_index.json), a Hub id 'org/name', or builtin:tiny-sd"
        )
    device = torch.device(device)
    family = detect_family(folder)
    encoders = []
    for index, spec in enumerate(FAMILIES[family]):
        tok_dir = folder / ("tokenizer" if index == 0 else f"tokenizer_{index + 1}")
        te_dir = folder / spec.component
        if not te_dir.is_dir() or not tok_dir.is_dir():
            raise BaseModelError(f"base_model.id: {folder} lacks {te_dir.name}/ or {tok_dir.name}/")
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        cls = CLIPTextModelWithProjection if spec.pooled else CLIPTextModel
        try:
            model = _from_pretrained(cls, te_dir, dtype)
        except OSError as exc:
            raise BaseModelError(f"base_model.id: cannot load {te_dir} with safetensors: {exc}") from None
        model.to(device).eval().requires_grad_(False)
        encoders.append(TextEncoder(spec, model, tokenizer))
    kv = read_kv_weights(folder / "unet", dtype, device)
    return EditModel(family, encoders, kv, source or str(folder), dtype=dtype, device=device)
