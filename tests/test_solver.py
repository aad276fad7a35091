"""The closed forms of docs/design.md §2.1–2.3 against their definitions, in float64."""

from __future__ import annotations

import warnings

import pytest
import torch

from erasepro_hub.errors import CapacityError, CapacityWarning
from erasepro_hub.solver import (
    LowRankDelta,
    erasepro_update,
    factorize_uce,
    factorize_zero_residual,
    iter_solve_shared,
    merge_equal_columns,
    solve,
    solve_shared,
    uce_update,
)
from erasepro_hub.solver.metric import cholesky_of_metric


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    m, d, n = 40, 64, 12
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    T = torch.randn(m, n, generator=g, dtype=torch.float64)
    return W, X, T


# ----------------------------------------------------------------------------- zero residual
def test_constraint_holds_exactly(problem):
    W, X, T = problem
    result = erasepro_update(W, X, T)
    assert rel((W + result.delta.dense()) @ X, T) <= 1e-10
    assert result.report.residual <= 1e-10
    assert result.report.constraint_rank == X.shape[1]
    assert result.report.within_capacity


def test_update_is_minimum_norm(problem):
    W, X, T = problem
    delta = erasepro_update(W, X, T).delta.dense()
    # Any other feasible update differs by Z with Z X = 0 (rows of Z orthogonal to span(X)).
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(X)
    Z = torch.randn(W.shape, generator=g, dtype=torch.float64)
    Z = Z - (Z @ Q) @ Q.T
    other = delta + 0.3 * Z
    assert rel((W + other) @ X, T) <= 1e-10  # also feasible
    assert torch.linalg.norm(delta) < torch.linalg.norm(other)
    # and it matches the pseudo-inverse formula Δ = (T − W X) X⁺
    assert rel(delta, (T - W @ X) @ torch.linalg.pinv(X)) <= 1e-10


