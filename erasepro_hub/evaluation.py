"""``erasepro eval`` and ``erasepro compare``: the evidence published with an erasure.

* :func:`evaluate_folder` measures a finished erasure folder — feature metrics on the solver's
  prompts, held-out and preserve prompts (from the manifest and ``--prompts``), the UCE baseline
  solved on the same prompts, and optionally image metrics — and writes them into
  ``metrics.json``, the manifest and the card (atomically).
* :func:`compare` runs several methods and named setting variants on the same manifests and
  writes a side-by-side table (Markdown and JSON).

Why one module of this length: ``eval`` and ``compare`` share the base loading and check, the
variant parsing and the table columns; the metric computations themselves live in ``metrics/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .adapters.fingerprint import check_fingerprints
from .adapters.folder import open_folder
from .erase import LoadedBase, compute, load_base
from .errors import ManifestError
from .layout import SAMPLES_FILE
from .metrics.features import feature_metrics
from .metrics.images import ImageOptions
from .metrics.prompt_sets import PromptSet, load_prompt_set
from .manifest import Recipe, load_manifest, to_data
from .naming import is_denoiser_key
from .output import update_folder
from .recipe import drift_prompts, heldout_pairs, training_pairs

SUMMARY_KEYS = (
    "anchor_similarity",
    "anchor_similarity_window",
    "preserve_similarity",
    "preserve_similarity_min",
    "preserve_similarity_window",
    "residual_train",
    "residual_heldout",
    "residual_heldout_all",
    "preserve_drift",
    "drift_preserve_concepts",
    "drift_unrelated",
    "pooled_residual_train",
    "delta_norm_total",
    "delta_norm_kv",
)


def _check_base(base: LoadedBase, manifest) -> None:
    """The loaded base model has the weights the erasure was computed from."""
    weights = {key: base.model.weight(key) for key in manifest.outputs.base_fingerprints}
    label = manifest.base_model.id + (f"@{manifest.base_model.revision}" if manifest.base_model.revision else "")
    check_fingerprints(weights, manifest.outputs.base_fingerprints, label)


def with_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """A copy of ``recipe`` with dotted keys replaced (``text_encoder.site=mlp.fc1``); validated."""
    data = to_data(recipe)
    for dotted, value in overrides.items():
        node = data
        *parents, last = dotted.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ManifestError(f"variant: {dotted!r} does not name a manifest setting")
            node = node[part]
        if last not in node:
            raise ManifestError(f"variant: {dotted!r} does not name a manifest setting")
        node[last] = value
    from pydantic import ValidationError

    from .manifest.io import format_validation_error

    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, Recipe, "variant") from None


# ----------------------------------------------------------------------------- eval
def evaluate_folder(
    folder: str | Path,
    *,
    prompts: str | None = None,
    images: bool = False,
    options: ImageOptions | None = None,
    device: str = "cpu",
    baseline: bool = True,
) -> dict:
    """Measure an erasure folder and write the results into it; returns the metrics."""
    options = options or ImageOptions()
    state = None
    if images:
        from accelerate import PartialState

        state = PartialState()
        device = str(state.device)
        if not options.clip_model:
            raise ManifestError("--images needs --clip-model (a CLIP model id or folder, e.g. openai/clip-vit-large-patch14)")
    opened = open_folder(folder)
    manifest = opened.manifest
    recipe = manifest.recipe()
    concepts = [(c.target, c.anchor) for c in recipe.concepts]
    extra = load_prompt_set(prompts, concepts) if prompts else PromptSet()
    heldout = heldout_pairs(recipe) + extra.heldout
    preserve = drift_prompts(recipe) + extra.preserve
    image_results = None
    if images:
        image_results = _image_evaluation(opened.path, recipe, heldout, preserve, options, state, device)
        if not state.is_main_process:
            state.wait_for_everyone()
            return {}
    base = load_base(recipe, device=device)
    _check_base(base, manifest)
    deltas = opened.adapter.deltas
    metrics = feature_metrics(
        base.model, deltas, pairs=training_pairs(recipe), token_policy=recipe.solver.token_policy,
        surplus=recipe.solver.surplus, heldout=heldout, preserve=preserve,
    )
    metrics.update(
        method=recipe.method,
        n_prompt_pairs=len(training_pairs(recipe)),
        n_heldout_prompts=len(heldout),
        n_preserve_prompts=len(preserve),
        n_constrained_tokens=(manifest.metrics or {}).get("n_constrained_tokens"),
    )
    if prompts:
        metrics["prompt_set"] = {"source": prompts, "revision": extra.revision, "heldout": len(extra.heldout),
                                 "preserve": len(extra.preserve)}
    if baseline and recipe.method != "uce":
        uce = compute(with_overrides(recipe, {"method": "uce"}), base=base)
        b = feature_metrics(base.model, uce.stored, pairs=training_pairs(recipe),
                            token_policy=recipe.solver.token_policy, surplus=recipe.solver.surplus,
                            heldout=heldout, preserve=preserve)
        metrics["baseline_uce"] = {k: v for k, v in b.items() if not isinstance(v, dict)} | {"delta_norm_rel": b["delta_norm_rel"]}
    if image_results is not None:
        metrics["images"] = image_results
    update_folder(opened.path, manifest, metrics)
    if state is not None:
        state.wait_for_everyone()
    return metrics


def _image_evaluation(folder: Path, recipe: Recipe, heldout, preserve, options: ImageOptions, state, device: str) -> dict | None:
    """Generate with the base and the edited pipeline (sharded), score on the main process."""
    from .adapters.apply import load_erasure
    from .metrics.images import generate, image_metrics, load_detector
    from .models.loading import DTYPES
    from .models.scoring import load_clip, load_pipeline

    limit = options.max_prompts
    targets = ([p.target for p in training_pairs(recipe)] + [p.target for p in heldout])[:limit]
    captions = [p.text for p in preserve][:limit]
    pipe = load_pipeline(recipe.base_model, dtype=DTYPES[recipe.solver.dtype], device=device)
    base_images = {"target": generate(pipe, targets, options, state), "preserve": generate(pipe, captions, options, state)}
    handle = load_erasure(pipe, folder)
    edited_images = {"target": generate(pipe, targets, options, state), "preserve": generate(pipe, captions, options, state)}
    handle.remove()
    if not state.is_main_process:
        return None
    scorer = load_clip(options.clip_model, device=device, revision=options.clip_revision)
    concepts = [(c.target, c.anchor) for c in recipe.concepts]
    labels = [t for t, _ in concepts] + [a for _, a in concepts if a] + list(recipe.preserve.concepts)
    detector = load_detector(options.detector) if options.detector else None
    results = image_metrics(base_images, edited_images, scorer=scorer, concepts=concepts, target_prompts=targets,
                            labels=list(dict.fromkeys(labels)), detector=detector)
    results.update(n_target_images=len(base_images["target"]), n_preserve_images=len(base_images["preserve"]),
                   clip_model=options.clip_model, steps=options.steps, seed=options.seed)
    _save_grid(folder / SAMPLES_FILE, base_images["target"][:4], edited_images["target"][:4])
    return results


def _save_grid(path: Path, top: Sequence, bottom: Sequence) -> None:
    """Before (top row) / after (bottom row) images of the same prompts and seeds."""
    from PIL import Image

    if not top:
        return
    w, h = top[0].size
    grid = Image.new("RGB", (w * len(top), 2 * h), "white")
    for i, (a, b) in enumerate(zip(top, bottom)):
        grid.paste(a, (i * w, 0))
        grid.paste(b, (i * w, h))
    grid.save(path, format="PNG")


# ----------------------------------------------------------------------------- compare
#: The reference row of a comparison: no edit at all (what the residuals are before erasure).
NO_EDIT = "none"
#: Named variants that are not a method of their own: UCE on ErasePro's tokens (``solver.token_policy``) instead
#: of the published last token of each prompt (``uce`` itself).
NAMED_VARIANTS = {"uce-erasepro-tokens": {"method": "uce", "uce.tokens": "erasepro"}}
#: What ``erasepro compare`` runs when given no methods or variants.
DEFAULT_VARIANTS = ("uce", "uce-erasepro-tokens", "erasepro-kv", "erasepro")


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
    """``name:key=value,key=value`` (values read as YAML scalars) or a bare method name."""
    name, sep, rest = spec.partition(":")
    if not name.strip():
        raise ManifestError(f"--variant {spec!r}: give it as name:key=value[,key=value]")
    if name == NO_EDIT:
        return Variant(NO_EDIT)
    if not sep:
        return Variant(name, dict(NAMED_VARIANTS.get(name, {"method": name})))
    overrides = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ManifestError(f"--variant {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return Variant(name, overrides)


def compare(
    manifests: Sequence[str | Path],
    variants: Sequence[Variant],
    *,
    prompts: str | None = None,
    device: str = "cpu",
    progress=None,
) -> list[dict]:
    """Solve every manifest with every variant on the same prompts; one row each."""
    rows = []
    bases: dict[str, LoadedBase] = {}
    for path in manifests:
        recipe = load_manifest(path).recipe()
        concepts = [(c.target, c.anchor) for c in recipe.concepts]
        extra = load_prompt_set(prompts, concepts) if prompts else PromptSet()
        key = recipe.base_model.id + str(recipe.base_model.revision) + recipe.solver.dtype
        if key not in bases:
            bases[key] = load_base(recipe, device=device)
        base = bases[key]
        for variant in variants:
            variant_recipe = with_overrides(recipe, variant.overrides)
            started = time.perf_counter()
            if variant.name == NO_EDIT:
                comp = None
            else:
                comp = compute(variant_recipe, base=base)
            elapsed = time.perf_counter() - started
            sites = comp.solution.sites if comp is not None else []
            metrics = feature_metrics(
                base.model, comp.stored if comp is not None else {}, pairs=training_pairs(variant_recipe),
                token_policy=variant_recipe.solver.token_policy, surplus=variant_recipe.solver.surplus,
                heldout=heldout_pairs(variant_recipe) + extra.heldout,
                preserve=drift_prompts(variant_recipe) + extra.preserve,
            )
            kv_ranks = [s.report.update_rank for s in sites if is_denoiser_key(s.key)]
            rows.append({
                "manifest": recipe.name or Path(path).stem,
                "concept": ", ".join(t for t, _ in concepts),
                "variant": variant.name,
                "method": variant_recipe.method,
                **{k: metrics.get(k) for k in SUMMARY_KEYS},
                "rank_kv": max(kv_ranks, default=0),
                "te_stages": sum(1 for s in sites if not is_denoiser_key(s.key)),
                "max_site_residual": max((s.report.residual for s in sites), default=None),
                "solve_seconds": comp.solution.seconds if comp is not None else 0.0,
                "seconds": elapsed,
            })
            if progress is not None:
                progress(f"{rows[-1]['manifest']}: {variant.name}")
    return rows


COLUMNS = (
    ("variant", "method", "{}"),
    ("anchor_similarity", "anchor sim.", "{:.4f}"),
    ("anchor_similarity_window", "anchor sim. (window)", "{:.4f}"),
    ("preserve_similarity", "preserve sim.", "{:.4f}"),
    ("preserve_similarity_min", "preserve sim. min", "{:.4f}"),
    ("residual_train", "residual_train", "{:.2e}"),
    ("residual_heldout", "residual_heldout", "{:.4f}"),
    ("residual_heldout_all", "heldout (all tokens)", "{:.4f}"),
    ("preserve_drift", "preserve_drift", "{:.4f}"),
    ("drift_unrelated", "drift (unrelated)", "{:.4f}"),
    ("delta_norm_total", "‖ΔW‖ total", "{:.3f}"),
    ("delta_norm_kv", "‖ΔW‖ K/V", "{:.3f}"),
    ("rank_kv", "update rank (K/V)", "{}"),
    ("solve_seconds", "solve s", "{:.3f}"),
)


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(rows: Sequence[dict]) -> str:
    """Per-concept tables, then the mean over concepts per variant."""
    lines = []
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    for manifest in dict.fromkeys(r["manifest"] for r in rows):
        group = [r for r in rows if r["manifest"] == manifest]
        lines += [f"### {manifest} ({group[0]['concept']})", "", header, rule]
        lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in group]
        lines.append("")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if len({r["manifest"] for r in rows}) > 1:
        lines += ["### Mean over concepts", "", header, rule]
        for variant in variants:
            group = [r for r in rows if r["variant"] == variant]
            cells = []
            for key, _, fmt in COLUMNS:
                if key == "variant":
                    cells.append(variant)
                    continue
                values = [r[key] for r in group if isinstance(r.get(key), (int, float))]
                cells.append(_cell(sum(values) / len(values) if values else None, fmt if key != "rank_kv" else "{:.0f}"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_comparison(rows: Sequence[dict], out: str | Path, *, command: Sequence[str] | None = None) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"command": list(command or []), "rows": list(rows)}, indent=2) + "\n")
    text = "# Method comparison\n\n"
    if command:
        text += "Produced by:\n\n```bash\n" + " ".join(command) + "\n```\n\n"
    (out / "compare.md").write_text(text + markdown_table(rows))
    return [out / "compare.md", out / "compare.json"]
