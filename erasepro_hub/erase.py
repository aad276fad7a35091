"""From a manifest to a finished erasure folder, and back again.

:func:`compute` turns a recipe into deltas (load the base, build prompts, run the
progressive driver). :func:`erase` writes the folder of docs/design.md §4.1 atomically.
:func:`regenerate` recomputes an erasure from its folder's manifest alone and,
with ``verify``, compares it with what is stored.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .adapters.fingerprint import weight_fingerprints
from .adapters.folder import open_folder
from .adapters.lora import ADAPTER_FILE, dense_as_lora, file_sha256, save_adapter
from .cards import write_card
from .errors import EraseProError, VerificationError
from .fsutil import atomic_folder, check_output
from .layout import MANIFEST_FILE, METRICS_FILE
from .manifest import (
    BaseModelRef,
    Manifest,
    Outputs,
    Provenance,
    Recipe,
    SiteRecord,
    dump_yaml,
    load_manifest,
    recipe_sha256,
    to_data,
)
from .solver import LowRankDelta

#: ``regenerate --verify`` accepts a max abs difference of this fraction of the largest |ΔW| entry.
#: It covers float32 feature differences between machines, thread counts and devices; a changed
#: recipe setting moves ΔW by orders of magnitude more.
REGENERATE_RTOL = 1e-4

#: The embedded models are built in code by this project.
BUILTIN_LICENSE = "apache-2.0"

LIBRARIES = ("torch", "diffusers", "transformers", "safetensors", "pydantic", "huggingface_hub")


# ----------------------------------------------------------------------------- recipe → plan
def _prompts_module():
    from .models import prompts

    return prompts


def prompt_templates(recipe: Recipe) -> list[str]:
    """The manifest's own templates, then the first ``bank_size`` of its kind's bank that it lacks."""
    own = list(recipe.prompts.templates)
    if recipe.prompts.kind is None:
        return own
    from .banks import bank

    return own + [t for t in bank(recipe.prompts.kind)[: recipe.prompts.bank_size] if t not in own]


def training_pairs(recipe: Recipe):
    return _prompts_module().make_pairs([(c.target, c.anchor) for c in recipe.concepts], prompt_templates(recipe))


def misspelled_pairs(recipe: Recipe):
    """Soft pairs: each target's one-letter deletions, alone, with the bare anchor (ErasePro methods only)."""
    if not recipe.prompts.misspellings or recipe.method == "uce":
        return []
    p = _prompts_module()
    taken = {text.casefold() for c in recipe.concepts for text in (c.target, c.anchor)}
    return [
        p.PromptPair(variant, c.anchor, "", index)
        for index, c in enumerate(recipe.concepts)
        for variant in p.misspellings(c.target)
        if variant.casefold() not in taken
    ]


def preserve_prompts(recipe: Recipe):
    if recipe.preserve.mode == "none":
        return []
    templates = recipe.preserve.templates or prompt_templates(recipe)
    return _prompts_module().make_prompts(recipe.preserve.concepts, templates)


def preserve_captions(recipe: Recipe):
    """The caption set kept in place by soft preservation (ErasePro methods only; UCE keeps its published form)."""
    if recipe.preserve.captions == "none" or recipe.method == "uce":
        return []
    from .banks import captions

    return [_prompts_module().Prompt(text) for text in captions(recipe.preserve.captions)]


def heldout_pairs(recipe: Recipe):
    p = _prompts_module()
    pairs = p.make_pairs([(c.target, c.anchor) for c in recipe.concepts], recipe.evaluation.heldout_templates)
    pairs += [p.PromptPair(h.target, h.anchor) for h in recipe.evaluation.heldout_prompts]
    return pairs


def drift_prompts(recipe: Recipe):
    p = _prompts_module()
    templates = recipe.preserve.templates or prompt_templates(recipe)
    prompts = p.make_prompts(recipe.preserve.concepts, templates)
    return prompts + [p.Prompt(text) for text in recipe.evaluation.preserve_prompts]


