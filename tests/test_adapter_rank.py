"""Each site is stored at the numerical rank of its update, with ``max|B A − ΔW| ≤ 1e-6 max|ΔW|`` in float32."""

from __future__ import annotations

import json

import pytest
import torch

from erasepro_hub.adapters.lora import (
    file_sha256,
    read_adapter,
    save_adapter,
    store_site,
    stored_deltas,
    to_state_dict,
)
from erasepro_hub.cli import main
from erasepro_hub.manifest import load_manifest
from erasepro_hub.solver.delta import STORAGE_RTOL, TRUNCATION_SHARE, LowRankDelta

SHA = "0" * 64
F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=F64))
    return q


def with_spectrum(m: int, d: int, spectrum: torch.Tensor, g: torch.Generator) -> LowRankDelta:
    """``U diag(spectrum) Vᵀ`` in random orthonormal bases, given as (non-orthogonal) factors."""
    k = len(spectrum)
    mix = torch.randn(k, k, generator=g, dtype=F64)  # B = U Σ M, A = M⁻¹ Vᵀ: the same product
    return LowRankDelta(orthonormal(m, k, g) * spectrum @ mix, torch.linalg.solve(mix, orthonormal(d, k, g).T))


def redundant(m: int, d: int, rank: int, columns: int, g: torch.Generator) -> LowRankDelta:
    """A rank-``rank`` update as ``columns`` factor columns: ``B = B₀ C``, ``A = C⁺ A₀`` with ``C C⁺ = I``."""
    B0 = torch.randn(m, rank, generator=g, dtype=F64)
    A0 = torch.randn(rank, d, generator=g, dtype=F64)
    C = torch.randn(rank, columns, generator=g, dtype=F64)
    return LowRankDelta(B0 @ C, torch.linalg.pinv(C) @ A0)


def relative_error(stored: LowRankDelta, exact: LowRankDelta) -> float:
    dense = exact.dense(F64)
    return float((stored.dense(F64) - dense).abs().max() / dense.abs().max())


def through_file(tmp_path, deltas: dict[str, LowRankDelta], dtype=torch.float32) -> dict[str, LowRankDelta]:
    path = tmp_path / "a.safetensors"
    save_adapter(path, deltas, recipe_sha256=SHA, version="test", dtype=dtype)
    return read_adapter(path).deltas


# ----------------------------------------------------------------------------- rank
@pytest.mark.parametrize("m, d, rank, columns", [(320, 768, 7, 40), (768, 3072, 12, 23), (16, 24, 3, 40)])
def test_redundant_factors_are_stored_at_the_true_rank(tmp_path, m, d, rank, columns):
    delta = redundant(m, d, rank, columns, gen(m + columns))
    # the exact re-factorisation keeps the rounding-level singular values: more columns than the rank
    assert delta.compact().rank > rank
    got = through_file(tmp_path, {"unet.x.attn2.to_k": delta})["unet.x.attn2.to_k"]
    assert got.rank == rank and got.shape == (m, d) and got.dtype == torch.float32
    assert relative_error(got, delta) <= STORAGE_RTOL


def test_rank_is_never_above_the_smaller_side():
    g = gen(3)
    wide = LowRankDelta(torch.randn(16, 50, generator=g, dtype=F64), torch.randn(50, 24, generator=g, dtype=F64))
    stored = stored_deltas({"unet.x": wide})["unet.x"]
    assert stored.rank == 16 and relative_error(stored, wide) <= STORAGE_RTOL
    tall = LowRankDelta(torch.randn(40, 30, generator=g, dtype=F64), torch.randn(30, 8, generator=g, dtype=F64))
    assert stored_deltas({"unet.x": tall})["unet.x"].rank == 8


# ----------------------------------------------------------------------------- the guarantee
@pytest.mark.parametrize(
    "name, m, d, spectrum",
    [
        ("random", 1280, 768, torch.rand(30, generator=gen(0), dtype=F64) * 10 + 0.1),
        ("ill-conditioned", 1280, 768, torch.logspace(0, -9, 40, dtype=F64)),
        ("ill-conditioned-te", 768, 3072, torch.logspace(2, -7, 24, dtype=F64)),
        ("cliff", 320, 768, torch.cat([torch.ones(6, dtype=F64), torch.full((10,), 1e-12, dtype=F64)])),
    ],
)
def test_float32_reconstruction_guarantee(tmp_path, name, m, d, spectrum):
    delta = with_spectrum(m, d, spectrum, gen(len(spectrum)))
    got = through_file(tmp_path, {"text_encoder.x.mlp.fc2": delta})["text_encoder.x.mlp.fc2"]
    assert relative_error(got, delta) <= STORAGE_RTOL, name
    # every singular value above the truncation threshold is kept, none far below it is
    scale = float(delta.dense().abs().max())
    threshold = TRUNCATION_SHARE * STORAGE_RTOL * scale
    assert got.rank >= int((spectrum > threshold).sum())
    assert got.rank <= int((spectrum > threshold * 1e-3).sum())
    if name != "random":
        assert got.rank < len(spectrum)


