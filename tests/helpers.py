"""Test helpers: K/V through diffusers' own encode_prompt, exactly what the UNet receives."""

from __future__ import annotations

import torch

from erasepro_hub.recipe import training_pairs
from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.prompts import Prompt, encode, pair_positions


def encode_prompts(pipe, prompts):
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return embeds, pooled
        embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return embeds, None


def kv(pipe, prompts):
    """``{attn2 path: (K, V)}`` and the pooled embedding for ``prompts``, via the pipeline's modules."""
    embeds, pooled = encode_prompts(pipe, prompts)
    with torch.no_grad():
        out = {n: (m.to_k(embeds), m.to_v(embeds)) for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    return out, pooled


def constrained_positions(folder, pipe):
    manifest = load_manifest(folder / "erasepro.yaml")
    pairs = training_pairs(manifest)
    t = encode(pipe.tokenizer, [Prompt(p.target, p.prefix) for p in pairs])
    a = encode(pipe.tokenizer, [Prompt(p.anchor, p.prefix) for p in pairs])
    return pairs, pair_positions(manifest.solver.token_policy, pairs, t, a, list(range(len(pairs))))


def kv_residuals(folder, edited_pipe, original_pipe):
    """Per site and K/V: ||K'(target) − K(anchor)|| / ||K(anchor)|| at the constrained positions."""
    pairs, pos = constrained_positions(folder, original_pipe)
    ref, ref_pooled = kv(original_pipe, [p.anchor for p in pairs])
    got, got_pooled = kv(edited_pipe, [p.target for p in pairs])
    residuals = {}
    for name in ref:
        for i, which in enumerate("kv"):
            a = ref[name][i][pos.a_rows, pos.a_pos]
            b = got[name][i][pos.t_rows, pos.t_pos]
            residuals[f"{name}.to_{which}"] = float((b - a).norm() / a.norm())
    pooled = None
    if ref_pooled is not None:
        pooled = float((got_pooled - ref_pooled).norm() / ref_pooled.norm())
    return residuals, pooled
