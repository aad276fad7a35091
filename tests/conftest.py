"""Shared fixtures. Tests are offline and CPU-only: models are built in code, and the Hub is a local server.

The local Hub-compatible server starts here, on an ephemeral 127.0.0.1 port, *before* anything imports
huggingface_hub (which reads HF_ENDPOINT once at import): every Hub call of the suite — ours, diffusers',
the client's — goes to it, and nothing can reach huggingface.co.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

_HUB_ROOT = tempfile.mkdtemp(prefix="erasepro-test-hub-")
_HF_HOME = tempfile.mkdtemp(prefix="erasepro-test-hf-home-")
_CACHE = tempfile.mkdtemp(prefix="erasepro-test-cache-")  # caption summaries: never the user's cache

assert "huggingface_hub" not in sys.modules, "the test Hub must start before huggingface_hub is imported"
from erasepro_hub.testing.hub import DEFAULT_USERS, HubServer  # noqa: E402  (standard library + PyYAML only)

HUB = HubServer(_HUB_ROOT).start()
os.environ.update(
    HF_ENDPOINT=HUB.endpoint,
    HF_HOME=_HF_HOME,
    ERASEPRO_CACHE=_CACHE,
    HF_HUB_OFFLINE="0",
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    # downloads give up after 3 s (the local server answers in milliseconds; fault tests make it slower)
    HF_HUB_ETAG_TIMEOUT="3",
    HF_HUB_DOWNLOAD_TIMEOUT="3",
    TRANSFORMERS_VERBOSITY="error",
    DIFFUSERS_VERBOSITY="error",
)
os.environ.pop("HF_TOKEN", None)
atexit.register(
    lambda: (HUB.stop(), shutil.rmtree(_HUB_ROOT, True), shutil.rmtree(_HF_HOME, True), shutil.rmtree(_CACHE, True))
)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

TOKENS = {user: token for token, user in DEFAULT_USERS.items()}

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


@pytest.fixture(scope="session")
def hub() -> HubServer:
    """The local Hub (shared by the session; tests use their own repository names)."""
    return HUB


@pytest.fixture
def as_alice(monkeypatch):
    """Calls to the test Hub carry the token of the built-in user alice."""
    monkeypatch.setenv("HF_TOKEN", TOKENS["alice"])
    return TOKENS["alice"]


@pytest.fixture
def no_backoff(monkeypatch):
    """The client retries 5xx and network errors with 1–8 s waits; tests do not need to wait."""
    import huggingface_hub.utils._http as http

    monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