def test_the_check_keeps_more_when_truncation_would_miss():
    """A dropped direction that sits on one entry moves it by its whole singular value: the check catches it."""
    m, d = 24, 40
    B = torch.zeros(m, 3, dtype=F64)
    A = torch.zeros(3, d, dtype=F64)
    for i, value in enumerate([1.0, 0.5, 1.5e-6]):
        B[i, i], A[i, i] = value, 1.0
    delta = LowRankDelta(B, A)
    # a threshold of 2e-6 · max|ΔW| would drop the 1.5e-6 direction: an error of 1.5e-6 > 1e-6
    loose = delta.at_numerical_rank(torch.float32, share=2.0)
    assert loose.rank == 3 and relative_error(loose.to(torch.float32), delta) <= STORAGE_RTOL
    # the default threshold (5e-7) keeps it on its own
    assert delta.at_numerical_rank(torch.float32).rank == 3
    # in float64 storage a tighter budget holds too
    tight = delta.at_numerical_rank(torch.float64, rtol=1e-12)
    assert tight.rank == 3 and relative_error(tight, delta) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_truncates_no_more_than_float32(dtype):
    delta = with_spectrum(320, 768, torch.logspace(0, -9, 40, dtype=F64), gen(40))
    half = stored_deltas({"unet.x": delta}, dtype=dtype)["unet.x"]
    single = stored_deltas({"unet.x": delta})["unet.x"]
    assert half.dtype == dtype and half.rank == single.rank < 40
    # the rounding of the factors to a half type dominates: no worse than storing every exact column
    every = delta.to(dtype)
    assert relative_error(half, delta) <= 2 * relative_error(every, delta)


# ----------------------------------------------------------------------------- bytes
def test_same_update_same_bytes(tmp_path):
    deltas = {"unet.a.attn2.to_k": redundant(320, 768, 7, 40, gen(1)), "unet.b.to_v": redundant(64, 96, 5, 9, gen(2))}
    copies = {key: LowRankDelta(delta.B.clone(), delta.A.clone()) for key, delta in deltas.items()}
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_adapter(first, deltas, recipe_sha256=SHA, version="t")
    save_adapter(second, copies, recipe_sha256=SHA, version="t")
    assert file_sha256(first) == file_sha256(second)


def test_singular_vectors_have_a_fixed_sign():
    delta = redundant(64, 96, 5, 9, gen(4))
    U, s, Vh = delta.svd()
    U2, s2, Vh2 = LowRankDelta(-delta.B, -delta.A).svd()  # the same product from other factors
    assert torch.allclose(s, s2) and torch.allclose(U[:, :5], U2[:, :5], atol=1e-10)
    assert torch.allclose(Vh[:5], Vh2[:5], atol=1e-10)
    pivots = U.gather(0, U.abs().argmax(dim=0, keepdim=True))
    assert bool((pivots > 0).all())


def test_stored_deltas_are_written_as_they_are(tmp_path):
    stored = stored_deltas({"unet.x": redundant(64, 96, 5, 9, gen(5))})
    state = to_state_dict(stored, as_stored=True)
    assert torch.equal(state["unet.x.lora_A.weight"], stored["unet.x"].A)
    assert torch.equal(state["unet.x.lora_B.weight"], stored["unet.x"].B)
    with pytest.raises(ValueError, match="stored as torch.float32, the adapter is torch.float16"):
        to_state_dict(stored, dtype=torch.float16, as_stored=True)


