"""The preservation metric ``M = I + Q Qᵀ`` of a solve, as the operator ``Y ↦ M⁻¹ Y`` (docs/design.md §2.2).

``Q`` holds the metric's columns — preserve features (weighted), a caption summary, soft targets — in
blocks. While they are fewer than the input width ``d``, Woodbury needs only the ``k × k`` Gram matrix
``QᵀQ``, formed and applied block by block (:func:`block_gram`; a caption summary's own block is the
diagonal of its orthogonal columns, :class:`Orthogonal`); otherwise the ``d × d`` matrix ``M`` is formed and
factorised. Soft targets can be added on top of
an existing metric (:func:`with_columns`) so that two small Gram matrices are formed instead of one wide one.
The Gram matrices are taken in float32 when every feature came in float32 (:func:`gram`); the constraints
of a solve do not depend on ``M`` (only the preservation weighting does), so they stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class Scaled:
    """A block of the metric's columns, ``scale · columns``: scaled only where the blocks are put side by side
    (:func:`side_by_side`). Where the metric is the ``d × d`` Cholesky (columns as many as the input is wide: the
    thousands of soft targets of a many-concept solve) that copy lives only while the Gram matrix is formed;
    Woodbury applies the scale to its ``k``-row products instead (:func:`metric_solver`)."""

    columns: Tensor
    scale: float

    @property
    def shape(self) -> torch.Size:
        return self.columns.shape


@dataclass(frozen=True)
class Orthogonal:
    """A block ``scale · columns`` whose columns are orthogonal to each other (an eigenbasis scaled, as a caption
    summary is, :mod:`erasepro_hub.models.preservation`): its own Gram matrix is the diagonal of its squared column
    norms, which Woodbury's ``k × k`` Gram matrix takes instead of the product (the off-diagonal entries are the
    stored columns' rounding)."""

    columns: Tensor
    scale: float = 1.0

    @property
    def shape(self) -> torch.Size:
        return self.columns.shape


Block = Union[Tensor, Scaled, Orthogonal]


def _columns(block: Block) -> tuple[Tensor, float]:
    """A block's ``(columns, scale)``: ``d × k`` and a float."""
    if isinstance(block, (Scaled, Orthogonal)):
        return block.columns, block.scale
    return block, 1.0