def test_orthogonal_inputs_unchanged(problem):
    W, X, T = problem
    delta = erasepro_update(W, X, T).delta
    Q, _ = torch.linalg.qr(X, mode="complete")
    outside = Q[:, X.shape[1] :]  # orthonormal basis of span(X)^⊥
    assert float(torch.linalg.norm(delta.dense() @ outside)) <= 1e-10 * float(torch.linalg.norm(delta.dense()))


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (7, 7)])
def test_frobenius_norm_of_the_identity_factor_form(shape):
    """``from_dense`` writes an identity factor; its norm is the dense matrix's, without the Gram products."""
    dense = torch.randn(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    delta = LowRankDelta.from_dense(dense)
    assert abs(delta.frobenius_norm() - float(torch.linalg.norm(dense))) <= 1e-12 * float(torch.linalg.norm(dense))
    # a square factor that is not the identity takes the general formula, and agrees with the dense norm
    scaled = LowRankDelta(2.0 * delta.B, delta.A)
    assert abs(scaled.frobenius_norm() - 2.0 * float(torch.linalg.norm(dense))) <= 1e-12 * float(torch.linalg.norm(dense))


def test_factors_are_exact_low_rank(problem):
    W, X, T = problem
    delta = erasepro_update(W, X, T).delta
    assert isinstance(delta, LowRankDelta)
    assert delta.B.shape == (W.shape[0], X.shape[1]) and delta.A.shape == (X.shape[1], W.shape[1])
    dense = delta.dense()
    assert abs(delta.frobenius_norm() - float(torch.linalg.norm(dense))) <= 1e-10 * float(torch.linalg.norm(dense))
    stored = delta.to(torch.float32)
    err = float((stored.dense() - dense).abs().max() / dense.abs().max())
    assert err <= 1e-6


def test_exact_preservation(problem):
    W, X, T = problem
    g = torch.Generator().manual_seed(2)
    P = torch.randn(W.shape[1], 20, generator=g, dtype=torch.float64)
    result = erasepro_update(W, X, T, preserve=P, preserve_mode="exact")
    delta = result.delta.dense()
    assert rel((W + delta) @ X, T) <= 1e-10
    assert float(torch.linalg.norm(delta @ P)) <= 1e-10 * float(torch.linalg.norm(W @ P))
    assert result.report.n_constraints == X.shape[1] + P.shape[1]


def _soft_brute_force(W, X, T, P, lam):
    """min ||Δ||² + λ||ΔP||² s.t. ΔX = R, solved as one KKT system over vec(Δ)."""
    m, d = W.shape
    n = X.shape[1]
    R = T - W @ X
    M = torch.eye(d, dtype=torch.float64) + lam * P @ P.T
    # Rows of Δ decouple: for each row δ (1×d): min δ M δᵀ s.t. δ X = r.
    K = torch.zeros(d + n, d + n, dtype=torch.float64)
    K[:d, :d] = 2 * M
    K[:d, d:] = X
    K[d:, :d] = X.T
    rhs = torch.cat([torch.zeros(d, m, dtype=torch.float64), R.T], dim=0)
    sol = torch.linalg.solve(K, rhs)
    return sol[:d].T


def test_soft_preservation_matches_brute_force(problem):
    W, X, T = problem
    g = torch.Generator().manual_seed(3)
    P = torch.randn(W.shape[1], 30, generator=g, dtype=torch.float64)
    lam = 0.7
    result = erasepro_update(W, X, T, preserve=P, preserve_mode="soft", preserve_weight=lam)
    delta = result.delta.dense()
    expected = _soft_brute_force(W, X, T, P, lam)
    assert rel(delta, expected) <= 1e-9
    assert rel((W + delta) @ X, T) <= 1e-10  # still zero residual
    # the brief's closed form R (Xᵀ M⁻¹ X)⁻¹ Xᵀ M⁻¹
    M = torch.eye(W.shape[1], dtype=torch.float64) + lam * P @ P.T
    Minv_X = torch.linalg.solve(M, X)
    closed = (T - W @ X) @ torch.linalg.solve(X.T @ Minv_X, Minv_X.T)
    assert rel(delta, closed) <= 1e-9
    # preservation helps: ΔP is smaller than without it
    plain = erasepro_update(W, X, T).delta.dense()
    assert torch.linalg.norm(delta @ P) < torch.linalg.norm(plain @ P)


def test_soft_with_zero_weight_is_plain(problem):
    W, X, T = problem
    P = torch.randn(W.shape[1], 5, dtype=torch.float64)
    a = erasepro_update(W, X, T, preserve=P, preserve_mode="soft", preserve_weight=0.0).delta.dense()
    b = erasepro_update(W, X, T).delta.dense()
    assert rel(a, b) <= 1e-12


# ----------------------------------------------------------------------------- UCE
def test_uce_matches_published_closed_form(problem):
    W, X, T = problem
    g = torch.Generator().manual_seed(4)
    P = torch.randn(W.shape[1], 25, generator=g, dtype=torch.float64)
    lam, s_e, eta = 0.5, 1.0, 0.1
    result = uce_update(W, X, T, preserve=P, lam=lam, erase_scale=s_e, preserve_scale=eta)
    d = W.shape[1]
    # W' = (λ W + s_e Σ v* cᵀ + η Σ W c_p c_pᵀ)(λ I + s_e Σ c cᵀ + η Σ c_p c_pᵀ)⁻¹
    left = lam * W + s_e * T @ X.T + eta * W @ P @ P.T
    right = lam * torch.eye(d, dtype=torch.float64) + s_e * X @ X.T + eta * P @ P.T
    W_new = torch.linalg.solve(right.T, left.T).T
    assert rel(W + result.delta.dense(), W_new) <= 1e-10
    # soft: the alignment residual is not zero
    assert result.report.residual > 1e-3
    assert not result.report.exact


def test_uce_residual_shrinks_with_lambda(problem):
    W, X, T = problem
    loose = uce_update(W, X, T, lam=10.0).report.residual
    tight = uce_update(W, X, T, lam=1e-3).report.residual
    assert tight < loose


# ----------------------------------------------------------------------------- capacity
def test_over_capacity_gives_least_squares_and_warns():
    g = torch.Generator().manual_seed(5)
    m, d, n = 10, 16, 30  # N > d: cannot all hold
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    T = torch.randn(m, n, generator=g, dtype=torch.float64)
    with pytest.warns(CapacityWarning, match="exceed the input width"):
        result = erasepro_update(W, X, T)
    delta = result.delta.dense()
    expected = (T - W @ X) @ torch.linalg.pinv(X)  # minimum-norm least squares
    assert rel(delta, expected) <= 1e-9
    achieved = float(torch.linalg.norm((W + delta) @ X - T) / torch.linalg.norm(T))
    assert result.report.residual == pytest.approx(achieved, rel=1e-9)
    assert result.report.residual > 1e-3
    assert result.report.constraint_rank == d
    assert not result.report.within_capacity
    with pytest.raises(CapacityError, match="exceed the input width"):
        erasepro_update(W, X, T, strict=True)


def test_dependent_conflicting_constraints_report_residual():
    g = torch.Generator().manual_seed(6)
    m, d = 8, 32
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    x = torch.randn(d, 5, generator=g, dtype=torch.float64)
    X = torch.cat([x, x[:, :2]], dim=1)  # two duplicated columns ...
    T = torch.randn(m, 7, generator=g, dtype=torch.float64)  # ... asked to map to different outputs
    with pytest.warns(CapacityWarning, match="dependent"):
        result = erasepro_update(W, X, T)
    assert result.report.constraint_rank == 5
    assert rel(result.delta.dense(), (T - W @ X) @ torch.linalg.pinv(X)) <= 1e-9
    assert result.report.residual > 1e-3
    with pytest.raises(CapacityError):
        erasepro_update(W, X, T, strict=True)


def test_dependent_consistent_constraints_are_exact():
    g = torch.Generator().manual_seed(7)
    m, d = 8, 32
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    x = torch.randn(d, 5, generator=g, dtype=torch.float64)
    t = torch.randn(m, 5, generator=g, dtype=torch.float64)
    X, T = torch.cat([x, x[:, :2]], 1), torch.cat([t, t[:, :2]], 1)  # duplicates agree
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = erasepro_update(W, X, T, strict=True)
    assert result.report.constraint_rank == 5 and result.report.residual <= 1e-10


def test_ridge_trades_residual_for_norm(problem):
    W, X, T = problem
    exact = erasepro_update(W, X, T)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a ridge is asked for: not exact by design, no warning
        ridged = erasepro_update(W, X, T, ridge=10.0)
    assert ridged.report.residual > exact.report.residual
    assert ridged.delta.frobenius_norm() < exact.delta.frobenius_norm()


def test_shared_factorisation_serves_many_sites(problem):
    W, X, T = problem
    fact = factorize_zero_residual(X)
    g = torch.Generator().manual_seed(8)
    for m in (3, 17, 50):
        W2 = torch.randn(m, X.shape[0], generator=g, dtype=torch.float64)
        T2 = torch.randn(m, X.shape[1], generator=g, dtype=torch.float64)
        result = solve(fact, W2, T2)
        assert rel((W2 + result.delta.dense()) @ X, T2) <= 1e-10


def test_bad_inputs_are_rejected(problem):
    W, X, T = problem
    with pytest.raises(ValueError, match="NaN"):
        erasepro_update(W, X * float("nan"), T)
    with pytest.raises(ValueError, match="width"):
        erasepro_update(W[:, :10], X, T)
    with pytest.raises(ValueError, match="columns"):
        erasepro_update(W, X, T[:, :3])
    with pytest.raises(ValueError, match="preserve_mode"):
        factorize_zero_residual(X, preserve=X, preserve_mode="hard")  # type: ignore[arg-type]


def test_zero_delta_when_targets_already_met(problem):
    W, X, _ = problem
    result = erasepro_update(W, X, W @ X)
    assert result.delta.frobenius_norm() <= 1e-10
    assert result.report.residual <= 1e-12


def test_beyond_capacity_with_soft_preservation_is_the_metric_least_squares():
    g = torch.Generator().manual_seed(9)
    m, d, n = 6, 12, 20
    W = torch.randn(m, d, generator=g, dtype=torch.float64)
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    T = torch.randn(m, n, generator=g, dtype=torch.float64)
    P = torch.randn(d, 5, generator=g, dtype=torch.float64)
    lam = 0.3
    with pytest.warns(CapacityWarning):
        result = erasepro_update(W, X, T, preserve=P, preserve_mode="soft", preserve_weight=lam)
    L = torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) + lam * P @ P.T)
    Linv = torch.linalg.inv(L)
    expected = (T - W @ X) @ torch.linalg.pinv(Linv @ X) @ Linv
    assert rel(result.delta.dense(), expected) <= 1e-9
    assert result.report.constraint_rank == d and result.report.n_constraints == n


