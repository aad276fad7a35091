"""Back from a folder to its recipe: :func:`regenerate` recomputes an erasure from its manifest alone,
:func:`verify` checks a folder (file hashes, recipe hash, base fingerprints) and compares the recomputed
deltas with the stored ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .adapters.fingerprint import check_fingerprints
from .adapters.folder import open_folder
from .erase import compute, compute_metrics
from .errors import BaseMismatchError, VerificationError
from .fsutil import check_output
from .manifest import load_manifest
from .output import write_folder
from .solver import LowRankDelta


#: ``--verify`` accepts a max abs difference of this fraction of the largest regenerated |ΔW| entry, by the
#: adapter's dtype: float32 feature differences between machines, thread counts and devices stay far
#: below it (about one unit in the last place of a half-precision factor for float16/bfloat16); a changed
#: recipe setting moves ΔW by orders of magnitude more. Accelerators get ten times the CPU's allowance.
#: The tolerance is the code's, never the folder's: a folder cannot loosen its own check.
REGENERATE_RTOL = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


def regenerate_tolerance(deltas: dict[str, LowRankDelta], dtype: str, device: str = "cpu") -> float:
    """The max abs difference ``--verify`` accepts for these (regenerated) deltas in the adapter's ``dtype``."""
    largest = max((float(d.dense().abs().max()) for d in deltas.values() if d.rank), default=0.0)
    scale = 1.0 if str(device).startswith("cpu") else 10.0
    return max(REGENERATE_RTOL[dtype] * scale * largest, 1e-12)


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
        from .hub.client import looks_like_repo, parse_ref
        from .hub.pull import fetch_verified

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
    manifest = load_manifest(folder)  # a manifest file, or the folder holding one
    out = Path(out) if out is not None else folder.with_name(folder.name + "-regenerated")
    check_output(out, overwrite=overwrite)
    comp = compute(manifest.recipe(), device=device, progress=progress)
    return write_folder(comp, compute_metrics(comp), out, overwrite=overwrite, command=command, device=device)


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
    recorded = manifest.outputs.base_fingerprints
    read = {site.key for site in comp.solution.sites} | set(recorded)
    try:
        check_fingerprints(
            {key: comp.model.weight(key) for key in sorted(read)}, recorded, recipe.base_model.id,
            fix="which is what the manifest pins: the weights at that revision are not the ones recorded at erase time",
        )
    except BaseMismatchError as exc:
        problems.append(str(exc))
    worst = max(per_site.values(), default=0.0)
    atol = regenerate_tolerance(comp.stored, recipe.adapter.dtype, device)
    return RegenerateReport(opened.path, worst, atol, per_site, problems)
