"""erasepro_hub: closed-form concept erasure for Stable Diffusion, as verifiable adapters.

The public API is small and imported lazily, so ``import erasepro_hub`` (and the
command line's start-up) does not pay for torch, diffusers or transformers::

    from erasepro_hub import load_adapter, unload_adapter
    handle = load_adapter(pipe, "path/to/erasure")     # verified against the base weights
    handle.remove()                                     # or unload_adapter(pipe)
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_adapter": "erasepro_hub.api",
    "unload_adapter": "erasepro_hub.api",
    "push": "erasepro_hub.api",
    "AppliedAdapter": "erasepro_hub.api",
    "erase": "erasepro_hub.erase",
    "regenerate": "erasepro_hub.verification",
    "verify": "erasepro_hub.verification",
    "load_manifest": "erasepro_hub.manifest",
    "Manifest": "erasepro_hub.manifest",
    "Recipe": "erasepro_hub.manifest",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'erasepro_hub' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
