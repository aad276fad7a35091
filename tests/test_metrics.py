"""Every feature-level metric against a value computed by hand (explicit loops) on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from erasepro_hub.adapters import load_erasure, read_adapter
from erasepro_hub.metrics.features import feature_metrics
from erasepro_hub.models.loading import load_builtin
from erasepro_hub.models.prompts import Prompt, PromptPair, fill


def encode_by_hand(pipe, prompt: str) -> torch.Tensor:
    """The prompt embedding (L × D) through the pipeline's own tokenizer and text encoder."""
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids).last_hidden_state[0]


def kv_by_hand(pipe, embedding: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {}
        for name, module in pipe.unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                out[f"unet.{name}"] = module(embedding)
        return out


def first_difference(pipe, a: str, b: str) -> int:
    ia = pipe.tokenizer(a, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    ib = pipe.tokenizer(b, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    return next(i for i, (x, y) in enumerate(zip(ia, ib)) if x != y)


def pairs_by_hand(pipe, target: str, anchor: str, k: int, *, everything: bool = False) -> list[tuple[int, int]]:
    """docs/design.md §2.5 written out: the concept and the tail shifted by the length difference, surplus concept
    tokens to the anchor's end-of-text token; up to the target's EOS (``concept-eos``), or every position
    of the window with the prefix (``all``)."""
    length = pipe.tokenizer.model_max_length
    nt, na = own_length(pipe, target), own_length(pipe, anchor)
    d = nt - na
    last = length if everything else nt
    found = [(i, i) for i in range(k)] if everything else []
    found += [(q, na - 1) for q in range(k, k + max(d, 0))]
    found += [(q, q - d) for q in range(k + max(d, 0), last) if q - d < length]
    return found


def frob(rows: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float((r.double() ** 2).sum()) for r in rows))


@pytest.fixture(scope="module")
def setup(demo_folder):
    original = load_builtin("tiny-sd")[0]
    edited = load_builtin("tiny-sd")[0]
    load_erasure(edited, demo_folder)
    _, model = load_builtin("tiny-sd")
    deltas = read_adapter(demo_folder / "pytorch_lora_weights.safetensors").deltas
    return original, edited, model, deltas


def residual_by_hand(original, edited, pairs: list[tuple[str, str, int]], *, everything=False) -> dict[str, float]:
    """For each site: sqrt(Σ_pairs Σ_(q, p) ‖K'(t)_q − K(a)_p‖²) / sqrt(Σ ‖K(a)_p‖²) over the paired positions."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for target, anchor, start in pairs:
        kt = kv_by_hand(edited, encode_by_hand(edited, target))
        ka = kv_by_hand(original, encode_by_hand(original, anchor))
        for site in ka:
            for q, p in pairs_by_hand(original, target, anchor, start, everything=everything):
                num[site] = num.get(site, 0.0) + float(((kt[site][q] - ka[site][p]).double() ** 2).sum())
                den[site] = den.get(site, 0.0) + float((ka[site][p].double() ** 2).sum())
    return {site: math.sqrt(num[site]) / math.sqrt(den[site]) for site in num}


def test_residuals_drift_and_norms_by_hand(setup):
    original, edited, model, deltas = setup
    # anchors the erasure was not made for, so that the residual is far above float32 rounding
    train = [fill(t, "Vincent van Gogh") for t in ("{}", "a painting by {}")]
    anchors = [fill(t, "a photograph") for t in ("{}", "a painting by {}")]
    pairs = [PromptPair(t.text, a.text, t.prefix) for t, a in zip(train, anchors)]
    heldout = [PromptPair("a starry night by Vincent van Gogh", "a starry night by a painting")]
    preserve = [Prompt("a photo of a dog on a beach"), Prompt("a portrait by Rembrandt")]
    metrics = feature_metrics(model, deltas, pairs=pairs, token_policy="concept-eos", heldout=heldout,
                              preserve=preserve)

    starts = [len(original.tokenizer(t.prefix).input_ids) - 1 for t in train]
    by_hand = residual_by_hand(original, edited, [(p.target, p.anchor, k) for p, k in zip(pairs, starts)])
    assert metrics["residual_train_per_site"] == pytest.approx(by_hand, rel=1e-4, abs=1e-9)
    assert metrics["residual_train"] == pytest.approx(sum(by_hand.values()) / len(by_hand), rel=1e-4, abs=1e-9)
    k_sites = [v for s, v in by_hand.items() if s.endswith("to_k")]
    assert metrics["residual_train_k"] == pytest.approx(sum(k_sites) / len(k_sites), rel=1e-4, abs=1e-9)

    h = heldout[0]
    held = residual_by_hand(original, edited, [(h.target, h.anchor, first_difference(original, h.target, h.anchor))])
    assert metrics["residual_heldout"] == pytest.approx(sum(held.values()) / len(held), rel=1e-5)
    held_all = residual_by_hand(original, edited, [(h.target, h.anchor, first_difference(original, h.target, h.anchor))],
                                everything=True)
    assert metrics["residual_heldout_all"] == pytest.approx(sum(held_all.values()) / len(held_all), rel=1e-5)

    drift_sites = {}
    for site in kv_by_hand(original, encode_by_hand(original, "x")):
        num = den = 0.0
        for p in preserve:
            ke = kv_by_hand(edited, encode_by_hand(edited, p.text))[site]
            ko = kv_by_hand(original, encode_by_hand(original, p.text))[site]
            num += float(((ke - ko).double() ** 2).sum())
            den += float((ko.double() ** 2).sum())
        drift_sites[site] = math.sqrt(num / den)
    assert metrics["preserve_drift"] == pytest.approx(sum(drift_sites.values()) / len(drift_sites), rel=1e-5)
    assert metrics["drift_unrelated"] == pytest.approx(metrics["preserve_drift"], rel=1e-9)
    assert metrics["drift_preserve_concepts"] is None

    for site, delta in deltas.items():
        weight = model.weight(site).double()
        dense = delta.dense()
        assert metrics["delta_norm_rel"][site] == pytest.approx(float(dense.norm() / weight.norm()), rel=1e-9)
    total = math.sqrt(sum(float(d.dense().norm() ** 2) for d in deltas.values()))
    assert metrics["delta_norm_total"] == pytest.approx(total, rel=1e-9)


def test_no_edit_means_no_drift_and_the_raw_gap(setup):
    original, _, model, _ = setup
    pair = PromptPair("a painting by Vincent van Gogh", "a painting by a painting", "a painting by ")
    metrics = feature_metrics(model, {}, pairs=[pair], token_policy="concept-eos", preserve=[Prompt("a cat")])
    assert metrics["preserve_drift"] == 0.0 and metrics["delta_norm_total"] == 0.0
    by_hand = residual_by_hand(original, original, [(pair.target, pair.anchor, 4)])
    assert metrics["residual_train"] == pytest.approx(sum(by_hand.values()) / len(by_hand), rel=1e-5)


def own_length(pipe, prompt: str) -> int:
    """BOS to the first end-of-text token, inclusive."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids
    return len(ids)


def pooled_cosine(ka: dict, kb: dict, na: int | None, nb: int | None) -> float:
    """Mean over sites of cos(mean of ka[:na], mean of kb[:nb]) (``None``: every position)."""
    sims = []
    for site in ka:
        a = ka[site][:na].double().mean(0)
        b = kb[site][:nb].double().mean(0)
        sims.append(float(a @ b / (a.norm() * b.norm())))
    return sum(sims) / len(sims)


def test_similarities_by_hand(setup):
    original, edited, model, deltas = setup
    pairs = [PromptPair("a painting by Vincent van Gogh", "a painting by a painting", "a painting by ")]
    heldout = [
        PromptPair("a starry night by Vincent van Gogh", "a starry night by a painting"),
        PromptPair("Vincent van Gogh", "a painting"),
    ]
    unrelated = [Prompt("a photo of a dog on a beach"), Prompt("a portrait by Rembrandt")]
    concept_prompt = fill("a sketch by {}", "Claude Monet")
    metrics = feature_metrics(model, deltas, pairs=pairs, token_policy="concept-eos", heldout=heldout,
                              preserve=unrelated + [concept_prompt])

    def kv(pipe, text):
        return kv_by_hand(pipe, encode_by_hand(pipe, text))

    masked = [pooled_cosine(kv(edited, h.target), kv(original, h.anchor), own_length(original, h.target),
                            own_length(original, h.anchor)) for h in heldout]
    window = [pooled_cosine(kv(edited, h.target), kv(original, h.anchor), None, None) for h in heldout]
    before = [pooled_cosine(kv(original, h.target), kv(original, h.anchor), own_length(original, h.target),
                            own_length(original, h.anchor)) for h in heldout]
    assert metrics["anchor_similarity"] == pytest.approx(sum(masked) / 2, rel=1e-5)
    assert metrics["anchor_similarity_window"] == pytest.approx(sum(window) / 2, rel=1e-5)
    assert metrics["anchor_similarity_no_edit"] == pytest.approx(sum(before) / 2, rel=1e-5)

    kept = [pooled_cosine(kv(edited, p.text), kv(original, p.text), own_length(original, p.text),
                          own_length(original, p.text)) for p in unrelated]
    assert metrics["preserve_similarity"] == pytest.approx(sum(kept) / 2, rel=1e-5)
    assert metrics["preserve_similarity_min"] == pytest.approx(min(kept), rel=1e-5)
    kept_window = [pooled_cosine(kv(edited, p.text), kv(original, p.text), None, None) for p in unrelated]
    assert metrics["preserve_similarity_window"] == pytest.approx(sum(kept_window) / 2, rel=1e-5)
    concept = pooled_cosine(kv(edited, concept_prompt.text), kv(original, concept_prompt.text),
                            own_length(original, concept_prompt.text), own_length(original, concept_prompt.text))
    assert metrics["preserve_similarity_concepts"] == pytest.approx(concept, rel=1e-5)
    # the erasure moved the held-out prompts towards their anchors and left unrelated prompts nearly alone
    assert metrics["anchor_similarity"] > metrics["anchor_similarity_no_edit"]
    assert 0.9 < metrics["preserve_similarity"] < 1.0


def test_no_edit_similarities(setup):
    _, _, model, _ = setup
    heldout = [PromptPair("a starry night by Vincent van Gogh", "a starry night by a painting")]
    metrics = feature_metrics(model, {}, pairs=heldout, token_policy="concept-eos", heldout=heldout,
                              preserve=[Prompt("a cat")])
    assert metrics["anchor_similarity"] == pytest.approx(metrics["anchor_similarity_no_edit"], rel=1e-9)
    assert metrics["preserve_similarity"] == pytest.approx(1.0, abs=1e-9)
    assert metrics["preserve_similarity_min"] == pytest.approx(1.0, abs=1e-9)
