"""Rendering the model card of an erasure.

The template is Jinja2 with ``StrictUndefined`` (a missing value is an error, never
an empty string). User strings — concept names, descriptions, prompts — are only
ever *data*: they are passed as variables, never used as template source, and are
escaped for the place they land (Markdown table cells, Python string literals, a
code fence longer than any backtick run they contain). The YAML front matter is
written by a YAML dumper from a dict, never by string concatenation.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..layout import CARD_FILE, PLOT_FILE
from ..manifest import Manifest, dump_yaml

TEMPLATE = "model_card.md.j2"
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|<>~])")


def md_inline(value: Any) -> str:
    """Escape a user string for inline Markdown (and a table cell): no markup, no HTML, one line."""
    text = str(value).replace("\r", " ").replace("\n", " ")
    return _MD_SPECIAL.sub(r"\\\1", text).replace("&", "&amp;")


_BLOCK_MARK = re.compile(r"^(\s*)([-=_*]{3,}|#|>|```|~~~)")


def md_text(value: Any) -> str:
    """Escape a free-text paragraph: keep line breaks; no HTML, and no line may start a heading, rule or fence."""
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "\n".join(_BLOCK_MARK.sub(r"\1\\\2", line.rstrip()) for line in text.splitlines())


def py_literal(value: Any) -> str:
    """A Python string literal (JSON's escapes are valid Python)."""
    return json.dumps(str(value), ensure_ascii=False)


def _fence(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _template_source() -> str:
    try:
        return resources.files("erasepro_hub.templates").joinpath(TEMPLATE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree without installing
        return (Path(__file__).resolve().parents[2] / "templates" / TEMPLATE).read_text(encoding="utf-8")


def _environment():
    from jinja2 import Environment, StrictUndefined

    env = Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, trim_blocks=False)
    env.filters.update(md=md_inline, text=md_text, py=py_literal)
    return env


def _fmt(value: float) -> str:
    return f"{value:.3e}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4f}"


METRIC_ROWS = (
    ("anchor_similarity", "held-out prompts: similarity to the anchor (1 = erased)"),
    ("anchor_similarity_no_edit", "  the same before the erasure"),
    ("preserve_similarity", "unrelated prompts: similarity to before (1 = untouched)"),
    ("preserve_similarity_min", "  the least similar unrelated prompt"),
    ("residual_train", "K/V residual, training prompts"),
    ("residual_train_k", "  K only"),
    ("residual_train_v", "  V only"),
    ("residual_heldout", "K/V residual, held-out prompts"),
    ("preserve_drift", "K/V drift, preserve and unrelated prompts"),
    ("pooled_residual_train", "pooled-embedding residual, training prompts"),
    ("pooled_residual_heldout", "pooled-embedding residual, held-out prompts"),
    ("delta_norm_total", "total ‖ΔW‖_F"),
)


IMAGE_ROWS = (
    ("clip_score_target", "CLIP score vs the erased concept, its prompts"),
    ("zero_shot_target_accuracy", "zero-shot CLIP accuracy for the erased concept"),
    ("detector_score_target", "detector score, its prompts"),
)
IMAGE_PAIR_ROWS = (
    ("clip_fid_preserve", "CLIP-FID edited vs base, caption prompts"),
    ("clip_kid_preserve", "CLIP-KID edited vs base, caption prompts"),
)


def _revision_kind(revision: str, known: str | None) -> str:
    """``commit``, ``tag``, ``branch``, or ``ref`` when the caller does not know which."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return "commit"
    if known is not None:
        return known
    return "branch" if revision == "main" or revision.startswith("refs/heads/") else "ref"


def card_context(
    manifest: Manifest, *, repo_id: str | None = None, revision: str | None = None, revision_kind: str | None = None
) -> dict:
    """Everything the template needs, as plain data (no I/O).

    ``revision_kind`` (``tag`` or ``branch``) says what ``revision`` names when the caller knows it (a push).
    """
    from ..hub.card_data import card_metadata

    outputs = manifest.outputs
    metrics = manifest.metrics or {}
    base = manifest.base_model
    family = outputs.family if outputs is not None else "sd1"
    repo_id = repo_id or "<user>/<repo>"
    revision = revision or "main"
    family_tag = "stable-diffusion-xl" if family == "sdxl" else "stable-diffusion"
    tags = ["lora", "diffusers", "text-to-image", family_tag, "concept-erasure", "erasepro"]
    hub_base = base.id if base.kind == "hub" else None
    license_ = outputs.base_license if outputs is not None else None
    name = manifest.name or "erasure"
    front = card_metadata(model_name=name, base_model=hub_base, license=license_, tags=tags, metrics=metrics)
    usage = {
        "pipeline_class": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
        "base_kind": base.kind,
        "base_id": base.id,
        "base_revision": base.revision,
        "builtin_name": base.builtin_name if base.kind == "builtin" else None,
    }
    recipe_yaml = dump_yaml(manifest.recipe())
    sites = outputs.sites if outputs is not None else []
    baseline = metrics.get("baseline_uce") or {}
    rows = [
        {"name": label, "value": _fmt(float(metrics[key])),
         "baseline": _fmt(float(baseline[key])) if baseline.get(key) is not None else "–"}
        for key, label in METRIC_ROWS
        if metrics.get(key) is not None
    ]
    images = metrics.get("images") or {}
    image_rows = [
        {"name": label, "base": _fmt(float(images[f"{key}_base"])), "edited": _fmt(float(images[f"{key}_edited"]))}
        for key, label in IMAGE_ROWS
        if images.get(f"{key}_base") is not None
    ]
    image_rows += [
        {"name": label, "base": "–", "edited": _fmt(float(images[key]))} for key, label in IMAGE_PAIR_ROWS if images.get(key) is not None
    ]
    provenance = manifest.provenance
    libraries = sorted((provenance.libraries if provenance else {}).items())
    return {
        "front_matter": yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=100),
        "title": f"{name}: concept erasure for {base.id}",
        "description": manifest.description or "",
        "base": {"id": base.id, "revision": base.revision, "url": f"https://huggingface.co/{base.id}" if hub_base else None},
        "method": manifest.method,
        "family": family,
        "concepts": [{"target": c.target, "anchor": c.anchor} for c in manifest.concepts],
        "n_sites": sum(1 for s in sites if s.update_rank),
        "n_te_sites": sum(1 for s in sites if s.update_rank and s.name.startswith("text_encoder")),
        "n_kv_sites": sum(1 for s in sites if s.update_rank and s.name.startswith("unet.")),
        "usage": usage,
        "repo_id": repo_id,
        "revision": revision,
        "revision_kind": _revision_kind(revision, revision_kind),
        "metrics": rows,
        "has_baseline": bool(baseline) and manifest.method != "uce",
        "image_rows": image_rows,
        "image_info": {k: images.get(k) for k in ("clip_model", "n_target_images", "n_preserve_images", "steps")},
        "plot": PLOT_FILE,
        "recipe_yaml": recipe_yaml,
        "fence": _fence(recipe_yaml),
        "tool_version": provenance.tool_version if provenance else "unknown",
        "libraries": [(k, v) for k, v in libraries if k in ("torch", "diffusers", "transformers")],
    }


def render_card(
    manifest: Manifest, *, repo_id: str | None = None, revision: str | None = None, revision_kind: str | None = None
) -> str:
    """The model card (README.md) of an erasure."""
    context = card_context(manifest, repo_id=repo_id, revision=revision, revision_kind=revision_kind)
    return _environment().from_string(_template_source()).render(**context)


def write_card(
    folder: str | Path,
    manifest: Manifest,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    revision_kind: str | None = None,
) -> list[str]:
    """Write ``README.md`` and the plot into ``folder``; returns the file names written."""
    from .plot import site_norm_plot

    folder = Path(folder)
    series = {manifest.method: {s.name: s.delta_norm_rel for s in manifest.outputs.sites} if manifest.outputs else {}}
    baseline = (manifest.metrics or {}).get("baseline_uce") or {}
    if baseline.get("delta_norm_rel") and manifest.method != "uce":
        series["uce (baseline, same prompts)"] = baseline["delta_norm_rel"]
    site_norm_plot(series, folder / PLOT_FILE, title=f"{manifest.name or 'erasure'}: per-site update norm")
    card = render_card(manifest, repo_id=repo_id, revision=revision, revision_kind=revision_kind)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return [CARD_FILE, PLOT_FILE]
