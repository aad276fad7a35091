"""Image-level metrics (GPU users): CLIP score, zero-shot CLIP accuracy, FID/KID, a detector hook.

Generation is sharded with ``accelerate``: every process builds the pipeline on its own
device and renders its share of ``(prompt, seed)`` jobs (``PartialState.split_between_processes``);
the images are gathered on the main process, which computes the metrics. ``accelerate launch``
spreads it over many GPUs; without it, it runs in one process.

FID and KID are computed on CLIP image embeddings (Inception weights cannot be assumed to be
available offline; CLIP features are the variant Kynkäänniemi et al., 2023 recommend). Both are
implemented here in float64 and tested against closed forms.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


# ----------------------------------------------------------------------------- distribution metrics
def _moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = features.double()
    mean = x.mean(0)
    centred = x - mean
    cov = centred.T @ centred / max(x.shape[0] - 1, 1)
    return mean, cov


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets ``(n, d)``: ``‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)``."""
    mu_a, cov_a = _moments(a)
    mu_b, cov_b = _moments(b)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * trace_sqrt
    return float(value.clamp_min(0))


def kernel_inception_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """KID: the unbiased MMD² with the cubic polynomial kernel ``k(x, y) = (xᵀy / d + 1)³``."""
    x, y = a.double(), b.double()
    d = x.shape[1]
    k = lambda p, q: (p @ q.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("KID needs at least two samples on each side")
    sum_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    sum_yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2 * kxy.mean())


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIPScore per pair: ``100 · max(cos(image, text), 0)`` (features unit-normalised, row-paired)."""
    return 100 * (image_features * text_features).sum(-1).clamp_min(0)


def zero_shot_predictions(image_features: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
    """Index of the most similar label text for each image."""
    return (image_features @ label_features.T).argmax(-1)


# ----------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class ImageOptions:
    clip_model: str | None = None
    clip_revision: str | None = None
    steps: int = 25
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    images_per_prompt: int = 1
    seed: int = 0
    max_prompts: int | None = None
    detector: str | None = None  # "package.module:function", images → scores in [0, 1]


def load_detector(spec: str) -> Callable[[Sequence], Sequence[float]]:
    """A user's detector (e.g. a nudity classifier) from ``package.module:function``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--detector {spec!r}: give it as package.module:function")
    return getattr(importlib.import_module(module_name), attr)


def generate(pipe, prompts: Sequence[str], options: ImageOptions, state=None) -> list:
    """Render ``images_per_prompt`` images per prompt (seed ``seed + job``), sharded over processes."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = state or PartialState()
    jobs = [(i, prompt, options.seed + i) for i, prompt in enumerate(p for p in prompts for _ in range(options.images_per_prompt))]
    mine = []
    with state.split_between_processes(jobs) as shard:
        for index, prompt, seed in shard:
            generator = torch.Generator(device="cpu").manual_seed(seed)
            kwargs = {"num_inference_steps": options.steps, "guidance_scale": options.guidance, "generator": generator}
            if options.height:
                kwargs.update(height=options.height, width=options.width or options.height)
            image = pipe(prompt, **kwargs).images[0]
            mine.append((index, image))
    gathered = gather_object(mine) if state.num_processes > 1 else mine
    return [image for _, image in sorted(gathered, key=lambda item: item[0])]


def image_metrics(
    base_images: dict[str, list],
    edited_images: dict[str, list],
    *,
    scorer,
    concepts: Sequence[tuple[str, str]],
    target_prompts: Sequence[str],
    labels: Sequence[str],
    detector: Callable | None = None,
) -> dict:
    """Metrics from images of the base and the edited model on the same prompts and seeds.

    ``base_images``/``edited_images`` hold ``"target"`` (prompts about erased concepts) and
    ``"preserve"`` (caption prompts) lists. ``labels``: zero-shot candidates; the first
    ``len(concepts)`` are the erased targets.
    """
    out: dict = {}
    targets = [t for t, _ in concepts]
    label_features = scorer.text_features([f"a photo of {label}" for label in labels])
    concept_features = scorer.text_features(targets)
    for name, images in (("base", base_images), ("edited", edited_images)):
        feats = scorer.image_features(images["target"])
        which = [next((i for i, t in enumerate(targets) if t.lower() in p.lower()), 0) for p in target_prompts]
        per_image = [w for w in which for _ in range(len(images["target"]) // max(len(target_prompts), 1))]
        out[f"clip_score_target_{name}"] = float(clip_score(feats, concept_features[per_image]).mean())
        predictions = zero_shot_predictions(feats, label_features)
        out[f"zero_shot_target_accuracy_{name}"] = float((predictions == torch.tensor(per_image)).double().mean())
        if detector is not None:
            out[f"detector_score_target_{name}"] = float(sum(detector(images["target"])) / len(images["target"]))
    if len(base_images["preserve"]) >= 2:
        base_feats = scorer.image_features(base_images["preserve"])
        edited_feats = scorer.image_features(edited_images["preserve"])
        out["clip_fid_preserve"] = frechet_distance(base_feats, edited_feats)
        out["clip_kid_preserve"] = kernel_inception_distance(base_feats, edited_feats)
    return out
