"""From a manifest to a finished erasure folder.

:func:`compute` turns a recipe into deltas (load the base, build prompts, run the progressive driver);
:func:`compute_metrics` measures them; :func:`erase` writes the folder of docs/design.md §4.1 through
:mod:`.output`. Regenerating and verifying a folder is :mod:`.verification`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters.lora import store_site
from .computation import LOADING_STEP, SOLVING_STEP, Computation, LoadedBase, Progress, ProgressCallback
from .errors import EraseProError
from .fsutil import check_output
from .manifest import BaseModelRef, Manifest, Recipe, load_manifest
from .recipe import drift_prompts, heldout_pairs, plan_from_recipe, resolve_recipe, training_pairs
from .solver import LowRankDelta

#: The embedded models are built in code by this project.
BUILTIN_LICENSE = "apache-2.0"


# ----------------------------------------------------------------------------- base model
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


# ----------------------------------------------------------------------------- compute
def compute(
    recipe: Recipe, *, device: str = "cpu", progress: ProgressCallback | None = None, base: LoadedBase | None = None
) -> Computation:
    """Solve a recipe. ``base`` reuses an already loaded base model.

    ``progress(stage)`` is called as each stage is solved; a :class:`~erasepro_hub.computation.Progress`
    also hears ``start(LOADING_STEP)`` before the base model is loaded and ``start(SOLVING_STEP, n)``
    with the number of stages before the first is solved.
    """
    from .models.loading import DTYPES
    from .models.progressive import solve_erasure

    if isinstance(recipe, Manifest):
        recipe = recipe.recipe()
    plan = plan_from_recipe(recipe)
    start = progress.start if isinstance(progress, Progress) else None
    if base is None:
        if start is not None:
            start(LOADING_STEP)
        base = load_base(recipe, device=device)
    resolved = resolve_recipe(recipe, base.ref)
    stages = (lambda n: start(SOLVING_STEP, n)) if start is not None else None
    fmt, dtype = recipe.adapter.format, DTYPES[recipe.adapter.dtype]
    ranks: dict[str, int] = {}

    def keep(key: str, delta: LowRankDelta) -> LowRankDelta:
        # the form the file stores, as each site is solved: the float64 updates are not all held to the end
        site = store_site(delta, fmt, dtype)
        ranks[key] = site.update_rank
        return site.delta

    solution = solve_erasure(base.model, plan, progress=progress, stages=stages, keep=keep)
    stored = {key: delta for key, delta in solution.deltas.items() if delta.rank}
    return Computation(resolved, base, solution, stored, ranks)


def compute_metrics(comp: Computation) -> dict:
    """The feature metrics of a computation, with the adapter as stored (docs/design.md §5)."""
    from .metrics.features import feature_metrics

    recipe = comp.recipe
    metrics = feature_metrics(
        comp.model,
        comp.stored,
        pairs=training_pairs(recipe),
        token_policy=recipe.solver.token_policy,
        surplus=recipe.solver.surplus,
        heldout=heldout_pairs(recipe),
        preserve=drift_prompts(recipe),
        known=comp.solution.original_embeddings,
    )
    metrics["method"] = recipe.method
    metrics["n_prompt_pairs"] = comp.solution.n_pairs
    metrics["n_constrained_tokens"] = comp.solution.n_constrained_tokens
    return metrics


def default_out(recipe: Recipe, manifest_path: str | Path | None) -> Path:
    name = recipe.name or (Path(manifest_path).stem if manifest_path else "erasure")
    return Path("erasures") / name


def erase(
    manifest: str | Path | Recipe,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    command: list[str] | None = None,
) -> Path:
    """Run an erasure from a manifest (path or object) and write its folder; returns the folder.

    ``progress`` hears each solved stage (and, as for :func:`compute`, each step as it begins).

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
    from .output import write_folder

    comp = compute(recipe, device=device, progress=progress)
    return write_folder(comp, compute_metrics(comp), out, overwrite=overwrite, command=command, device=device)
