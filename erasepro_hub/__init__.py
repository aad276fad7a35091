"""erasepro_hub: closed-form concept erasure for Stable Diffusion, as verifiable adapters.

The public API is small and imported lazily, so ``import erasepro_hub`` (and the
command line's start-up) does not pay for torch, diffusers or transformers::

    from erasepro_hub import load_erasure, unload_erasure
    handle = load_erasure(pipe, "path/to/erasure")     # verified, then a diffusers LoRA adapter
    handle.remove()                                     # or unload_erasure(pipe) / pipe.unload_lora_weights()
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_erasure": "erasepro_hub.api",
    "unload_erasure": "erasepro_hub.api",
    "AppliedErasure": "erasepro_hub.api",
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
