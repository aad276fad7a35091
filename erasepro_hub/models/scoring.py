"""Models used to *score* images (CLIP), and full pipelines for image generation.

Only here (in ``models/``) are transformers and diffusers imported; the metrics
themselves live in :mod:`erasepro_hub.metrics.images` and see plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: CLIP's image normalisation (the values of every released CLIP model).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ClipScorer:
    """A CLIP model as two embedding functions (unit-normalised features)."""

    model: torch.nn.Module
    tokenizer: object
    image_size: int
    device: torch.device

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images → a normalised batch: resize the short side (bicubic), centre crop, CLIP mean/std."""
        import numpy as np
        import torch.nn.functional as F

        batch = []
        for image in images:
            array = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            h, w = array.shape[1:]
            scale = self.image_size / min(h, w)
            size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
            array = F.interpolate(array[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
            top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
            array = array[:, top : top + self.image_size, left : left + self.image_size]
            batch.append(array)
        pixels = torch.stack(batch)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.device)

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values=self.preprocess(images))
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        features = self.model.get_text_features(**inputs)
        features = getattr(features, "pooler_output", features)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def load_clip(model_id: str, *, device: str | torch.device = "cpu", revision: str | None = None) -> ClipScorer:
    """A CLIP model by Hub id or local folder (safetensors only)."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_id, revision=revision, use_safetensors=True).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
    return ClipScorer(model, tokenizer, int(model.config.vision_config.image_size), torch.device(device))


def load_pipeline(ref, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The full diffusers pipeline of a base model (for image generation only; the solve never needs it)."""
    from diffusers import DiffusionPipeline

    from .builtin import build_builtin

    if ref.kind == "builtin":
        return build_builtin(ref.builtin_name, dtype).to(device)
    pipe = DiffusionPipeline.from_pretrained(
        ref.id, revision=ref.revision, torch_dtype=dtype, use_safetensors=True, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
