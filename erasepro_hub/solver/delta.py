"""The result type of every solve: a weight update stored as exact low-rank factors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
        return self.B.to(dtype) @ self.A.to(dtype)

    def apply(self, x: Tensor) -> Tensor:
        """``ΔW x`` for row vectors: ``x`` is ``(..., d)``, the result ``(..., m)``, in ``x``'s dtype."""
        return (x @ self.A.to(x.dtype).T) @ self.B.to(x.dtype).T

    def frobenius_norm(self) -> float:
        """``||B A||_F`` without forming the dense product: ``sqrt(tr((BᵀB)(AAᵀ)))``."""
        b = self.B.double()
        a = self.A.double()
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

    def to(self, dtype: torch.dtype) -> "LowRankDelta":
        """The same update with both factors cast to ``dtype``."""
        return LowRankDelta(self.B.to(dtype), self.A.to(dtype))

    @staticmethod
    def zeros(m: int, d: int, dtype: torch.dtype = torch.float64) -> "LowRankDelta":
        """The rank-0 (zero) update of shape ``(m, d)``."""
        return LowRankDelta(torch.zeros(m, 0, dtype=dtype), torch.zeros(0, d, dtype=dtype))
