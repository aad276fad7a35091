"""The driver's passes (issue: cold path and solve cost): the UCE token choice, the causal window cut,
the preserve pass through the original model, and what the metrics reuse from the solve."""

from __future__ import annotations

import platform

import pytest
import torch

from conftest import REPO

from erasepro_hub import erase as E
from erasepro_hub.evaluation import NAMED_VARIANTS, parse_variant, with_overrides
from erasepro_hub.manifest import load_manifest
from erasepro_hub.metrics.features import feature_metrics
from erasepro_hub.models.base import prompt_embeddings
from erasepro_hub.models.progressive import solve_erasure
from erasepro_hub.models.packing import pack_prefixes
from erasepro_hub.models.prompts import encode
from erasepro_hub.recipe import drift_prompts, heldout_pairs, plan_from_recipe, training_pairs

_DEMO = load_manifest(REPO / "manifests" / "demo.yaml").recipe()


def _base():
    return E.load_base(_DEMO)


def test_uce_reads_the_published_last_token_by_default_and_erasepro_tokens_by_name():
    base = _base()
    published = plan_from_recipe(_DEMO.model_copy(update={"method": "uce"}))
    assert published.recipe.uce.tokens == "last-token" and published.token_policy == "last-token"
    named = with_overrides(_DEMO, parse_variant("uce-erasepro-tokens").overrides)
    assert NAMED_VARIANTS["uce-erasepro-tokens"]["uce.tokens"] == "erasepro"
    ours = plan_from_recipe(named)
    assert ours.token_policy == _DEMO.solver.token_policy == "concept-eos"
    one = solve_erasure(base.model, published)
    many = solve_erasure(base.model, ours)
    assert one.n_constrained_tokens == len(published.pairs)  # one key per prompt
    assert many.n_constrained_tokens > one.n_constrained_tokens
    # ErasePro itself is not affected by the UCE setting
    assert plan_from_recipe(_DEMO).token_policy == "concept-eos"


def test_the_window_cut_changes_nothing_a_causal_encoder_reads():
    """Target and anchor passes stop after the last position read: the solve equals the full-window one."""
    base = _base()
    plan = plan_from_recipe(_DEMO)
    te = base.model.text_encoders[0]
    assert te.arch.causal
    ids = encode(te.tokenizer, plan.preserve[:3]).ids
    full, _ = prompt_embeddings(base.model, [ids])
    cut, _ = prompt_embeddings(base.model, [ids[:, :9]])
    assert torch.allclose(full[:, :9], cut, atol=1e-5, rtol=1e-5)


def _preserving(positions: str, **update):
    return _DEMO.model_copy(update={"preserve": _DEMO.preserve.model_copy(update={"positions": positions, **update})})


def test_the_preserve_pass_reads_the_original_model_and_the_metrics_reuse_it():
    """Under ``preserve.positions: window`` the preserve pass runs the whole window: the metrics reuse it. Under the
    default (each prompt's own tokens) a causal encoder's pass stops at the last end-of-text token: nothing to
    reuse, the metrics compute those rows themselves."""
    base = _base()
    recipe = _preserving("window")
    plan = plan_from_recipe(recipe)
    solution = solve_erasure(base.model, plan)
    assert set(solution.original_embeddings) == {p.text for p in plan.preserve}
    assert solve_erasure(base.model, plan_from_recipe(_DEMO)).original_embeddings == {}
    te = base.model.text_encoders[0]
    ids = encode(te.tokenizer, plan.preserve).ids
    original, _ = prompt_embeddings(base.model, [ids])
    for i, prompt in enumerate(plan.preserve):
        assert torch.allclose(solution.original_embeddings[prompt.text], original[i], atol=1e-5)
    # the metrics give the same figures with and without the rows the solve already computed
    deltas = solution.deltas
    args = dict(pairs=training_pairs(recipe), token_policy="concept-eos", heldout=heldout_pairs(recipe),
                preserve=drift_prompts(recipe))
    reused = feature_metrics(base.model, deltas, known=solution.original_embeddings, **args)
    fresh = feature_metrics(base.model, deltas, **args)
    for key in ("preserve_similarity", "preserve_similarity_min", "preserve_drift", "anchor_similarity"):
        assert abs(reused[key] - fresh[key]) <= 1e-6 * max(1.0, abs(fresh[key]))


