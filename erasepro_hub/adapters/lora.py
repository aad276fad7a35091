"""The adapter file: a diffusers/PEFT LoRA in safetensors, every scale folded into ``B``.

Keys::

    unet.<module path>.lora_A.weight                                           (r × in)
    unet.<module path>.lora_B.weight                                           (out × r)
    text_encoder.text_model.encoder.layers.N.mlp.fc2.lora_linear_layer.down.weight   (r × in)
    text_encoder.text_model.encoder.layers.N.mlp.fc2.lora_linear_layer.up.weight     (out × r)
    text_encoder_2.…                                                           (SDXL)

The UNet keys are PEFT's (``lora_A``/``lora_B``). The text-encoder keys use
diffusers' ``lora_linear_layer.down``/``up`` form instead: diffusers 0.42
converts a text-encoder state dict from PEFT form only for ``q/k/v/out_proj``
keys, so a file whose text-encoder keys are all ``fc1``/``fc2`` in PEFT form
fails to load ("Could not automatically infer state dict type"), while the
``lora_linear_layer`` form loads for every linear. :func:`read_adapter` accepts
both forms.

No ``lora_adapter_metadata`` and no alphas are written, so diffusers reads each
module's rank from its ``lora_B`` and uses scale 1.0 everywhere: ``W' = W + B A``
exactly. The safetensors header carries the recipe hash of the manifest that
made the file (``erasepro.recipe_sha256``), the tool version and the storage
format.

Each site is stored at the numerical rank of its update ``ΔW``, not at the
solver's column count (:func:`stored_deltas`), with
``max|B A − ΔW| ≤ 1e-6 · max|ΔW|`` in float32. A *dense* delta is stored
exactly as a LoRA too: ``B = I, A = ΔW`` when ``out ≤ in``, else ``B = ΔW, A = I``.

Why one module of this length: it is one file format, and what goes into the file (the stored deltas
and their ranks), how it is written and how it is read back and checked share the key forms, the dtype
codes and the layout; kept together, the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import AdapterFormatError
from ..fsutil import replacing
from ..solver import LowRankDelta
from ..solver.delta import owned

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
HEADER_RECIPE = "erasepro.recipe_sha256"
HEADER_MANIFEST = "erasepro.manifest_sha256"  # recipe + outputs + metrics (docs/design.md §4.1)
HEADER_VERSION = "erasepro.version"
HEADER_FORMAT = "erasepro.format"
_A, _B = ".lora_A.weight", ".lora_B.weight"
_DOWN, _UP = ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"


def factor_keys(site: str) -> tuple[str, str]:
    """``(A key, B key)`` of a site in the adapter file."""
    if site.startswith("text_encoder"):
        return site + _DOWN, site + _UP
    return site + _A, site + _B


def _split_factor_key(key: str) -> tuple[str, str] | None:
    """``(site, "A" | "B")`` for a factor key in either form, else ``None``."""
    for suffix, which in ((_A, "A"), (_B, "B"), (_DOWN, "A"), (_UP, "B")):
        if key.endswith(suffix):
            return key[: -len(suffix)], which
    return None


def dense_as_lora(delta: LowRankDelta) -> LowRankDelta:
    """The dense update ``ΔW`` as exact factors with an identity on the smaller side."""
    return LowRankDelta.from_dense(delta.dense(torch.float64))


@dataclass(frozen=True)
class StoredSite:
    """One site's update as the adapter file holds it (:func:`store_site`)."""

    #: the stored factors, in the adapter's dtype; rank 0 where nothing is stored (the zero update)
    delta: LowRankDelta
    #: the manifest's ``outputs.sites[*].update_rank``: the rank the file holds (``lora``), or the numerical rank
    #: the ``lora`` format would store (``dense``, which holds every site at full width); 0 where nothing is stored
    update_rank: int


def _check_format(fmt: str) -> None:
    if fmt not in ("lora", "dense"):
        raise ValueError(f"adapter format must be 'lora' or 'dense', got {fmt!r}")


def store_site(delta: LowRankDelta, fmt: str = "lora", dtype: torch.dtype = torch.float32) -> StoredSite:
    """One update as :func:`stored_deltas` stores it, with the rank the manifest records for it: what the erase
    command keeps of each site as the solve goes, instead of every float64 update until the end."""
    _check_format(fmt)
    nothing = StoredSite(LowRankDelta.zeros(*delta.shape, dtype=dtype), 0)
    if not delta.rank:
        return nothing
    if fmt == "dense":
        dense = dense_as_lora(delta)
        if not (torch.any(dense.A) and torch.any(dense.B)):  # (the identity is never zero: ΔW is not)
            return nothing
        return StoredSite(dense.to(dtype), delta.at_numerical_rank(dtype).rank)
    compact = delta.at_numerical_rank(dtype)
    if not compact.rank:  # a product that is exactly zero is the zero update too
        return nothing
    return StoredSite(compact.to(dtype), compact.rank)


