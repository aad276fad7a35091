"""Closed-form weight edits, pure torch, float64 inside (a preservation metric's Gram matrix in its features' float32).

This package imports nothing but torch (a test enforces it): the maths can be
used, read and tested without any model library.

    >>> from erasepro_hub.solver import erasepro_update
    >>> result = erasepro_update(W, X, T)      # (W + ΔW) X = T, ΔW minimum-norm
    >>> result.delta.B, result.delta.A         # exact low-rank factors
    >>> result.report.residual, result.report.constraint_rank
"""

from .closed_form import (
    DEFAULT_RESIDUAL_TOL,
    DEFAULT_RTOL,
    Factorization,
    SolveReport,
    SolveResult,
    erasepro_update,
    factorize_uce,
    factorize_zero_residual,
    iter_solve_shared,
    solve,
    solve_shared,
    uce_update,
)
from .delta import LowRankDelta
from .metric import merge_equal_columns

__all__ = [
    "DEFAULT_RESIDUAL_TOL",
    "DEFAULT_RTOL",
    "Factorization",
    "LowRankDelta",
    "SolveReport",
    "SolveResult",
    "erasepro_update",
    "factorize_uce",
    "factorize_zero_residual",
    "iter_solve_shared",
    "merge_equal_columns",
    "solve",
    "solve_shared",
    "uce_update",
]
