"""Applying an erasure to a loaded pipeline, verified, and undoing it.

:func:`load_erasure` checks everything before it touches the pipeline: file hashes, both header
hashes, that the adapter holds exactly the recorded sites, that every site exists with the right
shape, that no erasure or LoRA layer already sits on those modules, and (unless
``verify_base=False``) that the pipeline's weights are the ones the erasure was computed from.
Then it applies the erasure

* through diffusers' own LoRA machinery wherever diffusers can load the file (SD 1.x/2.x/XL, SD 3 and FLUX.1
  with CLIP text encoders): ``pipe.load_lora_weights(folder, adapter_name=...)`` — the erasure is an
  adapter diffusers knows (``get_list_adapters``, ``set_adapters``, ``fuse_lora``,
  ``unload_lora_weights`` all see it); ``fuse=True`` fuses it at scale 1. Afterwards every site is
  checked to carry the adapter at scale 1, or the load is undone and refused;
* with forward hooks (``y + ΔW x``) only where diffusers cannot load the file — the package's BERT
  text encoders (``builtin:minilm-sd``); ``fuse=True`` there adds ``B A`` into the weights in float64.

Either way the handle's :meth:`AppliedErasure.remove` undoes it; fused weights are restored bit for
bit from a copy taken before fusing.

Why one module of this length: the checks, the two ways of applying and the undo share one registry
of applied erasures; splitting them would let a path skip a check the others run.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import AdapterFormatError, BaseMismatchError
from ..naming import get_module, split_key
from ..solver import LowRankDelta
from .fingerprint import check_fingerprints
from .folder import ErasureFolder, open_folder

_REGISTRY: "weakref.WeakKeyDictionary[Any, list[AppliedErasure]]" = weakref.WeakKeyDictionary()


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
class AppliedErasure:
    """An erasure applied to a pipeline; :meth:`remove` undoes it exactly.

    ``backend`` is ``"diffusers"`` (a LoRA adapter named ``adapter_name`` in diffusers' registry) or
    ``"hooks"`` (forward hooks, or fused weights, managed here).
    """

    target: Any
    modules: dict[str, nn.Module]
    deltas: dict[str, LowRankDelta]
    fused: bool
    source: str = ""
    backend: str = "hooks"
    adapter_name: str | None = None
    _originals: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _handles: list = field(default_factory=list, repr=False)
    _removed: bool = field(default=False, repr=False)

    @property
    def active(self) -> bool:
        """Still applied: not removed here, and (diffusers backend) still in the pipeline's adapter registry."""
        if self._removed:
            return False
        if self.backend == "diffusers" and self.adapter_name not in _adapter_names(self.target):
            # unloaded by diffusers; still applied if it was fused into the weights before that
            return any(not torch.equal(_linear(self.modules[k]).weight, w) for k, w in self._originals.items())
        return True

    def _merged(self) -> bool:
        for key in self.modules:
            component, path = split_key(key)
            try:
                wrapper = get_module(getattr(self.target, component), path)
            except (KeyError, AttributeError):
                continue
            if self.adapter_name in (getattr(wrapper, "merged_adapters", None) or []):
                return True
        return False

    def remove(self) -> None:
        """Undo: unfuse and delete the diffusers adapter, or remove the hooks; the sites' weights are put back
        bit for bit (also when the erasure was fused — by ``fuse=True`` or ``pipe.fuse_lora()`` — and then
        unloaded). A LoRA fused into the same modules after this erasure is undone with it.

        Idempotent; also safe after ``pipe.unload_lora_weights()`` removed the adapter already.
        """
        if self._removed:
            return
        if self.backend == "diffusers" and self.adapter_name in _adapter_names(self.target):
            if self._merged():  # fused by load_erasure(fuse=True) or by the user's pipe.fuse_lora()
                self.target.unfuse_lora()
            self.target.delete_adapters(self.adapter_name)
            if not _adapter_names(self.target):  # the last adapter: give the modules back their plain form
                self.target.unload_lora_weights()
        for handle in self._handles:
            handle.remove()
        with torch.no_grad():
            for key, original in self._originals.items():
                _linear(self.modules[key]).weight.copy_(original)
        self._handles.clear()
        self._originals.clear()
        self._removed = True
        try:
            applied = _REGISTRY.get(self.target)
        except TypeError:  # the target cannot be weakly referenced (e.g. None)
            applied = None
        if applied and self in applied:
            applied.remove(self)


#: The name the first release used; kept as an alias.
AppliedAdapter = AppliedErasure


def _adapter_names(pipe: Any) -> set[str]:
    """Every LoRA adapter name diffusers knows on ``pipe`` (empty for objects without the LoRA API)."""
    lister = getattr(pipe, "get_list_adapters", None)
    if lister is None:
        return set()
    return {name for names in lister().values() for name in names}


def _hook(delta: LowRankDelta, weight: torch.Tensor):
    """``y + ΔW x`` with the factors on the weight's device and in its dtype (as PEFT computes a LoRA layer)."""
    factors = LowRankDelta(delta.B.to(weight.device, weight.dtype), delta.A.to(weight.device, weight.dtype))

    def forward_hook(module, args, output):
        return output + factors.apply(args[0].to(weight.dtype))

    return forward_hook


def check_not_stacked(target: Any, keys: Iterable[str]) -> None:
    """Refuse sites that already carry an erasure or a LoRA adapter: applying again would add ``ΔW`` twice.

    Two kinds are seen: an erasure applied with :func:`load_erasure` (still active), and LoRA layers
    ``pipe.load_lora_weights`` installed (PEFT wrappers with a ``lora_A`` entry). A LoRA already fused into the
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
                "erasepro_hub.unload_erasure(pipe) before loading another (to erase several concepts at once, "
                "`erasepro combine` solves them jointly)"
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
) -> AppliedErasure:
    """Apply ``deltas`` to the given linear ``modules`` with hooks, or fused (shapes are checked first)."""
    modules = {key: modules[key] for key in deltas}
    check_shapes(modules, deltas)
    applied = AppliedErasure(target, dict(modules), dict(deltas), fuse, source)
    for key, delta in deltas.items():
        module = modules[key]
        if fuse:
            weight = module.weight
            applied._originals[key] = weight.detach().clone()
            update = delta.dense(torch.float64).to(weight.device)
            weight.copy_((weight.double() + update).to(weight.dtype))
        else:
            applied._handles.append(module.register_forward_hook(_hook(delta, module.weight)))
    _register(target, applied)
    return applied


def _register(target: Any, applied: AppliedErasure) -> None:
    try:
        _REGISTRY.setdefault(target, []).append(applied)
    except TypeError:  # target cannot be weakly referenced; undo still works through the handle
        pass


_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")


def valid_adapter_name(name: str) -> bool:
    """A name PEFT can hold: no dots, and not an attribute its ``ModuleDict`` containers already have."""
    return bool(_ADAPTER_NAME.fullmatch(name)) and not hasattr(nn.ModuleDict(), name)


def adapter_name_for(folder: ErasureFolder) -> str:
    """A diffusers adapter name from the erasure's name (prefixed where the name itself is not one PEFT takes)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", folder.manifest.name or folder.path.name or "erasure").strip("_")[:56]
    return name if valid_adapter_name(name) else f"erasure_{name}"


def _diffusers_can_load(pipe: Any, folder: ErasureFolder) -> bool:
    """SD 1.x/2.x/XL/3 and FLUX.1 erasures on a pipeline with diffusers' LoRA API; BERT text encoders are not loadable."""
    assert folder.manifest.outputs is not None
    return folder.manifest.outputs.family in ("sd1", "sd2", "sdxl", "sd3", "flux") and callable(getattr(pipe, "load_lora_weights", None))


@torch.no_grad()
def _load_with_diffusers(pipe: Any, folder: ErasureFolder, modules: dict[str, nn.Module], name: str, fuse: bool, source: str):
    """``pipe.load_lora_weights`` under ``name``, then check that every site carries it at scale 1 (else undo)."""
    assert folder.manifest.outputs is not None
    if name in _adapter_names(pipe):
        raise BaseMismatchError(f"the pipeline already has an adapter named {name!r}; pass another adapter_name")
    applied = AppliedErasure(pipe, dict(modules), dict(folder.adapter.deltas), False, source, "diffusers", name)
    # the weights as they are now: remove() puts them back whatever was fused in between (by us or the user)
    applied._originals = {key: _linear(m).weight.detach().clone() for key, m in modules.items()}
    try:
        pipe.load_lora_weights(str(folder.path), weight_name=folder.manifest.outputs.adapter_file, adapter_name=name)
        for key in folder.adapter.deltas:
            component, path = split_key(key)
            wrapper = get_module(getattr(pipe, component), path)
            lora_a = getattr(wrapper, "lora_A", None) or {}
            scaling = getattr(wrapper, "scaling", {}).get(name)
            if name not in lora_a or scaling != 1.0:
                raise BaseMismatchError(
                    f"diffusers did not load {key} as a LoRA layer at scale 1 (scale {scaling}); "
                    "this diffusers version cannot apply the erasure exactly"
                )
        if fuse:
            pipe.fuse_lora(adapter_names=[name], lora_scale=1.0)
            applied.fused = True
    except BaseException:
        applied.remove()
        raise
    _register(pipe, applied)
    return applied


def load_erasure(
    pipe: Any,
    path: str | Path,
    *,
    adapter_name: str | None = None,
    weight_name: str | None = None,
    fuse: bool = False,
    verify_base: bool = True,
    source: str | None = None,
) -> AppliedErasure:
    """Apply a local erasure folder to a diffusers pipeline, verified; returns a handle whose ``remove()`` undoes it.

    (``erasepro_hub.load_erasure`` also takes a Hub repository and a revision; it downloads and checks
    that commit, then calls this.)

    Args:
        pipe: a loaded SD 1.x/2.x/XL, SD 3 or FLUX.1 diffusers pipeline (or any object with its components as
            attributes: ``unet`` or ``transformer``, ``text_encoder``, ...).
        path: an erasure folder written by ``erasepro erase``.
        adapter_name: the name diffusers lists the erasure under (default: from the erasure's name).
        weight_name: the adapter file, as diffusers' argument; it must be the one the manifest checks.
        fuse: fuse the erasure into the weights (no inference overhead); ``remove()`` restores them bit for bit.
        verify_base: compare the pipeline's weights with the fingerprints recorded at erase time and refuse a
            mismatch; ``False`` skips only this check.
        source: what ``applied.source`` names (default: the path).

    Raises:
        VerificationError: a file was modified, or the manifest was edited after the erasure was made.
        BaseMismatchError: the pipeline lacks a site, has other shapes, already carries an erasure or LoRA on
            those modules, or (``verify_base``) other weights.
        AdapterFormatError, ManifestError: the folder is not a readable erasure.
    """
    folder: ErasureFolder = open_folder(path)  # also refuses adapter sites the manifest does not record
    manifest = folder.manifest
    assert manifest.outputs is not None
    if weight_name is not None and weight_name != manifest.outputs.adapter_file:
        raise AdapterFormatError(
            f"weight_name={weight_name!r}: the erasure's adapter file is {manifest.outputs.adapter_file!r} "
            "(the one its manifest checks)"
        )
    deltas = folder.adapter.deltas
    modules = {key: resolve_site(pipe, key) for key in deltas}
    check_not_stacked(pipe, deltas)
    check_shapes(modules, deltas)
    if verify_base:
        base = manifest.base_model.id + (f"@{manifest.base_model.revision}" if manifest.base_model.revision else "")
        # every weight the solve read, also where nothing is stored (the update there was zero)
        recorded = manifest.outputs.base_fingerprints
        checked = {key: (modules[key] if key in modules else resolve_site(pipe, key)).weight for key in recorded}
        check_fingerprints(checked, recorded, base)
    source = source or str(path)
    if adapter_name is not None and not valid_adapter_name(adapter_name):
        raise ValueError(
            f"adapter_name={adapter_name!r}: use letters, digits, '_' and '-' (no dots, at most 64, not starting with a "
            "digit) and not a name torch modules already use (such as 'forward' or 'update')"
        )
    if _diffusers_can_load(pipe, folder):
        return _load_with_diffusers(pipe, folder, modules, adapter_name or adapter_name_for(folder), fuse, source)
    if adapter_name is not None:
        raise BaseMismatchError(
            f"diffusers cannot load this erasure ({manifest.outputs.family} text encoder), so it is applied with "
            "hooks and has no diffusers adapter name; leave adapter_name unset"
        )
    return apply_deltas(pipe, modules, deltas, fuse=fuse, source=source)


def unload_erasure(pipe: Any) -> int:
    """Undo every erasure applied to ``pipe`` with :func:`load_erasure`, newest first; returns how many."""
    applied = list(_REGISTRY.get(pipe, []))
    for handle in reversed(applied):
        handle.remove()
    return len(applied)