# ----------------------------------------------------------------------------- soft terms
def _kkt(W, X, T, *, metric, lam=0.0, V=None, T_soft=None, exact_P=None):
    """The constrained minimiser by its KKT system, dense and float64: min tr(D M Dᵀ) − 2λ tr(R_v Vᵀ Dᵀ)
    s.t. D X = T − W X (and D P = 0 for ``exact_P``)."""
    m = W.shape[0]
    C, Rc = X, T - W @ X
    if exact_P is not None:
        C = torch.cat([X, exact_P], 1)
        Rc = torch.cat([Rc, torch.zeros(m, exact_P.shape[1], dtype=torch.float64)], 1)
    Mi = torch.linalg.inv(metric)
    pull = lam * (T_soft - W @ V) @ V.T if V is not None else torch.zeros_like(W)
    multipliers = (Rc - pull @ Mi @ C) @ torch.linalg.inv(C.T @ Mi @ C)
    return (pull + multipliers @ C.T) @ Mi


@pytest.mark.parametrize("mode", ["none", "soft", "exact"])
def test_soft_targets_and_caption_metric_against_the_kkt_solution(problem, mode):
    """Soft targets (misspellings) and an extra soft metric factor (a caption summary) on top of each
    preservation mode: exact on X, and equal to the dense KKT solution of the same objective."""
    W, X, T = problem
    g = torch.Generator().manual_seed(3)
    d = W.shape[1]
    P = torch.randn(d, 9, generator=g, dtype=torch.float64)
    S = torch.randn(d, 20, generator=g, dtype=torch.float64)  # a caption summary, weight folded in
    V = torch.randn(d, 7, generator=g, dtype=torch.float64)
    T_soft = torch.randn(W.shape[0], 7, generator=g, dtype=torch.float64)
    lam, wp = 0.7, 0.3
    fact = factorize_zero_residual(
        X, preserve=P, preserve_mode=mode, preserve_weight=wp, soft=S, soft_targets=V, soft_target_weight=lam
    )
    result = solve(fact, W, T, T_soft=T_soft)
    delta = result.delta.dense()
    assert rel((W + delta) @ X, T) <= 1e-10 and result.report.residual <= 1e-10
    metric = torch.eye(d, dtype=torch.float64) + S @ S.T + lam * V @ V.T + (wp * P @ P.T if mode == "soft" else 0)
    expected = _kkt(W, X, T, metric=metric, lam=lam, V=V, T_soft=T_soft, exact_P=P if mode == "exact" else None)
    assert rel(delta, expected) <= 1e-9
    if mode == "exact":
        assert float(torch.linalg.norm(delta @ P)) <= 1e-9 * float(torch.linalg.norm(W @ P))
    assert result.report.delta_norm == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-9)


