"""What the solver needs from a Stable Diffusion model, and nothing more.

An :class:`EditModel` holds the tokenizer(s), the text encoder(s) and the few denoiser weights that read
the text — the UNet's cross-attention ``to_k``/``to_v``, or an MMDiT's ``context_embedder`` and pooled-text
linear — never the denoiser itself, the VAE or the scheduler: the solve runs no denoiser forward. How each
family's denoiser reads its encoders is data (:mod:`.conditioning`). It is built from a loaded pipeline
(:meth:`EditModel.from_pipeline`) or from a diffusers folder by reading single
tensors (:func:`erasepro_hub.models.loading.load_edit_model`).

Sites are named by their LoRA module keys (:mod:`erasepro_hub.naming`).

Why one module of this length: the family tables (:data:`FAMILIES`), the model view built from them and
the encoder run that reads them are one contract — what a spec says (``embed``, ``pooled``, ``editable``) is
exactly what :func:`run_encoder` and :meth:`EditModel.from_pipeline` do with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..naming import KV_SUFFIXES, get_module
from .conditioning import CONDITIONING, Conditioning, compose, pooled_vector
from .prompts import Encoded, Prompt, encode

SUPPORTED = "Stable Diffusion 1.x, 2.x, XL, 3 / 3.5 and FLUX.1 pipelines"  # what the refusals name


@dataclass(frozen=True)
class StreamPoint:
    """Where a ``stream``-mode site meets the residual stream, relative to its layer.

    ``anchor``: ``(module path, "input" | "output")`` — the stream value the anchor prompts produce there
    (what the target prompts must reproduce). ``residual``: ``(module path, positional argument)`` — the
    tensor the site's output is added to, read on the target prompts.
    """

    anchor: tuple[str, str]
    residual: tuple[str, int]


@dataclass(frozen=True)
class TextArch:
    """Module names of a text-encoder architecture, mapped to the three canonical site names.

    CLIP (pre-LN): ``mlp.fc1``, ``mlp.fc2``, ``self_attn.out_proj``. BERT (post-LN): ``intermediate.dense``,
    ``output.dense``, ``attention.output.dense``; its residual sums are the inputs of the LayerNorms.
    """

    name: str
    layers_path: str
    sites: dict[str, str]
    stream: dict[str, StreamPoint]
    causal: bool = True  # a token sees only the tokens before it (CLIP); BERT is bidirectional

    def key(self, component: str, layer: int, site: str) -> str:
        return f"{component}.{self.layers_path}.{layer}.{self.sites[site]}"


CLIP = TextArch(
    "clip",
    "text_model.encoder.layers",
    {"mlp.fc2": "mlp.fc2", "mlp.fc1": "mlp.fc1", "self_attn.out_proj": "self_attn.out_proj"},
    {
        "mlp.fc2": StreamPoint(("", "output"), ("layer_norm2", 0)),
        "self_attn.out_proj": StreamPoint(("layer_norm2", "input"), ("layer_norm1", 0)),
    },
)
BERT = TextArch(
    "bert",
    "encoder.layer",
    {"mlp.fc2": "output.dense", "mlp.fc1": "intermediate.dense", "self_attn.out_proj": "attention.output.dense"},
    {
        "mlp.fc2": StreamPoint(("output.LayerNorm", "input"), ("output", 1)),
        "self_attn.out_proj": StreamPoint(("attention.output.LayerNorm", "input"), ("attention.output", 1)),
    },
    causal=False,
)
#: T5 (SD 3 and FLUX): bidirectional, read as it is (diffusers loads no LoRA into it), so it has no sites
T5 = TextArch("t5", "encoder.block", {}, {}, causal=False)


@dataclass(frozen=True)
class EncoderSpec:
    """How a family uses one text encoder.

    ``embed``: ``last`` — its sequence output is ``last_hidden_state`` (final layer norm applied; SD 1.x/2.x,
    T5); ``penultimate`` — ``hidden_states[-2]`` (no final norm; SDXL, SD 3). ``pooled``: its pooled output
    conditions the denoiser too — ``text_embeds`` (the projected EOS state of a ``CLIPTextModelWithProjection``)
    or ``pooler_output`` (FLUX's ``CLIPTextModel``); ``None`` for none. ``editable``: whether the progressive
    stages edit it (its sequence reaches the denoiser and diffusers loads LoRA into it). ``max_length``: the
    window the pipeline pads to when it is not the tokenizer's ``model_max_length`` (T5: the pipelines'
    default ``max_sequence_length``; T5 reads its padding without a mask, so the window is part of the model).
    """

    component: str
    embed: Literal["last", "penultimate"]
    pooled: Literal["text_embeds", "pooler_output"] | None = None
    arch: TextArch = CLIP
    editable: bool = True
    max_length: int | None = None


FAMILIES: dict[str, tuple[EncoderSpec, ...]] = {
    "sd1": (EncoderSpec("text_encoder", "last"),),
    "sd2": (EncoderSpec("text_encoder", "last"),),
    "sdxl": (
        EncoderSpec("text_encoder", "penultimate"),
        EncoderSpec("text_encoder_2", "penultimate", pooled="text_embeds"),
    ),
    # a BERT text encoder (bidirectional; used by builtin:minilm-sd)
    "bert": (EncoderSpec("text_encoder", "last", arch=BERT),),
    # SD 3 / 3.5: CLIP-L and CLIP-G (penultimate states and projected pooled outputs), T5-XXL
    "sd3": (
        EncoderSpec("text_encoder", "penultimate", pooled="text_embeds"),
        EncoderSpec("text_encoder_2", "penultimate", pooled="text_embeds"),
        EncoderSpec("text_encoder_3", "last", arch=T5, editable=False, max_length=256),
    ),
    # FLUX.1: CLIP-L gives the pooled vector only, T5-XXL the sequence
    "flux": (
        EncoderSpec("text_encoder", "last", pooled="pooler_output", editable=False),
        EncoderSpec("text_encoder_2", "last", arch=T5, editable=False, max_length=512),
    ),
}

def _natural_key(name: str) -> tuple:
    order = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
    parts = re.split(r"(\d+)", name)
    head = name.split(".")[1] if name.count(".") > 1 else name
    return (order.get(head, 3), [int(p) if p.isdigit() else p for p in parts])


def sort_sites(keys) -> list[str]:
    """Cross-attention keys in UNet order, shallow to deep: down blocks, mid block, up blocks."""
    return sorted(keys, key=_natural_key)


@dataclass
class TextEncoder:
    """One text encoder with its tokenizer, as a family uses it."""

    spec: EncoderSpec
    model: nn.Module
    tokenizer: Any

    @property
    def component(self) -> str:
        return self.spec.component

    @property
    def arch(self) -> TextArch:
        return self.spec.arch

    @property
    def layers(self) -> nn.ModuleList:
        return get_module(self.model, self.arch.layers_path)  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embed_layers(self) -> int:
        """How many layers, from the first, feed the prompt embedding."""
        return self.num_layers if self.spec.embed == "last" else self.num_layers - 1

    def site_key(self, layer: int, site: str) -> str:
        return self.arch.key(self.component, layer, site)

    def site_module(self, layer: int, site: str) -> nn.Linear:
        return get_module(self.layers[layer], self.arch.sites[site])  # type: ignore[return-value]

    def encode(self, prompts: Sequence[Prompt]) -> Encoded:
        """``prompts`` tokenised as the pipeline does for this encoder (its window: :attr:`EncoderSpec.max_length`)."""
        return encode(self.tokenizer, prompts, length=self.spec.max_length)

    @property
    def width(self) -> int:  # of its sequence output
        return int(self.model.config.hidden_size)

    @property
    def pooled_width(self) -> int:
        projected = self.spec.pooled == "text_embeds"
        return int(self.model.config.projection_dim if projected else self.model.config.hidden_size)


@dataclass
class EditModel:
    """Tokenizers, text encoders and the denoiser weights that read the text, of one SD model.

    ``kv_weights`` maps the final stage's *sequence* sites — the UNet's ``unet.<path>.attn2.to_k|to_v``, or an
    MMDiT's ``transformer.context_embedder`` — to their original weights (``m × d``, read row by row from the
    prompt embedding), in UNet order; ``pooled_weights`` the sites that read the pooled vector (an MMDiT's
    ``transformer.time_text_embed.text_embedder.linear_1``). They are never modified in place.
    """

    family: str
    text_encoders: list[TextEncoder]
    kv_weights: dict[str, torch.Tensor]
    source: str
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    pooled_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layout = self.conditioning
        if not self.kv_weights:
            where = "transformer.context_embedder" if layout.sequence_sites else "UNet cross-attention (attn2.to_k/to_v)"
            raise UnsupportedModelError(f"{self.source}: no {where} weights found; erasepro_hub edits {SUPPORTED}")
        widths = {w.shape[1] for w in self.kv_weights.values()}
        if len(widths) != 1:
            raise UnsupportedModelError(f"{self.source}: cross-attention weights read inputs of widths {sorted(widths)}")
        width = next(iter(widths))
        for segment in layout.segments:
            given = sum(self.text_encoders[i].width for i in segment)
            if given != width and not (layout.pad and given < width):
                raise UnsupportedModelError(
                    f"{self.source}: the denoiser reads text of width {width}, but the text encoder(s) "
                    f"{', '.join(self.text_encoders[i].component for i in segment)} give {given}"
                )
        pooled = sum(self.text_encoders[i].pooled_width for i in layout.pooled)
        for key, weight in self.pooled_weights.items():
            if weight.shape[1] != pooled:
                raise UnsupportedModelError(
                    f"{self.source}: {key} reads a pooled vector of width {weight.shape[1]}, but the text encoders' "
                    f"pooled outputs give {pooled}"
                )

    @property
    def conditioning(self) -> Conditioning:
        return CONDITIONING[self.family]

    @property
    def cross_attention_dim(self) -> int:
        return next(iter(self.kv_weights.values())).shape[1]

    @property
    def final_weights(self) -> dict[str, torch.Tensor]:
        """Every final-stage site: the sequence sites, then the pooled ones."""
        return {**self.kv_weights, **self.pooled_weights}

    def encoder(self, component: str) -> TextEncoder:
        for te in self.text_encoders:
            if te.component == component:
                return te
        raise KeyError(component)

    def weight(self, key: str) -> torch.Tensor:
        """The original weight of any edit site, by its LoRA module key."""
        if key in self.kv_weights:
            return self.kv_weights[key]
        if key in self.pooled_weights:
            return self.pooled_weights[key]
        component, _, path = key.partition(".")
        return get_module(self.encoder(component).model, path).weight

    def encode(self, prompts: Sequence[Prompt]) -> list[Encoded]:
        """``prompts`` tokenised for every encoder."""
        return [te.encode(prompts) for te in self.text_encoders]

    @classmethod
    def from_pipeline(cls, pipe, *, family: str | None = None, source: str = "pipeline") -> "EditModel":
        """View a loaded diffusers pipeline (shares its tensors; modifies nothing)."""
        family = family or detect_family_from_pipeline(pipe)
        encoders = []
        for index, spec in enumerate(FAMILIES[family]):
            tokenizer = getattr(pipe, "tokenizer" if index == 0 else f"tokenizer_{index + 1}")
            encoders.append(TextEncoder(spec, getattr(pipe, spec.component), tokenizer))
        layout = CONDITIONING[family]
        if layout.sequence_sites:
            denoiser = pipe.transformer
            read = lambda paths: {f"transformer.{p}": get_module(denoiser, p).weight.detach() for p in paths}  # noqa: E731
            kv, pooled = read(layout.sequence_sites), read(layout.pooled_sites)
        else:
            kv = {
                f"unet.{name}": module.weight.detach()
                for name, module in pipe.unet.named_modules()
                if name.endswith(KV_SUFFIXES)
            }
            kv, pooled = {key: kv[key] for key in sort_sites(kv)}, {}
        first = encoders[0].model
        return cls(family, encoders, kv, source, dtype=first.dtype, device=first.device, pooled_weights=pooled)


def sd_family(hidden_size: int | None, pad_token: str | None) -> str:
    """``sd2`` or ``sd1`` for a single-encoder pipeline: SD 2.x's OpenCLIP is 1024 wide and pads with ``!``."""
    return "sd2" if hidden_size == 1024 or pad_token == "!" else "sd1"


