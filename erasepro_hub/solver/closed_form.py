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

``soft`` preservation (§2.2): ``min ||ΔW||² + λ_p ||ΔW P||²  s.t. ΔW X = R``. With
``M = I + λ_p P Pᵀ`` and its symmetric inverse square root ``S = M^{-1/2}`` (built
from a thin SVD of ``P``, never a ``d × d`` factorisation), substituting
``ΔW = Γ S`` turns it into the plain problem for ``X̃ = S X``: ``ΔW = R X̃⁺ S``. This
equals the brief's ``R (Xᵀ M⁻¹ X)⁻¹ Xᵀ M⁻¹``.

``exact`` preservation (§2.2): the plain problem with ``X' = [X P]`` and
``T' = [T, W P]``, i.e. ``R' = [R, 0]``.

``uce`` (§2.3): ``ΔW = s_e R Cᵀ M⁻¹`` with ``M = λ I + s_e C Cᵀ + η P Pᵀ`` (Cholesky solve);
a soft least-squares edit that leaves a non-zero residual by design.

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


def _rank(singular_values: Tensor, rtol: float) -> int:
    if singular_values.numel() == 0 or float(singular_values[0]) == 0.0:
        return 0
    return int((singular_values > rtol * singular_values[0]).sum())


def _inverse_sqrt_metric(P: Tensor, weight: float, rtol: float) -> tuple[Tensor, Tensor]:
    """``S = M^{-1/2}`` for ``M = I + weight · P Pᵀ`` as ``S = I + U diag(c − 1) Uᵀ``; returns ``(U, c − 1)``."""
    U, s, _ = torch.linalg.svd(P, full_matrices=False)
    keep = _rank(s, rtol)
    U, s = U[:, :keep], s[:keep]
    return U, torch.rsqrt(1.0 + weight * s.square()) - 1.0


def _apply_metric(U: Tensor, c_minus_1: Tensor, Z: Tensor) -> Tensor:
    """``S Z`` for ``S = I + U diag(c − 1) Uᵀ`` (``Z`` is ``d × k``)."""
    return Z + U @ (c_minus_1[:, None] * (U.T @ Z))


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

    metric: tuple[Tensor, Tensor] | None = None
    if preserve_mode == "exact":
        assert P is not None
        system = torch.cat([X, P], dim=1)
    elif preserve_mode == "soft" and preserve_weight > 0:
        assert P is not None
        metric = _inverse_sqrt_metric(P, preserve_weight, rtol)
        system = _apply_metric(*metric, X)
    else:
        system = X

    U, s, Vh = torch.linalg.svd(system, full_matrices=False)
    r = _rank(s, rtol)
    U, s_r, V = U[:, :r], s[:r], Vh[:r].T
    inv = s_r / (s_r.square() + ridge) if ridge > 0 else 1.0 / s_r
    right = V * inv[None, :]
    A = U.T if metric is None else _apply_metric(*metric, U).T
    return Factorization(
        kind="zero-residual",
        X=X,
        A=A.contiguous(),
        right=right.contiguous(),
        P=P,
        n_targets=n,
        n_constraints=system.shape[1] if preserve_mode == "exact" else n,
        rank=r,
        singular_values=s,
        rtol=rtol,
        exact=ridge == 0,
        preserve_mode=preserve_mode,
    )


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
    return Factorization(
        kind="uce",
        X=C,
        A=U[:, :r].T.contiguous(),
        right=right.contiguous(),
        P=P,
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
) -> SolveResult:
    """Solve one site given its shared factorisation.

    Args:
        fact: from :func:`factorize_zero_residual` or :func:`factorize_uce`.
        W: ``(m, d)`` current weight of the site (any float dtype).
        T: ``(m, N)`` wanted outputs ``W' X`` (bias excluded) for the target columns.
        strict: raise :class:`CapacityError` instead of warning when an exact solve
            cannot meet its constraints (achieved residual above ``residual_tol``).
        residual_tol: relative residual that still counts as exact.
        site: a name for messages.

    Returns:
        :class:`SolveResult` with a float64 :class:`LowRankDelta` and its :class:`SolveReport`.
    """
    W = _as_matrix("W", W)
    m, d = W.shape
    if d != fact.input_dim:
        raise ValueError(f"W{tuple(W.shape)} does not read inputs of width {fact.input_dim}")
    T = _as_matrix("T", T, rows=m)
    if T.shape[1] != fact.n_targets:
        raise ValueError(f"T has {T.shape[1]} columns, the factorisation {fact.n_targets}")

    R = T - W @ fact.X
    if fact.right.shape[0] > fact.n_targets:  # exact preservation: R' = [R, 0]
        R_full = torch.cat([R, R.new_zeros(m, fact.right.shape[0] - fact.n_targets)], dim=1)
    else:
        R_full = R
    B = R_full @ fact.right
    # nothing to change (the inputs already give the targets, bit for bit): the zero update, rank 0
    delta = LowRankDelta(B.contiguous(), fact.A) if torch.any(B) else LowRankDelta.zeros(m, d)

    miss = R - B @ (fact.A @ fact.X)
    t_norm = float(torch.linalg.matrix_norm(T))
    miss_norm = float(torch.linalg.matrix_norm(miss))
    residual = miss_norm / t_norm if t_norm > 0 else miss_norm
    preserve_residual = None
    if fact.P is not None:
        wp = float(torch.linalg.matrix_norm(W @ fact.P))
        dp = float(torch.linalg.matrix_norm(B @ (fact.A @ fact.P)))
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
        delta_norm=delta.frobenius_norm(),
        exact=fact.exact,
        within_capacity=within,
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
