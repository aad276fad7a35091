"""Adapter files (diffusers LoRA format), the erasure folder, and verified apply/undo.

Imports torch and safetensors only; a pipeline's own LoRA API (diffusers) is used when it has one.
"""

from ..layout import CARD_FILE, MANIFEST_FILE, METRICS_FILE
from .apply import AppliedAdapter, AppliedErasure, apply_deltas, load_erasure, resolve_site, unload_erasure
from .fingerprint import weight_fingerprint, weight_fingerprints
from .folder import ErasureFolder, open_folder
from .lora import ADAPTER_FILE, AdapterFile, file_sha256, read_adapter, save_adapter, to_state_dict

__all__ = [
    "ADAPTER_FILE",
    "CARD_FILE",
    "MANIFEST_FILE",
    "METRICS_FILE",
    "AdapterFile",
    "AppliedAdapter",
    "AppliedErasure",
    "ErasureFolder",
    "apply_deltas",
    "file_sha256",
    "load_erasure",
    "open_folder",
    "read_adapter",
    "resolve_site",
    "save_adapter",
    "to_state_dict",
    "unload_erasure",
    "weight_fingerprint",
    "weight_fingerprints",
]
