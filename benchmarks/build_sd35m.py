"""Build a random-weight folder with the real Stable Diffusion 3.5 Medium text-side shapes, as a diffusers folder.

CLIP-L (12 layers, width 768, projection 768), CLIP-G (32 layers, width 1280, projection 1280) and T5-XXL
(width 4096, 64 heads of 64, feed-forward 10240, gated GELU) **reduced in depth** to ``--t5-layers`` of its 24
blocks, stored in bfloat16; the transformer folder holds its config and only the two tensors the solve reads,
at their real shapes: ``context_embedder`` (1536 × 4096) and ``time_text_embed.text_embedder.linear_1``
(1536 × 2048). The shipped CLIP tokenizer fills all three tokenizer slots (T5's vocabulary is widened to
CLIP's 49,408 entries for it). The solver's cost does not depend on the weight values, so random weights
measure it faithfully; the T5 depth changes the cost of the T5 passes and the memory, which the benchmark
reports per depth.

    python benchmarks/build_sd35m.py [--t5-layers 2] [--out benchmarks/cache/sd35m-t5x2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CACHE = Path(__file__).resolve().parent / "cache"
#: SD 3.5 Medium: the transformer's inner width (24 heads of 64), its text input, the pooled width
INNER, JOINT, POOLED = 1536, 4096, 768 + 1280


def default_out(t5_layers: int) -> Path:
    return CACHE / f"sd35m-t5x{t5_layers}"


def build(t5_layers: int = 2, out: Path | None = None) -> Path:
    out = out or default_out(t5_layers)
    if (out / "model_index.json").exists():
        return out
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from erasepro_hub.models.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")

    def clip(hidden, layers, heads, act):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
            bos_token_id=49406, eos_token_id=2, pad_token_id=1,
        )).eval()

    clip(768, 12, 12, "quick_gelu").save_pretrained(tmp / "text_encoder", safe_serialization=True)
    clip(1280, 32, 20, "gelu").save_pretrained(tmp / "text_encoder_2", safe_serialization=True)
    t5 = T5EncoderModel(T5Config(
        vocab_size=VOCAB_SIZE, d_model=JOINT, d_kv=64, d_ff=10240, num_layers=t5_layers, num_heads=64,
        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", decoder_start_token_id=0,
    )).eval()
    t5.to(torch.bfloat16).save_pretrained(tmp / "text_encoder_3", safe_serialization=True)
    del t5
    clip_tokenizer(77).save_pretrained(tmp / "tokenizer")
    clip_tokenizer(77, pad_token="!").save_pretrained(tmp / "tokenizer_2")
    clip_tokenizer(256).save_pretrained(tmp / "tokenizer_3")
    transformer = tmp / "transformer"
    transformer.mkdir(parents=True)
    tensors = {
        "context_embedder.weight": torch.randn(INNER, JOINT) / JOINT**0.5,
        "context_embedder.bias": torch.zeros(INNER),
        "time_text_embed.text_embedder.linear_1.weight": torch.randn(INNER, POOLED) / POOLED**0.5,
        "time_text_embed.text_embedder.linear_1.bias": torch.zeros(INNER),
    }
    save_file(tensors, str(transformer / "diffusion_pytorch_model.safetensors"))
    (transformer / "config.json").write_text(json.dumps({
        "_class_name": "SD3Transformer2DModel", "joint_attention_dim": JOINT, "pooled_projection_dim": POOLED,
        "caption_projection_dim": INNER, "num_attention_heads": 24, "attention_head_dim": 64, "num_layers": 24,
        "note": "only the tensors the solve reads are stored (benchmarks/build_sd35m.py)",
    }, indent=2))
    (tmp / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "CLIPTokenizer"], "transformer": ["diffusers", "SD3Transformer2DModel"],
        "scheduler": [None, None], "vae": [None, None],
    }, indent=2))
    tmp.rename(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    path = build(args.t5_layers, args.out)
    print(f"{path} ready in {time.perf_counter() - start:.1f} s")
