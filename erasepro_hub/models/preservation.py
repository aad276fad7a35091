"""The default preserve set as the solver sees it: a low-rank summary of the captions' features at every stage.

Soft preservation (docs/design.md §2.2) needs, at each stage, the metric ``M = I + λ P Pᵀ`` of the
preserve features ``P`` (``d × M``). For a few hundred captions ``P`` has thousands of columns;
only ``P Pᵀ`` matters, and its leading eigen-directions carry nearly all of it. So each stage keeps
``S = U_r Λ_r^{1/2}`` (``d × r``, ``S Sᵀ ≈ P Pᵀ``, the top ``r`` eigenpairs, in float32), computed
once from the **original** model — the captions are not what the erasure changes, and earlier
stages keep them in place — and cached on disk under a key that covers everything the summary
depends on: the caption token ids, every text-encoder weight (of the token-embedding table, the
rows those ids read), the stages and their token positions, the rank. The solver's cost then no
longer grows with the number of captions.

The cache lives in ``$ERASEPRO_CACHE`` (default ``$XDG_CACHE_HOME/erasepro_hub`` or
``~/.cache/erasepro_hub``), one safetensors file per key, written atomically; an unreadable or
unwritable cache is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from itertools import chain
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..fsutil import replacing
from .base import EditModel, TextEncoder
from .conditioning import joint_single_positions
from .prompts import Encoded, Prompt, single_positions, single_rule

logger = logging.getLogger(__name__)

#: Eigen-directions kept per stage (docs/defaults.md: the measured effect of the rank).
CAPTION_RANK = 256
#: Bump when the way summaries are computed changes: old cache entries are then ignored.
SUMMARY_VERSION = 1
#: Captions per forward pass while the summaries are built.
CAPTION_BATCH = 64


def cache_dir() -> Path:
    root = os.environ.get("ERASEPRO_CACHE")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "erasepro_hub"


def summarize(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """``S`` (``d × r'``, ``r' ≤ rank``, float32) with ``S Sᵀ`` the best rank-``r'`` approximation of ``gram = P Pᵀ``.

    The eigendecomposition runs in float64; directions with no energy (``λ ≤ 1e-12 λ_max``) are dropped.
    """
    G = gram.double()
    values, U = torch.linalg.eigh((G + G.T) / 2)
    values, U = values.flip(0), U.flip(1)
    top = float(values[0]) if values.numel() else 0.0
    keep = min(rank, int((values > 1e-12 * top).sum())) if top > 0 else 0
    return (U[:, :keep] * values[:keep].sqrt()).float().contiguous()


#: module → (what its tensors are now, the sha256 of all of them but the token-embedding table's values, and per
#: set of token ids the sha256 of the table rows it reads): hashing a CLIP-L encoder takes most of a second, its
#: rows a caption set reads some milliseconds, and compare and the benchmarks solve many times on one loaded model.
#: An in-place change of a weight bumps its version counter, a new tensor has a new address: either makes the entry
#: stale.
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str, dict[str, str]]]" = weakref.WeakKeyDictionary()


def _token_embedding(module: torch.nn.Module) -> torch.Tensor | None:
    """The token-embedding table of a transformers text encoder (``None`` where it has none to report)."""
    get = getattr(module, "get_input_embeddings", None)
    try:
        table = get() if get is not None else None
    except NotImplementedError:
        return None
    weight = getattr(table, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.ndim == 2 else None


def _module_fingerprint(module: torch.nn.Module, ids: torch.Tensor) -> str:
    """sha256 of what a pass of the token ids ``ids`` through ``module`` reads: every tensor of its state, but of
    the token-embedding table only the rows ``ids`` select (with their indices; the table's name and shape too).

    The summaries depend on no other row, and the table is the largest tensor of a text encoder (49408 × 768
    in CLIP-L, 145 MB in float32): reading all of it would bring the whole memory-mapped table into memory for
    the rest of the process, where a solve needs a few thousand rows.
    """
    table = _token_embedding(module)

    def is_table(t: torch.Tensor) -> bool:  # (T5 ties two state entries to one table: both are the table)
        return table is not None and t.data_ptr() == table.data_ptr() and t.shape == table.shape

    # what the tensors are now, read without building a state dict (the hash below reads that, when it is stale)
    now = tuple((t.data_ptr(), t._version, t.dtype, tuple(t.shape)) for t in chain(module.parameters(), module.buffers()))
    known = _FINGERPRINTS.get(module)
    if known is None or known[0] != now:
        state = sorted(module.state_dict().items())
        digest = hashlib.sha256()
        for name, tensor in state:
            data = tensor.detach()
            digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
            if is_table(data):
                continue  # its rows are hashed below, per set of ids
            data = data.to("cpu").contiguous()
            digest.update(data.view(torch.uint8).numpy() if data.numel() else b"")  # the buffer itself: no copy
        known = (now, digest.hexdigest(), {})
        _FINGERPRINTS[module] = known
    if table is None:
        return known[1]
    rows = torch.unique(ids.detach().to("cpu", torch.long))
    seen = known[2].get(key := hashlib.sha256(rows.numpy().tobytes()).hexdigest())
    if seen is not None:
        return seen
    read = table.detach().index_select(0, rows.to(table.device)).to("cpu").contiguous()
    digest = hashlib.sha256(known[1].encode())
    digest.update(rows.numpy().tobytes())
    digest.update(read.view(torch.uint8).numpy())
    known[2][key] = digest.hexdigest()
    return known[2][key]


def _fingerprint(models: Sequence[torch.nn.Module], ids: Sequence[torch.Tensor]) -> str:
    joined = "".join(_module_fingerprint(m, i) for m, i in zip(models, ids, strict=True))
    return hashlib.sha256(joined.encode()).hexdigest()


def _cache_key(model: EditModel, ids: Sequence[torch.Tensor], stages: Mapping[str, tuple], policy: str, rank: int) -> str:
    token_hash = hashlib.sha256(b"".join(t.numpy().tobytes() for t in ids)).hexdigest()
    spec = {
        "version": SUMMARY_VERSION,
        "family": model.family,
        "tokens": token_hash,
        "weights": _fingerprint([te.model for te in model.text_encoders], ids),
        "stages": {name: list(map(str, where)) for name, where in stages.items()},
        "positions": single_rule(policy),
        "rank": rank,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def _load(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (OSError, SafetensorError, ValueError) as exc:
        if path.exists():
            logger.warning("ignoring an unreadable caption cache entry %s (%s)", path, exc)
        return None
    if set(tensors) != set(names) or any(t.ndim != 2 or t.dtype != torch.float32 for t in tensors.values()):
        logger.warning("ignoring a caption cache entry of the wrong shape: %s", path)
        return None
    stat = path.stat()
    stamp = (str(path), stat.st_mtime_ns, stat.st_size)
    if stamp not in _ORTHOGONAL:
        if not all(map(_orthogonal, tensors.values())):
            logger.warning("ignoring a caption cache entry whose columns are not orthogonal: %s", path)
            return None
        _ORTHOGONAL.add(stamp)
    return tensors


#: cache entries (path, mtime, size) whose summaries were found orthogonal in this process
_ORTHOGONAL: set[tuple[str, int, int]] = set()


def _orthogonal(S: torch.Tensor, tol: float = 1e-4) -> bool:
    """Whether the columns of a stored summary are orthogonal, as the solver takes them to be (it reads their Gram
    matrix as its diagonal, :class:`~erasepro_hub.solver.metric.Orthogonal`): ``Sᵀ S g = diag(SᵀS) g`` for a fixed
    pseudo-random ``g`` (two matrix-vector products; a stored eigenbasis meets it to the float32 rounding)."""
    if S.shape[1] == 0:
        return True
    S = S.double()
    g = torch.randn(S.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = S.square().sum(0) * g
    return bool(torch.isfinite(want).all()) and float((S.T @ (S @ g) - want).norm()) <= tol * float(want.norm())


def _store(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            save_file(dict(tensors), str(tmp))
    except OSError as exc:
        logger.warning("could not write the caption cache %s (%s); it will be recomputed next time", path, exc)


def caption_summaries(
    model: EditModel,
    captions: Sequence[Prompt],
    stages: Mapping[str, tuple[TextEncoder, torch.nn.Module, bool]],
    final_stage: str,
    *,
    policy: str,
    embed: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]],
    pooled_stage: str | None = None,
    rank: int = CAPTION_RANK,
    use_cache: bool = True,
) -> dict[str, torch.Tensor]:
    """``{stage: S}`` for every text-encoder stage (the input of its site) and the final stage (the prompt embedding).

    ``stages`` maps a stage name to ``(encoder, site module, at_eos)``: the site's inputs are read through the
    original encoder at the positions preservation keeps (:func:`~.prompts.single_positions` under ``policy``;
    the end-of-text token for ``at_eos`` stages). ``embed`` computes the prompt embedding and the pooled vector
    from the encoders' ids; ``pooled_stage`` names the summary of the pooled vectors (families that read it at a
    denoiser site), if wanted.
    """
    encoded = model.encode(captions)
    ids = [e.ids for e in encoded]
    names_in = {te.component: _module_names(te) for te, _, _ in stages.values()}
    where = {name: (te.component, names_in[te.component][id(module)], at_eos) for name, (te, module, at_eos) in stages.items()}
    finals = {final_stage: ("embedding",), **({pooled_stage: ("pooled",)} if pooled_stage else {})}
    key = _cache_key(model, ids, {**where, **finals}, policy, rank)
    path = cache_dir() / "captions" / f"{key}.safetensors"
    names = [*stages, *finals]
    if use_cache:
        cached = _load(path, names)
        if cached is not None:
            return cached
    # P Pᵀ per stage, accumulated over batches of captions (float32, d × d): the features themselves
    # (every position of a few hundred prompts, at a dozen stages) would not fit in memory at SD sizes
    grams: dict[str, torch.Tensor] = {}

    def add(name: str, columns: torch.Tensor) -> None:
        columns = columns.float()
        update = columns.T @ columns
        grams[name] = update if name not in grams else grams[name] + update

    handles = []
    batch: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, (te, module, at_eos) in stages.items():

        def hook(mod, args, name=name):
            x = args[0]
            r, p = batch[name]
            add(name, x[r.to(x.device), p.to(x.device)])

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(captions), CAPTION_BATCH):
                chunk = [e.ids[start : start + CAPTION_BATCH] for e in encoded]
                sub = [_rows(e, start, CAPTION_BATCH) for e in encoded]
                for name, (te, _, at_eos) in stages.items():
                    batch[name] = single_positions("eos" if at_eos else policy, sub[model.text_encoders.index(te)])
                embeddings, pooled = embed(chunk)
                rows, pos = joint_single_positions(model, policy, sub)
                add(final_stage, embeddings[rows.to(embeddings.device), pos.to(embeddings.device)])
                if pooled_stage:
                    add(pooled_stage, pooled)
    finally:
        for handle in handles:
            handle.remove()
    summaries = {name: summarize(grams[name].cpu(), rank) for name in names}
    if use_cache:
        _store(path, summaries)
    return summaries


def _rows(encoded: Encoded, start: int, size: int) -> Encoded:
    """A batch of an :class:`Encoded`."""
    stop = start + size
    return Encoded(encoded.ids[start:stop], encoded.tokens[start:stop], encoded.eos[start:stop], encoded.starts[start:stop])


def _module_names(te: TextEncoder) -> dict[int, str]:
    """``id(module) → its name`` for every module of the encoder (the stages' sites come from it)."""
    return {id(module): name for name, module in te.model.named_modules()}
