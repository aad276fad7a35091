"""Adapter files (diffusers LoRA format), the erasure folder, and verified apply/undo.

Imports torch and safetensors only; diffusers is never needed to read or apply an adapter.
"""

from ..layout import CARD_FILE, MANIFEST_FILE, METRICS_FILE
from .apply import AppliedAdapter, apply_deltas, load_adapter, resolve_site, unload_adapter
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
    "ErasureFolder",
    "apply_deltas",
    "file_sha256",
    "load_adapter",
    "open_folder",
    "read_adapter",
    "resolve_site",
    "save_adapter",
    "to_state_dict",
    "unload_adapter",
    "weight_fingerprint",
    "weight_fingerprints",
]