@pytest.mark.parametrize("mode", ["soft", "exact"])
def test_an_orthogonal_caption_summary_gives_the_kkt_solution_of_its_metric(problem, mode):
    """A summary with orthogonal columns (an eigenbasis scaled), declared so: its own Gram block is taken as the
    diagonal, and the solve is the dense KKT solution of ``M = I + S Sᵀ + …`` all the same."""
    W, X, T = problem
    g = torch.Generator().manual_seed(5)
    d = W.shape[1]
    P = torch.randn(d, 9, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(d, 20, generator=g, dtype=torch.float64))
    S = U * torch.linspace(4.0, 0.1, 20, dtype=torch.float64)
    V = torch.randn(d, 7, generator=g, dtype=torch.float64)
    T_soft = torch.randn(W.shape[0], 7, generator=g, dtype=torch.float64)
    lam, wp = 0.7, 0.3
    fact = factorize_zero_residual(
        X, preserve=P, preserve_mode=mode, preserve_weight=wp, soft=S, soft_orthogonal=True, soft_targets=V,
        soft_target_weight=lam,
    )
    delta = solve(fact, W, T, T_soft=T_soft).delta.dense()
    assert rel((W + delta) @ X, T) <= 1e-10
    metric = torch.eye(d, dtype=torch.float64) + S @ S.T + lam * V @ V.T + (wp * P @ P.T if mode == "soft" else 0)
    expected = _kkt(W, X, T, metric=metric, lam=lam, V=V, T_soft=T_soft, exact_P=P if mode == "exact" else None)
    assert rel(delta, expected) <= 1e-9
    # declared orthogonal, a summary that is not gives another metric: the declaration is what is used
    skew = S + 1e-3 * S[:, :1]
    other = factorize_zero_residual(X, preserve=P, preserve_mode=mode, preserve_weight=wp, soft=skew,
                                    soft_orthogonal=True, soft_targets=V, soft_target_weight=lam)
    honest = factorize_zero_residual(X, preserve=P, preserve_mode=mode, preserve_weight=wp, soft=skew,
                                     soft_targets=V, soft_target_weight=lam)
    assert rel(solve(other, W, T, T_soft=T_soft).delta.dense(), solve(honest, W, T, T_soft=T_soft).delta.dense()) > 1e-6


