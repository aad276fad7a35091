"""The adapter folder (docs/design.md §4.1) and the checks every reader runs before trusting it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import AdapterFormatError, UnsafePathError, VerificationError
from ..layout import MANIFEST_FILE
from ..manifest import Manifest, canonical_json, earlier_forms, load_manifest, recipe_sha256s, to_data
from .lora import AdapterFile, file_sha256, read_adapter


def safe_relative(name: str) -> str:
    """A file name inside the folder: relative, no ``..``, no backslashes; else :class:`UnsafePathError`."""
    pure = PurePosixPath(name)
    if not name or "\\" in name or pure.is_absolute() or ".." in pure.parts or name.startswith("~"):
        raise UnsafePathError(f"file name {name!r} would leave the adapter folder; use a plain relative name")
    return name


@dataclass(frozen=True)
class ErasureFolder:
    path: Path
    manifest: Manifest
    adapter: AdapterFile

    @property
    def adapter_path(self) -> Path:
        assert self.manifest.outputs is not None
        return self.path / self.manifest.outputs.adapter_file


def manifest_sha256(manifest: Manifest) -> str:
    """The hash the adapter's header records: recipe, outputs and metrics (not provenance).

    The adapter's own entry of ``outputs.files`` is left out (the file holds this hash); every other
    file of the folder is covered through its recorded sha256.
    """
    return manifest_sha256s(manifest)[0]


def manifest_sha256s(manifest: Manifest) -> list[str]:
    """:func:`manifest_sha256`, then the hash each earlier tool took of the same manifest."""
    data = to_data(manifest)
    data.pop("provenance", None)
    outputs = data.get("outputs") or {}
    files = dict(outputs.get("files") or {})
    files.pop(outputs.get("adapter_file"), None)
    data["outputs"] = {**outputs, "files": files}
    return [hashlib.sha256(canonical_json(form)).hexdigest() for form in earlier_forms(data)]


def recorded_sites(manifest: Manifest) -> set[str]:
    """The sites the manifest says hold an update (``outputs.sites`` with a non-zero stored rank)."""
    assert manifest.outputs is not None
    return {site.name for site in manifest.outputs.sites if site.update_rank}


def check_files(path: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists and has the recorded sha256."""
    outputs = manifest.outputs
    if outputs is None:
        raise AdapterFormatError(
            f"{path / MANIFEST_FILE} has no outputs section: it is a recipe, not a finished erasure "
            "(run `erasepro erase` on it)"
        )
    for name, expected in outputs.files.items():
        file = path / safe_relative(name)
        if not file.is_file():
            raise VerificationError(f"{file} is missing (the manifest lists it with sha256 {expected[:12]}…)")
        actual = file_sha256(file)
        if actual != expected:
            raise VerificationError(
                f"{file} was modified after it was written: sha256 {actual[:16]}… but the manifest records "
                f"{expected[:16]}…"
            )


def open_folder(path: str | Path) -> ErasureFolder:
    """Open an erasure folder, checking file hashes and that the manifest's recipe made the adapter."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFormatError(f"{path} is not an erasure folder (expected a folder holding {MANIFEST_FILE})")
    manifest = load_manifest(path / MANIFEST_FILE)
    check_files(path, manifest)
    assert manifest.outputs is not None
    adapter_name = safe_relative(manifest.outputs.adapter_file)
    if adapter_name not in manifest.outputs.files:
        raise AdapterFormatError(f"{path / MANIFEST_FILE}: outputs.files does not list the adapter {adapter_name}")
    adapter = read_adapter(path / adapter_name)
    recorded = manifest.outputs.recipe_sha256
    current, *earlier = recipe_sha256s(manifest)
    if recorded != current and recorded not in earlier:
        raise VerificationError(
            f"{path / MANIFEST_FILE} was edited after the erasure was made: its recipe hashes to "
            f"{current[:16]}…, outputs.recipe_sha256 says {recorded[:16]}…"
        )
    if adapter.recipe_sha256 != recorded:
        raise VerificationError(
            f"{path / adapter_name} was made from another recipe: its header says "
            f"{(adapter.recipe_sha256 or 'nothing')[:16]}…, the manifest {recorded[:16]}…"
        )
    whole, *earlier = manifest_sha256s(manifest)
    if adapter.manifest_sha256 != whole and adapter.manifest_sha256 not in earlier:
        raise VerificationError(
            f"{path / MANIFEST_FILE} does not match the adapter it describes: outputs or metrics were edited "
            f"(the manifest hashes to {whole[:16]}…, the adapter's header records "
            f"{(adapter.manifest_sha256 or 'nothing')[:16]}…); erase or pull the folder again"
        )
    sites = recorded_sites(manifest)
    unrecorded = sorted(set(adapter.deltas) - sites)
    if unrecorded:
        raise VerificationError(
            f"{path / adapter_name} holds {len(unrecorded)} site(s) the manifest does not record, first "
            f"{unrecorded[0]}; an adapter applies exactly the sites in outputs.sites"
        )
    missing = sorted(sites - set(adapter.deltas))
    if missing:
        raise VerificationError(f"{path / adapter_name} lacks the site {missing[0]} that outputs.sites records")
    return ErasureFolder(path, manifest, adapter)