@pytest.mark.parametrize("positions", ["prompt", "window"])
def test_exact_preservation_leaves_the_preserve_prompts_where_the_original_model_had_them(positions):
    """Preserve features come from the original model; under exact preservation every stage keeps them there,
    so the edited encoder computes the original embedding for every preserve prompt at every position kept:
    its own tokens (``prompt``), or the whole window, padding included (``window``)."""
    from erasepro_hub.metrics.features import EditedEncoders

    base = _base()
    plan = plan_from_recipe(_preserving(positions, mode="exact", captions="none"))
    solution = solve_erasure(base.model, plan)
    te = base.model.text_encoders[0]
    enc = encode(te.tokenizer, plan.preserve)
    before, _ = prompt_embeddings(base.model, [enc.ids])
    stored = {k: d.to(torch.float32) for k, d in solution.deltas.items()}
    with EditedEncoders(base.model, stored):
        after, _ = prompt_embeddings(base.model, [enc.ids])
    own = torch.arange(enc.length)[None, :] <= torch.tensor(enc.eos)[:, None]
    scale = before.abs().max()
    assert float((after - before)[own].abs().max() / scale) <= 1e-5
    padding = float((after - before)[~own].abs().max() / scale)
    assert padding <= 1e-5 if positions == "window" else padding > 1e-3  # the padding is kept only under window


def test_the_anchor_capture_holds_each_anchor_position_once():
    """Targets sharing an anchor read the same anchor rows: captured once, expanded to every constrained row."""
    from erasepro_hub.models.base import get_module, run_encoder
    from erasepro_hub.models.progressive import (
        _anchor_captures,
        _gather,
        _tensor_output,
        _tokenize,
        _window,
        text_encoder_stages,
    )

    base = _base()
    plan = plan_from_recipe(_DEMO)
    te, tok = base.model.text_encoders[0], _tokenize(base.model, plan).encoders[0]
    stages = text_encoder_stages(base.model, plan)[te.component]
    captured, _ = _anchor_captures(te, stages, tok.anchors.ids, tok)
    pos = tok.positions
    distinct = len({(int(r), int(p)) for r, p in zip(pos.a_rows, pos.a_pos)})
    assert distinct < len(pos.a_rows)  # the demo's prompts share their anchor positions
    stage = stages[0]
    assert stage.mode == "stream"  # the default: the anchors' residual stream after the layer
    where, kind = te.arch.stream[stage.site].anchor
    point = get_module(te.layers[stage.layer], where)
    seen = {}
    if kind == "output":
        handle = point.register_forward_hook(lambda mod, args, out: seen.setdefault("out", _tensor_output(out)))
    else:
        handle = point.register_forward_pre_hook(lambda mod, args: seen.setdefault("out", args[0]))
    try:
        run_encoder(te, _window(te, tok.anchors.ids, pos.a_pos, tok.eos_positions.a_pos))  # the capture's own batch
    finally:
        handle.remove()
    every = torch.ones(len(pos.a_rows), dtype=torch.bool)
    assert captured[stage.name].values.shape[0] == distinct
    assert torch.equal(captured[stage.name].rows(every), _gather(seen["out"], pos.a_rows, pos.a_pos))


def test_freed_memory_is_handed_back_only_where_the_c_library_has_malloc_trim(monkeypatch):
    """glibc's malloc_trim at each stage's end; elsewhere (another platform, no C library to open, no such
    function) a no-op, never an error."""
    from erasepro_hub.models import progressive

    def cannot_open(name):
        raise OSError("no C library here")

    class NoTrim:
        def __init__(self, name):
            pass

    trim = progressive._malloc_trim
    trim.cache_clear()
    try:
        for system, cdll in (("win32", None), ("darwin", None), ("linux", cannot_open), ("linux", NoTrim)):
            monkeypatch.setattr(progressive.sys, "platform", system)
            if cdll is not None:
                monkeypatch.setattr(progressive.ctypes, "CDLL", cdll)
            assert trim() is None
            progressive._return_freed_memory()
            trim.cache_clear()
            monkeypatch.undo()
        if platform.libc_ver()[0] == "glibc":
            assert trim() is not None and trim()(0) in (0, 1)
    finally:
        trim.cache_clear()