def plan_from_recipe(recipe: Recipe):
    from .models.loading import DTYPES
    from .models.progressive import ErasurePlan

    return ErasurePlan(
        method=recipe.method,
        pairs=tuple(training_pairs(recipe)),
        soft_pairs=tuple(misspelled_pairs(recipe)),
        soft_weight=recipe.prompts.misspelling_weight,
        preserve=tuple(preserve_prompts(recipe)) if recipe.preserve.mode != "none" else (),
        captions=tuple(preserve_captions(recipe)),
        caption_weight=recipe.preserve.caption_weight,
        token_policy=recipe.solver.token_policy,
        surplus=recipe.solver.surplus,
        te_site=recipe.text_encoder.site,
        te_first_layer=recipe.text_encoder.first_layer,
        te_depth=recipe.text_encoder.depth,
        te_target_mode=recipe.text_encoder.target_mode,
        pooled=recipe.text_encoder.pooled,
        preserve_mode=recipe.preserve.mode,
        preserve_weight=recipe.preserve.weight,
        rank_rtol=recipe.solver.rank_rtol,
        ridge=recipe.solver.ridge,
        residual_tol=recipe.solver.residual_tol,
        strict=recipe.solver.strict,
        uce_lam=recipe.uce.lam,
        uce_erase_scale=recipe.uce.erase_scale,
        uce_preserve_scale=recipe.uce.preserve_scale,
        factor_dtype=DTYPES[recipe.adapter.dtype],
    )


# ----------------------------------------------------------------------------- base model
@dataclass
class LoadedBase:
    model: object  # EditModel
    ref: BaseModelRef  # with the revision resolved to a commit for Hub ids
    license: str | None = None  # the base model's licence, from its model card


def check_device(device: str) -> None:
    """A clear error for a device that does not exist here (before anything is loaded)."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise EraseProError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EraseProError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise EraseProError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def load_base(recipe: Recipe, *, device: str = "cpu") -> LoadedBase:
    """Load what the solver needs of the recipe's base model."""
    from .models.loading import DTYPES, load_builtin, load_edit_model, read_card_license

    check_device(device)
    ref = recipe.base_model
    dtype = DTYPES[recipe.solver.dtype]
    if ref.kind == "builtin":
        _, model = load_builtin(ref.builtin_name, dtype=dtype, device=device)
        return LoadedBase(model, ref, license=BUILTIN_LICENSE)
    if ref.kind == "local":
        model = load_edit_model(ref.id, dtype=dtype, device=device)
        return LoadedBase(model, ref, license=read_card_license(Path(ref.id).expanduser()))
    from .hub.download import download_base_model

    folder, sha = download_base_model(ref.id, ref.revision)
    model = load_edit_model(folder, dtype=dtype, device=device, source=f"{ref.id}@{sha[:12]}")
    return LoadedBase(model, BaseModelRef(id=ref.id, revision=sha), license=read_card_license(folder))


def resolve_recipe(recipe: Recipe, ref: BaseModelRef) -> Recipe:
    """The recipe as it is recorded: the base pinned to ``ref`` and every template it uses spelled out."""
    data = to_data(recipe)
    data["base_model"] = to_data(ref)
    data["prompts"]["templates"] = prompt_templates(recipe)
    return Recipe.model_validate(data)


# ----------------------------------------------------------------------------- compute
@dataclass
class Computation:
    """A recipe solved: the resolved recipe, the model, the solution and the deltas as they are stored."""

    recipe: Recipe
    base: LoadedBase
    solution: object  # ErasureSolution
    stored: dict[str, LowRankDelta]

    @property
    def model(self):
        return self.base.model


def stored_deltas(deltas: dict[str, LowRankDelta], fmt: str, dtype: torch.dtype) -> dict[str, LowRankDelta]:
    """The deltas exactly as the adapter file holds them (format and dtype applied)."""
    out = {}
    for key, delta in deltas.items():
        if delta.rank == 0:
            continue
        out[key] = (dense_as_lora(delta) if fmt == "dense" else delta).to(dtype)
    return out


def compute(
    recipe: Recipe, *, device: str = "cpu", progress: Callable[[str], None] | None = None, base: LoadedBase | None = None
) -> Computation:
    """Solve a recipe. ``base`` reuses an already loaded base model."""
    from .models.loading import DTYPES
    from .models.progressive import solve_erasure

    if isinstance(recipe, Manifest):
        recipe = recipe.recipe()
    plan = plan_from_recipe(recipe)
    base = base or load_base(recipe, device=device)
    resolved = resolve_recipe(recipe, base.ref)
    solution = solve_erasure(base.model, plan, progress=progress)
    stored = stored_deltas(solution.deltas, recipe.adapter.format, DTYPES[recipe.adapter.dtype])
    return Computation(resolved, base, solution, stored)


def compute_metrics(comp: Computation) -> dict:
    from .evaluate.features import feature_metrics

    recipe = comp.recipe
    metrics = feature_metrics(
        comp.model,
        comp.stored,
        pairs=training_pairs(recipe),
        token_policy=recipe.solver.token_policy,
        surplus=recipe.solver.surplus,
        heldout=heldout_pairs(recipe),
        preserve=drift_prompts(recipe),
    )
    metrics["method"] = recipe.method
    metrics["n_prompt_pairs"] = comp.solution.n_pairs
    metrics["n_constrained_tokens"] = comp.solution.n_constrained_tokens
    return metrics


