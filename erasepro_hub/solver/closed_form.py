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
``zero-residual`` (ErasePro, DESIGN §2.1): ``ΔW = argmin ||ΔW||_F  s.t. (W + ΔW) X = T``,
i.e. ``ΔW = R X⁺``, computed from a thin SVD of ``X`` in float64 (no explicit inverse).

``soft`` preservation (§2.2): ``min ||ΔW||² + λ_p ||ΔW P||²  s.t. ΔW X = R``, with
``M = I + λ_p P Pᵀ``: ``ΔW = R (Xᵀ M⁻¹ X)⁻¹ Xᵀ M⁻¹``. ``Z = M⁻¹ X`` comes from Woodbury
(``M⁻¹ = I − P (I/λ_p + PᵀP)⁻¹ Pᵀ``, an ``M × M`` Cholesky; never ``d × d`` while the preserve set
is narrower than the input), and ``G = Xᵀ Z = V Λ Vᵀ`` (an ``N × N`` eigendecomposition) gives the
factors ``right = V Λ^{-1/2}`` and ``A = Λ^{-1/2} Vᵀ Zᵀ``. ``√Λ`` are the singular values of
``M^{-1/2} X``, so the rank rule is the same as without preservation. Forming ``G`` squares the
condition number; one step of iterative refinement in :func:`solve` restores the constraint to
working precision.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import CapacityError, CapacityWarning, warn
from .delta import LowRankDelta

#: Relative singular-value cut-off for the numerical rank (see the module docstring).
DEFAULT_RTOL = 1e-6
#: Achieved relative residual above which an ``exact`` solve counts as not exact.
DEFAULT_RESIDUAL_TOL = 1e-6

PreserveMode = Literal["none", "soft", "exact"]


@dataclass(frozen=True)
class Factorization:
    """The input-only half of a solve, shared by every site reading the same inputs.

    Attributes:
        kind: ``"zero-residual"`` or ``"uce"``.
        X: ``(d, N)`` float64 target input features (one column per constrained token).
        A: ``(r, d)`` float64 down factor shared by every site.
        right: ``(N_total, r)`` float64 map from the residual columns to ``B``.
        P: ``(d, M)`` float64 preserve features, or ``None``.
        AX, AP: ``A X`` and ``A P``, computed once for every site's report.
        n_targets: ``N``.
        n_constraints: ``N`` (+ ``M`` under exact preservation): the columns that must hold exactly.
        rank: ``r``: singular values kept.
        singular_values: the full spectrum the rank was read from (descending).
        rtol: the relative cut-off used.
        exact: whether the method aims at zero residual (``False`` for UCE and for a ridge).
        preserve_mode: ``none``, ``soft`` or ``exact``.
    """

    kind: str
    X: Tensor
    A: Tensor
    right: Tensor
    P: Tensor | None
    AX: Tensor  # A @ X, for the residual of every site
    AP: Tensor | None  # A @ P, for the preserve residual of every site

    @property
    def AAt(self) -> Tensor:
        """``A Aᵀ`` (``r × r``), computed once for the update norm of every site."""
        cached = self.__dict__.get("_AAt")
        if cached is None:
            cached = self.A @ self.A.T
            object.__setattr__(self, "_AAt", cached)
        return cached
    n_targets: int
    n_constraints: int
    rank: int
    singular_values: Tensor
    rtol: float
    exact: bool
    preserve_mode: str

    @property
    def input_dim(self) -> int:
        return self.X.shape[0]

    @property
    def condition(self) -> float:
        """``σ_max / σ_r`` over the kept singular values (``inf`` when nothing was kept)."""
        if self.rank == 0:
            return float("inf")
        return float(self.singular_values[0] / self.singular_values[self.rank - 1])


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
    rank: int
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
            "rank": self.rank,
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
def _as_matrix(name: str, value: Tensor, rows: int | None = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return value.detach().to(torch.float64)


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
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
) -> Factorization:
    """Factorise the ErasePro problem for target inputs ``X`` (``d × N``).

    Args:
        X: target input features, one column per constrained token.
        preserve: ``(d, M)`` inputs whose outputs should not change (``None`` for none).
        preserve_mode: ``"none"``, ``"soft"`` (weight ``preserve_weight``) or ``"exact"``.
        preserve_weight: ``λ_p`` of the soft mode (``0`` recovers the plain solve).
        rtol: relative singular-value cut-off for the numerical rank.
        ridge: optional ``ε ≥ 0``; uses ``σ / (σ² + ε)`` instead of ``1/σ`` (then not exact).
    """
    X = _as_matrix("X", X)
    d, n = X.shape
    if preserve_mode not in ("none", "soft", "exact"):
        raise ValueError(f"preserve_mode must be 'none', 'soft' or 'exact', got {preserve_mode!r}")
    if rtol <= 0 or ridge < 0 or preserve_weight < 0:
        raise ValueError("rtol must be > 0; ridge and preserve_weight must be >= 0")
    P = None if preserve is None or preserve.shape[-1] == 0 else _as_matrix("preserve", preserve, rows=d)
    if P is None:
        preserve_mode = "none"

    if preserve_mode == "soft" and preserve_weight == 0:
        preserve_mode = "none"
    columns = n + (P.shape[1] if preserve_mode == "exact" else 0)
    if columns > d:
        return _factorize_wide(X, P, preserve_mode, preserve_weight, rtol, ridge)
    if preserve_mode == "soft":
        assert P is not None
        return _factorize_soft(X, P, preserve_weight, rtol, ridge)
    system = torch.cat([X, P], dim=1) if preserve_mode == "exact" else X
    U, s, Vh = torch.linalg.svd(system, full_matrices=False)
    r = _rank(s, rtol)
    return _finish(X, P, U[:, :r].T, Vh[:r].T, s, r, system.shape[1], preserve_mode, rtol, ridge)