def detect_family_from_pipeline(pipe) -> str:
    name = type(pipe).__name__
    for prefix, family in (("StableDiffusion3", "sd3"), ("Flux", "flux")):
        if name.startswith(prefix):
            missing = [s.component for s in FAMILIES[family] if getattr(pipe, s.component, None) is None]
            missing += [] if getattr(pipe, "transformer", None) is not None else ["transformer"]
            if missing:
                raise UnsupportedModelError(
                    f"{name} without {', '.join(missing)}: erasepro_hub reads every text encoder and the transformer; "
                    "load the pipeline with all its components"
                )
            return family
    if getattr(pipe, "transformer", None) is not None:
        raise UnsupportedModelError(f"{name}: erasepro_hub edits {SUPPORTED}")
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    te = getattr(pipe, "text_encoder", None)
    if te is None:
        raise UnsupportedModelError(f"{name} has no text encoder; expected an SD 1.x/2.x/XL, SD 3 or FLUX.1 pipeline")
    return sd_family(te.config.hidden_size, getattr(pipe.tokenizer, "pad_token", None))


def run_encoder(te: TextEncoder, ids: torch.Tensor, **inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prompt embedding, pooled embedding or None)`` exactly as the diffusers pipelines compute them; ``inputs``
    (``attention_mask``, ``position_ids``) go to the model as they are."""
    device = te.model.device
    extra = {name: value.to(device) for name, value in inputs.items()}
    out = te.model(ids.to(device), output_hidden_states=te.spec.embed != "last", **extra)
    embeds = out.last_hidden_state if te.spec.embed == "last" else out.hidden_states[-2]
    pooled = getattr(out, te.spec.pooled) if te.spec.pooled else None
    return embeds, pooled


def prompt_embeddings(model: EditModel, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The denoiser's conditioning, exactly as the pipelines compute it: the prompt embedding
    (:func:`compose`) and the pooled vector (:func:`pooled_vector`)."""
    outputs = [run_encoder(te, te_ids) for te, te_ids in zip(model.text_encoders, ids)]
    return compose(model, [o[0] for o in outputs]), pooled_vector(model, [o[1] for o in outputs])
