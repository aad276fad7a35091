"""SD 3 and FLUX.1 (MMDiT pipelines) end to end on the embedded tiny models, checked through diffusers itself.

What the transformer reads of the text is ``context_embedder(prompt_embeds)`` (every block reads the prompt
only through it) and ``time_text_embed.text_embedder.linear_1(pooled)``: the erasure must make both, for every
training prompt at the constrained positions, what the original model gives its anchor — after a plain
``pipe.load_lora_weights``.
"""

from __future__ import annotations


import pytest
import torch
from helpers import captured_logs

from erasepro_hub.adapters import load_erasure, read_adapter
from erasepro_hub.cli import main
from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.base import EditModel
from erasepro_hub.models.builtin import MMDIT_TEXT_WIDTH
from erasepro_hub.models.conditioning import joint_pair_positions
from erasepro_hub.models.loading import load_builtin
from erasepro_hub.models.prompts import Prompt
from erasepro_hub.recipe import training_pairs

TOL = 1e-5
BUILTINS = ("tiny-sd3", "tiny-flux")


@pytest.fixture(scope="module", params=BUILTINS)
def erased(request, erase_variant):
    """``(builtin, folder)``: the demo manifest erased on an MMDiT builtin."""
    builtin = request.param
    return builtin, erase_variant(f"demo-{builtin}", lambda d: d["base_model"].update(id=f"builtin:{builtin}"))


def fresh(builtin: str):
    return load_builtin(builtin)[0]


@torch.no_grad()
def conditioning(pipe, prompts):
    """``(context_embedder(prompt_embeds), text_embedder.linear_1(pooled))`` as the pipeline computes them."""
    if type(pipe).__name__.startswith("Flux"):
        embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
    else:
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    transformer = pipe.transformer
    return transformer.context_embedder(embeds), transformer.time_text_embed.text_embedder.linear_1(pooled)


def residuals(folder, edited, original):
    """``(sequence residual, pooled residual)``: ``||f'(target) − f(anchor)|| / ||f(anchor)||`` at the positions
    the manifest's token policy pairs in the prompt embedding (CLIP rows, then T5 rows), and on the pooled site."""
    manifest = load_manifest(folder / "erasepro.yaml")
    pairs = training_pairs(manifest)
    model = EditModel.from_pipeline(original)
    enc_t = model.encode([Prompt(p.target, p.prefix) for p in pairs])
    enc_a = model.encode([Prompt(p.anchor, p.prefix) for p in pairs])
    pos = joint_pair_positions(model, manifest.solver.token_policy, pairs, enc_t, enc_a, list(range(len(pairs))))
    seq_a, pooled_a = conditioning(original, [p.anchor for p in pairs])
    seq_t, pooled_t = conditioning(edited, [p.target for p in pairs])
    a, t = seq_a[pos.a_rows, pos.a_pos], seq_t[pos.t_rows, pos.t_pos]
    return float((t - a).norm() / a.norm()), float((pooled_t - pooled_a).norm() / pooled_a.norm()), pos


def test_plain_load_lora_weights_makes_targets_read_as_their_anchors(erased):
    from peft.tuners.lora import LoraLayer

    builtin, folder = erased
    with captured_logs("diffusers", "peft", "transformers") as messages:
        plain = fresh(builtin)
        plain.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="erasure")
    text = "\n".join(messages).lower()
    assert "unexpected keys" not in text and "missing keys" not in text, text
    # every site of the file became a LoRA layer at scale 1 with the file's rank: nothing silently dropped
    sites = read_adapter(folder / "pytorch_lora_weights.safetensors").deltas
    layers = {
        f"{component}.{name}": sub
        for component in ("transformer", "text_encoder", "text_encoder_2")
        for name, sub in getattr(plain, component).named_modules()
        if isinstance(sub, LoraLayer)
    }
    assert len(layers) == len(sites)
    assert {"transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"} <= set(sites)
    for key, delta in sites.items():
        match = [layer for name, layer in layers.items() if key.replace("text_model.", "") == name.replace("text_model.", "")]
        assert len(match) == 1, key
        assert list(match[0].scaling.values()) == [1.0] and list(match[0].r.values()) == [delta.rank]
    original = fresh(builtin)
    sequence, pooled, pos = residuals(folder, plain, original)
    assert sequence <= TOL and pooled <= TOL, (sequence, pooled)
    # the constrained rows span both parts of the prompt embedding where there are two (SD 3: CLIP, then T5)
    clip_length = original.tokenizer.model_max_length
    if builtin == "tiny-sd3":
        assert bool((pos.t_pos < clip_length).any()) and bool((pos.t_pos >= clip_length).any())
    # without the adapter the targets are far from their anchors: the check above can fail
    sequence0, pooled0, _ = residuals(folder, fresh(builtin), original)
    assert sequence0 > 0.05 and pooled0 > 0.05
    # the metric written at erase time measures the same thing
    metrics = load_manifest(folder / "erasepro.yaml").metrics
    assert metrics["residual_train"] <= TOL and metrics["pooled_residual_train"] <= TOL
    # and the plainly loaded pipeline generates (2 steps; shape only)
    image = plain("a painting by Vincent van Gogh", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


def test_our_loader_agrees_and_an_image_is_generated(erased):
    builtin, folder = erased
    ours = fresh(builtin)
    handle = load_erasure(ours, folder)
    assert handle.active and handle.backend == "diffusers"
    sequence, pooled, _ = residuals(folder, ours, fresh(builtin))
    assert sequence <= TOL and pooled <= TOL
    image = ours("a painting by Vincent van Gogh", num_inference_steps=2, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_regenerate_verify(erased, capsys):
    _, folder = erased
    assert main(["regenerate", str(folder), "--verify"]) == 0
    assert capsys.readouterr().out.startswith("verified: ")


def test_manifest_and_card_name_the_family(erased):
    builtin, folder = erased
    manifest = load_manifest(folder / "erasepro.yaml")
    family = {"tiny-sd3": "sd3", "tiny-flux": "flux"}[builtin]
    assert manifest.outputs.family == family
    card = (folder / "README.md").read_text()
    assert f"- {family}\n" in card and f"- {family}-diffusers\n" in card
    # the card speaks of the transformer's text inputs, not of a UNet's keys and values
    assert "context_embedder" in card and "UNet" not in card and "to_k" not in card and "K/V" not in card
    # the final stage's sites are reported with their capacity (the transformer's text width)
    sites = {s.name: s for s in manifest.outputs.sites}
    context = sites["transformer.context_embedder"]
    assert list(context.shape)[1] == MMDIT_TEXT_WIDTH and 0 < context.n_constraints <= MMDIT_TEXT_WIDTH
    assert {s.stage for s in sites.values() if s.name.startswith("transformer.")} == {"transformer.text_input"}


@pytest.mark.parametrize("builtin, component", [("tiny-sd3", "transformer"), ("tiny-sd3", "text_encoder_3"),
                                                ("tiny-flux", "text_encoder_2")])
def test_a_pipeline_without_a_component_is_refused_by_name(builtin, component):
    from erasepro_hub.errors import UnsupportedModelError

    pipe = fresh(builtin)
    setattr(pipe, component, None)
    with pytest.raises(UnsupportedModelError, match=f"without {component}"):
        EditModel.from_pipeline(pipe)
