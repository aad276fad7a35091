"""What the solver needs from a Stable Diffusion model, and nothing more.

An :class:`EditModel` holds the tokenizer(s), the text encoder(s) and the UNet's
cross-attention ``to_k``/``to_v`` weights — never the UNet itself, the VAE or the
scheduler: the solve runs no UNet forward. It is built from a loaded pipeline
(:meth:`EditModel.from_pipeline`) or from a diffusers folder by reading single
tensors (:func:`erasepro_hub.models.loading.load_edit_model`).

Sites are named by their LoRA module keys (:mod:`erasepro_hub.naming`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..naming import KV_SUFFIXES, get_module

TE_SITES = ("mlp.fc2", "mlp.fc1", "self_attn.out_proj")


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


@dataclass(frozen=True)
class EncoderSpec:
    """How a family uses one text encoder.

    ``embed``: ``last`` — the prompt embedding is ``last_hidden_state`` (final layer
    norm applied; SD 1.x/2.x); ``penultimate`` — it is ``hidden_states[-2]`` (no final
    norm; SDXL). ``pooled``: the projected EOS embedding also conditions the UNet
    (SDXL's ``text_encoder_2``).
    """

    component: str
    embed: Literal["last", "penultimate"]
    pooled: bool = False
    arch: TextArch = CLIP


FAMILIES: dict[str, tuple[EncoderSpec, ...]] = {
    "sd1": (EncoderSpec("text_encoder", "last"),),
    "sd2": (EncoderSpec("text_encoder", "last"),),
    "sdxl": (EncoderSpec("text_encoder", "penultimate"), EncoderSpec("text_encoder_2", "penultimate", pooled=True)),
    # a BERT text encoder (bidirectional; used by builtin:minilm-sd)
    "bert": (EncoderSpec("text_encoder", "last", arch=BERT),),
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


@dataclass
class EditModel:
    """Tokenizers, text encoders and cross-attention weights of one SD model.

    ``kv_weights`` maps ``unet.<path>.attn2.to_k|to_v`` to the original weights
    (``m × d``), in UNet order; they are never modified in place.
    """

    family: str
    text_encoders: list[TextEncoder]
    kv_weights: dict[str, torch.Tensor]
    source: str
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        if not self.kv_weights:
            raise UnsupportedModelError(
                f"{self.source}: no UNet cross-attention (attn2.to_k / attn2.to_v) weights found; "
                "erasepro_hub edits Stable Diffusion 1.x, 2.x and XL UNets"
            )
        widths = {w.shape[1] for w in self.kv_weights.values()}
        if len(widths) != 1:
            raise UnsupportedModelError(f"{self.source}: cross-attention weights read inputs of widths {sorted(widths)}")
        expected = sum(te.model.config.hidden_size for te in self.text_encoders)
        if widths != {expected}:
            raise UnsupportedModelError(
                f"{self.source}: the UNet's cross-attention reads width {widths.pop()}, but the text encoder(s) "
                f"give {expected}"
            )

    @property
    def cross_attention_dim(self) -> int:
        return next(iter(self.kv_weights.values())).shape[1]

    def encoder(self, component: str) -> TextEncoder:
        for te in self.text_encoders:
            if te.component == component:
                return te
        raise KeyError(component)

    def weight(self, key: str) -> torch.Tensor:
        """The original weight of any edit site, by its LoRA module key."""
        if key in self.kv_weights:
            return self.kv_weights[key]
        component, _, path = key.partition(".")
        return get_module(self.encoder(component).model, path).weight

    @classmethod
    def from_pipeline(cls, pipe, *, family: str | None = None, source: str = "pipeline") -> "EditModel":
        """View a loaded diffusers pipeline (shares its tensors; modifies nothing)."""
        family = family or detect_family_from_pipeline(pipe)
        encoders = []
        for index, spec in enumerate(FAMILIES[family]):
            tokenizer = getattr(pipe, "tokenizer" if index == 0 else f"tokenizer_{index + 1}")
            encoders.append(TextEncoder(spec, getattr(pipe, spec.component), tokenizer))
        kv = {
            f"unet.{name}": module.weight.detach()
            for name, module in pipe.unet.named_modules()
            if name.endswith(KV_SUFFIXES)
        }
        kv = {key: kv[key] for key in sort_sites(kv)}
        first = encoders[0].model
        return cls(family, encoders, kv, source, dtype=first.dtype, device=first.device)


def sd_family(hidden_size: int | None, pad_token: str | None) -> str:
    """``sd2`` or ``sd1`` for a single-encoder pipeline: SD 2.x's OpenCLIP is 1024 wide and pads with ``!``."""
    return "sd2" if hidden_size == 1024 or pad_token == "!" else "sd1"


def detect_family_from_pipeline(pipe) -> str:
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sdxl"
    te = getattr(pipe, "text_encoder", None)
    if te is None:
        raise UnsupportedModelError(f"{type(pipe).__name__} has no text encoder; expected an SD 1.x/2.x/XL pipeline")
    return sd_family(te.config.hidden_size, getattr(pipe.tokenizer, "pad_token", None))


def read_length(causal: bool, *positions: torch.Tensor) -> int | None:
    """How much of the window a pass must run to read ``positions``: up to the last of them in a causal encoder
    (a token's features depend only on the tokens up to it: absolute positions, causal attention); ``None``
    (the whole window) for a bidirectional one, or when nothing is read."""
    used = [int(p.max()) for p in positions if p.numel()]
    return max(used) + 1 if causal and used else None


def run_encoder(te: TextEncoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(prompt embedding, pooled embedding or None)`` exactly as the diffusers pipelines compute them."""
    device = te.model.device
    out = te.model(ids.to(device), output_hidden_states=True)
    embeds = out.last_hidden_state if te.spec.embed == "last" else out.hidden_states[-2]
    pooled = out.text_embeds if te.spec.pooled else None
    return embeds, pooled


def prompt_embeddings(model: EditModel, ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's conditioning: per-encoder embeddings concatenated (SDXL), and the pooled one."""
    parts, pooled = [], None
    for te, te_ids in zip(model.text_encoders, ids):
        embeds, p = run_encoder(te, te_ids)
        parts.append(embeds)
        pooled = p if p is not None else pooled
    return torch.cat(parts, dim=-1), pooled
