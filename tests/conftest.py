"""Shared fixtures. Tests are offline and CPU-only: no Hub, no GPU, models built in code."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "manifests" / "demo.yaml"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


def _erase(tmp_path_factory, name: str, edit=None) -> Path:
    import yaml

    from erasepro_hub.cli import main

    data = yaml.safe_load(DEMO.read_text())
    if edit:
        edit(data)
    root = tmp_path_factory.mktemp(name)
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    out = root / "out"
    assert main(["erase", str(manifest), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory) -> Path:
    """``erasepro erase manifests/demo.yaml`` (builtin:tiny-sd), run once per session."""
    from erasepro_hub.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["erase", str(DEMO), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def demo_xl_folder(tmp_path_factory) -> Path:
    """The demo manifest on builtin:tiny-sdxl."""
    return _erase(tmp_path_factory, "demo-xl", lambda d: d["base_model"].update(id="builtin:tiny-sdxl"))


@pytest.fixture(scope="session")
def demo_uce_folder(tmp_path_factory) -> Path:
    """The demo manifest solved with the UCE baseline."""
    return _erase(tmp_path_factory, "demo-uce", lambda d: d.update(method="uce"))


@pytest.fixture(scope="session")
def erase_variant(tmp_path_factory):
    """Erase the demo manifest with an edit applied: ``erase_variant("name", fn)``."""
    return lambda name, edit: _erase(tmp_path_factory, name, edit)