def _finish(
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
        rank=r,
        singular_values=s,
        rtol=rtol,
        exact=ridge == 0,
        preserve_mode=preserve_mode,
    )


def _factorize_wide(
    X: Tensor, P: Tensor | None, preserve_mode: str, weight: float, rtol: float, ridge: float
) -> Factorization:
    """More constraint columns than inputs (beyond capacity): work with ``d × d`` matrices.

    With ``M = L Lᵀ`` (soft preservation; ``L = I`` otherwise) and ``X̃ = L⁻¹ [X (P)]``, the
    eigendecomposition of ``X̃ X̃ᵀ = Ũ Σ² Ũᵀ`` gives ``X̃⁺ = Ṽ Σ⁻¹ Ũᵀ`` with ``Ṽ = X̃ᵀ Ũ Σ⁻¹``, and
    ``ΔW = R X̃⁺ L⁻¹`` — the minimum-norm least-squares update — at ``O(d² N + d³)`` instead of an
    ``N × N`` eigenproblem or an SVD of a very wide matrix.
    """
    d, n = X.shape
    system = torch.cat([X, P], dim=1) if preserve_mode == "exact" else X
    L = None
    if preserve_mode == "soft":
        assert P is not None
        L = torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) + weight * (P @ P.T))
        system = torch.linalg.solve_triangular(L, system, upper=False)
    K = system @ system.T
    values, U = torch.linalg.eigh((K + K.T) / 2)
    values, U = values.flip(0).clamp_min(0), U.flip(1)
    s = values.sqrt()
    r = _rank(s, rtol)
    U = U[:, :r]
    V = (system.T @ U) / s[:r]
    A = (U if L is None else torch.linalg.solve_triangular(L.T, U, upper=True)).T
    return _finish(X, P, A, V, s, r, system.shape[1], preserve_mode, rtol, ridge)


