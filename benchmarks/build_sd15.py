"""Build a random-weight pipeline with the real Stable Diffusion 1.5 shapes, saved as a diffusers folder.

CLIP ViT-L/14 text encoder (12 layers, width 768), the SD-1.5 UNet (860 M parameters, 16 cross-attention
blocks: 32 to_k/to_v of widths 320/640/1280 reading 768) and the SD VAE, with the real CLIP tokenizer.
The solver's cost does not depend on the weight values, so random weights measure it faithfully.

    python benchmarks/build_sd15.py [--out benchmarks/cache/sd15]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

DEFAULT = Path(__file__).resolve().parent / "cache" / "sd15"


def build(out: Path = DEFAULT) -> Path:
    if (out / "model_index.json").exists():
        return out
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasepro_hub.models.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=2,
        pad_token_id=1,
    ))
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(77), unet=unet,
        scheduler=PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT)
    args = parser.parse_args()
    start = time.perf_counter()
    path = build(args.out)
    print(f"{path} ready in {time.perf_counter() - start:.1f} s")