def _site_records(comp: Computation) -> list[SiteRecord]:
    records = []
    norms = {}
    for site in comp.solution.sites:
        weight = comp.model.weight(site.key)
        norms[site.key] = float(torch.linalg.norm(weight.double()))
        r = site.report
        records.append(
            SiteRecord(
                name=site.key,
                stage=site.stage,
                shape=list(site.delta.shape),
                rank=r.rank,
                update_rank=r.update_rank,
                n_constraints=r.n_constraints,
                residual=r.residual,
                preserve_residual=r.preserve_residual,
                condition=r.condition if r.rank else 0.0,
                delta_norm=r.delta_norm,
                delta_norm_rel=r.delta_norm / norms[site.key] if norms[site.key] else 0.0,
            )
        )
    return records


def _fingerprints(comp: Computation) -> dict[str, dict[str, str]]:
    """Every weight the solve read (stored update or not): the erasure is only valid on these."""
    return {site.key: weight_fingerprints(comp.model.weight(site.key)) for site in comp.solution.sites}


def _regenerate_atol(deltas: dict[str, LowRankDelta]) -> float:
    largest = max((float(d.dense().abs().max()) for d in deltas.values() if d.rank), default=0.0)
    return max(REGENERATE_RTOL * largest, 1e-12)


def _provenance(comp: Computation, command: list[str] | None, device: str) -> Provenance:
    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libraries[name] = "not installed"
    return Provenance(
        tool_version=__version__,
        python=platform.python_version(),
        platform=platform.platform(),
        device=device,
        libraries=libraries,
        command=list(command) if command is not None else ["erasepro_hub.erase()"],
        created_at=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        solve_seconds=round(comp.solution.seconds, 4),
    )


def build_manifest(comp: Computation, files: dict[str, str], metrics: dict, provenance: Provenance) -> Manifest:
    outputs = Outputs(
        recipe_sha256=recipe_sha256(comp.recipe),
        family=comp.model.family,
        base_license=comp.base.license,
        adapter_file=ADAPTER_FILE,
        files=files,
        base_fingerprints=_fingerprints(comp),
        sites=_site_records(comp),
        regenerate_atol=_regenerate_atol(comp.stored),
    )
    data = to_data(comp.recipe)
    data.update(outputs=to_data(outputs), metrics=metrics, provenance=to_data(provenance))
    return Manifest.model_validate(data)


def write_folder(
    comp: Computation,
    out: str | Path,
    *,
    overwrite: bool = False,
    command: list[str] | None = None,
    device: str = "cpu",
) -> Path:
    """Write the erasure folder atomically (adapter, metrics, manifest, card)."""
    from .models.loading import DTYPES

    recipe = comp.recipe
    metrics = compute_metrics(comp)
    rhash = recipe_sha256(recipe)
    with atomic_folder(out, overwrite=overwrite) as tmp:
        files = {
            ADAPTER_FILE: save_adapter(
                tmp / ADAPTER_FILE,
                comp.stored,
                recipe_sha256=rhash,
                version=__version__,
                fmt=recipe.adapter.format,
                dtype=DTYPES[recipe.adapter.dtype],
            )
        }
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
        files[METRICS_FILE] = file_sha256(tmp / METRICS_FILE)
        manifest = build_manifest(comp, files, metrics, _provenance(comp, command, device))
        (tmp / MANIFEST_FILE).write_text(dump_yaml(manifest), encoding="utf-8")
        write_card(tmp, manifest)
    return Path(out)


def update_folder(folder: str | Path, manifest: Manifest, metrics: dict) -> Path:
    """Replace an erasure folder's metrics (metrics.json, the manifest, the card), atomically.

    The adapter and the recipe are untouched; ``outputs.files`` gets the new hash of metrics.json.
    """
    import shutil

    folder = Path(folder)
    assert manifest.outputs is not None
    with atomic_folder(folder, overwrite=True) as tmp:
        for item in folder.iterdir():
            if item.name in (METRICS_FILE, MANIFEST_FILE, "README.md") or item.suffix == ".png" and item.name != "samples.png":
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
        data = to_data(manifest)
        data["outputs"]["files"][METRICS_FILE] = file_sha256(tmp / METRICS_FILE)
        data["metrics"] = metrics
        updated = Manifest.model_validate(data)
        (tmp / MANIFEST_FILE).write_text(dump_yaml(updated), encoding="utf-8")
        write_card(tmp, updated)
    return folder


