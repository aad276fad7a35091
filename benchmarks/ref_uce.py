"""The benchmark's peer: Unified Concept Editing as its authors' reference script performs it.

Procedure: Gandikota, Orgad, Belinkov, Materzyńska and Bau, "Unified Concept Editing in Diffusion
Models", WACV 2024 — the procedure of ``UCE()`` in ``trainscripts/uce_sd_erase.py`` of the authors'
public repository (github.com/rohitgandikota/unified-concept-editing). This module is written afresh
for the benchmark and follows that procedure step by step, deliberately unoptimised, since it is the
yardstick the tool is measured against:

1. the whole pipeline is loaded (``DiffusionPipeline.from_pretrained``, float32, no safety checker)
   and gradients are off;
2. the edited modules are the UNet's cross-attention key/value projections (module names that contain
   ``attn2`` and end with ``to_k`` or ``to_v``), deep-copied;
3. every distinct erase and preserve prompt is encoded on its own (``pipe.encode_prompt``) and its
   embedding taken at ``attention_mask.sum() - 2``, the last token before end-of-text;
4. every distinct guide and preserve prompt is encoded again the same way, and the original modules'
   outputs at that token are kept (the targets ``v*``);
5. per module, ``mat1 = λW + s_e Σ v*_i c_iᵀ + s_p Σ (W c_j) c_jᵀ`` and
   ``mat2 = λI + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ``, accumulated concept by concept in float32, and the
   new weight is ``mat1 @ torch.inverse(mat2)`` (float32 inverse);
6. the full new ``to_k``/``to_v`` weights are written with ``safetensors.torch.save_file``.

Defaults are the script's: λ = 0.5, erase and preserve scales 1. As a program::

    python benchmarks/ref_uce.py --model benchmarks/cache/sd15 --erase "Van Gogh" --guide art \\
        --preserve "Claude Monet;Pablo Picasso" --out /tmp/uce.safetensors
    python benchmarks/ref_uce.py --model DIR --prompts prompts.json --out FILE  # {"erase": [...], "guide": [...], "preserve": [...]}

A single guide is used for every erase prompt, as in the reference script.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

LAMB, ERASE_SCALE, PRESERVE_SCALE = 0.5, 1.0, 1.0


def load_pipeline(model: str | Path, device: str = "cpu"):
    """The whole pipeline in float32 without a safety checker, as the reference script loads it."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32, safety_checker=None).to(device)


def cross_attention_modules(unet) -> tuple[list[str], list[torch.nn.Module]]:
    """Names and modules of the UNet's cross-attention key/value projections, in module order."""
    names, modules = [], []
    for name, module in unet.named_modules():
        if "attn2" in name and (name.endswith("to_k") or name.endswith("to_v")):
            names.append(name)
            modules.append(module)
    return names, modules


def last_token_embedding(pipe, prompt: str) -> torch.Tensor:
    """``(1, d)``: the prompt's text embedding at its last token before end-of-text (one encoder call)."""
    embeds = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    mask = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )["attention_mask"]
    return embeds[0][:, mask.sum() - 2, :]


