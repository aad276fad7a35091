"""Loading just enough of a Stable Diffusion model to solve an erasure.

From a diffusers folder this reads ``model_index.json``, the tokenizer(s), the
text encoder(s), and *single tensors* of the denoiser — the UNet's cross-attention
``to_k``/``to_v`` weights (SD 1.x, 2.x, XL), or the MMDiT's ``context_embedder`` and
pooled-text linear (SD 3, FLUX.1) — out of its safetensors file(s): the UNet or
transformer is never instantiated and the VAE never touched. Weights are read from
safetensors only; a folder that holds only pickle (``.bin``) weights is refused.

A T5 text encoder (SD 3's ``text_encoder_3``, FLUX.1's ``text_encoder_2``) is loaded in the
dtype it is stored in, whatever dtype the solve asks for (:func:`t5_stored_dtype`).

A base-model folder is input like a manifest: every JSON file of a component is parsed and checked
here before the tokenizer or model library reads it, every safetensors file is opened and its header
checked before a tensor is read, and whatever the libraries still refuse becomes a
:class:`~erasepro_hub.errors.BaseModelError` that names the file or folder, on one line.

Why one module of this length: each step (family, tokenizers, text encoders, denoiser tensors) turns
a folder's failures into the same one-line errors; split apart, those error paths would be repeated.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import BaseModelError, UnsupportedModelError
from ..layout import front_matter
from .base import FAMILIES, KV_SUFFIXES, SUPPORTED, T5, EditModel, EncoderSpec, TextEncoder, sd_family, sort_sites
from .conditioning import CONDITIONING
from .builtin import build_builtin, builtin_spec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: safetensors dtype names of the floating dtypes a T5 encoder may be stored in
STORED_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: ``model_index.json`` class-name prefixes of the MMDiT families
MMDIT_CLASSES = (("StableDiffusion3", "sd3"), ("Flux", "flux"))
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


def _listed(index: dict, component: str) -> bool:
    """Whether ``model_index.json`` lists ``component`` as a loaded part (``[library, class]``, not ``null``)."""
    entry = index.get(component)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def _expected_class(spec: EncoderSpec) -> str:
    """The transformers class diffusers saves for an encoder of this spec."""
    if spec.arch is T5:
        return "T5EncoderModel"
    return "CLIPTextModelWithProjection" if spec.pooled == "text_embeds" else "CLIPTextModel"


def _check_mmdit_index(folder: Path, index: dict, class_name: str, family: str) -> None:
    """An SD 3 / FLUX.1 ``model_index.json`` must list every text encoder, tokenizer and the transformer, each
    encoder of the class diffusers ships (FLUX.2 and SD 3 saved without its T5 are refused here)."""
    parts = []
    for i, spec in enumerate(FAMILIES[family]):
        parts += [spec.component, "tokenizer" if i == 0 else f"tokenizer_{i + 1}"]
    missing = [name for name in [*parts, "transformer"] if not _listed(index, name)]
    if missing:
        raise UnsupportedModelError(
            f"base_model.id: {folder} holds a {class_name} pipeline without {', '.join(missing)} in its "
            f"model_index.json; erasepro_hub edits {SUPPORTED} with all their text encoders and the transformer"
        )
    for spec in FAMILIES[family]:
        found, expected = str(index[spec.component][1]), _expected_class(spec)
        if found != expected:
            raise UnsupportedModelError(
                f"base_model.id: {folder} holds a {class_name} pipeline whose {spec.component} is a {found}, not a "
                f"{expected}; erasepro_hub edits {SUPPORTED} as diffusers ships them"
            )


def detect_family(folder: Path) -> str:
    """``sd1``, ``sd2``, ``sdxl``, ``sd3`` or ``flux`` from a diffusers folder's ``model_index.json``."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    class_name = str(index.get("_class_name", ""))
    for prefix, family in MMDIT_CLASSES:
        if class_name.startswith(prefix):
            _check_mmdit_index(folder, index, class_name, family)
            return family
    if not class_name.startswith("StableDiffusion") or "text_encoder" not in index:
        raise UnsupportedModelError(
            f"base_model.id: {folder} holds a {class_name or 'unknown'} pipeline; erasepro_hub edits {SUPPORTED}"
        )
    te2 = index.get("text_encoder_2")
    if isinstance(te2, list) and te2 and te2[0] is not None:
        return "sdxl"
    te_config = _read_json(folder / "text_encoder" / "config.json")
    tok_config_path = folder / "tokenizer" / "special_tokens_map.json"
    pad = None
    if tok_config_path.exists():
        pad_entry = _read_json(tok_config_path).get("pad_token")
        pad = pad_entry.get("content") if isinstance(pad_entry, dict) else pad_entry
    return sd_family(te_config.get("hidden_size"), pad)