def default_out(recipe: Recipe, manifest_path: str | Path | None) -> Path:
    name = recipe.name or (Path(manifest_path).stem if manifest_path else "erasure")
    return Path("erasures") / name


def erase(
    manifest: str | Path | Recipe,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    command: list[str] | None = None,
) -> Path:
    """Run an erasure from a manifest (path or object) and write its folder; returns the folder.

    Nothing is written unless everything succeeds; an existing ``out`` is refused
    unless ``overwrite``.
    """
    path = None
    if not isinstance(manifest, Recipe):
        path = manifest
        manifest = load_manifest(manifest)
    recipe = manifest.recipe() if isinstance(manifest, Manifest) else manifest
    out = Path(out) if out is not None else default_out(recipe, path)
    check_output(out, overwrite=overwrite)
    comp = compute(recipe, device=device, progress=progress)
    return write_folder(comp, out, overwrite=overwrite, command=command, device=device)


# ----------------------------------------------------------------------------- regenerate
@dataclass
class RegenerateReport:
    folder: Path
    max_abs_diff: float
    atol: float
    per_site: dict[str, float]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and self.max_abs_diff <= self.atol


def compare_deltas(stored: dict[str, LowRankDelta], fresh: dict[str, LowRankDelta]) -> tuple[dict[str, float], list[str]]:
    """Max abs difference of ``B A`` per site, and the sites present on one side only."""
    problems = []
    missing = sorted(set(stored) - set(fresh))
    extra = sorted(set(fresh) - set(stored))
    if missing:
        problems.append(f"the stored adapter has sites the recipe does not produce: {', '.join(missing[:3])}")
    if extra:
        problems.append(f"the recipe produces sites the stored adapter lacks: {', '.join(extra[:3])}")
    diffs = {}
    for key in sorted(set(stored) & set(fresh)):
        a, b = stored[key], fresh[key]
        if a.shape != b.shape:
            problems.append(f"{key}: stored shape {a.shape}, regenerated {b.shape}")
            continue
        diffs[key] = float((a.dense() - b.dense()).abs().max())
    return diffs, problems


def _local(folder: str | Path) -> Path:
    """A folder, or a Hub reference ``user/name[@revision]`` downloaded (and checked) first."""
    if isinstance(folder, str):
        from .hub.publish import fetch_verified, looks_like_repo, parse_ref

        if looks_like_repo(folder):
            folder, _ = fetch_verified(*parse_ref(folder))
    return Path(folder)


def regenerate(
    folder: str | Path,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
    command: list[str] | None = None,
) -> Path:
    """Recompute an erasure from ``folder/erasepro.yaml`` (or a manifest file) and write it to ``out``.

    ``folder`` may also be a Hub reference ``user/name[@revision]``: that commit is downloaded first.
    Returns the new folder (default: ``<folder>-regenerated`` beside it).
    """
    folder = _local(folder)
    manifest = load_manifest(folder / MANIFEST_FILE if folder.is_dir() else folder)
    out = Path(out) if out is not None else folder.with_name(folder.name + "-regenerated")
    check_output(out, overwrite=overwrite)
    comp = compute(manifest.recipe(), device=device, progress=progress)
    return write_folder(comp, out, overwrite=overwrite, command=command, device=device)


def verify(
    folder: str | Path,
    *,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> RegenerateReport:
    """Check an erasure folder against its manifest alone.

    ``folder`` may also be a Hub reference ``user/name[@revision]``. Checks the file hashes and the recipe
    hash, recomputes the deltas and the base-weight fingerprints, and compares them with the stored ones.
    """
    opened = open_folder(_local(folder))
    manifest = opened.manifest
    assert manifest.outputs is not None
    recipe = manifest.recipe()
    if recipe.base_model.kind == "hub" and (recipe.base_model.revision is None or len(recipe.base_model.revision) != 40):
        raise VerificationError("the manifest does not pin the base model to a commit; it cannot be verified")
    comp = compute(recipe, device=device, progress=progress)
    per_site, problems = compare_deltas(opened.adapter.deltas, comp.stored)
    fingerprints = _fingerprints(comp)
    for key, prints in fingerprints.items():
        recorded = manifest.outputs.base_fingerprints.get(key, {})
        for dtype, value in prints.items():
            if recorded.get(dtype) != value:
                problems.append(f"the base weights of {key} ({dtype}) differ from the fingerprint recorded at erase time")
                break
    worst = max(per_site.values(), default=0.0)
    return RegenerateReport(opened.path, worst, manifest.outputs.regenerate_atol, per_site, problems)