def _factorize_soft(X: Tensor, P: Tensor, weight: float, rtol: float, ridge: float) -> Factorization:
    """Soft preservation through Woodbury and the ``N × N`` Gram matrix (see the module docs)."""
    d, n = X.shape
    m = P.shape[1]
    if m < d:
        C = torch.eye(m, dtype=torch.float64) / weight + P.T @ P
        L = torch.linalg.cholesky(C)
        Z = X - P @ torch.cholesky_solve(P.T @ X, L)
    else:
        L = torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) + weight * (P @ P.T))
        Z = torch.cholesky_solve(X, L)
    G = X.T @ Z
    values, V = torch.linalg.eigh((G + G.T) / 2)
    values, V = values.flip(0).clamp_min(0), V.flip(1)
    s = values.sqrt()  # singular values of M^{-1/2} X
    r = _rank(s, rtol)
    V = V[:, :r]
    return _finish(X, P, ((Z @ V) / s[:r]).T, V, s, r, n, "soft", rtol, ridge)


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
    M = lam * torch.eye(d, dtype=torch.float64) + erase_scale * (C @ C.T)
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
        rank=r,
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
) -> SolveResult:
    """Solve one site given its shared factorisation.

    Args:
        fact: from :func:`factorize_zero_residual` or :func:`factorize_uce`.
        W: ``(m, d)`` current weight of the site (any float dtype).
        T: ``(m, N)`` wanted outputs ``W' X`` (bias excluded) for the target columns.
        WX, WP: ``W X`` and ``W P`` when the caller already has them (a forward pass computed
            them); otherwise they are computed here.
        strict: raise :class:`CapacityError` instead of warning when an exact solve
            cannot meet its constraints (achieved residual above ``residual_tol``).
        residual_tol: relative residual that still counts as exact.
        site: a name for messages.

    Returns:
        :class:`SolveResult` with a float64 :class:`LowRankDelta` and its :class:`SolveReport`.
    """
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"W must be a 2-D tensor, got {getattr(W, 'shape', type(W).__name__)}")
    m, d = W.shape
    if d != fact.input_dim:
        raise ValueError(f"W{tuple(W.shape)} does not read inputs of width {fact.input_dim}")
    T = _as_matrix("T", T, rows=m)
    if T.shape[1] != fact.n_targets:
        raise ValueError(f"T has {T.shape[1]} columns, the factorisation {fact.n_targets}")

    # W only enters through W X (and W P for the report): convert it only when they were not given
    W64 = _as_matrix("W", W) if WX is None or (fact.P is not None and WP is None) else None
    R = T - (W64 @ fact.X if WX is None else _as_matrix("WX", WX, rows=m))
    if fact.right.shape[0] > fact.n_targets:  # exact preservation: R' = [R, 0]
        R_full = torch.cat([R, R.new_zeros(m, fact.right.shape[0] - fact.n_targets)], dim=1)
    else:
        R_full = R
    t_norm = float(torch.linalg.matrix_norm(T))
    already_met = fact.exact and float(torch.linalg.matrix_norm(R)) <= residual_tol * t_norm
    if already_met:
        # the targets already hold within residual_tol (an earlier stage did the work): no update, so
        # the adapter does not carry corrections at the level of float32 rounding
        B = R.new_zeros(m, fact.rank)
    else:
        B = R_full @ fact.right
    if fact.exact and not already_met:  # one step of iterative refinement: corrects rounding, a no-op in exact arithmetic
        correction = R - B @ fact.AX
        if R_full is not R:
            correction = torch.cat([correction, -(B @ fact.AP)], dim=1)
        B = B + correction @ fact.right
    # nothing to change (the inputs already give the targets, bit for bit): the zero update, rank 0
    delta = LowRankDelta(B.contiguous(), fact.A) if torch.any(B) else LowRankDelta.zeros(m, d)

    miss = R - B @ fact.AX
    miss_norm = float(torch.linalg.matrix_norm(miss))
    residual = miss_norm / t_norm if t_norm > 0 else miss_norm
    preserve_residual = None
    if fact.P is not None:
        wp = float(torch.linalg.matrix_norm(W64 @ fact.P if WP is None else _as_matrix("WP", WP, rows=m)))
        dp = float(torch.linalg.matrix_norm(B @ fact.AP))
        preserve_residual = dp / wp if wp > 0 else dp
    within = fact.rank >= fact.n_constraints
    report = SolveReport(
        method=fact.kind,
        n_targets=fact.n_targets,
        n_constraints=fact.n_constraints,
        input_dim=d,
        rank=fact.rank,
        condition=fact.condition,
        residual=residual,
        preserve_residual=preserve_residual,
        delta_norm=_frobenius(B, fact.AAt) if delta.rank else 0.0,
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
            else f"the {fact.n_constraints} constraint columns are dependent (numerical rank {fact.rank}"
            f" at rtol={fact.rtol:g})"
        )
        message = (
            f"zero residual is not reachable{where}: {reason}; used the least-squares update with rank "
            f"{fact.rank}, relative residual {residual:.3e}"
            + (f", preserve residual {preserve_residual:.3e}" if preserve_residual is not None else "")
            + ". Fewer prompts or a narrower token policy (eos, last-token) bring it back within capacity."
        )
        if strict:
            raise CapacityError(message)
        warn(message, CapacityWarning)
    return SolveResult(delta, report)


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
