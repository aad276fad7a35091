"""sha256 fingerprints of base weights, so an adapter is never applied to the wrong base.

A fingerprint hashes a tensor's dtype, shape and raw bytes. The manifest keeps,
for every edited weight, the fingerprint in the dtype the base was loaded in and
in float16 and bfloat16 (as a cast of it), so a pipeline loaded in half
precision is recognised too.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch

from ..errors import BaseMismatchError

FINGERPRINT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of ``dtype | shape | bytes`` of a tensor (on any device)."""
    t = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
    digest.update(t.view(torch.uint8).numpy() if t.numel() else b"")  # the buffer itself: no copy
    return digest.hexdigest()


def weight_fingerprints(tensor: torch.Tensor) -> dict[str, str]:
    """Fingerprints of ``tensor`` in its own dtype and cast to float16 and bfloat16."""
    own = dtype_name(tensor.dtype)
    prints = {own: weight_fingerprint(tensor)}
    for name, dtype in FINGERPRINT_DTYPES.items():
        if name not in prints and dtype.itemsize <= tensor.dtype.itemsize:
            prints[name] = weight_fingerprint(tensor.to(dtype))
    return prints


def check_fingerprints(
    weights: Mapping[str, torch.Tensor],
    recorded: Mapping[str, Mapping[str, str]],
    base: str,
    *,
    fix: str = "or pass verify_base=False if you know the weights are equivalent",
) -> None:
    """Raise :class:`BaseMismatchError` naming the first weight that differs from the recorded base.

    The one fingerprint check: the loader, evaluation and ``regenerate --verify`` all call it.
    """
    for key, weight in weights.items():
        prints = recorded.get(key)
        if prints is None:
            raise BaseMismatchError(f"the manifest records no fingerprint for {key}; cannot verify the base weights")
        dtype = dtype_name(weight.dtype)
        if dtype not in prints:
            raise BaseMismatchError(
                f"{key} is in {dtype}; fingerprints are recorded for {', '.join(prints)} only. Load the pipeline in "
                f"one of those dtypes, {fix}"
            )
        if weight_fingerprint(weight) != prints[dtype]:
            raise BaseMismatchError(
                f"the pipeline's weights differ from the base this adapter was made for, first at {key}. "
                f"Load {base}, {fix}"
            )
