"""``erasepro erase manifests/demo.yaml`` end to end on the embedded models, checked through diffusers itself."""

from __future__ import annotations


import pytest
import torch
from helpers import captured_logs, kv_residuals

from erasepro_hub.adapters import load_erasure, read_adapter, unload_erasure
from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.loading import load_builtin

TOL = 1e-5


def fresh(name: str = "tiny-sd"):
    pipe, _ = load_builtin(name)
    return pipe


@pytest.mark.parametrize("fixture, builtin", [("demo_folder", "tiny-sd"), ("demo_xl_folder", "tiny-sdxl")])
def test_kv_of_targets_equal_anchor_kv(request, fixture, builtin):
    folder = request.getfixturevalue(fixture)
    original, edited = fresh(builtin), fresh(builtin)
    load_erasure(edited, folder)
    residuals, pooled = kv_residuals(folder, edited, original)
    n_sites = sum(1 for n, _ in original.unet.named_modules() if n.endswith("attn2"))
    assert len(residuals) == 2 * n_sites
    assert max(residuals.values()) <= TOL, residuals
    if builtin == "tiny-sdxl":  # the pooled embedding is matched too (text_encoder.pooled: match)
        assert pooled is not None and pooled <= TOL
    # the metric written at erase time measures the same thing
    metrics = load_manifest(folder / "erasepro.yaml").metrics
    assert metrics["residual_train"] <= TOL


def test_without_adapter_the_residual_is_large(demo_folder):
    residuals, _ = kv_residuals(demo_folder, fresh(), fresh())
    assert min(residuals.values()) > 0.05


def test_uce_leaves_a_larger_residual(demo_folder, demo_uce_folder):
    original = fresh()
    ours, uce = fresh(), fresh()
    load_erasure(ours, demo_folder)
    load_erasure(uce, demo_uce_folder)
    r_ours, _ = kv_residuals(demo_folder, ours, original)
    r_uce, _ = kv_residuals(demo_uce_folder, uce, original)
    mean = lambda r: sum(r.values()) / len(r)  # noqa: E731
    assert mean(r_uce) > 1e-3
    assert mean(r_uce) > 1000 * mean(r_ours)
    m_ours = load_manifest(demo_folder / "erasepro.yaml").metrics["residual_train"]
    m_uce = load_manifest(demo_uce_folder / "erasepro.yaml").metrics["residual_train"]
    assert m_uce > 1000 * m_ours
    assert m_uce == pytest.approx(mean(r_uce), rel=1e-3)


@pytest.mark.parametrize("fixture, builtin", [("demo_folder", "tiny-sd"), ("demo_xl_folder", "tiny-sdxl")])
def test_plain_diffusers_loads_the_adapter(request, fixture, builtin):
    from peft.tuners.lora import LoraLayer

    folder = request.getfixturevalue(fixture)
    with captured_logs("diffusers", "peft", "transformers") as messages:
        plain = fresh(builtin)
        plain.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    text = "\n".join(messages).lower()
    # diffusers reports incompatible keys as "... led to unexpected keys ..." / "... missing keys ..."
    assert "unexpected keys" not in text and "missing keys" not in text, text
    # every site in the file became a LoRA layer with scale 1 and the file's rank: nothing was silently dropped
    sites = read_adapter(folder / "pytorch_lora_weights.safetensors").deltas
    layers = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(plain, component, None)
        if module is None:
            continue
        for name, sub in module.named_modules():
            if isinstance(sub, LoraLayer):
                layers[f"{component}.{name}"] = sub
    assert len(layers) == len(sites)
    for key, delta in sites.items():
        match = [layer for name, layer in layers.items() if key.replace("text_model.", "") == name.replace("text_model.", "")]
        assert len(match) == 1, key
        assert list(match[0].scaling.values()) == [1.0]
        assert list(match[0].r.values()) == [delta.rank]
    # and gives the same K/V as our verified loader
    ours = fresh(builtin)
    load_erasure(ours, folder)
    original = fresh(builtin)
    r_plain, p_plain = kv_residuals(folder, plain, original)
    r_ours, p_ours = kv_residuals(folder, ours, original)
    assert max(r_plain.values()) <= TOL
    for key in r_plain:
        assert abs(r_plain[key] - r_ours[key]) <= TOL
    # SDXL: the pooled embedding is matched too, and plain diffusers gives the same pooled residual as ours
    assert (p_plain is None) == (p_ours is None) == ("xl" not in builtin)
    if p_plain is not None:
        assert p_plain <= TOL and abs(p_plain - p_ours) <= TOL


def test_fused_and_hooked_agree_and_undo_is_exact(demo_folder):
    original = fresh()
    before = {n: p.detach().clone() for n, p in original.unet.named_parameters() if "attn2" in n}
    before.update({n: p.detach().clone() for n, p in original.text_encoder.named_parameters()})
    fused = fresh()
    handle = load_erasure(fused, demo_folder, fuse=True)
    r_fused, _ = kv_residuals(demo_folder, fused, original)
    assert max(r_fused.values()) <= TOL
    handle.remove()
    for n, p in fused.unet.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    for n, p in fused.text_encoder.named_parameters():
        assert torch.equal(p, before[n]), n
    # hooks: unload_erasure removes every applied erasure
    hooked = fresh()
    load_erasure(hooked, demo_folder)
    assert unload_erasure(hooked) == 1
    r_clean, _ = kv_residuals(demo_folder, hooked, original)
    assert min(r_clean.values()) > 0.05


