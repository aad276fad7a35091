"""The progressive driver's stage solve, directly (the driver end to end is covered by the erasure tests)."""

from __future__ import annotations

import torch

from conftest import REPO

from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.progressive import _AnchorRows, _split, _Stage, _StageInputs, _solve_stage
from erasepro_hub.recipe import plan_from_recipe

_DEMO = load_manifest(REPO / "manifests" / "demo.yaml").recipe()
PLAN = plan_from_recipe(_DEMO.model_copy(update={"preserve": _DEMO.preserve.model_copy(update={"mode": "none"})}))


def test_the_plan_reads_the_recipe_it_was_built_from():
    """No copy of the settings: the plan holds the recipe object itself, and the schema's defaults."""
    plan = plan_from_recipe(_DEMO)
    assert plan.recipe is _DEMO and plan.method == _DEMO.method
    assert plan.preserve and plan.pairs
    assert PLAN.preserve == () and PLAN.recipe.preserve.mode == "none"


def _problem(seed: int = 0, n: int = 4, d: int = 12, m: int = 7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)  # rows, as the hook gathers them
    return W, X, torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)


def _inputs(W, X, soft, residual=None, bias=None) -> _StageInputs:
    """What the target pass's hook hands a stage for the rows ``X``: split into exact and soft columns."""
    (Xe, V), (WX, WV) = _split(X, soft), _split(X @ W.T, soft)
    take = (lambda keep: residual[keep]) if residual is not None else None
    return _StageInputs(X=Xe, V=V, WX=WX, WV=WV, P=None, WP=None, residual=take, bias=bias)


def _anchor(rows: torch.Tensor) -> _AnchorRows:
    return _AnchorRows(rows, torch.arange(len(rows)))


def test_site_mode_meets_the_anchor_outputs_exactly():
    W, X, anchor, _ = _problem()
    stage = _Stage("s", layer=1, site="mlp.fc2", mode="site", eos=False)
    none = torch.zeros(len(X), dtype=torch.bool)
    result = _solve_stage(stage, W, _inputs(W, X, none), _anchor(anchor), none, PLAN, None)
    edited = X @ (W + result.delta.dense()).T
    assert torch.allclose(edited, anchor, atol=1e-10) and result.report.residual < 1e-10


def test_stream_mode_makes_the_residual_stream_equal_the_anchors():
    """residual + (W' x + b) = anchor stream: the site's output is whatever closes the gap."""
    W, X, anchor_stream, b = _problem(1)
    residual = torch.randn(len(X), W.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stage = _Stage("s", layer=1, site="mlp.fc2", mode="stream", eos=False)
    none = torch.zeros(len(X), dtype=torch.bool)
    result = _solve_stage(stage, W, _inputs(W, X, none, residual, b), _anchor(anchor_stream), none, PLAN, None)
    stream = residual + X @ (W + result.delta.dense()).T + b
    assert torch.allclose(stream, anchor_stream, atol=1e-10)


def test_soft_rows_are_not_constraints():
    W, X, anchor, _ = _problem(2, n=5)
    soft = torch.tensor([False, False, False, True, True])
    stage = _Stage("s", layer=1, site="mlp.fc2", mode="site", eos=False)
    result = _solve_stage(stage, W, _inputs(W, X, soft), _anchor(anchor), soft, PLAN, None)
    edited = X @ (W + result.delta.dense()).T
    assert torch.allclose(edited[~soft], anchor[~soft], atol=1e-10)  # exact where constrained
    assert result.report.n_targets == 3
    # the soft rows move towards their targets, not onto them
    before = (X[soft] @ W.T - anchor[soft]).norm()
    after = (edited[soft] - anchor[soft]).norm()
    assert 0 < after < before