def stored_deltas(
    deltas: Mapping[str, LowRankDelta], fmt: str = "lora", dtype: torch.dtype = torch.float32
) -> dict[str, LowRankDelta]:
    """The deltas exactly as an adapter file holds them: zero updates left out, the format and dtype applied.

    ``lora``: each site at the numerical rank of its ``ΔW`` (:meth:`LowRankDelta.at_numerical_rank`), not
    at the solver's column count, with ``max|B A − ΔW| ≤ 1e-6 · max|ΔW|`` checked after the cast to
    float32 (float16/bfloat16 round by more than that on their own). ``dense``: :func:`dense_as_lora`.
    """
    _check_format(fmt)
    stored = {}
    for key, delta in deltas.items():
        site = store_site(delta, fmt, dtype)
        if site.delta.rank:
            stored[key] = site.delta
    return stored


def to_state_dict(
    deltas: Mapping[str, LowRankDelta], *, fmt: str = "lora", dtype: torch.dtype = torch.float32,
    as_stored: bool = False,
) -> dict[str, torch.Tensor]:
    """LoRA tensors for every non-zero delta, keyed by ``<site>.lora_{A,B}.weight``.

    ``as_stored``: ``deltas`` already are :func:`stored_deltas` (in ``dtype``): written as they are, not
    compressed and rounded a second time.
    """
    if as_stored:
        wrong = next((key for key, delta in deltas.items() if delta.dtype != dtype), None)
        if wrong is not None:
            raise ValueError(f"{wrong} is stored as {deltas[wrong].dtype}, the adapter is {dtype}")
        chosen = {key: delta for key, delta in deltas.items() if delta.rank}
    else:
        chosen = stored_deltas(deltas, fmt, dtype)
    state: dict[str, torch.Tensor] = {}
    for key, stored in chosen.items():
        a_key, b_key = factor_keys(key)
        # the solver shares one identity factor between updates in dense form: each key gets its own tensor
        state[a_key] = owned(stored.A.contiguous().cpu())
        state[b_key] = owned(stored.B.contiguous().cpu())
    return state


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file byte-for-byte deterministically.

    The safetensors library stores ``__metadata__`` from a hash map, so two writes of
    the same content can order the header differently. Here the header is canonical
    JSON (sorted keys), tensors are laid out in key order and the header is padded
    with spaces to 8 bytes, as the format specifies: the same adapter always gives the
    same bytes, hence the same sha256. The file is written new beside ``path`` (a link's target's, for a
    symbolic link) and then replaces it, so a failed write leaves the old file as it was.
    """
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.dtype not in _DTYPE_CODES:
            raise ValueError(f"cannot store {key} of dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    # one tensor's bytes at a time (no copy of the whole file in memory), into a new file beside ``path`` that then
    # replaces it: the tensors may be memory-mapped from ``path`` itself (an adapter read and written back). A
    # symbolic link is written through, as an open for writing would: its target is replaced.
    with replacing(Path(path).resolve()) as tmp, open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for key in sorted(tensors):
            data = tensors[key].detach().to("cpu").contiguous().view(torch.uint8)  # held while written
            if data.numel():
                handle.write(data.numpy())


def save_adapter(
    path: str | Path,
    deltas: Mapping[str, LowRankDelta],
    *,
    recipe_sha256: str,
    version: str,
    fmt: str = "lora",
    dtype: torch.dtype = torch.float32,
    manifest_sha256: str | None = None,
    as_stored: bool = False,
) -> str:
    """Write the adapter file; returns its sha256. ``as_stored``: as for :func:`to_state_dict`."""
    state = to_state_dict(deltas, fmt=fmt, dtype=dtype, as_stored=as_stored)
    metadata = {"format": "pt", HEADER_RECIPE: recipe_sha256, HEADER_VERSION: version, HEADER_FORMAT: fmt}
    if manifest_sha256 is not None:
        metadata[HEADER_MANIFEST] = manifest_sha256
    write_safetensors(path, state, metadata)
    return file_sha256(path)


@dataclass(frozen=True)
class AdapterFile:
    """A read adapter: factors per site (in file order) and the safetensors header metadata."""

    deltas: dict[str, LowRankDelta]
    metadata: dict[str, str]

    @property
    def recipe_sha256(self) -> str | None:
        return self.metadata.get(HEADER_RECIPE)

    @property
    def manifest_sha256(self) -> str | None:
        return self.metadata.get(HEADER_MANIFEST)

    @property
    def stored_bytes(self) -> int:
        """The bytes of the factors the file holds (both factors of every site; the header left out)."""
        return sum(d.A.numel() * d.A.element_size() + d.B.numel() * d.B.element_size() for d in self.deltas.values())

    @property
    def dense_bytes(self) -> int:
        """The bytes of the same sites' dense updates ``m × d`` in the file's dtype."""
        return sum(math.prod(d.shape) * d.A.element_size() for d in self.deltas.values())


#: bytes per element of each safetensors dtype
_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
#: the safetensors format's own bound on the header
_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: more dimensions than any tensor of an adapter (2) or a model has
_MAX_DIMS = 8


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a key appears twice in one mapping")
    return dict(pairs)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_problem(entry: object) -> str | None:
    """Why a tensor entry of the header is malformed, or ``None``."""
    if not isinstance(entry, dict):
        return f"entry is a {type(entry).__name__}, not a mapping of dtype, shape and data_offsets"
    if set(entry) != {"dtype", "shape", "data_offsets"}:
        return f"entry has the keys {_short(sorted(entry))}, expected dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        return f"dtype {_short(dtype)} is not one of {', '.join(_DTYPE_SIZES)}"
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(_is_int(n) and n >= 0 for n in shape):
        return f"shape {_short(shape)} is not a list of at most {_MAX_DIMS} non-negative integers"
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(n) for n in offsets)):
        return f"data_offsets {_short(offsets)} is not a pair of integers [begin, end]"
    if not 0 <= offsets[0] <= offsets[1]:
        return f"data_offsets {_short(offsets)} are not in order (0 <= begin <= end)"
    return None


def _header(path: Path) -> tuple[dict, int]:
    """Parse and check the safetensors header ourselves before the safetensors library sees the file.

    ``__metadata__`` maps strings to strings; each tensor has a known ``dtype``, a ``shape`` of non-negative
    integers and ``data_offsets`` ``[begin, end]`` spanning exactly its bytes; the tensors tile the data
    with no gap, overlap or excess. Any problem is an :class:`AdapterFormatError` with a one-line reason.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise AdapterFormatError(f"{path} is not a safetensors file: only {size} bytes")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise AdapterFormatError(f"{path} is truncated or not a safetensors file (header length {length})")
        try:
            header = json.loads(
                handle.read(length), object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant
            )
        except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = "nested too deeply" if isinstance(exc, RecursionError) else " ".join(str(exc).split())[:200]
            raise AdapterFormatError(f"{path} has a corrupted safetensors header (not valid JSON: {reason})") from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise AdapterFormatError(f"{path} has a corrupted safetensors header (a {kind}, not a mapping)")
    metadata = {} if header.get("__metadata__") is None else header["__metadata__"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path} has a corrupted safetensors header: __metadata__ must map strings to strings")
    tensors = {key: entry for key, entry in header.items() if key != "__metadata__"}
    for key, entry in tensors.items():
        problem = _entry_problem(entry)
        if problem is not None:
            raise AdapterFormatError(f"{path} has a corrupted safetensors header: {_short(key)}: {problem}")
    data_size = size - 8 - length
    spans = sorted((entry["data_offsets"][0], entry["data_offsets"][1], key) for key, entry in tensors.items())
    end = max((stop for _, stop, _ in spans), default=0)
    if end != data_size:
        raise AdapterFormatError(
            f"{path} is truncated or padded: its header describes {end} bytes of tensors, the file holds {data_size}"
        )
    position = 0
    for begin, stop, key in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise AdapterFormatError(f"{path} has a corrupted safetensors header: {_short(key)} {what}")
        entry = tensors[key]
        expected = math.prod(entry["shape"]) * _DTYPE_SIZES[entry["dtype"]]
        if stop - begin != expected:
            raise AdapterFormatError(
                f"{path} has a corrupted safetensors header: {_short(key)} spans {stop - begin} bytes, its dtype "
                f"{entry['dtype']} and shape {entry['shape']} need {expected}"
            )
        position = stop
    return header, length


