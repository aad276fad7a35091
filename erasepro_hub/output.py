"""The erasure folder on disk: write one atomically, or replace its metrics (docs/design.md §4.1)."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from importlib import metadata
from pathlib import Path

import torch

from . import __version__
from .adapters.fingerprint import weight_fingerprints
from .adapters.lora import ADAPTER_FILE, file_sha256, save_adapter
from .cards import write_card
from .computation import Computation
from .fsutil import atomic_folder
from .layout import CARD_FILE, MANIFEST_FILE, METRICS_FILE
from .manifest import Manifest, Outputs, Provenance, SiteRecord, dump_yaml, recipe_sha256, to_data
from .solver import LowRankDelta

#: ``regenerate --verify`` accepts a max abs difference of this fraction of the largest |ΔW| entry.
#: It covers float32 feature differences between machines, thread counts and devices; a changed
#: recipe setting moves ΔW by orders of magnitude more.
REGENERATE_RTOL = 1e-4

LIBRARIES = ("torch", "diffusers", "transformers", "safetensors", "pydantic", "huggingface_hub")


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


def base_fingerprints(comp: Computation) -> dict[str, dict[str, str]]:
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
        base_fingerprints=base_fingerprints(comp),
        sites=_site_records(comp),
        regenerate_atol=_regenerate_atol(comp.stored),
    )
    data = to_data(comp.recipe)
    data.update(outputs=to_data(outputs), metrics=metrics, provenance=to_data(provenance))
    return Manifest.model_validate(data)


def write_folder(
    comp: Computation,
    metrics: dict,
    out: str | Path,
    *,
    overwrite: bool = False,
    command: list[str] | None = None,
    device: str = "cpu",
) -> Path:
    """Write the erasure folder atomically (adapter, metrics, manifest, card)."""
    from .models.loading import DTYPES

    recipe = comp.recipe
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
            if item.name in (METRICS_FILE, MANIFEST_FILE, CARD_FILE) or item.suffix == ".png" and item.name != "samples.png":
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
