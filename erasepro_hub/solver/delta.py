"""The result type of every solve: a weight update stored as exact low-rank factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: The reconstruction guarantee of a stored update: ``max|B A − ΔW| ≤ STORAGE_RTOL · max|ΔW|`` once its
#: factors are rounded to float32 (docs/design.md §4.1).
STORAGE_RTOL = 1e-6
#: The share of that budget that dropping small singular values may take; the rest is for the rounding.
TRUNCATION_SHARE = 0.5


def _max_abs(x: Tensor) -> float:
    """``max|x|`` of a non-empty tensor, in one pass (cheaper than ``x.abs().max()``)."""
    low, high = torch.aminmax(x)
    return max(float(high), -float(low))


@dataclass(frozen=True)
class LowRankDelta:
    """A weight update ``ΔW = B @ A`` for a linear layer ``y = W x``.

    Shapes (torch layout, ``W`` is ``out × in``):
        B: ``(m, r)``: the "up" factor (diffusers/PEFT ``lora_B``),
        A: ``(r, d)``: the "down" factor (``lora_A``),
    with ``ΔW`` of shape ``(m, d)``. Every scale is already folded into ``B``: the
    effective LoRA scale is exactly 1. A rank-0 delta (``r == 0``) is the zero update.
    """

    B: Tensor
    A: Tensor

    def __post_init__(self) -> None:
        if self.B.ndim != 2 or self.A.ndim != 2:
            raise ValueError(f"LowRankDelta factors must be 2-D, got B{tuple(self.B.shape)} A{tuple(self.A.shape)}")
        if self.B.shape[1] != self.A.shape[0]:
            raise ValueError(
                f"LowRankDelta inner dimensions differ: B{tuple(self.B.shape)} @ A{tuple(self.A.shape)}"
            )
        if self.B.dtype != self.A.dtype:
            raise ValueError(f"LowRankDelta factors have different dtypes: {self.B.dtype} and {self.A.dtype}")

    # ------------------------------------------------------------------ shape
    @property
    def shape(self) -> tuple[int, int]:
        """``(m, d)``: the shape of the dense update."""
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        """The number of factor columns ``r`` (an upper bound on the matrix rank)."""
        return self.A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    # ------------------------------------------------------------------ maths
    def dense(self, dtype: torch.dtype | None = torch.float64) -> Tensor:
        """``B @ A`` as a dense ``(m, d)`` tensor, computed in ``dtype`` (float64 by default)."""
        dtype = dtype or self.dtype
        if _is_identity(self.B):  # from_dense's form: ΔW itself (a copy, never the factor)
            return self.A.to(dtype, copy=True)
        if _is_identity(self.A):
            return self.B.to(dtype, copy=True)
        return self.B.to(dtype) @ self.A.to(dtype)

    def apply(self, x: Tensor) -> Tensor:
        """``ΔW x`` for row vectors: ``x`` is ``(..., d)``, the result ``(..., m)``, in ``x``'s dtype (an identity
        factor, :meth:`from_dense`'s form, is not multiplied)."""
        if _is_identity(self.A):
            return x @ self.B.to(x.dtype).T
        out = x @ self.A.to(x.dtype).T
        return out if _is_identity(self.B) else out @ self.B.to(x.dtype).T

    def frobenius_norm(self) -> float:
        """``||B A||_F`` without forming the dense product: ``sqrt(tr((BᵀB)(AAᵀ)))``, or the other factor's own
        norm where one factor is the identity (:meth:`from_dense`: the Gram form would cost a ``d × d`` product)."""
        b = self.B.double()
        a = self.A.double()
        if _is_identity(b):
            return float(torch.linalg.norm(a))
        if _is_identity(a):
            return float(torch.linalg.norm(b))
        value = torch.sum((b.T @ b) * (a @ a.T)).clamp_min(0.0)
        return float(value.sqrt())

    def compact(self) -> "LowRankDelta":
        """The same update with at most ``min(m, d)`` factor columns.

        Factors with more columns than that (a soft-target part beside an exact part) are
        re-factorised exactly: QR of both factors, then an SVD of the small core, keeping every
        non-zero singular value. Factors that are already that narrow are returned as they are.
        """
        m, d = self.shape
        if self.rank <= min(m, d):
            return self
        q_b, r_b = torch.linalg.qr(self.B)
        q_a, r_a = torch.linalg.qr(self.A.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        keep = int((s > 0).sum())
        B = (q_b @ u[:, :keep]) * s[:keep]
        A = vh[:keep] @ q_a.T
        return LowRankDelta(B.contiguous(), A.contiguous())

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """The thin SVD ``U diag(s) Vh`` of ``B A`` in float64, without forming the dense product.

        QR of ``B`` and of ``Aᵀ``, then an SVD of the small core ``R_b R_aᵀ``: ``U`` is ``(m, p)``, ``s``
        (``p``, descending) and ``Vh`` ``(p, d)`` with ``p = min(m, d, r)``. Each singular pair's sign is
        fixed (the largest-magnitude entry of ``U``'s column, the first of equals, is positive), so the same
        factors give the same result whatever sign convention the SVD routine follows.
        """
        B, A = self.B.double(), self.A.double()
        q_b, r_b = torch.linalg.qr(B)
        q_a, r_a = torch.linalg.qr(A.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        U, Vh = q_b @ u, vh @ q_a.T
        if U.shape[1]:
            pivot = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
            sign = torch.where(pivot < 0, -1.0, 1.0).to(U.dtype)
            U, Vh = U * sign, Vh * sign.T
        return U, s, Vh

    def at_numerical_rank(
        self, dtype: torch.dtype = torch.float32, rtol: float = STORAGE_RTOL, share: float = TRUNCATION_SHARE
    ) -> "LowRankDelta":
        """The same update at its numerical rank, as factors (float64, or these ones) that keep ``rtol`` once cast
        to ``dtype``.

        With ``E`` the difference between the returned factors cast to ``dtype`` (their product taken in
        float64) and the exact ``ΔW = B A``, the guarantee is ``max|E| ≤ rtol · max|ΔW|`` for float32 and
        float64 storage. The factors are ``B = U √Σ``, ``A = √Σ Vh`` of :meth:`svd` (the effective scale
        stays exactly 1), truncated to the ``k`` singular values above ``share · rtol · max|ΔW|``: the
        truncation alone moves no entry by more than ``σ_{k+1} ≤ share · rtol · max|ΔW|``
        (``max_ij |E_ij| ≤ ||E||₂``), leaving the rest of the budget for rounding to ``dtype``. The
        product is then checked entry by entry in float64; should it miss, more singular values are
        kept (those above a tenth, a hundredth, … of the threshold, then all of them), and should every
        truncation miss, the exact factors (:meth:`compact`) are returned.

        For float32 and float64 storage, an update given as ``min(m, d)`` columns (:meth:`from_dense`'s form, for
        one) that is certainly of full numerical rank is returned as it is where its cast passes the check: its
        SVD factors would be no smaller, and the SVD is skipped. "Certainly" is a Cholesky test with a margin
        for the Gram matrix's rounding (:func:`_all_above`): an update whose smallest singular values lie within
        that margin of the threshold goes the SVD way, as every update did before.

        float16 and bfloat16 round each factor entry by more than ``rtol`` on their own: for them the
        same truncation is applied without the check (no worse than storing every column), and the
        guarantee is stated for float32. The zero update (``ΔW = 0`` exactly) gives rank 0.
        """
        m, d = self.shape
        if not self.rank:
            return LowRankDelta.zeros(m, d)
        exact = self.dense(torch.float64)
        scale = _max_abs(exact) if exact.numel() else 0.0
        if scale == 0.0:
            return LowRankDelta.zeros(m, d)
        budget = rtol * scale
        threshold = share * budget
        if dtype in (torch.float32, torch.float64) and self.rank == min(m, d) and _all_above(exact, threshold):
            # ΔW at full numerical rank: its SVD factors would be as large as these (ΔW beside an identity, say),
            # so these are kept (no SVD to form); only the cast to ``dtype`` moves them, checked here
            if _max_abs(self.to(dtype).dense(torch.float64) - exact) <= budget:
                return self
        U, s, Vh = self.svd()

        def truncated(k: int) -> LowRankDelta:
            root = s[:k].sqrt()
            return LowRankDelta((U[:, :k] * root).contiguous(), (root[:, None] * Vh[:k]).contiguous())

        if dtype not in (torch.float32, torch.float64):
            return truncated(max(int((s > threshold).sum()), 1))
        tried: set[int] = set()
        ranks = [int((s > threshold * 10.0**-j).sum()) for j in range(4)] + [int((s > 0).sum())]
        for k in ranks:
            k = max(k, 1)
            if k in tried:
                continue
            tried.add(k)
            candidate = truncated(k)
            rounded = candidate.to(dtype)
            error = _max_abs(torch.addmm(exact, rounded.B.double(), rounded.A.double(), beta=-1))
            if error <= budget:
                return candidate
        return self.compact()

    def to(self, dtype: torch.dtype) -> "LowRankDelta":
        """The same update with both factors cast to ``dtype`` (an identity factor stays the shared one)."""
        return LowRankDelta(_cast(self.B, dtype), _cast(self.A, dtype))

    def is_dense_form(self) -> bool:
        """Whether this is :meth:`from_dense`'s form: ``ΔW`` beside an identity factor."""
        return _is_identity(self.B) or _is_identity(self.A)

    @staticmethod
    def from_dense(dense: Tensor) -> "LowRankDelta":
        """A dense ``ΔW`` (``m × d``) as exact factors with an identity on the smaller side.

        The identity is one shared tensor per size, dtype and device (:func:`identity`): a solve of many concepts
        holds dozens of such updates, and each would otherwise carry its own ``n × n`` identity.
        """
        m, d = dense.shape
        if m <= d:
            return LowRankDelta(identity(m, dense.dtype, dense.device), dense)
        return LowRankDelta(dense, identity(d, dense.dtype, dense.device))

    @staticmethod
    def zeros(m: int, d: int, dtype: torch.dtype = torch.float64) -> "LowRankDelta":
        """The rank-0 (zero) update of shape ``(m, d)``."""
        return LowRankDelta(torch.zeros(m, 0, dtype=dtype), torch.zeros(0, d, dtype=dtype))


def _all_above(dense: Tensor, threshold: float) -> bool:
    """Whether every singular value of ``dense`` (float64) certainly exceeds ``threshold``: ``G − (threshold² +
    margin) I`` has a Cholesky factor, ``G = D Dᵀ`` (``D`` the wide orientation, ``n`` rows) and ``margin =
    n · eps · tr G`` a bound on what the rounding of ``G`` and of the factorisation moves its eigenvalues by. An
    ``n² k`` product and an ``n³/3`` factorisation, a fraction of the singular values' cost; ``False`` where the
    smallest singular values sit within the margin (the caller then takes the SVD)."""
    D = dense if dense.shape[0] <= dense.shape[1] else dense.T
    G = D @ D.T
    margin = D.shape[0] * torch.finfo(G.dtype).eps * float(G.trace())
    G.diagonal().sub_(threshold**2 + margin)
    return int(torch.linalg.cholesky_ex(G)[1]) == 0


#: (size, dtype, device) → the identity :func:`identity` hands out
_IDENTITIES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def identity(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Tensor:
    """The ``n × n`` identity as one tensor shared by every caller within the solver's results: read it, never
    write to it (what leaves for a file or a caller's state dict is a copy: :func:`owned`)."""
    key = (n, dtype, torch.device(device))
    if key not in _IDENTITIES:
        _IDENTITIES[key] = torch.eye(n, dtype=dtype, device=device)
    return _IDENTITIES[key]


def is_shared_identity(t: Tensor) -> bool:
    """Whether ``t`` is one of the tensors :func:`identity` hands out (asking creates none)."""
    return t.ndim == 2 and t.shape[0] == t.shape[1] and t is _IDENTITIES.get((t.shape[0], t.dtype, t.device))


def owned(t: Tensor) -> Tensor:
    """``t``, or a copy of it where it is a shared identity: for tensors handed to code that may write to them."""
    return t.clone() if is_shared_identity(t) else t


def _is_identity(t: Tensor) -> bool:
    """A square factor equal to the identity (the form :meth:`LowRankDelta.from_dense` writes); the check of a
    factor that is not the shared one allocates nothing of ``t``'s size."""
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        return False
    if is_shared_identity(t):
        return True
    n = t.shape[0]
    return bool((t.diagonal() == 1).all()) and int(torch.count_nonzero(t)) == n


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; the shared identity in ``dtype`` where ``t`` is the shared identity."""
    if t.dtype != dtype and is_shared_identity(t):
        return identity(t.shape[0], dtype, t.device)
    return t.to(dtype)