def read_adapter(path: str | Path) -> AdapterFile:
    """Read and check an adapter file: every site has an ``A`` and a ``B`` of matching rank."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdapterFormatError(f"adapter file not found: {path}")
    header, _ = _header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{path} is not a readable safetensors file: {exc}") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        parsed = _split_factor_key(key)
        if parsed is None:
            raise AdapterFormatError(
                f"{path}: unexpected tensor {key!r}; every key must end in {_A}, {_B}, {_DOWN} or {_UP}"
            )
        site, which = parsed
        if which in factors.setdefault(site, {}):
            raise AdapterFormatError(f"{path}: {site} has two {which} factors")
        factors[site][which] = tensor
    deltas: dict[str, LowRankDelta] = {}
    for site, pair in factors.items():
        if set(pair) != {"A", "B"}:
            missing = "B (up)" if "A" in pair else "A (down)"
            raise AdapterFormatError(f"{path}: {site} has no {missing} factor")
        A, B = pair["A"], pair["B"]
        if not (A.is_floating_point() and B.is_floating_point()) or A.ndim != 2 or B.ndim != 2:
            raise AdapterFormatError(f"{path}: {site} factors must be 2-D floating-point matrices")
        if B.shape[1] != A.shape[0] or A.dtype != B.dtype:
            raise AdapterFormatError(
                f"{path}: {site} factors do not match: B {tuple(B.shape)} {B.dtype}, A {tuple(A.shape)} {A.dtype}"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFormatError(f"{path}: {site} holds NaN or infinite values")
        deltas[site] = LowRankDelta(B, A)
    return AdapterFile(deltas, dict(metadata))
