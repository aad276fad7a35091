"""Applying an erasure to a loaded pipeline, verified, and undoing it.

``load_adapter`` checks everything before it touches the pipeline: file hashes,
that the manifest's recipe made the adapter, that every site exists with the
right shape, and (unless ``verify_base=False``) that the pipeline's weights are
the ones the erasure was computed from. Then it either

* adds ``ΔW x`` with forward hooks (``fuse=False``, the default; undo removes the
  hooks and the weights were never touched), or
* fuses: ``W ← W + B A`` computed in float64 and cast once (zero inference
  overhead); the original weights are kept, so undo restores them bit for bit.

Plain diffusers works too: ``pipe.load_lora_weights(folder,
weight_name="pytorch_lora_weights.safetensors")`` — without these checks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import BaseMismatchError
from ..naming import get_module, split_key
from ..solver import LowRankDelta
from .fingerprint import check_fingerprints
from .folder import ErasureFolder, open_folder

_REGISTRY: "weakref.WeakKeyDictionary[Any, list[AppliedAdapter]]" = weakref.WeakKeyDictionary()


def _linear(module: nn.Module) -> nn.Module:
    """The plain linear layer (unwraps a PEFT LoRA layer's ``base_layer``)."""
    return getattr(module, "base_layer", module)


def resolve_site(target: Any, key: str) -> nn.Module:
    """The linear layer a site key names on a pipeline (or any object with the components as attributes)."""
    component, path = split_key(key)
    root = getattr(target, component, None)
    if not isinstance(root, nn.Module):
        raise BaseMismatchError(f"adapter site {key}: the pipeline has no {component}; it was made for another model family")
    try:
        module = _linear(get_module(root, path))
    except KeyError:
        raise BaseMismatchError(
            f"adapter site {key}: {component} has no module {path}; the adapter was made for another architecture"
        ) from None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise BaseMismatchError(f"adapter site {key} is not a linear layer in this pipeline")
    return module


def check_shapes(modules: Mapping[str, nn.Module], deltas: Mapping[str, LowRankDelta]) -> None:
    for key, delta in deltas.items():
        shape = tuple(modules[key].weight.shape)
        if shape != delta.shape:
            raise BaseMismatchError(
                f"adapter site {key} expects a weight of shape {delta.shape}, the pipeline's is {shape}: "
                "the adapter was made for another base model"
            )


@dataclass(eq=False)
class AppliedAdapter:
    """An erasure applied to a pipeline; :meth:`remove` undoes it exactly."""

    target: Any
    modules: dict[str, nn.Module]
    deltas: dict[str, LowRankDelta]
    fused: bool
    source: str = ""
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _handles: list = field(default_factory=list, repr=False)
    active: bool = True

    def remove(self) -> None:
        """Undo: remove the hooks, or restore the original weights bit for bit. Idempotent."""
        if not self.active:
            return
        for handle in self._handles:
            handle.remove()
        with torch.no_grad():
            for key, original in self._originals.items():
                self.modules[key].weight.copy_(original)
        self._handles.clear()
        self._originals.clear()
        self.active = False
        try:
            applied = _REGISTRY.get(self.target)
        except TypeError:  # the target cannot be weakly referenced (e.g. None)
            applied = None
        if applied and self in applied:
            applied.remove(self)


def _hook(delta: LowRankDelta, weight: torch.Tensor):
    """``y + ΔW x`` with the factors on the weight's device and in its dtype (as PEFT computes a LoRA layer)."""
    factors = LowRankDelta(delta.B.to(weight.device, weight.dtype), delta.A.to(weight.device, weight.dtype))

    def forward_hook(module, args, output):
        return output + factors.apply(args[0].to(weight.dtype))

    return forward_hook


def check_not_stacked(target: Any, keys: Iterable[str]) -> None:
    """Refuse sites that already carry an erasure or a LoRA adapter: applying again would add ``ΔW`` twice.

    Two kinds are seen: an erasure applied with :func:`load_adapter` (ours, still active), and the LoRA layers
    ``pipe.load_lora_weights`` installs (PEFT wrappers with a ``lora_A`` entry). A LoRA already fused into the
    weights is not visible here; the base-weight fingerprints catch it.
    """
    keys = list(keys)
    try:
        applied = [a for a in _REGISTRY.get(target, []) if a.active]
    except TypeError:  # the target cannot be weakly referenced
        applied = []
    for handle in applied:
        shared = sorted(set(keys) & set(handle.modules))
        if shared:
            raise BaseMismatchError(
                f"the pipeline already carries the erasure {handle.source or 'applied earlier'} on {shared[0]} "
                f"(and {len(shared) - 1} more sites); call .remove() on its handle or "
                "erasepro_hub.unload_adapter(pipe) before loading another"
            )
    for key in keys:
        component, path = split_key(key)
        root = getattr(target, component, None)
        try:
            module = get_module(root, path) if isinstance(root, nn.Module) else None
        except KeyError:
            continue
        names = list(getattr(module, "lora_A", None) or {})
        if names:
            raise BaseMismatchError(
                f"{key} already carries the LoRA adapter(s) {', '.join(map(repr, names))} "
                "(pipe.load_lora_weights); an erasure loaded twice is applied twice. Use one loader: call "
                "pipe.unload_lora_weights() first, or keep the diffusers-loaded one"
            )


@torch.no_grad()
def apply_deltas(
    target: Any,
    modules: Mapping[str, nn.Module],
    deltas: Mapping[str, LowRankDelta],
    *,
    fuse: bool = False,
    source: str = "",
) -> AppliedAdapter:
    """Apply ``deltas`` to the given linear ``modules`` (shapes are checked first)."""
    modules = {key: modules[key] for key in deltas}
    check_shapes(modules, deltas)
    applied = AppliedAdapter(target, dict(modules), dict(deltas), fuse, source)
    for key, delta in deltas.items():
        module = modules[key]
        if fuse:
            weight = module.weight
            applied._originals[key] = weight.detach().clone()
            update = delta.dense(torch.float64).to(weight.device)
            weight.copy_((weight.double() + update).to(weight.dtype))
        else:
            applied._handles.append(module.register_forward_hook(_hook(delta, module.weight)))
    try:
        _REGISTRY.setdefault(target, []).append(applied)
    except TypeError:  # target cannot be weakly referenced; undo still works through the handle
        pass
    return applied


def load_adapter(pipe: Any, path: str | Path, *, fuse: bool = False, verify_base: bool = True, source: str | None = None) -> AppliedAdapter:
    """Apply a local erasure folder to a diffusers pipeline, verified; returns a handle whose ``remove()`` undoes it.

    (``erasepro_hub.load_adapter`` also takes a Hub repository and a revision; it downloads and checks
    that commit, then calls this.)

    Args:
        pipe: a loaded ``StableDiffusion[XL]Pipeline`` (or any object with ``unet``/``text_encoder`` attributes).
        path: an erasure folder written by ``erasepro erase``.
        fuse: add ``B A`` into the weights (no inference overhead) instead of using forward hooks.
        verify_base: compare the pipeline's weights with the fingerprints recorded at erase time and refuse a
            mismatch; ``False`` skips only this check.
        source: what ``applied.source`` names (default: the path).

    Raises:
        VerificationError: a file was modified, or the manifest was edited after the erasure was made.
        BaseMismatchError: the pipeline lacks a site, has other shapes, or (``verify_base``) other weights.
        AdapterFormatError, ManifestError: the folder is not a readable erasure.
    """
    folder: ErasureFolder = open_folder(path)  # also refuses adapter sites the manifest does not record
    deltas = folder.adapter.deltas
    modules = {key: resolve_site(pipe, key) for key in deltas}
    check_not_stacked(pipe, deltas)
    check_shapes(modules, deltas)
    if verify_base:
        manifest = folder.manifest
        assert manifest.outputs is not None
        base = manifest.base_model.id + (f"@{manifest.base_model.revision}" if manifest.base_model.revision else "")
        # every weight the solve read, also where nothing is stored (the update there was zero)
        recorded = manifest.outputs.base_fingerprints
        checked = {key: (modules[key] if key in modules else resolve_site(pipe, key)).weight for key in recorded}
        check_fingerprints(checked, recorded, base)
    return apply_deltas(pipe, modules, deltas, fuse=fuse, source=source or str(path))


def unload_adapter(pipe: Any) -> int:
    """Undo every erasure applied to ``pipe`` with :func:`load_adapter`, newest first; returns how many."""
    applied = list(_REGISTRY.get(pipe, []))
    for handle in reversed(applied):
        handle.remove()
    return len(applied)
