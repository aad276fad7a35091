"""Site keys and module lookup shared by the model glue and the adapter loader (torch only).

A *site key* is the LoRA module key diffusers uses (docs/design.md §4.1): the pipeline
component, then the module path inside it — ``unet.<path>.attn2.to_k``, ``transformer.context_embedder`` or
``text_encoder.text_model.encoder.layers.N.mlp.fc2``. The ``text_model.`` form
loads on transformers 4 and 5; :func:`get_module` resolves it on either layout
(transformers ≥ 5.6 flattened ``CLIPTextModel`` to ``encoder.layers.N``).
"""

from __future__ import annotations

from torch import nn

KV_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def get_module(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, accepting ``text_model.``-prefixed and flattened CLIP layouts.

    Raises:
        KeyError: no such module under either spelling.
    """
    candidates = [path]
    if not path:
        return root
    if path.startswith("text_model."):
        candidates.append(path[len("text_model.") :])
    else:
        candidates.append("text_model." + path)
    for candidate in candidates:
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    raise KeyError(path)


def split_key(key: str) -> tuple[str, str]:
    """``("unet", "down_blocks.0…to_k")`` from a site key."""
    component, _, path = key.partition(".")
    return component, path


#: the pipeline components that hold the final stage's sites (the denoiser: a UNet, or an MMDiT transformer)
DENOISERS = ("unet", "transformer")


def is_denoiser_key(key: str) -> bool:
    """A final-stage site — a UNet's ``attn2.to_k``/``to_v``, an MMDiT's ``context_embedder`` or pooled-text
    linear — rather than a text-encoder one."""
    return key.partition(".")[0] in DENOISERS
