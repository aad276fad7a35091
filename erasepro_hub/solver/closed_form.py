"""Closed-form weight edits for one linear layer ``y = W x`` (torch layout, ``W`` is ``m × d``).

All three solvers share one shape. A *factorisation* depends only on the inputs
(``X`` and the preserve set ``P``); a *solve* then takes any weight ``W`` that
reads those inputs and the wanted outputs ``T``. Sites that read the same input
stream (every UNet cross-attention ``to_k``/``to_v`` reads the final text
embedding) share one factorisation, and every solve returns the update as exact
low-rank factors::

    R = T − W X                      (m × N)  what the constraints still ask for
    ΔW = (R_full @ right) @ A        B = R_full @ right,  rank(ΔW) ≤ r ≤ N

Methods
-------
``zero-residual`` (ErasePro, docs/design.md §2.1): ``ΔW = argmin ||ΔW||_F  s.t. (W + ΔW) X = T``,
i.e. ``ΔW = R X⁺``, computed from a thin SVD of ``X`` in float64 (no explicit inverse).

``soft`` preservation (§2.2): ``min ||ΔW||² + λ_p ||ΔW P||²  s.t. ΔW X = R``, with
``M = I + λ_p P Pᵀ``: ``ΔW = R (Xᵀ M⁻¹ X)⁻¹ Xᵀ M⁻¹``. ``Z = M⁻¹ X`` comes from Woodbury
(``M⁻¹ = I − P (I/λ_p + PᵀP)⁻¹ Pᵀ``, an ``M × M`` Cholesky; never ``d × d`` while the preserve set
is narrower than the input), and ``G = Xᵀ Z = V Λ Vᵀ`` (an ``N × N`` eigendecomposition) gives the
factors ``right = V Λ^{-1/2}`` and ``A = Λ^{-1/2} Vᵀ Zᵀ``. ``√Λ`` are the singular values of
``M^{-1/2} X``, so the rank rule is the same as without preservation. Forming ``G`` squares the
condition number; one step of iterative refinement in :func:`solve` restores the constraint to
working precision. Soft targets ``V`` (§2.2) enter as a second Woodbury step on top of ``M⁻¹``
(:func:`.metric.with_columns`), so two small Gram matrices are formed instead of one of their summed width.

Cost: the factorisation is the per-stage work (``O(k² d)`` for ``k`` soft columns, the Gram matrix taken in
float32 when the features came in float32: :func:`.metric.gram`); a site then costs ``O(m N r)``. Sites that want
``T = W Y`` for shared ``Y`` (the UNet's K/V) are solved once in input space, ``ΔW = W ΔW_I``
(:func:`solve_shared`). Its inputs are checked for shape only; a NaN or inf anywhere shows in the update,
whose finiteness is checked once. Factors wider than the matrix (``r > min(m, d)``) are multiplied
out (``ΔW`` with an identity factor), so a site never factorises its own update.

``exact`` preservation (§2.2): the plain problem with ``X' = [X P]`` and
``T' = [T, W P]``, i.e. ``R' = [R, 0]``.

``uce`` (§2.3): ``ΔW = s_e R Cᵀ M⁻¹`` with ``M = λ I + s_e C Cᵀ + η P Pᵀ`` (Cholesky solve);
a soft least-squares edit that leaves a non-zero residual by design.

A site whose targets already hold within ``residual_tol`` before any update (an earlier
progressive stage did the work) gets the zero update.

Numerical rank
--------------
Singular values ``σ_i ≤ rtol · σ_max`` are treated as zero (:data:`DEFAULT_RTOL`).
Features are produced by float32 forward passes whose entries carry relative
rounding of ``2⁻²⁴ ≈ 6e-8``; directions weaker than ``1e-6 · σ_max`` are at that
noise level, and forcing them to hold makes ``ΔW`` huge while the float32
pipeline cannot reproduce the result anyway. When fewer than ``N`` directions
survive (dependent constraints, or ``N`` beyond the input width ``d``), the
answer is the minimum-norm least-squares update and the achieved residual is
reported; :func:`solve` warns (or raises under ``strict``) when that residual
exceeds ``residual_tol``.

Why one module of this length: the three solvers (ErasePro exact, its soft-preservation and
soft-target variants, UCE) share the factorisation type, the rank rule and the residual checks; split
apart, each would re-state the maths the others rely on. Every function is one step of the docstring above.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Mapping

import torch
from torch import Tensor

from ..errors import CapacityError, CapacityWarning, warn
from .delta import LowRankDelta, _is_identity
from .metric import Block, Orthogonal, Scaled, metric_cholesky, metric_solver, side_by_side, with_columns

#: Relative singular-value cut-off for the numerical rank (see the module docstring).
DEFAULT_RTOL = 1e-6
#: Achieved relative residual above which an ``exact`` solve counts as not exact.
DEFAULT_RESIDUAL_TOL = 1e-6

PreserveMode = Literal["none", "soft", "exact"]


@dataclass(frozen=True)
class SoftTargets:
    """Columns that should *nearly* reach their targets: the ``λ_v ||ΔW V − R_v||²`` term of the objective.

    Attributes:
        V: ``(d, N_v)`` their inputs (float64; in the dense mode in ``product_dtype``, the only dtype it is read in).
        A: ``(N_v, d)`` ``λ_v (M⁻¹ V)ᵀ``, so that their part of the update is ``R_v A`` (``R_v = T_v − W V``);
            ``None`` in the dense mode.
        AX: ``A X`` (``N_v × N``), what that part does to the exact columns (the exact part corrects it).
        AP: ``A P``, or ``None``.
        solve: the dense mode (one site, soft columns as many as the input is wide): ``Y ↦ M'⁻¹ Y``, and each
            solve forms that part as ``λ_v (M'⁻¹ V R_vᵀ)ᵀ`` (``m × d``) instead of the ``N_v × d`` factor ``A``.
        weight: ``λ_v`` (the dense mode's).
        product_dtype: the dense mode's ``V R_vᵀ`` is taken in this dtype (float32 when the features came in
            float32, as the metric's Gram matrix is; the exact part then corrects what it does to ``X``).
    """

    V: Tensor
    A: Tensor | None
    AX: Tensor | None
    AP: Tensor | None
    solve: Callable[[Tensor], Tensor] | None = None
    weight: float = 1.0
    product_dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class Factorization:
    """The input-only half of a solve, shared by every site reading the same inputs.

    Attributes:
        kind: ``"zero-residual"`` or ``"uce"``.
        X: ``(d, N)`` float64 target input features (one column per constrained token).
        A: ``(r, d)`` float64 down factor of the exact part, shared by every site.
        right: ``(N_total, r)`` float64 map from the residual columns to that part's ``B``.
        P: ``(d, M)`` float64 preserve features, or ``None``.
        AX, AP: ``A X`` and ``A P``, computed once for every site's report.
        n_targets: ``N``.
        n_constraints: ``N`` (+ ``M`` under exact preservation): the columns that must hold exactly.
        constraint_rank: ``r``: singular values kept (the numerical rank of the constraints).
        singular_values: the full spectrum the rank was read from (descending).
        rtol: the relative cut-off used.
        exact: whether the method aims at zero residual (``False`` for UCE and for a ridge).
        preserve_mode: ``none``, ``soft`` or ``exact``.
        soft_targets: the soft-target part (:class:`SoftTargets`), or ``None``.
    """

    kind: str
    X: Tensor
    A: Tensor
    right: Tensor
    P: Tensor | None
    AX: Tensor
    AP: Tensor | None
    n_targets: int
    n_constraints: int
    constraint_rank: int
    singular_values: Tensor
    rtol: float
    exact: bool
    preserve_mode: str
    soft_targets: SoftTargets | None = None

    @property
    def input_dim(self) -> int:
        return self.X.shape[0]

    @property
    def condition(self) -> float:
        """``σ_max / σ_r`` over the kept singular values (``inf`` when nothing was kept)."""
        if self.constraint_rank == 0:
            return float("inf")
        return float(self.singular_values[0] / self.singular_values[self.constraint_rank - 1])

    def _cached(self, name: str, compute) -> Tensor:
        value = self.__dict__.get(name)
        if value is None:
            value = compute()
            object.__setattr__(self, name, value)
        return value

    @property
    def down(self) -> Tensor:
        """The update's down factor: ``[A_soft; A]`` (soft-target rows first), or ``A``."""
        soft = self.soft_targets
        return self.A if soft is None else self._cached("_down", lambda: torch.cat([soft.A, self.A]).contiguous())

    @property
    def gram(self) -> Tensor:
        """``down downᵀ``, computed once for the update norm of every site."""
        return self._cached("_gram", lambda: self.down @ self.down.T)


@dataclass(frozen=True)
class SolveReport:
    """What a solve achieved, reported for every site (never silently).

    ``residual`` is ``||(W + ΔW) X − T||_F / ||T||_F`` in float64 with the float64 factors;
    ``preserve_residual`` is ``||ΔW P||_F / ||W P||_F`` (``None`` without a preserve set).
    """

    method: str
    n_targets: int
    n_constraints: int
    input_dim: int
    constraint_rank: int
    condition: float
    residual: float
    preserve_residual: float | None
    delta_norm: float
    exact: bool
    within_capacity: bool
    update_rank: int = 0  # rank of the stored update (0: the targets already held, nothing to store)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "n_targets": self.n_targets,
            "n_constraints": self.n_constraints,
            "input_dim": self.input_dim,
            "constraint_rank": self.constraint_rank,
            "condition": self.condition,
            "residual": self.residual,
            "preserve_residual": self.preserve_residual,
            "delta_norm": self.delta_norm,
            "update_rank": self.update_rank,
        }


@dataclass(frozen=True)
class SolveResult:
    delta: LowRankDelta
    report: SolveReport


# ----------------------------------------------------------------------------- helpers
def _as_matrix(
    name: str, value: Tensor, rows: int | None = None, *, finite: bool = True, dtype: torch.dtype = torch.float64
) -> Tensor:
    """``value`` as a ``dtype`` (float64) matrix, its shape checked (and, with ``finite``, its entries)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(value.shape)}")
    if finite and not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.detach().to(dtype)


def _as_dense(dense: Tensor) -> tuple[LowRankDelta, float]:
    """``ΔW`` itself as factors with an identity on the smaller side, and ``||ΔW||_F``: for factors wider than
    the matrix (``r > min(m, d)``, beyond capacity or many soft columns; ``m·r·d`` flops, no factorisation)."""
    if not torch.any(dense):
        return LowRankDelta.zeros(*dense.shape), 0.0
    return LowRankDelta.from_dense(dense), float(torch.linalg.matrix_norm(dense))


def _frobenius(B: Tensor, AAt: Tensor) -> float:
    """``||B A||_F`` from ``B`` and the cached ``A Aᵀ``: ``sqrt(Σ (BᵀB) ∘ (AAᵀ))``."""
    return float(torch.sum((B.T @ B) * AAt).clamp_min(0.0).sqrt())


def _rank(singular_values: Tensor, rtol: float) -> int:
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


# ----------------------------------------------------------------------------- factorisations
def factorize_zero_residual(
    X: Tensor,
    *,
    preserve: Tensor | None = None,
    preserve_mode: PreserveMode = "none",
    preserve_weight: float = 0.0,
    soft: Tensor | None = None,
    soft_weight: float = 1.0,
    soft_orthogonal: bool = False,
    soft_targets: Tensor | None = None,
    soft_target_weight: float = 1.0,
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
    one_site: bool = False,
) -> Factorization:
    """Factorise the ErasePro problem for target inputs ``X`` (``d × N``).

    With soft targets ``V`` (weight ``λ_v``) the problem is
    ``min ||ΔW||²_M + λ_v ||ΔW V − R_v||²  s.t.  ΔW X = R`` with ``M`` the preservation metric: the
    unconstrained minimiser ``ΔW_v = λ_v R_v Vᵀ M'⁻¹`` (``M' = M + λ_v V Vᵀ``) plus the minimum-``M'``-norm
    correction that makes the exact columns hold — still exact on ``X``, still a low-rank update.

    Args:
        X: target input features, one column per constrained token.
        preserve: ``(d, M)`` inputs whose outputs should not change (``None`` for none).
        preserve_mode: ``"none"``, ``"soft"`` (weight ``preserve_weight``) or ``"exact"``.
        preserve_weight: ``λ_p`` of the soft mode (``0`` recovers the plain solve).
        soft: an optional ``(d, k)`` factor ``S`` of further soft preservation: the metric becomes
            ``M = I + λ_s S Sᵀ (+ λ_p P Pᵀ in soft mode)``, whatever ``preserve_mode`` does with ``preserve``
            (a summary of a caption set, for instance).
        soft_weight: ``λ_s ≥ 0``, applied where ``S`` is multiplied (no scaled copy of ``S``).
        soft_orthogonal: the columns of ``soft`` are orthogonal to each other (a caption summary's are: an
            eigenbasis scaled), so that their own Gram matrix is taken as its diagonal (:class:`~.metric.Orthogonal`).
        soft_targets: ``(d, N_v)`` inputs that should nearly reach their targets (their targets come with
            each site's :func:`solve`), or ``None``.
        soft_target_weight: ``λ_v > 0``.
        rtol: relative singular-value cut-off for the numerical rank.
        ridge: optional ``ε ≥ 0``; uses ``σ / (σ² + ε)`` instead of ``1/σ`` (then not exact).
        one_site: the factorisation serves a single site (a text-encoder stage): with at least ``d / 2`` soft
            targets their part is then formed per solve as an ``m × d`` matrix (:class:`SoftTargets`' dense
            mode, ``O(d N_v m + d² m)``) rather than as an ``N_v × d`` factor (``O(d² N_v)``).
    """
    # the metric's Gram matrix is taken in float32 when every feature in it came in float32 or narrower (metric.gram)
    metric_inputs = [t for t in (preserve, soft, soft_targets) if isinstance(t, Tensor)]
    gram_dtype = torch.float64 if any(t.dtype == torch.float64 for t in metric_inputs) else torch.float32
    X = _as_matrix("X", X)
    d, n = X.shape
    if preserve_mode not in ("none", "soft", "exact"):
        raise ValueError(f"preserve_mode must be 'none', 'soft' or 'exact', got {preserve_mode!r}")
    if rtol <= 0 or ridge < 0 or preserve_weight < 0 or soft_weight < 0:
        raise ValueError("rtol must be > 0; ridge, preserve_weight and soft_weight must be >= 0")
    # preserve features that only enter the metric are checked through its Gram matrix (metric.metric_solver)
    in_metric = preserve_mode == "soft" and preserve_weight > 0
    P = None if preserve is None or preserve.shape[-1] == 0 else _as_matrix("preserve", preserve, rows=d, finite=not in_metric)
    if P is None or (preserve_mode == "soft" and preserve_weight == 0):
        preserve_mode = "none"
    # the soft metric M = I + Q Qᵀ, and the columns that must hold exactly: [X] or [X P]
    # the metric's blocks (P in float64, S in its own float32 or float64) carry their weights as scales, applied
    # where a block is multiplied (metric.Scaled, metric.Orthogonal); the Gram products are taken in gram_dtype
    factors: list[Block] = [Scaled(P, preserve_weight**0.5)] if preserve_mode == "soft" else []
    if soft is not None and soft.shape[-1] and soft_weight > 0:
        dtype = torch.float64 if soft.dtype == torch.float64 else torch.float32
        S = _as_matrix("soft", soft, rows=d, finite=False, dtype=dtype)
        factors.append((Orthogonal if soft_orthogonal else Scaled)(S, soft_weight**0.5))
    V = None if soft_targets is None or soft_targets.shape[-1] == 0 else soft_targets
    dense_soft = V is not None and one_site and 2 * V.shape[-1] >= d
    if V is not None:
        # the dense mode reads V only in the metric's Gram matrix and in products taken in its dtype: V is then
        # held in that dtype (no float64 copy of d × N_v where the features came in float32)
        V = _as_matrix("soft_targets", V, rows=d, dtype=gram_dtype if dense_soft else torch.float64)
        if not soft_target_weight > 0:
            raise ValueError("soft_target_weight must be > 0")
    solved = None  # M'⁻¹ Vw, where a branch computes it on the way
    # soft targets: M' = M + Vw Vwᵀ with Vw = √λ_v V, scaled where the metric's columns are put side by side
    Vw = Scaled(V, soft_target_weight**0.5) if V is not None else None
    system = torch.cat([X, P], dim=1) if preserve_mode == "exact" else X
    mode = "soft" if preserve_mode == "none" and (factors or Vw is not None) else preserve_mode
    blocks = factors + ([Vw] if Vw is not None else [])  # M' = I + Σ B Bᵀ over these column blocks
    if system.shape[1] > d:
        fact, solve_m = _factorize_wide(X, P, system, blocks, mode, rtol, ridge, gram_dtype)
    elif blocks:
        if Vw is None or sum(b.shape[1] for b in blocks) >= d:  # one metric: Woodbury, or the d × d Cholesky
            solve_m = metric_solver(blocks, gram_dtype)
            Z = solve_m(system)
        else:  # soft targets on top of the preservation metric, so the Gram matrices stay two small ones
            base = metric_solver(factors, gram_dtype) if factors else (lambda Y: Y)
            solve_m, solved, Z = with_columns(base, side_by_side([Vw]).double(), system)
        fact = _factorize_soft(X, P, system, Z, mode, rtol, ridge)
    else:
        U, s, Vh = torch.linalg.svd(system, full_matrices=False)
        r = _rank(s, rtol)
        return _zero_residual_factorization(X, P, U[:, :r].T, Vh[:r].T, s, r, system.shape[1], preserve_mode, rtol, ridge)
    if V is None:
        return fact
    if dense_soft:
        return replace(fact, soft_targets=SoftTargets(
            V, None, None, None, solve=solve_m, weight=soft_target_weight, product_dtype=gram_dtype
        ))
    # λ_v M'⁻¹ V; with the nested Woodbury it is already known (M'⁻¹ Vw, Vw = √λ_v V)
    A_soft = (soft_target_weight**0.5 * solved if solved is not None else soft_target_weight * solve_m(V)).T.contiguous()
    targets = SoftTargets(V, A_soft, A_soft @ X, A_soft @ P if P is not None else None)
    return replace(fact, soft_targets=targets)


def _zero_residual_factorization(
    X: Tensor,
    P: Tensor | None,
    A: Tensor,
    V: Tensor,
    s: Tensor,
    r: int,
    n_constraints: int,
    preserve_mode: str,
    rtol: float,
    ridge: float,
) -> Factorization:
    """The zero-residual factorisation from ``A`` (``r × d``), the right singular vectors ``V`` (``N' × r``)
    and the spectrum ``s``: ``right = V diag(1/σ)`` (or ``σ/(σ² + ε)`` with a ridge)."""
    s_r = s[:r]
    inv = s_r / (s_r.square() + ridge) if ridge > 0 else 1.0 / s_r
    A = A.contiguous()
    return Factorization(
        kind="zero-residual",
        X=X,
        A=A,
        right=(V * inv[None, :]).contiguous(),
        P=P,
        AX=A @ X,
        AP=A @ P if P is not None else None,
        n_targets=X.shape[1],
        n_constraints=n_constraints,
        constraint_rank=r,
        singular_values=s,
        rtol=rtol,
        exact=ridge == 0,
        preserve_mode=preserve_mode,
    )


def _factorize_wide(
    X: Tensor,
    P: Tensor | None,
    system: Tensor,
    blocks: list[Block],
    preserve_mode: str,
    rtol: float,
    ridge: float,
    gram_dtype: torch.dtype = torch.float64,
) -> tuple[Factorization, Callable[[Tensor], Tensor]]:
    """More constraint columns than inputs (beyond capacity): work with ``d × d`` matrices.

    With ``M = L Lᵀ`` (soft preservation, ``M = I + Σ B Bᵀ`` over the metric's column ``blocks``; ``L = I`` without) and ``X̃ = L⁻¹ system``,
    the eigendecomposition of ``X̃ X̃ᵀ = Ũ Σ² Ũᵀ`` gives ``X̃⁺ = Ṽ Σ⁻¹ Ũᵀ`` with ``Ṽ = X̃ᵀ Ũ Σ⁻¹``, and
    ``ΔW = R X̃⁺ L⁻¹`` — the minimum-norm least-squares update — at ``O(d² N + d³)`` instead of an
    ``N × N`` eigenproblem or an SVD of a very wide matrix. Returns the factorisation and ``Y ↦ M⁻¹ Y``.
    """
    L = None
    if blocks:
        L = metric_cholesky(blocks, gram_dtype)
        system = torch.linalg.solve_triangular(L, system, upper=False)
    K = system @ system.T
    values, U = torch.linalg.eigh((K + K.T) / 2)
    values, U = values.flip(0).clamp_min(0), U.flip(1)
    s = values.sqrt()
    r = _rank(s, rtol)
    U = U[:, :r]
    V = (system.T @ U) / s[:r]
    A = (U if L is None else torch.linalg.solve_triangular(L.T, U, upper=True)).T
    fact = _zero_residual_factorization(X, P, A, V, s, r, system.shape[1], preserve_mode, rtol, ridge)
    return fact, (lambda Y: Y if L is None else torch.cholesky_solve(Y, L))


def _factorize_soft(
    X: Tensor, P: Tensor | None, system: Tensor, Z: Tensor, preserve_mode: str, rtol: float, ridge: float
) -> Factorization:
    """Soft preservation from ``Z = M⁻¹ system`` and the ``N × N`` Gram matrix (see the module docs).

    ``system`` is ``X``, or ``[X P]`` under exact preservation (those columns hold exactly too).
    """
    G = system.T @ Z
    values, V = torch.linalg.eigh((G + G.T) / 2)
    values, V = values.flip(0).clamp_min(0), V.flip(1)
    s = values.sqrt()  # singular values of M^{-1/2} system
    r = _rank(s, rtol)
    V = V[:, :r]
    return _zero_residual_factorization(X, P, ((Z @ V) / s[:r]).T, V, s, r, system.shape[1], preserve_mode, rtol, ridge)


def factorize_uce(
    C: Tensor,
    *,
    preserve: Tensor | None = None,
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    rtol: float = DEFAULT_RTOL,
) -> Factorization:
    """Factorise the UCE problem (Gandikota et al., 2024) for erase keys ``C`` (``d × N``).

    ``ΔW = s_e (V* − W C) Cᵀ M⁻¹`` with ``M = λ I + s_e C Cᵀ + η P Pᵀ``. The published
    defaults are ``λ = 0.5``, ``s_e = 1``, ``η = 1`` (newer script) or ``0.1`` (older).
    """
    C = _as_matrix("C", C)
    d, n = C.shape
    if lam <= 0:
        raise ValueError(f"UCE lambda must be > 0 (it keeps M invertible), got {lam}")
    if erase_scale < 0 or preserve_scale < 0:
        raise ValueError("UCE erase_scale and preserve_scale must be >= 0")
    P = None if preserve is None or preserve.shape[-1] == 0 else _as_matrix("preserve", preserve, rows=d)
    M = lam * torch.eye(d, dtype=torch.float64, device=C.device) + erase_scale * (C @ C.T)
    if P is not None and preserve_scale > 0:
        M = M + preserve_scale * (P @ P.T)
    L = torch.linalg.cholesky(M)
    G = erase_scale * torch.cholesky_solve(C, L)  # (d, N): s_e M⁻¹ C, so ΔW = R Gᵀ
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    r = _rank(s, rtol)
    right = Vh[:r].T * s[None, :r]
    A = U[:, :r].T.contiguous()
    return Factorization(
        kind="uce",
        X=C,
        A=A,
        right=right.contiguous(),
        P=P,
        AX=A @ C,
        AP=A @ P if P is not None else None,
        n_targets=n,
        n_constraints=n,
        constraint_rank=r,
        singular_values=s,
        rtol=rtol,
        exact=False,
        preserve_mode="soft" if P is not None and preserve_scale > 0 else "none",
    )


# ----------------------------------------------------------------------------- solve
def solve(
    fact: Factorization,
    W: Tensor,
    T: Tensor,
    *,
    strict: bool = False,
    residual_tol: float = DEFAULT_RESIDUAL_TOL,
    site: str = "",
    WX: Tensor | None = None,
    WP: Tensor | None = None,
    T_soft: Tensor | None = None,
    WV: Tensor | None = None,
) -> SolveResult:
    """Solve one site given its shared factorisation.

    Args:
        fact: from :func:`factorize_zero_residual` or :func:`factorize_uce`.
        W: ``(m, d)`` current weight of the site (any float dtype).
        T: ``(m, N)`` wanted outputs ``W' X`` (bias excluded) for the target columns.
        WX, WP: ``W X`` and ``W P`` when the caller already has them (a forward pass computed
            them); otherwise they are computed here.
        T_soft, WV: the wanted outputs of the soft-target columns (``m × N_v``; required when the
            factorisation has soft targets) and, optionally, ``W V``.
        strict: raise :class:`CapacityError` instead of warning when an exact solve
            cannot meet its constraints (achieved residual above ``residual_tol``).
        residual_tol: relative residual that still counts as exact.
        site: a name for messages.

    Returns:
        :class:`SolveResult` with a float64 :class:`LowRankDelta` and its :class:`SolveReport`.
    """
    up = _update(fact, W, T, residual_tol=residual_tol, site=site, WX=WX, WP=WP, T_soft=T_soft, WV=WV)
    report = _report(
        fact, fact.input_dim, up.delta, up.residual, up.preserve_residual, up.delta_norm, site=site, strict=strict,
        residual_tol=residual_tol,
    )
    return SolveResult(up.delta, report)


@dataclass(frozen=True)
class _Update:
    """What :func:`_update` computes: the update and its figures, and the exact columns' residual ``R_exact`` (what
    the exact part had to do after the soft part) with whether it already met the targets."""

    delta: LowRankDelta
    residual: float
    preserve_residual: float | None
    delta_norm: float
    R_exact: Tensor
    already_met: bool


def _update(
    fact: Factorization,
    W: Tensor | None,
    T: Tensor,
    *,
    residual_tol: float,
    site: str,
    WX: Tensor | None,
    WP: Tensor | None,
    T_soft: Tensor | None,
    WV: Tensor | None,
) -> _Update:
    """:func:`solve` without its report: the update, its residual, preserve residual and Frobenius norm.

    ``W=None`` is the identity (:func:`solve_shared`'s input-space problem), never formed: ``W X``, ``W P`` and
    ``W V`` must then be given. Also returns the exact columns' residual ``R_exact`` (after the soft part) and
    whether it already met the targets (no exact part stored), which :func:`solve_shared` reads per site.
    """
    if W is None:
        m = d = fact.input_dim
    elif not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"W must be a 2-D tensor, got {getattr(W, 'shape', type(W).__name__)}")
    else:
        m, d = W.shape
    if d != fact.input_dim:
        raise ValueError(f"W{tuple(W.shape)} does not read inputs of width {fact.input_dim}")
    # the inputs are checked for shape only: a NaN or inf anywhere shows in the update, checked once below
    T = _as_matrix("T", T, rows=m, finite=False)
    if T.shape[1] != fact.n_targets:
        raise ValueError(f"T has {T.shape[1]} columns, the factorisation {fact.n_targets}")

    soft = fact.soft_targets
    if (soft is None) != (T_soft is None):
        raise ValueError("T_soft is needed exactly when the factorisation has soft targets")
    # W only enters through W X, W V (and W P for the report): convert it only when they were not given
    need_w = WX is None or (fact.P is not None and WP is None) or (soft is not None and WV is None)
    W64 = _as_matrix("W", W, finite=False) if need_w else None
    R = T - (W64 @ fact.X if WX is None else _as_matrix("WX", WX, rows=m, finite=False))
    t_norm = float(torch.linalg.matrix_norm(T))
    # the soft-target part of the update, R_v A_soft; the exact part then corrects what it does to X (and P)
    dense_soft = None  # the soft part as an m × d matrix (the dense mode of SoftTargets)
    if soft is not None:
        B_soft = _as_matrix("T_soft", T_soft, rows=m, finite=False) - (
            W64 @ soft.V.double() if WV is None else _as_matrix("WV", WV, rows=m, finite=False)
        )
        if soft.A is None:
            narrow = soft.product_dtype
            dense_soft = soft.weight * soft.solve((soft.V.to(narrow) @ B_soft.T.to(narrow)).double()).T
            soft_x = dense_soft @ fact.X
            soft_p = dense_soft @ fact.P if fact.P is not None else None
        else:
            soft_x = B_soft @ soft.AX
            soft_p = B_soft @ soft.AP if soft.AP is not None else None
        R_exact = R - soft_x
    else:
        B_soft, R_exact, soft_p = None, R, None
    extra = fact.right.shape[0] - fact.n_targets  # exact preservation: R' = [R, −(soft part) P]
    if extra:
        held = -soft_p if soft is not None else R.new_zeros(m, extra)
        R_full = torch.cat([R_exact, held], dim=1)
    else:
        R_full = R_exact
    already_met = fact.exact and float(torch.linalg.matrix_norm(R_exact)) <= residual_tol * t_norm
    if already_met:
        # the targets already hold within residual_tol (an earlier stage did the work): no exact update, so
        # the adapter does not carry corrections at the level of float32 rounding
        B = R.new_zeros(m, fact.constraint_rank)
    else:
        B = R_full @ fact.right
    if fact.exact and not already_met:  # one step of iterative refinement: corrects rounding, a no-op in exact arithmetic
        correction = R_exact - B @ fact.AX
        if extra:
            correction = torch.cat([correction, R_full[:, -extra:] - B @ fact.AP], dim=1)
        B = B + correction @ fact.right
    # the update's factors: the soft-target part first, then the exact part (left out when it is all zero)
    # (gram: A Aᵀ for the update's norm, asked for only when the factors are kept; shared by every site)
    if soft is None or dense_soft is not None:  # down = A (the dense soft part is added below)
        A, AX, AP, gram = fact.A, fact.AX, fact.AP, lambda: fact.gram
    elif already_met:
        B, A, AX, AP = B_soft, soft.A, soft.AX, soft.AP
        gram = lambda: A @ A.T  # noqa: E731
    else:  # down = [A_soft; A], shared
        B = torch.cat([B_soft, B], dim=1)
        A, gram = fact.down, lambda: fact.gram
        AX = torch.cat([soft.AX, fact.AX])
        AP = torch.cat([soft.AP, fact.AP]) if fact.P is not None else None
    if not torch.isfinite(B).all() or (dense_soft is not None and not torch.isfinite(dense_soft).all()):
        where = f" at {site}" if site else ""
        raise ValueError(
            f"the update{where} is not finite: W, T or the features hold NaN or infinite values "
            "(a float16 overflow? solve in float32: solver.dtype)"
        )
    # nothing to change (the inputs already give the targets, bit for bit): the zero update, rank 0
    delta_norm = None
    if dense_soft is not None:
        delta, delta_norm = _as_dense(dense_soft + B @ A)
    elif not torch.any(B):
        delta = LowRankDelta.zeros(m, d)
    elif B.shape[1] > min(m, d):
        delta, delta_norm = _as_dense(B @ A)
    else:
        delta = LowRankDelta(B.contiguous(), A)

    miss = (R if dense_soft is None else R_exact) - B @ AX
    miss_norm = float(torch.linalg.matrix_norm(miss))
    residual = miss_norm / t_norm if t_norm > 0 else miss_norm
    preserve_residual = None
    if fact.P is not None:
        wp = float(torch.linalg.matrix_norm(W64 @ fact.P if WP is None else _as_matrix("WP", WP, rows=m, finite=False)))
        dp = float(torch.linalg.matrix_norm(B @ AP if dense_soft is None else soft_p + B @ AP))
        preserve_residual = dp / wp if wp > 0 else dp
    delta_norm = (_frobenius(B, gram()) if delta_norm is None else delta_norm) if delta.rank else 0.0
    return _Update(delta, residual, preserve_residual, delta_norm, R_exact, already_met)


def solve_shared(
    fact: Factorization,
    weights: Mapping[str, Tensor],
    Y: Tensor,
    *,
    Y_soft: Tensor | None = None,
    strict: bool = False,
    residual_tol: float = DEFAULT_RESIDUAL_TOL,
) -> dict[str, SolveResult]:
    """Solve every site of ``weights`` whose wanted outputs are its own weight applied to shared inputs.

    Each site wants ``T = W Y`` (and ``T_v = W Y_soft`` for the soft targets), as every cross-attention
    ``to_k``/``to_v`` does for the anchors' prompt embedding. Its residual ``R = W (Y − X)`` is then ``W``
    times the residual of the same problem with ``W = I``, and the update is linear in the residual, so
    ``ΔW = W ΔW_I`` with ``ΔW_I`` (``d × d``) solved once by :func:`solve`: each site costs a product with
    ``W`` instead of forming ``T``, ``W X``, ``W V`` and a soft part of ``N_v`` columns of its own. The
    result is the one :func:`solve` gives each site (same factorisation, same minimum-norm update), and each
    site's report measures its own residual ``||W (Y − X) − ΔW X|| / ||W Y||`` and preserve residual.

    Args:
        fact: the sites' shared factorisation.
        weights: ``(m, d)`` weights by site name.
        Y: ``(d, N)`` inputs whose outputs the target columns should reach.
        Y_soft: ``(d, N_v)`` the same for the soft targets (required exactly when ``fact`` has them).
    """
    return dict(iter_solve_shared(fact, weights, Y, Y_soft=Y_soft, strict=strict, residual_tol=residual_tol))


def iter_solve_shared(
    fact: Factorization,
    weights: Mapping[str, Tensor],
    Y: Tensor,
    *,
    Y_soft: Tensor | None = None,
    strict: bool = False,
    residual_tol: float = DEFAULT_RESIDUAL_TOL,
) -> Iterator[tuple[str, SolveResult]]:
    """:func:`solve_shared` one site at a time, in the order of ``weights``: ``(site, result)`` as each is solved,
    so that a caller keeping less than the float64 update (the adapter's stored form) never holds them all."""
    d = fact.input_dim
    Y = _as_matrix("Y", Y, rows=d, finite=False)
    soft = fact.soft_targets
    if (soft is None) != (Y_soft is None):
        raise ValueError("Y_soft is needed exactly when the factorisation has soft targets")
    Y_soft = _as_matrix("Y_soft", Y_soft, rows=d, finite=False) if Y_soft is not None else None
    # the inputs are checked here, when it is called; the sites are solved as the caller asks for them
    return _each_site(fact, weights, Y, Y_soft, strict, residual_tol)


def _each_site(
    fact: Factorization, weights: Mapping[str, Tensor], Y: Tensor, Y_soft: Tensor | None, strict: bool,
    residual_tol: float,
) -> Iterator[tuple[str, SolveResult]]:
    """:func:`iter_solve_shared`'s sites, one at a time (its inputs already checked)."""
    d = fact.input_dim
    soft = fact.soft_targets
    if soft is not None and soft.A is None:  # the one-site (dense) soft form: nothing to share
        for key, w in weights.items():
            T, T_soft = w.double() @ Y, w.double() @ Y_soft
            yield key, solve(fact, w, T, T_soft=T_soft, strict=strict, residual_tol=residual_tol, site=key)
        return
    # each site reports (and warns about) its own residual below
    shared = _update(
        fact, None, Y, WX=fact.X, WP=fact.P, T_soft=Y_soft, WV=soft.V if soft is not None else None,
        residual_tol=residual_tol, site="the shared input-space update",
    )
    base, R_exact, shared_met = shared.delta, shared.R_exact, shared.already_met
    # in input space: what the exact part has to do (after the soft part), what it leaves, what the update does
    # to the preserve inputs; "already met" (no exact part stored) is decided as solve decides it, per site
    miss = (Y - fact.X) - base.B @ (base.A @ fact.X) if base.rank else Y - fact.X
    AP = base.A @ fact.P if fact.P is not None and base.rank else None
    factored = base.rank and base.rank <= d and not _is_identity(base.B)
    gram = base.A @ base.A.T if factored else None
    n = Y.shape[1]
    # what a site reports are norms — ||W Y||, what it still misses ||W miss||, its exact residual ||W R_exact||,
    # ||W P|| — read in float32 from one product with the weight as stored (the features came in float32); only its
    # update's left factor W B_I is formed in float64. Skinny products are taken as (Rᵀ Wᵀ)ᵀ, the faster way round.
    parts = [Y, miss, R_exact, *([fact.P] if fact.P is not None else [])]
    narrow = torch.cat(parts, dim=1).T.to(torch.float32).contiguous()
    left = base.B.T.contiguous() if factored else None
    buffer = torch.empty(0, dtype=torch.float64, device=Y.device)  # W in float64, one allocation for every site
    for key, weight in weights.items():
        if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[1] != d:
            raise ValueError(f"{key}: W{tuple(getattr(weight, 'shape', ()))} does not read inputs of width {d}")
        m = weight.shape[0]
        norms = (narrow @ weight.detach().to(torch.float32).T).T
        if not torch.isfinite(norms).all():
            raise ValueError(f"the update at {key} is not finite: W holds NaN or infinite values")
        t_norm = float(torch.linalg.matrix_norm(norms[:, :n].double()))
        met = fact.exact and float(torch.linalg.matrix_norm(norms[:, 2 * n : 3 * n].double())) <= residual_tol * t_norm
        if buffer.numel() < m * d:
            buffer = torch.empty(m * d, dtype=torch.float64, device=Y.device)
        W = buffer[: m * d].view(m, d).copy_(weight.detach())
        if met != shared_met:  # this site's W decides "already met" the other way: solve it on its own
            yield key, solve(
                fact, weight, W @ Y, T_soft=W @ Y_soft if soft is not None else None, strict=strict,
                residual_tol=residual_tol, site=key,
            )
            continue
        delta_norm = 0.0
        B = ((left @ W.T).T.contiguous() if factored else W @ base.B) if base.rank else None
        if B is None or not torch.any(B):  # nothing to change at this site: the zero update, rank 0
            delta, B = LowRankDelta.zeros(m, d), None
        elif base.rank > min(m, d):
            delta, delta_norm = _as_dense(B @ base.A)
        else:
            delta = LowRankDelta(B, base.A)
            delta_norm = _frobenius(B, gram) if gram is not None else float(torch.linalg.matrix_norm(B @ base.A))
        miss_norm = float(torch.linalg.matrix_norm(norms[:, n : 2 * n].double()))
        residual = miss_norm / t_norm if t_norm > 0 else miss_norm
        preserve_residual = None
        if fact.P is not None:  # ||ΔW P|| / ||W P||
            wp = float(torch.linalg.matrix_norm(norms[:, 3 * n :].double()))
            dp = float(torch.linalg.matrix_norm(B @ AP)) if B is not None else 0.0
            preserve_residual = dp / wp if wp > 0 else dp
        report = _report(
            fact, d, delta, residual, preserve_residual, delta_norm, site=key, strict=strict, residual_tol=residual_tol
        )
        yield key, SolveResult(delta, report)


def _report(
    fact: Factorization,
    d: int,
    delta: LowRankDelta,
    residual: float,
    preserve_residual: float | None,
    delta_norm: float,
    *,
    site: str,
    strict: bool,
    residual_tol: float,
) -> SolveReport:
    """The report of one site's solve; warns (raises under ``strict``) when an exact solve misses its constraints."""
    within = fact.constraint_rank >= fact.n_constraints
    report = SolveReport(
        method=fact.kind,
        n_targets=fact.n_targets,
        n_constraints=fact.n_constraints,
        input_dim=d,
        constraint_rank=fact.constraint_rank,
        condition=fact.condition,
        residual=residual,
        preserve_residual=preserve_residual,
        delta_norm=delta_norm,
        exact=fact.exact,
        within_capacity=within,
        update_rank=delta.rank,
    )
    failed = residual > residual_tol or (
        fact.preserve_mode == "exact" and preserve_residual is not None and preserve_residual > residual_tol
    )
    if fact.exact and failed:
        where = f" at {site}" if site else ""
        reason = (
            f"{fact.n_constraints} constraints exceed the input width {d}"
            if fact.n_constraints > d
            else f"the {fact.n_constraints} constraint columns are dependent (numerical rank {fact.constraint_rank}"
            f" at rtol={fact.rtol:g})"
        )
        message = (
            f"zero residual is not reachable{where}: {reason}; used the least-squares update with rank "
            f"{fact.constraint_rank}, relative residual {residual:.3e}"
            + (f", preserve residual {preserve_residual:.3e}" if preserve_residual is not None else "")
            + ". Fewer prompts or a narrower token policy (eos, last-token) bring it back within capacity."
        )
        if strict:
            raise CapacityError(message)
        warn(message, CapacityWarning, depth=2)  # attributed to the caller of solve / solve_shared
    return report


# ----------------------------------------------------------------------------- one-shot helpers
def erasepro_update(
    W: Tensor,
    X: Tensor,
    T: Tensor,
    *,
    preserve: Tensor | None = None,
    preserve_mode: PreserveMode = "none",
    preserve_weight: float = 0.0,
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
    strict: bool = False,
    residual_tol: float = DEFAULT_RESIDUAL_TOL,
) -> SolveResult:
    """Zero-residual minimum-norm update for one site: ``(W + ΔW) X = T``."""
    fact = factorize_zero_residual(
        X, preserve=preserve, preserve_mode=preserve_mode, preserve_weight=preserve_weight, rtol=rtol, ridge=ridge
    )
    return solve(fact, W, T, strict=strict, residual_tol=residual_tol)


def uce_update(
    W: Tensor,
    C: Tensor,
    V_star: Tensor,
    *,
    preserve: Tensor | None = None,
    lam: float = 0.5,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    rtol: float = DEFAULT_RTOL,
) -> SolveResult:
    """UCE update for one site: soft alignment of ``W' C`` to ``V*``."""
    fact = factorize_uce(
        C, preserve=preserve, lam=lam, erase_scale=erase_scale, preserve_scale=preserve_scale, rtol=rtol
    )
    return solve(fact, W, V_star)
