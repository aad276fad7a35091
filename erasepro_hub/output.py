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
from .adapters.folder import manifest_sha256
from .adapters.lora import (
    ADAPTER_FILE,
    HEADER_MANIFEST,
    file_sha256,
    save_adapter,
    write_safetensors,
)
from .cards import write_card
from .computation import Computation
from .fsutil import atomic_folder
from .layout import CARD_FILE, MANIFEST_FILE, METRICS_FILE, SAMPLES_FILE
from .manifest import Manifest, Outputs, Provenance, SiteRecord, dump_yaml, recipe_sha256, to_data


LIBRARIES = ("torch", "diffusers", "transformers", "safetensors", "pydantic", "huggingface_hub")


def _site_records(comp: Computation) -> list[SiteRecord]:
    """One record per solved site; ``update_rank`` is the rank the adapter stores (not the solver's column count)."""
    ranks = comp.update_ranks
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
                constraint_rank=r.constraint_rank,
                update_rank=ranks[site.key],
                n_constraints=r.n_constraints,
                residual=r.residual,
                preserve_residual=r.preserve_residual,
                condition=r.condition if r.constraint_rank else 0.0,
                delta_norm=r.delta_norm,
                delta_norm_rel=r.delta_norm / norms[site.key] if norms[site.key] else 0.0,
            )
        )
    return records


def base_fingerprints(comp: Computation) -> dict[str, dict[str, str]]:
    """Every weight the solve read (stored update or not): the erasure is only valid on these."""
    return {site.key: weight_fingerprints(comp.model.weight(site.key)) for site in comp.solution.sites}


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
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
        metrics_sha = file_sha256(tmp / METRICS_FILE)
        # the adapter's header records the hash of the manifest, which records the adapter's sha256:
        # the manifest hash leaves the adapter's own entry out, so it is taken before the adapter is written
        manifest = build_manifest(comp, {METRICS_FILE: metrics_sha}, metrics, _provenance(comp, command, device))
        adapter_sha = save_adapter(
            tmp / ADAPTER_FILE,
            comp.stored,
            recipe_sha256=rhash,
            version=__version__,
            fmt=recipe.adapter.format,
            dtype=DTYPES[recipe.adapter.dtype],
            manifest_sha256=manifest_sha256(manifest),
            as_stored=True,
        )
        manifest = _with_files(manifest, {ADAPTER_FILE: adapter_sha, METRICS_FILE: metrics_sha})
        (tmp / MANIFEST_FILE).write_text(dump_yaml(manifest), encoding="utf-8")
        write_card(tmp, manifest)
    return Path(out)


def _with_files(manifest: Manifest, files: dict[str, str]) -> Manifest:
    data = to_data(manifest)
    data["outputs"]["files"] = files
    return Manifest.model_validate(data)


def _restamp_adapter(src: Path, dst: Path, manifest: Manifest) -> str:
    """Copy an adapter file with its header's manifest hash replaced (tensors byte for byte); its sha256."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    metadata[HEADER_MANIFEST] = manifest_sha256(manifest)
    write_safetensors(dst, tensors, metadata)
    return file_sha256(dst)


def update_folder(folder: str | Path, manifest: Manifest, metrics: dict) -> Path:
    """Replace an erasure folder's metrics (metrics.json, the manifest, the card), atomically.

    The recipe and the adapter's tensors are untouched; ``outputs.files`` gets the new hash of metrics.json,
    and the adapter's header the new manifest hash (so the adapter file's sha256 changes too).
    """
    import shutil

    folder = Path(folder)
    assert manifest.outputs is not None
    adapter = manifest.outputs.adapter_file
    with atomic_folder(folder, overwrite=True) as tmp:
        for item in folder.iterdir():
            skipped = (METRICS_FILE, MANIFEST_FILE, CARD_FILE, adapter)
            if item.name in skipped or item.suffix == ".png" and item.name != SAMPLES_FILE:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
        data = to_data(manifest)
        data["outputs"]["files"][METRICS_FILE] = file_sha256(tmp / METRICS_FILE)
        if (tmp / SAMPLES_FILE).is_file():  # the image grid of `eval --images`: published, so hashed
            data["outputs"]["files"][SAMPLES_FILE] = file_sha256(tmp / SAMPLES_FILE)
        data["metrics"] = metrics
        updated = Manifest.model_validate(data)
        files = dict(updated.outputs.files)
        files[adapter] = _restamp_adapter(folder / adapter, tmp / adapter, updated)
        updated = _with_files(updated, files)
        (tmp / MANIFEST_FILE).write_text(dump_yaml(updated), encoding="utf-8")
        write_card(tmp, updated)
    return folder