# ----------------------------------------------------------------------------- updates in dense form
def test_a_full_rank_dense_update_is_stored_beside_the_shared_identity(tmp_path):
    g = gen(7)
    wide = LowRankDelta.from_dense(torch.randn(24, 40, generator=g, dtype=F64))
    tall = LowRankDelta.from_dense(torch.randn(40, 24, generator=g, dtype=F64))
    other = LowRankDelta.from_dense(torch.randn(24, 40, generator=g, dtype=F64))
    assert wide.B is other.B and tall.A is wide.B  # one 24 × 24 identity for all three
    stored = stored_deltas({"unet.a": wide, "unet.b": tall, "unet.c": other})
    # full numerical rank: no SVD factors, the update itself beside the identity, cast to float32
    assert stored["unet.a"].B is stored["unet.c"].B and stored["unet.b"].A is stored["unet.a"].B
    assert torch.equal(stored["unet.a"].A, wide.A.float()) and torch.equal(stored["unet.b"].B, tall.B.float())
    assert store_site(wide).update_rank == 24
    # a file written from shared factors holds each site's own copy, and reads back within the guarantee
    back = through_file(tmp_path, {"unet.a": wide, "unet.b": tall})
    assert relative_error(back["unet.a"], wide) <= STORAGE_RTOL and relative_error(back["unet.b"], tall) <= STORAGE_RTOL


def test_the_state_dict_holds_copies_of_the_shared_identity():
    g = gen(10)
    deltas = {k: LowRankDelta.from_dense(torch.randn(12, 20, generator=g, dtype=F64)) for k in ("unet.a", "unet.b")}
    state = to_state_dict(deltas)
    up_a, up_b = state["unet.a.lora_B.weight"], state["unet.b.lora_B.weight"]
    assert torch.equal(up_a, torch.eye(12)) and up_a.data_ptr() != up_b.data_ptr()
    up_a.mul_(0.5)  # a caller writing to its state dict changes nothing else
    assert torch.equal(LowRankDelta.from_dense(torch.ones(12, 20, dtype=torch.float32)).B, torch.eye(12))
    assert torch.equal(up_b, torch.eye(12))


def test_a_singular_value_just_under_the_threshold_is_still_dropped():
    """Full width, the smallest direction at 0.4 x the truncation threshold: the SVD way, one rank less."""
    g = gen(11)
    U, V = orthonormal(16, 16, g), orthonormal(20, 16, g)
    spectrum = torch.ones(16, dtype=F64)
    scale = float((U * spectrum @ V.T).abs().max())
    spectrum[-1] = 0.4 * TRUNCATION_SHARE * STORAGE_RTOL * scale
    delta = LowRankDelta.from_dense(U * spectrum @ V.T)
    stored = stored_deltas({"unet.x": delta})["unet.x"]
    assert stored.rank == 15 and relative_error(stored, delta) <= STORAGE_RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_svd_factors_of_a_dense_update(dtype):
    """Half types round ΔW's small entries away on their own: the shortcut is for float32 and float64 only."""
    delta = LowRankDelta.from_dense(torch.randn(16, 20, generator=gen(12), dtype=F64) * 1e-5)
    stored = stored_deltas({"unet.x": delta}, dtype=dtype)["unet.x"]
    assert stored.dtype == dtype and not stored.is_dense_form()


def test_a_rank_deficient_dense_update_is_still_truncated():
    delta = LowRankDelta.from_dense(redundant(64, 96, 5, 9, gen(8)).dense())
    assert delta.is_dense_form()
    stored = stored_deltas({"unet.x": delta})["unet.x"]
    assert stored.rank == 5 and not stored.is_dense_form() and relative_error(stored, delta) <= STORAGE_RTOL


def test_dense_form_with_one_tiny_direction_keeps_the_guarantee():
    """Full rank, but one singular value below the truncation threshold: the SVD path decides, as before."""
    spectrum = torch.cat([torch.ones(15, dtype=F64), torch.full((1,), 1e-9, dtype=F64)])
    delta = LowRankDelta.from_dense(with_spectrum(16, 20, spectrum, gen(9)).dense())
    stored = stored_deltas({"unet.x": delta})["unet.x"]
    assert stored.rank == 15 and relative_error(stored, delta) <= STORAGE_RTOL


# ----------------------------------------------------------------------------- zero updates
def test_zero_updates_are_left_out():
    b, a = torch.ones(8, 1, dtype=F64), torch.ones(1, 12, dtype=F64)
    cancelling = LowRankDelta(torch.cat([b, b], 1), torch.cat([a, -a]))  # non-zero factors, B A = 0
    deltas = {"unet.zero": LowRankDelta.zeros(8, 12), "unet.cancel": cancelling, "unet.one": LowRankDelta(b, a)}
    for fmt in ("lora", "dense"):
        stored = stored_deltas(deltas, fmt)
        assert set(stored) == {"unet.one"}
        sites = {key: store_site(delta, fmt) for key, delta in deltas.items()}
        ranks = {key: site.update_rank for key, site in sites.items()}
        assert ranks == {"unet.zero": 0, "unet.cancel": 0, "unet.one": 1}
        for key in ("unet.zero", "unet.cancel"):  # nothing stored: the zero update of the site's shape
            assert sites[key].delta.rank == 0 and sites[key].delta.shape == (8, 12)
    with pytest.raises(ValueError, match="adapter format must be 'lora' or 'dense', got 'safetensors'"):
        store_site(deltas["unet.one"], "safetensors")
    assert set(to_state_dict(deltas)) == {"unet.one.lora_A.weight", "unet.one.lora_B.weight"}


