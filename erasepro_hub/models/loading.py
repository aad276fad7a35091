"""Loading just enough of a Stable Diffusion model to solve an erasure.

From a diffusers folder this reads ``model_index.json``, the tokenizer(s), the
text encoder(s), and *single tensors* of the UNet (the cross-attention
``to_k``/``to_v`` weights) out of its safetensors file(s): the UNet is never
instantiated and the VAE never touched. Weights are read from safetensors only;
a folder that holds only pickle (``.bin``) weights is refused.

A base-model folder is input like a manifest: every JSON file of a component is parsed and checked
here before the tokenizer or model library reads it, every safetensors file is opened and its header
checked before a tensor is read, and whatever the libraries still refuse becomes a
:class:`~erasepro_hub.errors.BaseModelError` that names the file or folder, on one line.
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
#: the largest JSON file of a model folder read (a CLIP tokenizer.json is about 2 MiB)
MAX_JSON_BYTES = 64 * 2**20


def _reason(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and message."""
    text = " ".join(str(exc).split()) or "no details"
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}"


def load_builtin(name: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``(pipeline, EditModel)`` of an embedded model."""
    spec = builtin_spec(name)
    pipe = build_builtin(name, dtype).to(device)
    return pipe, EditModel.from_pipeline(pipe, family=spec.family, source=f"builtin:{name}")


def _read_json(path: Path) -> dict:
    """A JSON object from a model folder; anything else is a :class:`BaseModelError` naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise BaseModelError(f"base_model.id: {path.parent} has no {path.name}; is it a diffusers folder?") from None
    except OSError as exc:
        raise BaseModelError(f"base_model.id: cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise BaseModelError(f"base_model.id: {path} is larger than {MAX_JSON_BYTES // 2**20} MiB; not a config file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _reason(exc)
        raise BaseModelError(f"base_model.id: {path} is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"base_model.id: {path} must hold a JSON object, not a {type(data).__name__}")
    return data


def _check_component(folder: Path) -> list[str]:
    """Check every JSON and safetensors file of a component folder; returns its file names."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in names:
        if name.endswith(".json"):
            _read_json(folder / name)
        elif name.endswith(".safetensors"):
            _check_safetensors(folder / name)
    return names


def _check_safetensors(path: Path) -> None:
    """Open a safetensors file (its header is parsed and checked; no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            handle.keys()
    except Exception as exc:  # noqa: BLE001 - the library's errors have no common type; each is a bad file
        raise BaseModelError(f"base_model.id: {path} is not a readable safetensors file ({_reason(exc)})") from None


def read_card_license(folder: str | Path) -> str | None:
    """The ``license`` of a model folder's README.md front matter, if it has one."""
    card = Path(folder) / "README.md"
    if not card.is_file():
        return None
    if card.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        data = front_matter(card.read_text(encoding="utf-8", errors="replace")) or {}
    except RecursionError:
        return None
    value = data.get("license")
    # a scalar only: str() of a nested value could expand YAML aliases without bound
    return str(value) if value and isinstance(value, (str, int, float)) else None


def detect_family(folder: Path) -> str:
    """``sd1``, ``sd2`` or ``sdxl`` from a diffusers folder's ``model_index.json``."""
    index = _read_json(folder / "model_index.json")
    class_name = str(index.get("_class_name", ""))
    te2 = index.get("text_encoder_2")
    if isinstance(te2, list) and te2 and te2[0] is not None:
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

        try:
            with safe_open(str(single), framework="pt") as handle:
                return {key: single for key in handle.keys()}
        except Exception as exc:  # noqa: BLE001 - the library's errors have no common type; each is a bad file
            raise BaseModelError(
                f"base_model.id: {single} is not a readable safetensors file ({_reason(exc)})"
            ) from None
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
            for k, v in weight_map.items()
        ):
            raise BaseModelError(
                f"base_model.id: {index} must map each tensor name to a file name in {unet_dir.name}/ (weight_map)"
            )
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
        if not path.is_file():
            raise BaseModelError(f"base_model.id: {path} is missing (the UNet weight index lists it)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                read = {key: handle.get_tensor(key) for key in keys}
        except Exception as exc:  # noqa: BLE001 - the library's errors have no common type; each is a bad file
            raise BaseModelError(f"base_model.id: cannot read the UNet weights in {path} ({_reason(exc)})") from None
        for key, tensor in read.items():
            weights[f"unet.{key[: -len('.weight')]}"] = tensor.to(device=device, dtype=dtype)
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
        tok_files = _check_component(tok_dir)
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - the tokenizer library's errors on bad files have no common type
            raise BaseModelError(
                f"base_model.id: cannot load the tokenizer in {tok_dir} ({', '.join(tok_files) or 'no files'}): "
                f"{_reason(exc)}"
            ) from None
        te_files = _check_component(te_dir)
        cls = CLIPTextModelWithProjection if spec.pooled else CLIPTextModel
        try:
            model = _from_pretrained(cls, te_dir, dtype)
        except OSError as exc:
            raise BaseModelError(f"base_model.id: cannot load {te_dir} with safetensors: {_reason(exc)}") from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the model library's errors on bad files have no common type
            raise BaseModelError(
                f"base_model.id: cannot load the text encoder in {te_dir} ({', '.join(te_files) or 'no files'}): "
                f"{_reason(exc)}"
            ) from None
        model.to(device).eval().requires_grad_(False)
        encoders.append(TextEncoder(spec, model, tokenizer))
    kv = read_kv_weights(folder / "unet", dtype, device)
    return EditModel(family, encoders, kv, source or str(folder), dtype=dtype, device=device)