def test_other_base_weights_are_refused_before_anything_changes(demo_folder):
    from erasepro_hub.errors import BaseMismatchError

    pipe = fresh()
    module = pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2.to_v")
    with torch.no_grad():
        module.weight[0, 0] += 1e-3
    snapshot = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    te_snapshot = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    with pytest.raises(BaseMismatchError, match="mid_block.attentions.0.transformer_blocks.0.attn2.to_v"):
        load_erasure(pipe, demo_folder)
    for n, p in pipe.unet.named_parameters():
        assert torch.equal(p, snapshot[n])
    for n, p in pipe.text_encoder.named_parameters():
        assert torch.equal(p, te_snapshot[n])
    hooks = [m for m in pipe.text_encoder.modules() if m._forward_hooks] + [
        m for m in pipe.unet.modules() if m._forward_hooks
    ]
    assert hooks == []
    # the expert opt-out applies it anyway
    handle = load_erasure(pipe, demo_folder, verify_base=False)
    assert handle.active


def test_adapter_for_another_architecture_is_refused(demo_folder):
    from erasepro_hub.errors import BaseMismatchError

    with pytest.raises(BaseMismatchError, match="shape|no module|another"):
        load_erasure(fresh("tiny-sdxl"), demo_folder)


def test_half_precision_pipeline_is_recognised(demo_folder):
    pipe, _ = load_builtin("tiny-sd", dtype=torch.bfloat16)
    handle = load_erasure(pipe, demo_folder)  # bfloat16 fingerprints are recorded at erase time
    assert handle.active


def test_folder_contents(demo_folder):
    names = sorted(p.name for p in demo_folder.iterdir())
    assert {"pytorch_lora_weights.safetensors", "erasepro.yaml", "metrics.json"} <= set(names)
    assert not [n for n in names if n.startswith(".")]
    adapter = read_adapter(demo_folder / "pytorch_lora_weights.safetensors")
    manifest = load_manifest(demo_folder / "erasepro.yaml")
    from erasepro_hub.manifest import recipe_sha256

    assert adapter.recipe_sha256 == recipe_sha256(manifest) == manifest.outputs.recipe_sha256
    # 3 text-encoder stages (mlp.fc2 of layers 1-3, stream mode) carry the erasure; at the 8
    # cross-attention K/V sites the exact targets then already hold within residual_tol, so only the
    # soft misspelling terms are stored there (a smaller rank than the exact constraints)
    assert sum(k.startswith("text_encoder.") for k in adapter.deltas) == 3
    assert sum(k.startswith("unet.") for k in adapter.deltas) == 8
    sites = manifest.outputs.sites
    assert len(sites) == 11
    for site in sites:
        if site.name.startswith("unet."):
            # surplus concept tokens and EOS all became the anchor's EOS: dependent (consistent) columns
            assert site.constraint_rank <= site.n_constraints and site.residual <= manifest.solver.residual_tol
            assert site.update_rank > 0
        else:
            assert site.constraint_rank == site.n_constraints and site.update_rank > site.constraint_rank and site.residual <= 1e-10


@pytest.mark.parametrize(
    "name, builtin, edit",
    [
        ("sd2", "tiny-sd2", lambda d: d["base_model"].update(id="builtin:tiny-sd2")),
        ("dense", "tiny-sd", lambda d: d.update(adapter={"format": "dense"})),
        ("stream", "tiny-sd", lambda d: d.update(text_encoder={"target_mode": "stream", "depth": 2})),
        ("out-proj", "tiny-sd", lambda d: d.update(text_encoder={"site": "self_attn.out_proj", "depth": 1})),
        ("exact-preserve", "tiny-sd", lambda d: d["preserve"].update(mode="exact", concepts=["Claude Monet"], templates=["{}"])),
        ("exact-preserve-window", "tiny-sd", lambda d: d["preserve"].update(
            mode="exact", concepts=["Claude Monet"], templates=["{}"], positions="window")),
    ],
)
def test_variants_reach_zero_residual_through_plain_diffusers(erase_variant, name, builtin, edit):
    folder = erase_variant(name, edit)
    original, plain = fresh(builtin), fresh(builtin)
    plain.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    residuals, _ = kv_residuals(folder, plain, original)
    assert max(residuals.values()) <= TOL, residuals
    manifest = load_manifest(folder / "erasepro.yaml")
    if name == "dense":
        adapter = read_adapter(folder / "pytorch_lora_weights.safetensors")
        assert all(d.rank == min(d.shape) for d in adapter.deltas.values())
    if name in ("stream", "out-proj"):
        te = [s for s in manifest.outputs.sites if s.name.startswith("text_encoder")]
        assert len(te) == (2 if name == "stream" else 1)
        assert all(s.residual <= 1e-10 for s in manifest.outputs.sites)
    if name.startswith("exact-preserve"):
        # the target tokens + the positions of "Claude Monet" in the "{}" template, all held exactly: its own
        # tokens (BOS, Claude, Monet, EOS), or under preserve.positions: window every position of the window
        kept = 32 if name.endswith("window") else 4
        for site in manifest.outputs.sites:
            assert site.n_constraints == manifest.metrics["n_constrained_tokens"] + kept
            # the padding repeats itself, so the numerical rank can be below the column count
            assert site.constraint_rank <= site.n_constraints and site.residual <= manifest.solver.residual_tol
            assert site.preserve_residual <= 1e-10
