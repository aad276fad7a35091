"""The target pass over a prefix tree (erasepro_hub.models.packing) and the merged soft columns: both are
exact rewrites of the rectangular pass and of the per-prompt soft terms, so the solve must not move."""

from __future__ import annotations

import pytest
import torch

from conftest import REPO

from erasepro_hub import erase as E
from erasepro_hub.manifest import load_manifest
from erasepro_hub.models import progressive as PG
from erasepro_hub.models.base import run_encoder
from erasepro_hub.models.packing import pack_prefixes
from erasepro_hub.models.prompts import PromptPair
from erasepro_hub.recipe import plan_from_recipe

_DEMO = load_manifest(REPO / "manifests" / "demo.yaml").recipe()

IDS = torch.tensor([
    [7, 1, 2, 3, 9, 9],
    [7, 1, 2, 4, 5, 9],
    [7, 1, 6, 9, 9, 9],
    [7, 8, 2, 3, 9, 9],
    [7, 1, 2, 3, 9, 9],  # the same prompt as the first
])
LAST = torch.tensor([4, 5, 3, 2, 4])


def test_every_read_position_sits_under_its_own_prefix():
    packed = pack_prefixes(IDS, LAST)
    assert packed is not None
    # distinct prefixes: BOS, then 1, 1-2, 1-2-3, 1-2-3-9, 1-2-4, 1-2-4-5, 1-2-4-5-9, 1-6, 1-6-9, 8, 8-2 = 12 (+ BOS copies)
    assert int((packed.ids != -1).sum()) >= 12 and packed.ids.numel() < IDS.numel()
    for i in range(len(IDS)):
        for p in range(int(LAST[i]) + 1):
            row, col = packed.locate(torch.tensor([i]), torch.tensor([p]))
            row, col = int(row), int(col)
            assert int(packed.ids[row, col]) == int(IDS[i, p]) and int(packed.position_ids[row, col]) == p
            seen = packed.mask[row, 0, col].nonzero().flatten().tolist()
            # it attends to exactly its prefix: p + 1 tokens, which spell IDS[i, :p + 1] in position order
            assert len(seen) == p + 1
            order = sorted(seen, key=lambda c: int(packed.position_ids[row, c]))
            assert [int(packed.ids[row, c]) for c in order] == IDS[i, : p + 1].tolist()
    # positions past a prompt's last read one are not in the tree
    with pytest.raises(ValueError, match="outside"):
        packed.locate(torch.tensor([3]), torch.tensor([4]))


@pytest.mark.parametrize("ids, last", [
    (IDS, LAST[:3]),  # one position per prompt is missing
    (IDS, torch.tensor([4, 5, 3, 2, 6])),  # past the window
    (IDS, torch.tensor([4, 5, 3, 2, -2])),
    (IDS[0], LAST[:1]),  # not a batch
])
def test_a_malformed_batch_is_named(ids, last):
    with pytest.raises(ValueError, match="one last read position per prompt"):
        pack_prefixes(ids, last)


def test_no_tree_where_it_saves_little_or_the_prompts_start_differently():
    assert pack_prefixes(IDS[:1], LAST[:1]) is None  # one prompt: the tree is the row
    other = IDS.clone()
    other[1, 0] = 5
    assert pack_prefixes(other, LAST) is None


def test_the_packed_pass_equals_the_rectangular_one_at_every_read_position():
    base = E.load_base(_DEMO)
    te = base.model.text_encoders[0]
    assert te.arch.causal and te.spec.pooled is None
    plan = plan_from_recipe(_DEMO)
    tokens = PG._tokenize(base.model, plan).encoders[0]
    ids, packed = PG._target_batch(te, tokens.targets.ids, tokens)
    assert packed is not None and packed.ids.numel() < ids.numel()
    with torch.no_grad():
        plain, _ = run_encoder(te, ids)
        tree, _ = run_encoder(te, packed.ids, attention_mask=packed.additive_mask(te.model.dtype),
                              position_ids=packed.position_ids)
    read = packed.column >= 0
    assert int(read.sum()) > len(ids)
    unpacked = packed.unpack(tree)
    assert torch.allclose(unpacked[read], plain[read], atol=1e-5, rtol=1e-5)
    assert not unpacked[~read].any()


def _solve(plan, monkeypatch, *, pack: bool, merge: bool):
    base = E.load_base(_DEMO)
    with monkeypatch.context() as m:
        if not pack:
            m.setattr(PG, "pack_prefixes", lambda ids, last: None)
        if not merge:  # neither the soft columns' copies nor the final stage's equal preserve columns
            m.setattr(PG, "_merge_soft", lambda positions, soft, ids, causal: (
                torch.arange(len(soft)), torch.ones(len(soft), dtype=torch.float64)))
            m.setattr(PG, "merge_equal_columns", lambda P, *alongside: (P, *alongside))
        return {s.key: s.delta.dense() for s in PG.solve_erasure(base.model, plan).sites}


def _close(a: dict, b: dict, tol: float, first: float = 1e-6) -> None:
    """Equal updates: the first stage to ``first`` (nothing before it), deeper ones to ``tol`` (each stage sees the
    float32 forward pass of the edited model, whose rounding the solve carries on)."""
    assert a.keys() == b.keys()
    for i, key in enumerate(a):
        bound = first if i == 0 else tol
        assert float((a[key] - b[key]).norm()) <= bound * float(b[key].norm()) + 1e-12, key


