"""Test helpers: K/V through diffusers' own encode_prompt, exactly what the UNet receives."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from erasepro_hub.recipe import training_pairs
from erasepro_hub.adapters.folder import manifest_sha256
from erasepro_hub.adapters.lora import HEADER_MANIFEST, file_sha256, write_safetensors
from erasepro_hub.manifest import Manifest, dump_yaml, load_manifest, to_data
from erasepro_hub.models.prompts import Prompt, encode, pair_positions


def encode_prompts(pipe, prompts):
    with torch.no_grad():
        if getattr(pipe, "text_encoder_2", None) is not None:
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            return embeds, pooled
        embeds, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        return embeds, None


def kv(pipe, prompts):
    """``{attn2 path: (K, V)}`` and the pooled embedding for ``prompts``, via the pipeline's modules."""
    embeds, pooled = encode_prompts(pipe, prompts)
    with torch.no_grad():
        out = {n: (m.to_k(embeds), m.to_v(embeds)) for n, m in pipe.unet.named_modules() if n.endswith("attn2")}
    return out, pooled


def constrained_positions(folder, pipe):
    manifest = load_manifest(folder / "erasepro.yaml")
    pairs = training_pairs(manifest)
    t = encode(pipe.tokenizer, [Prompt(p.target, p.prefix) for p in pairs])
    a = encode(pipe.tokenizer, [Prompt(p.anchor, p.prefix) for p in pairs])
    return pairs, pair_positions(manifest.solver.token_policy, pairs, t, a, list(range(len(pairs))))


def kv_residuals(folder, edited_pipe, original_pipe):
    """Per site and K/V: ||K'(target) − K(anchor)|| / ||K(anchor)|| at the constrained positions."""
    pairs, pos = constrained_positions(folder, original_pipe)
    ref, ref_pooled = kv(original_pipe, [p.anchor for p in pairs])
    got, got_pooled = kv(edited_pipe, [p.target for p in pairs])
    residuals = {}
    for name in ref:
        for i, which in enumerate("kv"):
            a = ref[name][i][pos.a_rows, pos.a_pos]
            b = got[name][i][pos.t_rows, pos.t_pos]
            residuals[f"{name}.to_{which}"] = float((b - a).norm() / a.norm())
    pooled = None
    if ref_pooled is not None:
        pooled = float((got_pooled - ref_pooled).norm() / ref_pooled.norm())
    return residuals, pooled


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata())


def forge(folder: Path, *, tensors=None, edit_manifest=None, restamp: bool = False) -> None:
    """Forge a folder: new tensors and/or manifest edits, ``outputs.files`` updated to the new hashes;
    with ``restamp`` the adapter's header also gets the forged manifest's hash (a fully consistent forgery)."""
    path = folder / "pytorch_lora_weights.safetensors"
    old_tensors, metadata = read_tensors(path)
    data = yaml.safe_load((folder / "erasepro.yaml").read_text())
    if edit_manifest:
        edit_manifest(data)
    manifest = Manifest.model_validate(data)
    if restamp:
        metadata[HEADER_MANIFEST] = manifest_sha256(manifest)
    write_safetensors(path, tensors if tensors is not None else old_tensors, metadata)
    data = to_data(manifest)
    data["outputs"]["files"]["pytorch_lora_weights.safetensors"] = file_sha256(path)
    (folder / "erasepro.yaml").write_text(dump_yaml(Manifest.model_validate(data)))


@contextmanager
def captured_logs(*names: str, level: int = logging.DEBUG):
    """The messages the named loggers emit inside the block (a list, filled as they come), at ``level`` and above
    whatever verbosity the tests run at; the loggers' levels are restored after."""
    messages: list[str] = []

    class _Capture(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = _Capture(level)
    loggers = [logging.getLogger(name) for name in names]
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(level)
    try:
        yield messages
    finally:
        for lg, old in zip(loggers, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(old)