def test_dense_format_is_unaffected():
    delta = redundant(64, 96, 5, 9, gen(6))
    stored = stored_deltas({"unet.x": delta}, "dense")["unet.x"]
    assert stored.rank == 64 and torch.equal(stored.B, torch.eye(64, dtype=torch.float32))
    assert torch.equal(stored.A, delta.dense().float())
    site = store_site(delta, "dense")
    assert site.update_rank == 5 and torch.equal(site.delta.A, stored.A)


# ----------------------------------------------------------------------------- end to end
def test_erasure_folder_records_the_stored_ranks(demo_folder, capsys):
    manifest = load_manifest(demo_folder / "erasepro.yaml")
    adapter = read_adapter(demo_folder / manifest.outputs.adapter_file)
    recorded = {site.name: site.update_rank for site in manifest.outputs.sites}
    assert {key: delta.rank for key, delta in adapter.deltas.items()} == {k: r for k, r in recorded.items() if r}
    for key, delta in adapter.deltas.items():
        # nothing at the level of rounding is stored: every direction is well above the truncation threshold
        _, s, _ = delta.svd()
        assert delta.rank <= min(delta.shape)
        assert float(s[-1]) > TRUNCATION_SHARE * STORAGE_RTOL * float(delta.dense().abs().max()), key

    assert main(["inspect", str(demo_folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    factors = sum(d.A.numel() + d.B.numel() for d in adapter.deltas.values()) * 4
    dense = sum(d.shape[0] * d.shape[1] for d in adapter.deltas.values()) * 4
    assert summary["adapter_bytes"] == factors and summary["dense_bytes"] == dense
    assert summary["adapter_over_dense"] == pytest.approx(factors / dense)
    assert summary["total_rank"] == sum(d.rank for d in adapter.deltas.values())
    assert main(["inspect", str(demo_folder)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("adapter "))
    percent = f"{100 * factors / dense:.1f} %"
    assert line == f"adapter      {factors / 1e6:.3g} MB = {percent} of the dense update ({dense / 1e6:.3g} MB)"


def test_inspect_of_a_bare_manifest_has_no_sizes(demo_folder, capsys):
    assert main(["inspect", str(demo_folder / "erasepro.yaml"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["adapter_bytes"] is None and summary["adapter_over_dense"] is None


@pytest.mark.parametrize("fmt", ["lora", "dense"])
def test_compute_keeps_each_site_as_the_file_stores_it(fmt):
    """compute keeps each site's stored form as the solve goes: what a solve stored at the end gives, bit for bit,
    with the same recorded ranks; no float64 update is left in the computation."""
    import yaml
    from conftest import DEMO

    from erasepro_hub.erase import compute
    from erasepro_hub.manifest import parse_manifest, to_data
    from erasepro_hub.models.loading import DTYPES
    from erasepro_hub.models.progressive import solve_erasure
    from erasepro_hub.recipe import plan_from_recipe

    data = to_data(load_manifest(DEMO))
    data["adapter"]["format"] = fmt
    recipe = parse_manifest(yaml.safe_dump(data)).recipe()
    comp = compute(recipe)
    dtype = DTYPES[recipe.adapter.dtype]
    solution = solve_erasure(comp.model, plan_from_recipe(recipe))
    expected = stored_deltas(solution.deltas, fmt, dtype)
    assert list(comp.stored) == list(expected) and expected
    for key, delta in expected.items():
        assert torch.equal(comp.stored[key].A, delta.A) and torch.equal(comp.stored[key].B, delta.B)
    ranks = {key: store_site(delta, fmt, dtype).update_rank for key, delta in solution.deltas.items()}
    assert comp.update_ranks == ranks
    assert comp.solution.seconds > 0 and comp.solution.timings["keep"] > 0
    assert {d.dtype for d in comp.solution.deltas.values()} == {dtype}