def test_the_solve_is_the_same_with_the_tree_and_with_merged_columns(monkeypatch):
    """The tree (target pass, and the preserve pass, which reads a shared position once) and the merged columns
    (soft copies, the final stage's equal preserve columns) leave the solve as it is without them."""
    plan = plan_from_recipe(_DEMO)
    assert plan.soft_pairs  # the demo's misspellings: soft columns, some of them copies
    reference = _solve(plan, monkeypatch, pack=False, merge=False)
    # the tree's layout rounds the float32 forward pass differently, hence the first stage's 1e-5
    _close(_solve(plan, monkeypatch, pack=True, merge=False), reference, 1e-4, first=1e-5)
    # the final stage's Gram is taken in float32, and its rounding alone moves this tiny model's K/V updates by
    # up to 2e-4 (measured: the same merged columns with a float64 Gram); the merge reorders that rounding
    _close(_solve(plan, monkeypatch, pack=False, merge=True), reference, 3e-4, first=1e-5)


def test_a_soft_column_twice_at_half_weight_is_the_column_once():
    """k copies merged into one column weighted √k: the objective, so the update, of the copies."""
    plan = plan_from_recipe(_DEMO)
    base = E.load_base(_DEMO)
    once = plan.recipe.model_copy(update={"prompts": plan.recipe.prompts.model_copy(update={"misspelling_weight": 0.2})})
    twice = plan.recipe.model_copy(update={"prompts": plan.recipe.prompts.model_copy(update={"misspelling_weight": 0.1})})
    soft = (PromptPair("Vincent van Gohg", "a painting"),)
    one = PG.ErasurePlan(once, plan.pairs, soft, plan.preserve, plan.captions)
    two = PG.ErasurePlan(twice, plan.pairs, soft + soft, plan.preserve, plan.captions)
    tokens = PG._tokenize(base.model, two).encoders[0]
    n_soft = int(tokens.soft.sum())
    assert n_soft == int(PG._tokenize(base.model, one).encoders[0].soft.sum())  # merged: one entry per position
    assert torch.all(tokens.weight[tokens.soft] == torch.tensor(2.0).sqrt().float().double())
    a = {s.key: s.delta.dense() for s in PG.solve_erasure(base.model, one).sites}
    b = {s.key: s.delta.dense() for s in PG.solve_erasure(base.model, two).sites}
    # the first stage agrees to 1e-7; the deeper ones carry the two float32 passes' rounding (the batches differ),
    # up to 1.1e-4 of the K/V sites' updates, which are a hundredth of the text encoder's
    _close(b, a, 2e-4)


def test_the_preserve_pass_runs_on_the_prefix_tree_and_captures_what_the_rectangular_pass_does(monkeypatch):
    """The preserve prompts (concepts × templates) share their templates' prefixes; cut after each prompt's
    end-of-text token, the pass runs on their tree, which reads a shared position once (a column read k times is
    kept as the column times √k): every stage's ``P Pᵀ`` and ``P (W P)ᵀ`` — all a solve forms from them — and the
    read rows of the sequence output are those of the rectangular pass."""
    base = E.load_base(_DEMO)
    te = base.model.text_encoders[0]
    plan = plan_from_recipe(_DEMO)
    tokens = PG._tokenize(base.model, plan).encoders[0]
    stages = PG.text_encoder_stages(base.model, plan)[te.component]
    ids = PG._window(te, tokens.preserve.ids, tokens.preserve_positions[1], tokens.preserve_eos[1])
    assert ids.shape[1] < tokens.preserve.length  # each prompt's own tokens: the window is cut
    packed = PG._packed(te, ids, tokens.preserve.length, tokens.preserve_positions, tokens.preserve_eos)
    assert packed is not None and packed.ids.numel() < ids.numel()
    with torch.no_grad():
        tree, (tree_seq, _) = PG._preserve_captures(te, stages, tokens.preserve.ids, tokens)
        with monkeypatch.context() as m:
            m.setattr(PG, "pack_prefixes", lambda ids, last: None)
            plain, (plain_seq, _) = PG._preserve_captures(te, stages, tokens.preserve.ids, tokens)
    assert tree.keys() == plain.keys() == {s.name for s in stages}
    for name in tree:
        (P, WP), (P0, WP0) = tree[name], plain[name]
        assert P.shape[1] == WP.shape[1] < P0.shape[1] == WP0.shape[1], name  # fewer columns, alike in both
        for a, b in ((P @ P.T, P0 @ P0.T), (P @ WP.T, P0 @ WP0.T)):
            assert torch.allclose(a.double(), b.double(), atol=1e-4 * float(b.abs().max()), rtol=1e-4), name
    rows, pos = tokens.preserve_positions
    assert torch.allclose(tree_seq[rows, pos], plain_seq[rows, pos], atol=1e-5, rtol=1e-5)


def test_no_tree_whose_rows_outgrow_the_window():
    """A row holds a whole subtree: ten prompts below one template prefix make a row of 22 tokens, longer than a
    6-token window the model reads; the pass is then rectangular."""
    te = E.load_base(_DEMO).model.text_encoders[0]
    ids = torch.tensor([[7, 1, 2, x, 9, 9] for x in range(20, 30)])
    last = torch.full((10,), 4)
    tree = pack_prefixes(ids, last)
    assert tree is not None and tree.ids.shape[1] > 6
    where = (torch.arange(10), last)
    assert PG._packed(te, ids, 6, where) is None
    assert PG._packed(te, ids, tree.ids.shape[1], where) is not None