def test_only_a_stage_with_large_updates_hands_memory_back(monkeypatch):
    """The trim walks the whole heap (milliseconds): it runs at the end of a stage whose float64 updates reached
    TRIM_BYTES (its working set grew with them), not after each of a small solve's stages."""
    from types import SimpleNamespace

    from erasepro_hub.models import progressive
    from erasepro_hub.solver.delta import LowRankDelta

    calls = []
    monkeypatch.setattr(progressive, "_return_freed_memory", lambda: calls.append(1))
    report = SimpleNamespace(constraint_rank=0, residual=0.0)
    recorder = progressive._Recorder(None)
    small = LowRankDelta(torch.zeros(768, 20, dtype=torch.float64), torch.zeros(20, 3072, dtype=torch.float64))
    for stage in ("a", "b"):
        recorder.add(f"{stage}.site", stage, SimpleNamespace(delta=small, report=report))
        recorder.stage_done(stage)
    assert calls == []
    rank = progressive.TRIM_BYTES // (8 * (768 + 3072)) + 1
    large = LowRankDelta(torch.zeros(768, rank, dtype=torch.float64), torch.zeros(rank, 3072, dtype=torch.float64))
    recorder.add("c.site", "c", SimpleNamespace(delta=large, report=report))
    recorder.stage_done("c")
    assert calls == [1]
    recorder.add("d.site", "d", SimpleNamespace(delta=small, report=report))  # counted afresh per stage
    recorder.stage_done("d")
    assert calls == [1]
    # K/V sites share their stage's A: it is counted once, so sixteen sites with small B stay below the mark
    shared = torch.zeros(rank // 4, 3072, dtype=torch.float64)
    for i in range(16):
        recorder.add(f"e.site{i}", "e", SimpleNamespace(
            delta=LowRankDelta(torch.zeros(64, rank // 4, dtype=torch.float64), shared), report=report))
    recorder.stage_done("e")
    assert calls == [1]


def test_auto_keeps_the_preserve_padding_only_where_no_caption_summary_keeps_the_window():
    from erasepro_hub.models.progressive import _preserve_padding

    assert _DEMO.preserve.positions == "auto" and _DEMO.preserve.captions != "none"
    assert not _preserve_padding(plan_from_recipe(_DEMO))
    assert _preserve_padding(plan_from_recipe(_preserving("auto", captions="none")))
    assert _preserve_padding(plan_from_recipe(_DEMO.model_copy(update={"method": "uce"})))  # no caption set
    for captions in ("default-v1", "none"):
        assert not _preserve_padding(plan_from_recipe(_preserving("prompt", captions=captions)))
        assert _preserve_padding(plan_from_recipe(_preserving("window", captions=captions)))


def test_a_preserve_prompt_that_reaches_the_window_end_leaves_whole_embeddings_to_reuse():
    """One preserve prompt reaches the window's end, the others are short: the pass is not cut, so it runs
    rectangular and every prompt's whole window is what the metrics reuse (a prefix-tree pass would hold only
    the positions it reads)."""
    base = _base()
    te = base.model.text_encoders[0]
    long = " ".join(["quiet harbour"] * te.tokenizer.model_max_length)  # its own subtree: no shared word
    recipe = _preserving("auto", concepts=[*_DEMO.preserve.concepts, "a photo of a dog", long], templates=["{}"])
    plan = plan_from_recipe(recipe)
    enc = encode(te.tokenizer, plan.preserve)
    assert max(enc.eos) == enc.length - 1 and min(enc.eos) < enc.length // 2
    assert pack_prefixes(enc.ids, torch.tensor(enc.eos)) is not None  # a prefix tree would pack this pass
    solution = solve_erasure(base.model, plan)
    assert set(solution.original_embeddings) == {p.text for p in plan.preserve}
    original, _ = prompt_embeddings(base.model, [enc.ids])
    for i, prompt in enumerate(plan.preserve):
        assert torch.allclose(solution.original_embeddings[prompt.text], original[i], atol=1e-5)