def test_the_block_gram_is_the_gram_of_the_blocks_side_by_side():
    from erasepro_hub.solver.metric import Orthogonal, Scaled, block_gram, gram, side_by_side

    g = torch.Generator().manual_seed(6)
    P = torch.randn(9, 40, generator=g, dtype=torch.float64).T  # a transposed view, as the preserve features come
    U, _ = torch.linalg.qr(torch.randn(40, 6, generator=g, dtype=torch.float64))
    S = (U * torch.linspace(2.0, 0.5, 6, dtype=torch.float64)).float()
    V = torch.randn(40, 3, generator=g, dtype=torch.float64)
    blocks = [Scaled(P, 0.3), Orthogonal(S), Scaled(V, 2.0)]
    # S's own block is its diagonal: the off-diagonal entries it leaves out are those of S's float32 rounding
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 1e-6)):
        G = block_gram(blocks, dtype)
        assert G.dtype == torch.float64 and torch.equal(G, G.T)
        expected = gram(side_by_side(blocks, torch.float64))
        assert float((G - expected).abs().max()) <= tol * float(expected.abs().max())
        plain = [Scaled(P, 0.3), S, Scaled(V, 2.0)]  # not declared orthogonal: the product itself
        assert float((block_gram(plain, torch.float64) - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_equal_columns_merge_into_one_column_times_the_root_of_their_copies(monkeypatch):
    from erasepro_hub.solver import metric

    g = torch.Generator().manual_seed(7)
    a, b, c = torch.randn(3, 30, generator=g)
    P = torch.stack([a, b, a, c, a, b], dim=1)
    WP = torch.randn(5, 3, generator=g, dtype=torch.float64)[:, [0, 1, 0, 2, 0, 1]]
    merged, merged_wp = merge_equal_columns(P, WP)
    roots = torch.tensor([3, 2, 1], dtype=torch.float64).sqrt()
    assert torch.allclose(merged, torch.stack([a, b, c], dim=1) * roots.float())  # in the order they first appear
    assert torch.allclose(merged_wp, WP[:, [0, 1, 3]] * roots)
    assert torch.allclose(merged @ merged.T, P @ P.T, atol=1e-5)
    assert torch.allclose(merged_wp.norm(), WP.norm())
    distinct = torch.randn(30, 4, generator=g)
    assert merge_equal_columns(distinct)[0] is distinct
    with pytest.raises(ValueError, match="M columns"):
        merge_equal_columns(P, WP[:, :4])
    with pytest.raises(ValueError, match="d × M"):
        merge_equal_columns(a)
    # columns that share a hash but are not equal are kept apart
    monkeypatch.setattr(metric, "_probe", lambda d, device: torch.zeros(d, dtype=torch.float64))
    kept, = merge_equal_columns(torch.stack([a, b, a], dim=1))
    assert torch.allclose(kept, torch.stack([a * 2**0.5, b], dim=1))


@pytest.mark.parametrize("mode", ["soft", "exact"])
def test_the_solve_is_the_same_with_equal_preserve_columns_merged(problem, mode):
    W, X, T = problem
    g = torch.Generator().manual_seed(8)
    P = torch.randn(W.shape[1], 6, generator=g, dtype=torch.float64)[:, [0, 1, 0, 2, 0, 3, 4, 5, 1]]
    merged, = merge_equal_columns(P)
    assert merged.shape[1] == 6
    results = [
        solve(factorize_zero_residual(X, preserve=p, preserve_mode=mode, preserve_weight=0.4), W, T) for p in (P, merged)
    ]
    assert rel(results[1].delta.dense(), results[0].delta.dense()) <= 1e-10
    assert results[1].report.preserve_residual == pytest.approx(results[0].report.preserve_residual, rel=1e-9, abs=1e-14)


def test_a_caption_summary_weight_is_the_summary_scaled():
    g = torch.Generator().manual_seed(9)
    d = 48
    X = torch.randn(d, 5, generator=g, dtype=torch.float64)
    W = torch.randn(20, d, generator=g, dtype=torch.float64)
    T = torch.randn(20, 5, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(d, 12, generator=g, dtype=torch.float64))
    S = (U * torch.linspace(6.0, 0.2, 12, dtype=torch.float64)).float()  # float32, as the caption cache holds it
    weighted = factorize_zero_residual(X, soft=S, soft_weight=0.3, soft_orthogonal=True)
    folded = factorize_zero_residual(X, soft=S.double() * 0.3**0.5, soft_orthogonal=True)
    assert rel(solve(weighted, W, T).delta.dense(), solve(folded, W, T).delta.dense()) <= 1e-6
    assert factorize_zero_residual(X, soft=S, soft_weight=0.0).singular_values.shape == (5,)  # weight 0: no metric
    with pytest.raises(ValueError, match="soft_weight"):
        factorize_zero_residual(X, soft=S, soft_weight=-1.0)
    broken = S.clone()
    broken[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        factorize_zero_residual(X, soft=broken, soft_weight=0.3, soft_orthogonal=True)


def test_soft_targets_pull_towards_their_targets(problem):
    W, X, T = problem
    g = torch.Generator().manual_seed(4)
    V = torch.randn(W.shape[1], 5, generator=g, dtype=torch.float64)
    T_soft = torch.randn(W.shape[0], 5, generator=g, dtype=torch.float64)
    misses = []
    for lam in (0.01, 1.0, 100.0):
        fact = factorize_zero_residual(X, soft_targets=V, soft_target_weight=lam)
        delta = solve(fact, W, T, T_soft=T_soft).delta.dense()
        misses.append(rel((W + delta) @ V, T_soft))
    assert misses[0] > misses[1] > misses[2]
    with pytest.raises(ValueError, match="T_soft"):
        solve(factorize_zero_residual(X, soft_targets=V), W, T)
    with pytest.raises(ValueError, match="T_soft"):
        solve(factorize_zero_residual(X), W, T, T_soft=T_soft)


def test_compact_keeps_the_update_and_caps_its_width():
    g = torch.Generator().manual_seed(3)
    wide = LowRankDelta(torch.randn(6, 15, generator=g, dtype=torch.float64), torch.randn(15, 9, generator=g, dtype=torch.float64))
    small = wide.compact()
    assert small.rank == 6 and small.shape == wide.shape
    assert torch.allclose(small.dense(), wide.dense(), rtol=0, atol=1e-12 * float(wide.dense().abs().max()))
    narrow = LowRankDelta(torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(2, 9, generator=g, dtype=torch.float64))
    assert narrow.compact() is narrow


@pytest.mark.parametrize("mode", ["none", "soft", "exact"])
def test_many_soft_targets_on_one_site_give_the_same_update(problem, mode):
    """As many soft columns as half the input width: the one-site (dense) form of the soft part gives the
    factor form's update and the KKT solution, exact on X."""
    W, X, T = problem
    g = torch.Generator().manual_seed(4)
    d = W.shape[1]
    P = torch.randn(d, 6, generator=g, dtype=torch.float64)
    V = torch.randn(d, d // 2 + 3, generator=g, dtype=torch.float64)
    T_soft = torch.randn(W.shape[0], V.shape[1], generator=g, dtype=torch.float64)
    lam, wp = 0.2, 0.3
    kwargs = dict(preserve=P, preserve_mode=mode, preserve_weight=wp, soft_targets=V, soft_target_weight=lam)
    dense = factorize_zero_residual(X, one_site=True, **kwargs)
    assert dense.soft_targets.A is None  # the dense form was taken
    factored = factorize_zero_residual(X, **kwargs)
    assert factored.soft_targets.A is not None
    one, other = solve(dense, W, T, T_soft=T_soft), solve(factored, W, T, T_soft=T_soft)
    assert rel(one.delta.dense(), other.delta.dense()) <= 1e-9
    assert rel((W + one.delta.dense()) @ X, T) <= 1e-10 and one.report.residual <= 1e-10
    assert abs(one.report.delta_norm - other.report.delta_norm) <= 1e-9 * other.report.delta_norm
    if mode == "exact":
        assert one.report.preserve_residual <= 1e-10
    metric = torch.eye(d, dtype=torch.float64) + lam * V @ V.T + (wp * P @ P.T if mode == "soft" else 0)
    expected = _kkt(W, X, T, metric=metric, lam=lam, V=V, T_soft=T_soft, exact_P=P if mode == "exact" else None)
    assert rel(one.delta.dense(), expected) <= 1e-9


# ----------------------------------------------------------------------------- sites that want W Y
def _shared_problem(n_soft: int, seed: int = 5):
    """Three sites of different widths reading the same inputs, wanting ``W Y`` (and ``W Y_soft``)."""
    g = torch.Generator().manual_seed(seed)
    d, n = 24, 5
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    Y = torch.randn(d, n, generator=g, dtype=torch.float64)
    V = torch.randn(d, n_soft, generator=g, dtype=torch.float64) if n_soft else None
    Y_soft = torch.randn(d, n_soft, generator=g, dtype=torch.float64) if n_soft else None
    P = torch.randn(d, 8, generator=g, dtype=torch.float64)
    S = torch.randn(d, 6, generator=g, dtype=torch.float64)
    weights = {f"site{m}": torch.randn(m, d, generator=g, dtype=torch.float64) for m in (7, 24, 40)}
    return X, Y, V, Y_soft, P, S, weights


@pytest.mark.parametrize("n_soft", [0, 3, 60])  # none, the factor form, wider than the input (dense form)
@pytest.mark.parametrize("mode", ["soft", "exact"])
def test_solve_shared_is_the_per_site_solve(n_soft, mode):
    """One solve in input space, then W ΔW_I per site: the update and the report :func:`solve` gives each site."""
    X, Y, V, Y_soft, P, S, weights = _shared_problem(n_soft)
    fact = factorize_zero_residual(
        X, preserve=P, preserve_mode=mode, preserve_weight=0.3, soft=S, soft_targets=V, soft_target_weight=0.2
    )
    shared = solve_shared(fact, weights, Y, Y_soft=Y_soft)
    assert list(shared) == list(weights)
    for key, W in weights.items():
        alone = solve(fact, W, W @ Y, T_soft=W @ Y_soft if V is not None else None)
        ours = shared[key]
        assert rel(ours.delta.dense(), alone.delta.dense()) <= 1e-9
        assert rel((W + ours.delta.dense()) @ X, W @ Y) <= 1e-10
        assert ours.report.residual <= 1e-10 and alone.report.residual <= 1e-10
        assert ours.report.delta_norm == pytest.approx(alone.report.delta_norm, rel=1e-9)
        assert ours.report.delta_norm == pytest.approx(float(torch.linalg.norm(ours.delta.dense())), rel=1e-9)
        assert ours.report.update_rank == ours.delta.rank
        assert ours.report.preserve_residual == pytest.approx(
            float(torch.linalg.norm(ours.delta.dense() @ P) / torch.linalg.norm(W @ P)), rel=1e-5, abs=1e-12
        )
        if mode == "exact":
            assert ours.report.preserve_residual <= 1e-10


@pytest.mark.parametrize("n_soft", [0, 60])
def test_iter_solve_shared_gives_each_site_as_it_is_solved(n_soft):
    """One site per step, in the weights' order, each the update the per-site solve gives; its inputs are checked
    when it is called, before any site is solved."""
    X, Y, V, Y_soft, P, S, weights = _shared_problem(n_soft)
    fact = factorize_zero_residual(X, preserve=P, preserve_mode="soft", preserve_weight=0.3, soft=S, soft_targets=V)
    if n_soft:
        with pytest.raises(ValueError, match="Y_soft is needed"):
            iter_solve_shared(fact, weights, Y)
    steps = iter_solve_shared(fact, weights, Y, Y_soft=Y_soft)
    first = next(steps)
    results = [first, *steps]
    assert [key for key, _ in results] == list(weights)
    for key, result in results:
        W = weights[key]
        alone = solve(fact, W, W @ Y, T_soft=W @ Y_soft if V is not None else None)
        assert rel(result.delta.dense(), alone.delta.dense()) <= 1e-9
        assert rel((W + result.delta.dense()) @ X, W @ Y) <= 1e-10


def test_the_metric_is_factorised_in_place_of_its_gram_matrix():
    """cholesky_of_metric writes the factor of I + G over G's storage (no second d × d matrix), the factor a plain
    Cholesky gives bit for bit."""
    g = torch.Generator().manual_seed(3)
    F = torch.randn(40, 300, generator=g, dtype=torch.float64)
    G = F @ F.T
    G = (G + G.T) / 2  # symmetric to the last bit, as metric.gram makes it
    expected = torch.linalg.cholesky(G + torch.eye(40, dtype=torch.float64))
    storage = G.data_ptr()
    L = cholesky_of_metric(G)
    assert L.data_ptr() == storage and torch.equal(L, expected)
    B = torch.randn(40, 5, generator=g, dtype=torch.float64)
    assert torch.equal(torch.cholesky_solve(B, L), torch.cholesky_solve(B, expected))
    bad = (F @ F.T + F @ F.T) / 2
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cholesky_of_metric(bad)


def test_solve_shared_serves_uce_and_reports_misses_per_site():
    X, Y, _, _, P, _, weights = _shared_problem(0)
    fact = factorize_uce(X, preserve=P)
    shared = solve_shared(fact, weights, Y)
    for key, W in weights.items():
        alone = solve(fact, W, W @ Y)
        assert rel(shared[key].delta.dense(), alone.delta.dense()) <= 1e-9
        # the shared path reads a site's norms from a float32 product (the features' precision)
        assert shared[key].report.residual == pytest.approx(alone.report.residual, rel=1e-6)
    # beyond capacity (more independent constraints than inputs): every site warns, naming itself
    g = torch.Generator().manual_seed(9)
    wide = torch.randn(24, 30, generator=g, dtype=torch.float64)
    over = factorize_zero_residual(wide)
    with pytest.warns(CapacityWarning) as caught:
        solve_shared(over, weights, torch.randn(24, 30, generator=g, dtype=torch.float64))
    assert sorted(str(w.message).split(" at ")[1].split(":")[0] for w in caught) == sorted(weights)
    with pytest.raises(CapacityError, match="site7"):
        solve_shared(over, weights, torch.randn(24, 30, generator=g, dtype=torch.float64), strict=True)


def test_solve_shared_refuses_a_weight_of_another_width_and_a_missing_soft_input():
    X, Y, V, Y_soft, _, _, weights = _shared_problem(3)
    fact = factorize_zero_residual(X, soft_targets=V)
    with pytest.raises(ValueError, match="Y_soft"):
        solve_shared(fact, weights, Y)
    with pytest.raises(ValueError, match="width 24"):
        solve_shared(fact, {"narrow": torch.zeros(5, 10, dtype=torch.float64)}, Y, Y_soft=Y_soft)


@pytest.mark.parametrize("case", ["woodbury", "d-by-d", "dense-soft"])
def test_float32_metric_features_keep_the_constraints_exact(problem, case):
    """Features given in float32 have their Gram matrix (and the dense soft part's product) taken in float32: the
    constraints still hold to float64 precision, and the update is the float64 one up to that rounding."""
    W, X, T = problem
    g = torch.Generator().manual_seed(6)
    d = W.shape[1]
    P = torch.randn(d, 90 if case == "d-by-d" else 20, generator=g, dtype=torch.float64)
    n_soft = d // 2 + 3 if case == "dense-soft" else 5
    V = torch.randn(d, n_soft, generator=g, dtype=torch.float64)
    T_soft = torch.randn(W.shape[0], n_soft, generator=g, dtype=torch.float64)
    kwargs = dict(preserve_mode="soft", preserve_weight=0.3, soft_target_weight=0.2, one_site=case == "dense-soft")
    narrow = solve(factorize_zero_residual(X.float(), preserve=P.float(), soft_targets=V.float(), **kwargs), W, T, T_soft=T_soft)
    full = solve(factorize_zero_residual(X.float().double(), preserve=P.float().double(), soft_targets=V.float().double(), **kwargs), W, T, T_soft=T_soft)
    assert rel((W + narrow.delta.dense()) @ X.float().double(), T) <= 1e-10
    assert narrow.report.residual <= 1e-10
    assert 0 < rel(narrow.delta.dense(), full.delta.dense()) <= 1e-4


@pytest.mark.parametrize("where", ["preserve", "soft"])
def test_non_finite_metric_features_are_named(problem, where):
    W, X, T = problem
    bad = torch.randn(W.shape[1], 4, dtype=torch.float64)
    bad[3, 1] = float("nan") if where == "preserve" else float("inf")
    kwargs = {"preserve": bad, "preserve_mode": "soft", "preserve_weight": 0.5} if where == "preserve" else {"soft": bad}
    with pytest.raises(ValueError, match="preserve features .* NaN or infinite"):
        factorize_zero_residual(X, **kwargs)


@pytest.mark.parametrize("direction", ["top", "bottom"])
def test_solve_shared_decides_already_met_per_site(direction):
    """Targets met to rounding in input space are not necessarily met through a site's W, and the other way round:
    each site decides as :func:`solve` does (no update, no warning, exactly where solve stores none)."""
    g = torch.Generator().manual_seed(3)
    d, n = 16, 4
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Vt, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    W = U @ torch.diag(torch.logspace(0, -2, d, dtype=torch.float64)) @ Vt.T  # condition number 100
    X = torch.randn(d, n, generator=g, dtype=torch.float64)
    column, eps = (0, 5e-7) if direction == "top" else (d - 1, 2e-6)
    E = Vt[:, column : column + 1].repeat(1, n)
    Y = X + eps * torch.linalg.norm(X) * E / torch.linalg.norm(E)
    fact = factorize_zero_residual(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CapacityWarning)
        ours = solve_shared(fact, {"site": W}, Y, strict=True)["site"]
        alone = solve(fact, W, W @ Y, strict=True)
    assert ours.delta.rank == alone.delta.rank
    assert torch.allclose(ours.delta.dense(), alone.delta.dense(), rtol=0, atol=1e-12)
    assert ours.report.residual == pytest.approx(alone.report.residual, rel=1e-6, abs=1e-20)


def test_solve_shared_stores_nothing_where_a_site_changes_nothing():
    X, Y, V, Y_soft, P, S, _ = _shared_problem(3)
    fact = factorize_zero_residual(X, preserve=P, preserve_mode="soft", preserve_weight=0.3, soft=S, soft_targets=V)
    zero = solve_shared(fact, {"zero": torch.zeros(5, X.shape[0], dtype=torch.float64)}, Y, Y_soft=Y_soft)["zero"]
    assert zero.delta.rank == 0 and zero.report.update_rank == 0 and zero.report.delta_norm == 0.0
    bad = torch.randn(5, X.shape[0], dtype=torch.float64)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        solve_shared(fact, {"bad": bad}, Y, Y_soft=Y_soft)


@pytest.mark.parametrize("mode, weight", [("none", 1.0), ("soft", 0.0), ("exact", 1.0)])
def test_non_finite_preserve_features_outside_the_metric_are_refused(problem, mode, weight):
    W, X, T = problem
    bad = torch.randn(W.shape[1], 4, dtype=torch.float64)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        factorize_zero_residual(X, preserve=bad, preserve_mode=mode, preserve_weight=weight)