def _denoiser_name(denoiser_dir: Path) -> str:
    return "transformer" if denoiser_dir.name == "transformer" else "UNet"


def _checked_weight_map(index: Path, folder: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded-safetensors index: tensor name → a file name inside ``folder``."""
    weight_map = _read_json(index).get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v and v not in (".", "..")
        for k, v in weight_map.items()
    ):
        raise BaseModelError(
            f"base_model.id: {index} must map each tensor name to a file name in {folder.name}/ (weight_map)"
        )
    return weight_map


def _denoiser_weight_files(denoiser_dir: Path) -> dict[str, Path]:
    """Map each tensor name of a UNet or transformer folder to the safetensors file that holds it."""
    what = _denoiser_name(denoiser_dir)
    single = denoiser_dir / "diffusion_pytorch_model.safetensors"
    index = denoiser_dir / "diffusion_pytorch_model.safetensors.index.json"
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
        return {key: denoiser_dir / name for key, name in _checked_weight_map(index, denoiser_dir).items()}
    if any(denoiser_dir.glob("*.bin")):
        raise BaseModelError(
            f"base_model.id: {denoiser_dir} holds only pickle (.bin) weights; erasepro_hub reads safetensors only. "
            "Convert the folder with diffusers (`pipe.save_pretrained(dir, safe_serialization=True)`)."
        )
    raise BaseModelError(f"base_model.id: no {what} weights (diffusion_pytorch_model.safetensors) in {denoiser_dir}")


def _read_tensors(
    denoiser_dir: Path, files: dict[str, Path], keys: list[str], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (``<path>.weight``) of a denoiser folder, as ``{<denoiser>.<path>: tensor}``."""
    from safetensors import safe_open

    what = _denoiser_name(denoiser_dir)
    prefix = "transformer" if what == "transformer" else "unet"
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(files[key], []).append(key)
    weights: dict[str, torch.Tensor] = {}
    for path, wanted in by_file.items():
        if not path.is_file():
            raise BaseModelError(f"base_model.id: {path} is missing (the {what} weight index lists it)")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                read = {key: handle.get_tensor(key) for key in wanted}
        except Exception as exc:  # noqa: BLE001 - the library's errors have no common type; each is a bad file
            raise BaseModelError(f"base_model.id: cannot read the {what} weights in {path} ({_reason(exc)})") from None
        for key, tensor in read.items():
            weights[f"{prefix}.{key[: -len('.weight')]}"] = tensor.to(device=device, dtype=dtype)
    return weights


def read_kv_weights(unet_dir: Path, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read only the cross-attention ``to_k``/``to_v`` weights of a diffusers UNet folder."""
    files = _denoiser_weight_files(unet_dir)
    wanted = [key for key in files if key.endswith(tuple(f"{s}.weight" for s in KV_SUFFIXES))]
    weights = _read_tensors(unet_dir, files, wanted, dtype, device)
    return {key: weights[key] for key in sort_sites(weights)}


def read_site_weights(
    transformer_dir: Path, sites: tuple[str, ...], dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """Read only the weights of ``sites`` (module paths, e.g. ``context_embedder``) of a diffusers transformer
    folder, keyed ``transformer.<site>`` in the order given; every one must be there."""
    files = _denoiser_weight_files(transformer_dir)
    missing = [site for site in sites if f"{site}.weight" not in files]
    if missing:
        raise UnsupportedModelError(
            f"base_model.id: the transformer in {transformer_dir} has no {', '.join(f'{m}.weight' for m in missing)}; "
            f"erasepro_hub edits {SUPPORTED}"
        )
    weights = _read_tensors(transformer_dir, files, [f"{site}.weight" for site in sites], dtype, device)
    return {f"transformer.{site}": weights[f"transformer.{site}"] for site in sites}


def _largest_tensor_dtype(path: Path) -> str | None:
    """The safetensors dtype name (``BF16``, ``F16``, ...) of the largest tensor of a file (header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            best, best_size = None, -1
            for key in handle.keys():
                piece = handle.get_slice(key)
                size = 1
                for n in piece.get_shape():
                    size *= int(n)
                if size > best_size:
                    best, best_size = piece.get_dtype(), size
            return best
    except Exception as exc:  # noqa: BLE001 - the library's errors have no common type; each is a bad file
        raise BaseModelError(f"base_model.id: {path} is not a readable safetensors file ({_reason(exc)})") from None


def t5_stored_dtype(te_dir: Path, fallback: torch.dtype) -> torch.dtype:
    """The dtype a T5 encoder folder is stored in: that of the largest tensor of ``model.safetensors`` (or of
    the first shard its ``model.safetensors.index.json`` lists), else the config's ``dtype``/``torch_dtype``,
    else ``fallback``.

    T5-XXL's encoder (SD 3, FLUX.1) has 4.7 billion parameters: about 9.5 GB in bfloat16/float16, 19 GB if
    up-cast to float32. It is therefore loaded in the dtype it is stored in, never up-cast to the solve's
    dtype: the solve runs T5 only forward (it edits no T5 layer), and computes its outputs in that dtype —
    the dtype the pipeline computes them in when it loads the checkpoint as stored. (transformers still keeps
    T5's ``wo`` projections in float32 when the dtype is float16, as the pipeline's loader does.)
    """
    single = te_dir / "model.safetensors"
    index = te_dir / "model.safetensors.index.json"
    first = None
    if single.is_file():
        first = single
    elif index.is_file():
        weight_map = _checked_weight_map(index, te_dir)
        if weight_map:
            first = te_dir / weight_map[sorted(weight_map)[0]]
    name = _largest_tensor_dtype(first) if first is not None and first.is_file() else None
    if name is None:
        config = _read_json(te_dir / "config.json")
        configured = config.get("dtype") or config.get("torch_dtype")
        if configured is None:
            return fallback
        if configured not in DTYPES:
            raise BaseModelError(
                f"base_model.id: {te_dir}/config.json gives the T5 dtype {configured!r}; erasepro_hub loads T5 "
                "encoders stored in float32, float16 or bfloat16"
            )
        return DTYPES[configured]
    if name not in STORED_DTYPES:
        raise BaseModelError(
            f"base_model.id: {first} stores the T5 encoder in {name}; erasepro_hub loads T5 encoders stored in "
            "float32, float16 or bfloat16 (use the diffusers release of the model)"
        )
    return STORED_DTYPES[name]


def _from_pretrained(cls, path: Path, dtype: torch.dtype):
    try:
        return cls.from_pretrained(str(path), dtype=dtype, use_safetensors=True, local_files_only=True)
    except TypeError:  # transformers 4 spells it torch_dtype
        return cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True, local_files_only=True)


def _load_tokenizer(tok_dir: Path, spec: EncoderSpec):
    """CLIP slots with ``CLIPTokenizer``; a T5 slot with ``AutoTokenizer`` (T5's, or whatever class it holds)."""
    from transformers import AutoTokenizer, CLIPTokenizer

    tok_files = _check_component(tok_dir)
    cls = AutoTokenizer if spec.arch is T5 else CLIPTokenizer
    try:
        return cls.from_pretrained(str(tok_dir), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - the tokenizer library's errors on bad files have no common type
        raise BaseModelError(
            f"base_model.id: cannot load the tokenizer in {tok_dir} ({', '.join(tok_files) or 'no files'}): "
            f"{_reason(exc)}"
        ) from None


def _load_text_encoder(te_dir: Path, spec: EncoderSpec, dtype: torch.dtype, device: torch.device):
    """The text encoder of ``spec``: CLIP in ``dtype``, T5 in the dtype it is stored in (:func:`t5_stored_dtype`)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    te_files = _check_component(te_dir)
    if spec.arch is T5:
        cls, dtype = T5EncoderModel, t5_stored_dtype(te_dir, dtype)
    else:
        cls = CLIPTextModelWithProjection if spec.pooled == "text_embeds" else CLIPTextModel
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
    return model.to(device).eval().requires_grad_(False)


def load_edit_model(
    folder: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", source: str | None = None
) -> EditModel:
    """Load tokenizers, text encoders and the denoiser's text-reading weights from a diffusers folder.

    SD 1.x/2.x/XL: the UNet's cross-attention ``to_k``/``to_v``. SD 3 / FLUX.1: the transformer's sequence and
    pooled sites (``CONDITIONING[family]``), read as single tensors. Every text encoder is in ``dtype``, except
    a T5, which stays in the dtype it is stored in (:func:`t5_stored_dtype`).
    """
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
        tokenizer = _load_tokenizer(tok_dir, spec)
        encoders.append(TextEncoder(spec, _load_text_encoder(te_dir, spec, dtype, device), tokenizer))
    layout = CONDITIONING[family]
    pooled: dict[str, torch.Tensor] = {}
    if layout.sequence_sites:
        transformer_dir = folder / "transformer"
        if not transformer_dir.is_dir():
            raise BaseModelError(f"base_model.id: {folder} lacks transformer/; is it a complete diffusers folder?")
        kv = read_site_weights(transformer_dir, layout.sequence_sites, dtype, device)
        pooled = read_site_weights(transformer_dir, layout.pooled_sites, dtype, device)
    else:
        kv = read_kv_weights(folder / "unet", dtype, device)
    return EditModel(family, encoders, kv, source or str(folder), dtype=dtype, device=device, pooled_weights=pooled)