def _erase_embeddings(pipe, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Step 3: the key ``c`` of every distinct erase and preserve prompt."""
    found: dict[str, torch.Tensor] = {}
    for prompt in prompts:
        if prompt not in found:
            found[prompt] = last_token_embedding(pipe, prompt)
    return found


def _guide_outputs(pipe, prompts: list[str], originals: list[torch.nn.Module]) -> dict[str, list[torch.Tensor]]:
    """Step 4: per distinct guide and preserve prompt, each original module's output at its last token."""
    found: dict[str, list[torch.Tensor]] = {}
    for prompt in prompts:
        if prompt in found:
            continue
        embedding = last_token_embedding(pipe, prompt)
        for module in originals:
            found[prompt] = found.get(prompt, []) + [module(embedding)]
    return found


@torch.no_grad()
def uce_edit(
    pipe,
    erase: list[str],
    guide: list[str],
    preserve: list[str] = (),
    *,
    lamb: float = LAMB,
    erase_scale: float = ERASE_SCALE,
    preserve_scale: float = PRESERVE_SCALE,
) -> dict[str, torch.Tensor]:
    """The new ``to_k``/``to_v`` weights (``"<module name>.weight"`` → tensor) after the UCE edit.

    ``guide`` pairs with ``erase`` one to one (a single guide serves every erase prompt). The pipeline
    itself is left unchanged.
    """
    erase, preserve = list(erase), list(preserve)
    guide = list(guide) * len(erase) if len(guide) == 1 else list(guide)
    if len(guide) != len(erase):
        raise ValueError(f"{len(erase)} erase prompts but {len(guide)} guide prompts")
    names, modules = cross_attention_modules(pipe.unet)
    originals = copy.deepcopy(modules)
    edited = copy.deepcopy(modules)
    keys = _erase_embeddings(pipe, erase + preserve)
    values = _guide_outputs(pipe, guide + preserve, originals)
    for index, module in enumerate(originals):
        weight = module.weight
        mat1 = lamb * weight
        mat2 = lamb * torch.eye(weight.shape[1], device=weight.device, dtype=weight.dtype)
        for concept, target in zip(erase, guide):
            c, v = keys[concept].T, values[target][index].T
            mat1 += erase_scale * (v @ c.T)
            mat2 += erase_scale * (c @ c.T)
        for concept in preserve:
            c, v = keys[concept].T, values[concept][index].T
            mat1 += preserve_scale * (v @ c.T)
            mat2 += preserve_scale * (c @ c.T)
        edited[index].weight = torch.nn.Parameter(mat1 @ torch.inverse(mat2.float()).to(weight.dtype))
    return {f"{name}.weight": module.weight.detach() for name, module in zip(names, edited)}


def _split(text: str | None) -> list[str]:
    return [] if text is None else [part.strip() for part in text.split(";")]


def read_prompts(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Erase, guide and preserve prompts from ``--prompts`` (JSON) or the ``;``-separated options."""
    if args.prompts:
        data = json.loads(Path(args.prompts).read_text())
        return list(data["erase"]), list(data.get("guide") or ["art"]), list(data.get("preserve") or [])
    if not args.erase:
        raise SystemExit("give --erase or --prompts")
    return _split(args.erase), _split(args.guide or "art"), _split(args.preserve)


def main(argv: list[str] | None = None) -> int:
    """The whole reference process: load the pipeline, edit, save the full new weights."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="diffusers pipeline folder or Hub id")
    parser.add_argument("--erase", help="prompts to erase, separated by ;")
    parser.add_argument("--guide", help="guide prompts, separated by ; (one for all, or one per erase prompt; default art)")
    parser.add_argument("--preserve", help="prompts to preserve, separated by ;")
    parser.add_argument("--prompts", help='JSON file {"erase": [...], "guide": [...], "preserve": [...]} instead')
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--lamb", type=float, default=LAMB)
    parser.add_argument("--erase-scale", type=float, default=ERASE_SCALE)
    parser.add_argument("--preserve-scale", type=float, default=PRESERVE_SCALE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timings", help="write load/edit/save seconds to this JSON file")
    args = parser.parse_args(argv)
    folder = Path(args.model).expanduser()
    if (folder.exists() or args.model.startswith(("/", ".", "~"))) and not (folder / "model_index.json").is_file():
        parser.error(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json); "
                     "build one with benchmarks/build_sd15.py or give a Hub id")
    torch.set_grad_enabled(False)
    from safetensors.torch import save_file

    erase, guide, preserve = read_prompts(args)
    start = time.perf_counter()
    pipe = load_pipeline(args.model, args.device)
    loaded = time.perf_counter()
    weights = uce_edit(pipe, erase, guide, preserve, lamb=args.lamb, erase_scale=args.erase_scale,
                       preserve_scale=args.preserve_scale)
    edited = time.perf_counter()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, args.out)
    saved = time.perf_counter()
    if args.timings:
        Path(args.timings).write_text(json.dumps(
            {"load_s": loaded - start, "edit_s": edited - loaded, "save_s": saved - edited, "modules": len(weights)}
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