def side_by_side(blocks: Sequence[Block], dtype: torch.dtype | None = None) -> Tensor:
    """The blocks' columns side by side, each :class:`Scaled` block times its scale (in its own dtype, then cast to
    ``dtype``: the values a scaled copy cast to ``dtype`` would have)."""
    parts = [columns * scale if scale != 1.0 else columns for columns, scale in map(_columns, blocks)]
    if dtype is not None:
        parts = [part.to(dtype) for part in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def gram(F: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """``Fᵀ F`` as a symmetric float64 matrix, the product taken in ``dtype``.

    It only ever forms a preservation metric ``M = I + Q Qᵀ`` (or its Woodbury kernel). When every feature in it
    came in float32 (a float32 forward pass, the float32 caption summary), the product is taken in float32 —
    half the time; its rounding (``~6e-8`` of ``||q_i|| ||q_j||``) is that of the features themselves. The
    result is symmetrised, so every ``M⁻¹`` applied is the inverse of one symmetric matrix and the constraints
    ``ΔW X = R`` hold to float64 precision whatever ``M`` is; only the preservation weighting moves, by that
    rounding. The off-diagonal blocks of a wide ``F`` are computed once (a quarter less work).
    """
    F = F.to(dtype)
    k = F.shape[1]
    if k < 256:
        G = F.T @ F
        return ((G + G.T) / 2).double()
    h = k // 2
    G = torch.empty(k, k, dtype=torch.float64, device=F.device)
    for rows in (slice(0, h), slice(h, k)):
        block = F[:, rows].T @ F[:, rows]
        G[rows, rows] = (block + block.T) / 2
    corner = F[:, :h].T @ F[:, h:]
    G[:h, h:] = corner
    G[h:, :h] = corner.T
    return G


def metric_cholesky(blocks: Sequence[Block], dtype: torch.dtype) -> Tensor:
    """The Cholesky factor of ``M = I + Σ B Bᵀ`` (``d × d``); the blocks are put side by side in ``dtype``."""
    return cholesky_of_metric(gram(side_by_side(blocks, dtype).T, dtype))


def cholesky_of_metric(G: Tensor) -> Tensor:
    """The Cholesky factor of ``I + G`` (``G`` symmetric, the caller's Gram matrix: overwritten, not read again).

    Factorised in place: LAPACK works on column-major matrices, and ``Gᵀ`` (the same values) is one, so the
    factor is written over ``G``'s storage (75 MB at d = 3072); given ``G`` itself as ``out``, torch would
    factorise into a column-major temporary of that size and copy it back. A NaN or inf in the metric's
    features reaches ``G`` and from there a diagonal entry of the factor: reported here, checked on the ``d``
    (or ``k``) diagonal entries only."""
    G.diagonal().add_(1.0)
    L = G.mT
    _, info = torch.linalg.cholesky_ex(L, out=(L, torch.empty((), dtype=torch.int32, device=G.device)))
    if int(info) or not torch.isfinite(L.diagonal()).all():
        raise ValueError("the preserve features (preserve prompts or caption summary) contain NaN or infinite values")
    return L


def metric_solver(blocks: Sequence[Block], dtype: torch.dtype = torch.float64) -> Callable[[Tensor], Tensor]:
    """``Y ↦ M⁻¹ Y`` for ``M = I + Q Qᵀ``, ``Q`` the column ``blocks`` side by side: Woodbury (a ``k × k`` Cholesky)
    while ``Q`` is narrower than the input, the ``d × d`` Cholesky otherwise; Gram matrices taken in ``dtype``
    (:func:`gram`). An :class:`Orthogonal` block's own Gram block is diagonal, so Woodbury eliminates it first:
    the Cholesky is that of the other blocks' Schur complement (:func:`_schur_solver`)."""
    d, k = blocks[0].shape[0], sum(b.shape[1] for b in blocks)
    if k >= d:
        L = metric_cholesky(blocks, dtype)
        return lambda Y: torch.cholesky_solve(Y, L)
    orthogonal = [b for b in blocks if isinstance(b, Orthogonal)]
    if len(orthogonal) == 1:
        return _schur_solver([b for b in blocks if not isinstance(b, Orthogonal)], orthogonal[0], dtype)
    L = cholesky_of_metric(block_gram(blocks, dtype))  # I + Qᵀ Q
    # Q is never put together: each block, in float64, reads and writes its own rows of the k × n middle (float32
    # products here would leave the constraints to the refinement of solve: the update is Y less a near copy of it)
    parts = [(columns.to(torch.float64), scale) for columns, scale in map(_columns, blocks)]

    def solve_m(Y: Tensor) -> Tensor:
        YT = Y.T.contiguous()
        inner = torch.cholesky_solve(_times_y(parts, YT), L)
        return Y - _low_rank(parts, inner).T

    return solve_m


def _times_y(parts: Sequence[tuple[Tensor, float]], YT: Tensor) -> Tensor:
    """``Qᵀ Y`` (``k × n``) from ``Yᵀ``: skinny products are taken with the narrow operand on the left, as ``(Yᵀ B)ᵀ``
    and ``(innerᵀ Bᵀ)ᵀ`` (:func:`_low_rank`); BLAS runs them several times faster that way round."""
    return torch.cat([(YT @ B).T * scale for B, scale in parts])


def _low_rank(parts: Sequence[tuple[Tensor, float]], inner: Tensor) -> Tensor:
    """``(Q inner)ᵀ`` (``n × d``), ``inner`` the ``k × n`` rows of the blocks in order."""
    start, out = 0, None
    for B, scale in parts:
        rows = inner[start : start + B.shape[1]] * scale
        out = rows.T @ B.T if out is None else out.addmm_(rows.T, B.T)
        start += B.shape[1]
    return out


def _schur_solver(others: Sequence[Block], orthogonal: Orthogonal, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """:func:`metric_solver` with one :class:`Orthogonal` block ``O`` among the others ``B``: ``I + QᵀQ`` is
    ``[[I + BᵀB, C], [Cᵀ, I + D]]`` with ``C = Bᵀ O`` and ``D`` the diagonal ``OᵀO``, so its Cholesky is that of the
    Schur complement ``K = I + BᵀB − C (I + D)⁻¹ Cᵀ``, as wide as the other blocks (the preserve prompts' columns,
    against the caption summary's 256 more), and the inner solve is
    ``i_B = K⁻¹ (Bᵀy − C (I + D)⁻¹ Oᵀy)``, ``i_O = (I + D)⁻¹ (Oᵀy − Cᵀ i_B)``."""
    columns, scale = _columns(orthogonal)
    O = columns.to(dtype)
    over = 1.0 / (1.0 + (O * O).sum(0).double() * scale**2)  # (I + D)⁻¹, D in ``dtype`` as the products
    if not torch.isfinite(over).all():
        raise ValueError("the preserve features (preserve prompts or caption summary) contain NaN or infinite values")
    parts = [(b.to(torch.float64), s) for b, s in map(_columns, others)]
    L = None
    if others:
        narrow = [Scaled(b.to(dtype), s) for b, s in map(_columns, others)]  # cast once, for C and for BᵀB
        corner = torch.cat([(b.columns.T @ O).double() * (b.scale * scale) for b in narrow])  # C
        L = cholesky_of_metric(block_gram(narrow, dtype) - (corner * over) @ corner.T)  # K
    O64 = columns.to(torch.float64)
    both = [*parts, (O64, scale)]

    def solve_m(Y: Tensor) -> Tensor:
        YT = Y.T.contiguous()
        rows = _times_y(both, YT)  # [Bᵀy; Oᵀy]
        split = rows.shape[0] - O64.shape[1]
        o = rows[split:] * over[:, None]
        if L is not None:
            inner_b = torch.cholesky_solve(rows[:split] - corner @ o, L)
            o = o - (corner.T @ inner_b) * over[:, None]
            o = torch.cat([inner_b, o])
        return Y - _low_rank(both, o).T

    return solve_m


def block_gram(blocks: Sequence[Block], dtype: torch.dtype = torch.float64) -> Tensor:
    """``Qᵀ Q`` (float64, exactly symmetric) for ``Q`` the ``blocks`` side by side, block by block: no copy of ``Q``
    (its blocks come as views, the preserve features transposed), each block cast to ``dtype`` once, each
    off-diagonal block computed once, an :class:`Orthogonal` block's own one its squared column norms."""
    parts = [(*_columns(b), isinstance(b, Orthogonal)) for b in blocks]
    parts = [(columns.to(dtype), scale, orthogonal) for columns, scale, orthogonal in parts]
    sizes = [columns.shape[1] for columns, _, _ in parts]
    k = sum(sizes)
    G = torch.empty(k, k, dtype=torch.float64, device=parts[0][0].device)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for i, (Bi, si, orthogonal) in enumerate(parts):
        rows = slice(starts[i], starts[i] + sizes[i])
        if orthogonal:
            G[rows, rows] = torch.diag((Bi * Bi).sum(0).double() * si**2)  # in ``dtype``, as the products
        else:
            G[rows, rows] = gram(Bi, dtype) * si**2
        for j in range(i + 1, len(parts)):
            Bj, sj, _ = parts[j]
            cols = slice(starts[j], starts[j] + sizes[j])
            corner = (Bi.T @ Bj).double() * (si * sj)
            G[rows, cols] = corner
            G[cols, rows] = corner.T
    return G


_PROBES: dict[tuple[int, str], Tensor] = {}


def _probe(d: int, device: str) -> Tensor:
    """A fixed pseudo-random float64 vector of length ``d``: column ``j`` of a matrix hashes to ``probe · p_j``."""
    if (d, device) not in _PROBES:
        _PROBES[d, device] = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(device)
    return _PROBES[d, device]


def merge_equal_columns(P: Tensor, *alongside: Tensor) -> tuple[Tensor, ...]:
    """``P`` (``d × M``) with each set of bit-for-bit equal columns as one column times √(copies), in the order they
    first appear, and the columns of ``alongside`` (``· × M`` each) taken and scaled alike.

    Every use a solve makes of preserve features is unchanged by it: the metric's ``λ P Pᵀ``, the norms
    ``||ΔW P||`` and ``||W P||`` are sums over columns of squares, and ``ΔW p = 0`` holds for a column exactly when
    it holds for a multiple of it. Preserve prompts repeat columns: a causal encoder gives every one of them the same
    BOS column, and the prompts of one template share the columns of its prefix (about half of them, on SD-1.5
    shapes). Columns are grouped by a hash, ``probe · p``, and merged only where they are equal.
    """
    if P.ndim != 2 or any(t.ndim != 2 or t.shape[1] != P.shape[1] for t in alongside):
        raise ValueError(
            f"merge_equal_columns needs a d × M matrix and matrices of M columns beside it, got {tuple(P.shape)} and "
            f"{[tuple(t.shape) for t in alongside]}"
        )
    m = P.shape[1]
    if m < 2:
        return (P, *alongside)
    first: dict[float, int] = {}
    firsts = [first.setdefault(key, j) for j, key in enumerate((_probe(P.shape[0], str(P.device)) @ P.double()).tolist())]
    copies = [j for j, f in enumerate(firsts) if f != j]
    if not copies:
        return (P, *alongside)
    rows = P.T  # the columns as rows: preserve features come as the transpose of gathered rows, so a row gather
    pick = torch.tensor(copies, device=P.device)
    equal = (rows[pick] == rows[torch.tensor([firsts[j] for j in copies], device=P.device)]).all(dim=1).tolist()
    for j, same in zip(copies, equal):
        if not same:  # a hash shared by unequal columns: kept apart
            firsts[j] = j
    counts: dict[int, int] = {}
    for f in firsts:
        counts[f] = counts.get(f, 0) + 1
    keep = torch.tensor(list(counts), device=P.device)  # in the order the columns first appear
    scale = torch.tensor(list(counts.values()), dtype=torch.float64).sqrt()
    return tuple((t.T[keep] * scale.to(device=t.device, dtype=t.dtype)[:, None]).T for t in (P, *alongside))


def with_columns(
    solve_m: Callable[[Tensor], Tensor], C: Tensor, Y: Tensor
) -> tuple[Callable[[Tensor], Tensor], Tensor, Tensor]:
    """``Y ↦ (M + C Cᵀ)⁻¹ Y`` from ``Y ↦ M⁻¹ Y`` (Woodbury once more): ``M⁻¹Y − M⁻¹C (I + Cᵀ M⁻¹ C)⁻¹ Cᵀ M⁻¹ Y``;
    ``(M + C Cᵀ)⁻¹ C = M⁻¹C (I + Cᵀ M⁻¹ C)⁻¹`` (push-through), which the soft targets need; and that solver
    applied to ``Y`` already (``M⁻¹`` applied once to ``[C Y]`` together).

    Costs ``k² d`` for the ``k`` columns of ``C`` instead of ``(k + k_M)² d`` for one metric holding both.
    """
    k = C.shape[1]
    both = solve_m(torch.cat([C, Y], dim=1))
    MC, MY = both[:, :k], both[:, k:]
    L = torch.linalg.cholesky(torch.eye(k, dtype=torch.float64, device=C.device) + C.T @ MC)

    def correct(MY: Tensor) -> Tensor:
        return MY - MC @ torch.cholesky_solve(C.T @ MY, L)

    return (lambda Y: correct(solve_m(Y))), torch.cholesky_solve(MC.T, L).T, correct(MY)
