"""Tokenizer, builtin models, prompt positions and family glue."""

from __future__ import annotations

import pytest
import torch

from erasepro_hub.errors import BaseModelError, PromptError
from erasepro_hub.models.builtin import BUILTINS, build_builtin
from erasepro_hub.models.loading import load_builtin
from erasepro_hub.models.prompts import (
    Prompt,
    PromptPair,
    encode,
    fill,
    make_pairs,
    pair_positions,
    single_positions,
)
from erasepro_hub.models.tokenizer import clip_tokenizer, clip_vocab_and_merges


def test_tokenizer_matches_clip_ids():
    tok = clip_tokenizer()
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    # ids of OpenAI CLIP's tokenizer for these prompts
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tok.model_max_length == 77 and tok.pad_token_id == 49407
    assert clip_tokenizer(pad_token="!").pad_token_id == 0


def test_vocabulary_ships_with_its_licence():
    from importlib import resources

    assets = resources.files("erasepro_hub.models").joinpath("assets")
    licence = assets.joinpath("LICENSE-CLIP-BPE.txt").read_text()
    assert "MIT License" in licence and "OpenAI" in licence


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_builtins_are_deterministic(name):
    a, b = build_builtin(name), build_builtin(name)
    for component in ("text_encoder", "text_encoder_2", "unet"):
        ma, mb = getattr(a, component, None), getattr(b, component, None)
        if ma is None:
            continue
        for (na, pa), (nb, pb) in zip(ma.named_parameters(), mb.named_parameters()):
            assert na == nb and torch.equal(pa, pb)


def test_builtin_families():
    _, sd = load_builtin("tiny-sd")
    _, sd2 = load_builtin("tiny-sd2")
    _, xl = load_builtin("tiny-sdxl")
    assert (sd.family, sd2.family, xl.family) == ("sd1", "sd2", "sdxl")
    assert sd.cross_attention_dim == 192 and len(sd.kv_weights) == 8
    assert xl.cross_attention_dim == 96 + 128 and len(xl.text_encoders) == 2
    assert sd2.text_encoders[0].tokenizer.pad_token_id == 0
    # K/V keys come shallow → deep: down blocks, mid block, up blocks
    keys = list(sd.kv_weights)
    assert keys[0].startswith("unet.down_blocks") and keys[-1].startswith("unet.up_blocks")
    assert keys.index(next(k for k in keys if "mid_block" in k)) == 2


def test_unknown_builtin():
    with pytest.raises(BaseModelError, match="available: builtin:tiny-sd"):
        build_builtin("tiny-kandinsky")


def test_fill_treats_braces_in_concepts_as_data():
    assert fill("a painting by {}", "{0} {x}").text == "a painting by {0} {x}"
    assert fill("{} style", "Monet").prefix == ""


def _positions(policy, target, anchor, template):
    tok = clip_tokenizer(16)
    pairs = make_pairs([(target, anchor)], [template])
    t = encode(tok, [Prompt(p.target, p.prefix) for p in pairs])
    a = encode(tok, [Prompt(p.anchor, p.prefix) for p in pairs])
    return pair_positions(policy, pairs, t, a, [0]), t, a


def test_concept_suffix_pairs_the_tail_from_the_concept_end():
    pos, t, a = _positions("concept-suffix", "Vincent van Gogh", "art", "a painting by {}")
    k = 4  # BOS a painting by
    pairs = list(zip(pos.t_pos.tolist(), pos.a_pos.tolist()))
    # vincent, van → the anchor's EOS (5); gogh ↔ art; then EOS ↔ EOS and the padding, shifted by 2
    assert pairs[:3] == [(k, 5), (k + 1, 5), (k + 2, k)]
    assert pairs[3:] == [(q, q - 2) for q in range(k + 3, 16)]
    assert int(t.ids[0, k + 2]) != int(a.ids[0, k]) and int(t.ids[0, 7]) == int(a.ids[0, 5])  # EOS ↔ EOS


def test_eos_and_last_token_policies():
    pos, t, a = _positions("eos", "Vincent van Gogh", "art", "a painting by {}")
    assert pos.t_pos.tolist() == [7] and pos.a_pos.tolist() == [5]  # BOS a painting by vincent van gogh EOS
    pos, _, _ = _positions("last-token", "Vincent van Gogh", "art", "a painting by {}")
    assert pos.t_pos.tolist() == [6] and pos.a_pos.tolist() == [4]
    pos, _, _ = _positions("all", "Vincent van Gogh", "art", "a painting by {}")
    assert pos.t_pos.tolist() == list(range(16))


def test_heldout_pair_without_template_finds_the_shared_prefix():
    tok = clip_tokenizer(16)
    pair = PromptPair("a painting by van gohg", "a painting by art")
    t, a = encode(tok, [Prompt(pair.target)]), encode(tok, [Prompt(pair.anchor)])
    pos = pair_positions("concept-eos", [pair], t, a, [0])
    assert pos.t_pos[0].item() == 4
    with pytest.raises(PromptError, match="same tokens"):
        same = PromptPair("a cat", "a cat")
        e = encode(tok, [Prompt(same.target)])
        pair_positions("concept-eos", [same], e, e, [0])


def test_single_positions_for_preserve_prompts():
    tok = clip_tokenizer(16)
    enc = encode(tok, [fill("a painting by {}", "Monet"), Prompt("no template")])
    rows, pos = single_positions("concept-eos", enc)
    assert pos[rows == 0].tolist() == list(range(16))  # preservation keeps every position
    assert pos[rows == 1].tolist() == list(range(16))
    rows, pos = single_positions("concept-eos", enc, padding=False)  # each prompt's own tokens, BOS to EOS
    assert pos[rows == 0].tolist() == list(range(enc.eos[0] + 1))
    assert pos[rows == 1].tolist() == list(range(enc.eos[1] + 1))
    assert enc.eos[0] != enc.eos[1] and max(enc.eos) + 1 < 16
    for padding in (True, False):  # the one token eos and last-token constrain, either way
        rows, pos = single_positions("eos", enc, padding=padding)
        assert pos.tolist() == [enc.eos[0], enc.eos[1]]
        rows, pos = single_positions("last-token", enc, padding=padding)
        assert pos.tolist() == [enc.eos[0] - 1, enc.eos[1] - 1]


def test_concept_cut_off_by_truncation_is_an_error():
    tok = clip_tokenizer(8)
    with pytest.raises(PromptError, match="longer than"):
        encode(tok, [fill("one two three four five six seven eight {}", "Monet")])
