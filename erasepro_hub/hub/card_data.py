"""Model-card metadata (the YAML front matter) in the Hub's own format, built with ``ModelCardData``.

Evaluation results go into ``model-index`` through :class:`huggingface_hub.EvalResult`, so the Hub
shows them as it shows any other model's. Tags are the ones the Hub's LoRA pages look for
(``template:sd-lora``, the model family's ``stable-diffusion[-xl]`` and ``…-diffusers`` tags), and
``widget`` entries (the Hub's gallery: a prompt and the image it gave) are written only for sample
images the caller says exist. The front matter is written by a YAML dumper from that dict
(:func:`dump_front_matter`), never by joining strings, so no value can end it or add a key.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

#: (metric key in metrics.json, prompt set, human name of the metric). The Hub groups results by
#: dataset *type*, so each prompt set has its own type.
CARD_METRICS = (
    ("anchor_similarity", "held-out", "pooled K/V cosine, edited target vs original anchor (higher is better)"),
    ("preserve_similarity", "unrelated", "pooled K/V cosine, after vs before (higher is better)"),
    ("preserve_similarity_min", "unrelated", "least pooled K/V cosine, after vs before (higher is better)"),
    ("residual_train", "training", "K/V residual, target vs anchor (lower is better)"),
    ("pooled_residual_train", "training", "pooled-embedding residual (lower is better)"),
    ("residual_heldout", "held-out", "K/V residual, target vs anchor (lower is better)"),
    ("preserve_drift", "preserve", "K/V drift of unrelated prompts (lower is better)"),
)


#: The Hub's tags for a model family, as its diffusers-made LoRA cards carry them. The BERT family is
#: the package's own SD-shaped pipeline (a tiny UNet behind a BERT text encoder).
FAMILY_TAGS = {
    "sd1": ("stable-diffusion", "stable-diffusion-diffusers"),
    "sd2": ("stable-diffusion", "stable-diffusion-diffusers"),
    "bert": ("stable-diffusion", "stable-diffusion-diffusers"),
    "sdxl": ("stable-diffusion-xl", "stable-diffusion-xl-diffusers"),
    "sd3": ("sd3", "sd3-diffusers"),
    "flux": ("flux", "flux-diffusers"),
}


def card_tags(family: str) -> list[str]:
    """The card's tags: a diffusers LoRA for text-to-image (the Hub's LoRA template), the family's, ours."""
    return ["lora", "diffusers", "template:sd-lora", "text-to-image", *FAMILY_TAGS[family], "concept-erasure", "erasepro"]


def card_metadata(
    *,
    model_name: str,
    base_model: str | None,
    license: str | None,
    tags: list[str],
    metrics: dict[str, Any],
    widget: list[dict[str, Any]] | None = None,
    feature: str = "K/V",
) -> dict[str, Any]:
    """The front matter as a plain dict (``base_model`` only for Hub base models).

    ``feature``: what the metrics compare, in their names — ``K/V`` (a UNet's cross-attention keys and values)
    or ``text-input`` (an MMDiT's ``context_embedder`` output).

    ``widget``: ``[{"text": prompt, "output": {"url": file}}]`` for sample images that are part of the
    release; ``None`` or empty writes no ``widget`` key.
    """
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type="text-to-image",
            task_name="concept erasure",
            dataset_type=f"erasepro-{dataset}-prompts",
            dataset_name=f"{dataset} prompts",
            metric_type=key,
            metric_name=name.replace("K/V", feature),
            metric_value=float(metrics[key]),
        )
        for key, dataset, name in CARD_METRICS
        if metrics.get(key) is not None
    ]
    data = ModelCardData(
        base_model=base_model,
        base_model_relation="adapter" if base_model else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        tags=tags,
        model_name=model_name,
        eval_results=results or None,
        widget=widget or None,
    )
    return data.to_dict()


def dump_front_matter(data: dict[str, Any]) -> str:
    """``data`` as the YAML between the card's ``---`` lines (ends with a newline).

    Every string is a YAML scalar, quoted and escaped by the dumper where needed; a value with line
    breaks is folded onto indented lines, so none of its lines can read as the closing ``---``
    (nor as ``...``); that is checked after dumping.
    """
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100)
    if re.search(r"^(---|\.\.\.)", text, re.M):
        raise ValueError("the card metadata does not dump to a single YAML document")  # pragma: no cover
    return text
