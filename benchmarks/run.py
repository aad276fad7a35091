"""Performance benchmarks on an SD-1.5-shaped random pipeline (docs/design.md §6). Figures, not tests.

    python benchmarks/run.py               # everything; writes benchmarks/results/latest.{json,md}
    python benchmarks/run.py --quick       # fewer repeats and scaling cases (the 100-concept pair stays)
    python benchmarks/run.py --threads 4   # torch threads here and in every child (default: all cores)

All ratios are measured side by side in one run on the same prompts. The peer is UCE as its authors'
reference script performs it (benchmarks/ref_uce.py; Gandikota et al., WACV 2024), given the tool's
erase prompts (its target prompts), guides (their anchors) and preserve prompts. The pipeline (CLIP
ViT-L/14 text encoder, SD-1.5 UNet and VAE, random weights) is built once by build_sd15.py into
benchmarks/cache/sd15 (gitignored). Run from the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "sd15-one-concept.yaml"
SD15 = HERE / "cache" / "sd15"
REF_UCE = HERE / "ref_uce.py"
RESULTS = HERE / "results"
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
TARGETS = {
    "cold_over_ref_uce": ("<=", 1.0),
    "erasepro_over_uce": ("<=", 1.5),
    "concepts100_over_ref_uce": ("<=", 1.5),
    "peak_rss_100_gb": ("<=", 1.5),
    "adapter_over_dense": ("<=", 0.10),
    "lora_rel_error": ("<=", 1e-6),
}
FIRST_NAMES = [
    "Ada", "Boris", "Clara", "Dmitri", "Edith", "Felix", "Greta", "Hugo", "Ilse", "Jonas", "Klara", "Lucian",
    "Mira", "Nikolai", "Olga", "Pavel", "Quentin", "Rosa", "Stefan", "Tamara", "Ulrich", "Vera", "Wanda", "Xavier",
    "Yuri", "Zelda", "Anton", "Bettina", "Cyril", "Dora", "Emil", "Frieda", "Gustav", "Hedda", "Ivo", "Jana",
    "Kasimir", "Lotte", "Magnus", "Nora", "Otto", "Petra", "Rainer", "Sabine", "Theo", "Ursula", "Viktor", "Wilma",
    "Yvonne", "Zeno",
]
SURNAMES = [
    "Abbott", "Baxter", "Calder", "Dalton", "Ellison", "Fairley", "Garrick", "Hollis", "Irving", "Jarvis",
    "Kendall", "Lambert", "Mercer", "Norwood", "Osborne", "Prescott", "Quimby", "Radley", "Sutton", "Thorne",
    "Upton", "Vance", "Whitlock", "Yardley", "Ashby", "Bramwell", "Cotter", "Dunmore", "Everly", "Fenwick",
    "Gresham", "Hartley", "Ingram", "Jessop", "Kirkby", "Lockwood", "Marlow", "Nettleton", "Oakley", "Pembroke",
    "Rowntree", "Selwyn", "Tennant", "Underhill", "Verity", "Wakefield", "Yates", "Ainsley", "Blackwood", "Carew",
]


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
    }


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


_PEAK_OF_CHILD = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[2:]).returncode\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def child_env(threads: int, **extra: str) -> dict:
    """The environment of every child process: offline, with ``threads`` OpenMP/MKL threads."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def timed_with_peak(command: list[str], peak_file: Path, env: dict) -> tuple[float, float]:
    """``(wall seconds, peak RSS GB)`` of ``command`` run as a fresh process.

    It runs under its own small parent, whose children's peak RSS is that command's alone.
    """
    wrapped = [sys.executable, "-c", _PEAK_OF_CHILD, str(peak_file), *command]
    start = time.perf_counter()
    result = subprocess.run(wrapped, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{result.stderr[-2000:]}")
    return wall, int(peak_file.read_text()) / 2**20


def peer_prompts(plan) -> dict[str, list[str]]:
    """What the peer is given: the tool's target prompts, their anchors as guides, its preserve prompts."""
    return {
        "erase": [pair.target for pair in plan.pairs],
        "guide": [pair.anchor for pair in plan.pairs],
        "preserve": [prompt.text for prompt in plan.preserve],
    }


def cold_pair(workdir: Path, repeats: int, threads: int) -> dict:
    """Whole processes, interleaved: `erasepro erase` on the manifest and the peer on the same prompts.

    One untimed run of each first: erasepro's computes the default preserve set's summary (once per
    base model, then read from ERASEPRO_CACHE, as every later erasure does; its figures are reported
    as first use), the peer's brings the whole pipeline into the page cache. Then ``repeats`` pairs,
    the order alternating, each with wall time and peak RSS.
    """
    from erasepro_hub.manifest import load_manifest
    from erasepro_hub.recipe import plan_from_recipe

    out = workdir / "cold-erase"
    prompts_file = workdir / "peer-prompts.json"
    prompts_file.write_text(json.dumps(peer_prompts(plan_from_recipe(load_manifest(MANIFEST).recipe()))))
    ref_out, ref_timings = workdir / "ref-uce.safetensors", workdir / "ref-uce-timings.json"
    commands = {
        "erasepro": [str(Path(sys.executable).parent / "erasepro"), "erase", str(MANIFEST), "--out", str(out), "--overwrite"],
        "ref_uce": [sys.executable, str(REF_UCE), "--model", str(SD15), "--prompts", str(prompts_file),
                    "--out", str(ref_out), "--timings", str(ref_timings)],
    }
    env = child_env(threads, ERASEPRO_CACHE=str(workdir / "cache"))
    first = {name: timed_with_peak(command, workdir / f"peak-{name}-first", env) for name, command in commands.items()}
    walls: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, list[float]] = {name: [] for name in commands}
    ref_inside: dict[str, list[float]] = {"load_s": [], "edit_s": []}
    loads = []
    for index in range(repeats):
        loads.append(load_average())
        order = list(commands) if index % 2 == 0 else list(reversed(commands))
        for name in order:
            wall, peak = timed_with_peak(commands[name], workdir / f"peak-{name}-{index}", env)
            walls[name].append(wall)
            peaks[name].append(peak)
        inside = json.loads(ref_timings.read_text())
        for key in ref_inside:
            ref_inside[key].append(inside[key])
    cold_s, ref_s = statistics.median(walls["erasepro"]), statistics.median(walls["ref_uce"])
    return {
        "cold_over_ref_uce": cold_s / ref_s,
        "cold_erase_s": cold_s,
        "cold_ref_uce_s": ref_s,
        "cold_samples_s": walls,
        "cold_peak_rss_samples_gb": peaks,
        "peak_rss_gb": statistics.median(peaks["erasepro"]),
        "ref_uce_peak_rss_gb": statistics.median(peaks["ref_uce"]),
        "ref_uce_load_s": statistics.median(ref_inside["load_s"]),
        "ref_uce_edit_s": statistics.median(ref_inside["edit_s"]),
        "ref_uce_file_mb": ref_out.stat().st_size / 2**20,
        "cold_erase_first_use_s": first["erasepro"][0],
        "peak_rss_first_use_gb": first["erasepro"][1],
        "cold_ref_uce_first_s": first["ref_uce"][0],
        "cold_pair_load_average": loads,
        "cold_pair_repeats": repeats,
        "folder": str(out),
    }


def adapter_sizes(adapter: Path) -> dict:
    """The adapter's bytes (tensors and file) against the dense updates it stands for (m·d float32 per site).

    Sites are read from the factor pairs in the file: B (m × r, "lora_B" / "up") and A (r × d, "lora_A" / "down").
    """
    from safetensors import safe_open

    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B",
                ".lora_linear_layer.down.weight": "A", ".lora_linear_layer.up.weight": "B"}
    sites: dict[str, dict[str, tuple[int, ...]]] = {}
    tensor_bytes = 0
    with safe_open(str(adapter), framework="pt") as handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            tensor_bytes += tensor.numel() * tensor.element_size()
            for suffix, which in suffixes.items():
                if key.endswith(suffix):
                    sites.setdefault(key[: -len(suffix)], {})[which] = tuple(tensor.shape)
    dense_bytes = sum(f["B"][0] * f["A"][1] * 4 for f in sites.values())
    file_bytes = adapter.stat().st_size
    return {
        "adapter_over_dense": tensor_bytes / dense_bytes,
        "adapter_file_over_dense": file_bytes / dense_bytes,
        "adapter_tensor_bytes": tensor_bytes,
        "adapter_file_bytes": file_bytes,
        "adapter_mb": file_bytes / 2**20,
        "dense_delta_bytes": dense_bytes,
        "adapter_sites": len(sites),
        "adapter_max_rank": max((f["A"][0] for f in sites.values()), default=0),
    }


def without_preservation(recipe):
    """The recipe with neither preserve prompts nor the default caption set."""
    return recipe.model_copy(update={"preserve": recipe.preserve.model_copy(update={"mode": "none", "captions": "none"})})


def lora_rel_error(deltas: dict) -> float:
    """max over sites of max|B A − ΔW| / max|ΔW|: the factors as the adapter stores them against the exact float64 ΔW."""
    from erasepro_hub.adapters.lora import stored_deltas

    errors = []
    for key, stored in stored_deltas(deltas, "lora", torch.float32).items():
        exact = deltas[key].dense(torch.float64)
        errors.append(float((stored.dense(torch.float64) - exact).abs().max() / exact.abs().max()))
    return max(errors, default=0.0)


def last_token_uce(recipe):
    """``(recipe, setting)``: the tool's ``uce`` constrained at the last token before end-of-text, as the peer is.

    ``uce.tokens`` where the schema has it, else ``solver.token_policy``; ``(None, reason)`` when neither exists.
    """
    uce = recipe.model_copy(update={"method": "uce"})
    if "tokens" in type(recipe.uce).model_fields:
        return uce.model_copy(update={"uce": recipe.uce.model_copy(update={"tokens": "last-token"})}), "uce.tokens: last-token"
    if "last-token" in get_args(type(recipe.solver).model_fields["token_policy"].annotation):
        solver = recipe.solver.model_copy(update={"token_policy": "last-token"})
        return uce.model_copy(update={"solver": solver}), "solver.token_policy: last-token"
    return None, "no last-token setting in the schema"


def peer_agreement(model, recipe, pipe, peer: dict[str, torch.Tensor]) -> dict:
    """Relative Frobenius difference, per to_k/to_v site, between the peer's ΔW (new − old) and the tool's uce ΔW."""
    from erasepro_hub import recipe as R
    from erasepro_hub.models.progressive import solve_erasure

    variant, setting = last_token_uce(recipe)
    if variant is None:
        return {"skipped": setting}
    deltas = solve_erasure(model, R.plan_from_recipe(variant)).deltas
    modules = dict(pipe.unet.named_modules())
    diffs = []
    for name, new in peer.items():
        module = name[: -len(".weight")]
        theirs = new.double() - modules[module].weight.detach().double()
        ours = deltas[f"unet.{module}"].dense(torch.float64) if f"unet.{module}" in deltas else torch.zeros_like(theirs)
        diffs.append(float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs)))
    return {"setting": setting, "max_rel_fro": max(diffs), "median_rel_fro": statistics.median(diffs), "sites": len(diffs)}


def solve_ratios(repeats: int) -> dict:
    """Solve times (weights loaded) of erasepro and uce on the same prompts, the peer's edit, one text-encoder pass."""
    import ref_uce

    from erasepro_hub import erase as E
    from erasepro_hub import recipe as R
    from erasepro_hub.manifest import load_manifest
    from erasepro_hub.models.base import prompt_embeddings
    from erasepro_hub.models.progressive import solve_erasure
    from erasepro_hub.models.prompts import encode

    recipe = load_manifest(MANIFEST).recipe()
    start = time.perf_counter()
    base = E.load_base(recipe)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe = ref_uce.load_pipeline(SD15)
    ref_load_s = time.perf_counter() - start
    plan = R.plan_from_recipe(recipe)
    uce = R.plan_from_recipe(recipe.model_copy(update={"method": "uce"}))
    variants = {
        "erasepro": plan,
        "uce": uce,
        "uce_erasepro_tokens": R.plan_from_recipe(
            recipe.model_copy(update={"method": "uce", "uce": recipe.uce.model_copy(update={"tokens": "erasepro"})})
        ),
        "erasepro_no_captions": dataclasses.replace(plan, captions=()),
        "erasepro_no_preserve": R.plan_from_recipe(without_preservation(recipe)),
        "uce_no_preserve": R.plan_from_recipe(without_preservation(recipe).model_copy(update={"method": "uce"})),
    }
    peer = peer_prompts(plan)
    anchors = list(dict.fromkeys((p.anchor, p.prefix) for p in plan.pairs))
    from erasepro_hub.models.prompts import Prompt

    all_prompts = [Prompt(p.target, p.prefix) for p in plan.pairs] + [Prompt(a, pre) for a, pre in anchors]
    all_prompts += list(plan.preserve)
    ids = [encode(te.tokenizer, all_prompts).ids for te in base.model.text_encoders]

    def text_pass():
        with torch.no_grad():
            prompt_embeddings(base.model, ids)

    def peer_edit():
        return ref_uce.uce_edit(pipe, peer["erase"], peer["guide"], peer["preserve"])

    solve_erasure(base.model, plan)  # warm-up (allocator, first-call overheads)
    peer_edit()
    text_pass()
    solutions = {}
    # interleave the variants so that machine noise hits them alike, in an order rotated at each repeat: the one
    # solved first after the peer's edit (a whole pipeline's allocations given back) is not always the same
    samples: dict[str, list[float]] = {name: [] for name in [*variants, "ref_uce"]}
    text_samples = []
    names = list(variants)
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            variant = variants[name]
            start = time.perf_counter()
            solutions[name] = solve_erasure(base.model, variant)
            samples[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        peer_weights = peer_edit()
        samples["ref_uce"].append(time.perf_counter() - start)
        _, one = median_time(text_pass, 1)
        text_samples += one
    times = {name: statistics.median(values) for name, values in samples.items()}
    text_s = statistics.median(text_samples)
    sol = solutions["erasepro"]
    agreement = peer_agreement(base.model, recipe, pipe, peer_weights)
    return {
        "load_edit_model_s": load_s,
        "ref_uce_pipeline_load_s": ref_load_s,
        "solve_s": times,
        "solve_samples_s": samples,
        "text_pass_s": text_s,
        "text_pass_prompts": len(all_prompts),
        "erasepro_over_uce": times["erasepro"] / times["uce"],
        "erasepro_over_ref_uce_edit": times["erasepro"] / times["ref_uce"],
        "uce_over_ref_uce_edit": times["uce"] / times["ref_uce"],
        "erasepro_over_uce_no_captions": times["erasepro_no_captions"] / times["uce"],
        "erasepro_over_uce_erasepro_tokens": times["erasepro"] / times["uce_erasepro_tokens"],
        "erasepro_over_uce_no_preserve": times["erasepro_no_preserve"] / times["uce_no_preserve"],
        "erase_over_text_pass": times["erasepro"] / text_s,
        "lora_rel_error": lora_rel_error(sol.deltas),
        "peer_vs_uce_last_token": agreement,
        "stage_timings_s": sol.timings,
        "n_constrained_tokens": sol.n_constrained_tokens,
        "n_preserve_prompts": len(plan.preserve),
        "n_captions": len(plan.captions),
        "n_soft_pairs": len(plan.soft_pairs),
        "n_peer_prompts": {k: len(v) for k, v in peer.items()},
    }


def apply_and_overhead(folder: Path, repeats: int) -> dict:
    """load_erasure onto a loaded SD-1.5-shaped pipeline; inference time base / unfused LoRA layers / fused.

    (The ``hooks`` keys are the unfused adapter: diffusers' LoRA layers since the loader goes through diffusers.)
    """
    from diffusers import StableDiffusionPipeline

    from erasepro_hub import load_erasure

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(SD15), use_safetensors=True)
    pipeline_load_s = time.perf_counter() - start
    ids = pipe.tokenizer(["a painting by Van Gogh"] * 4, padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def forward():
        embeds = pipe.text_encoder(ids)[0]
        pipe.unet(latents, 500, encoder_hidden_states=embeds)

    forward()
    base_s, _ = median_time(forward, repeats)
    start = time.perf_counter()
    handle = load_erasure(pipe, folder)
    apply_hooks_s = time.perf_counter() - start
    hooks_s, _ = median_time(forward, repeats)
    handle.remove()
    start = time.perf_counter()
    handle = load_erasure(pipe, folder, fuse=True)
    apply_fused_s = time.perf_counter() - start
    fused_s, _ = median_time(forward, repeats)
    handle.remove()
    return {
        "pipeline_load_s": pipeline_load_s,
        "apply_s": max(apply_hooks_s, apply_fused_s),
        "apply_hooks_s": apply_hooks_s,
        "apply_fused_s": apply_fused_s,
        "forward_base_s": base_s,
        "forward_hooks_s": hooks_s,
        "forward_fused_s": fused_s,
        "fused_overhead": fused_s / base_s - 1,
        "hooks_overhead": hooks_s / base_s - 1,
        "forward": "text encoder (4 prompts) + one UNet step on 4 latents of 32x32",
    }


# ----------------------------------------------------------------------------- scaling
def _peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def default_policy() -> str:
    """The schema's default token policy."""
    from erasepro_hub.manifest.schema import SolverSettings

    return SolverSettings().token_policy


#: A policy written ``<policy>+no-misspellings`` runs that token policy with ``prompts.misspellings: false``.
NO_MISSPELLINGS = "+no-misspellings"


def scaling_recipe(concepts: int, templates: int, policy: str):
    """The benchmark manifest with ``concepts`` generated names (anchor "art") in the first ``templates`` templates."""
    from erasepro_hub.manifest import load_manifest, to_data
    from erasepro_hub.manifest.schema import Recipe

    data = to_data(load_manifest(MANIFEST).recipe())
    pool = ["{}", "a painting by {}", "art in the style of {}", "an oil painting of a wheat field by {}",
            "a portrait painted by {}", "a landscape in the manner of {}", "the work of {}", "one sketch by {}"]
    # distinct first words, so that no two target prompts share their first concept token
    firsts = FIRST_NAMES + SURNAMES
    data["concepts"] = [{"target": f"{firsts[i]} {SURNAMES[(i * 7 + 3) % len(SURNAMES)]}", "anchor": "art"}
                        for i in range(concepts)]
    data["prompts"]["templates"] = pool[:templates]
    if policy.endswith(NO_MISSPELLINGS):
        policy = policy.removesuffix(NO_MISSPELLINGS)
        data["prompts"]["misspellings"] = False
    data["solver"]["token_policy"] = policy
    return Recipe.model_validate(data)


def scaling_case(concepts: int, templates: int, policy: str) -> dict:
    """One configuration, run in its own process (so that its peak memory is its own).

    As the erase command does, each site's update is brought to the adapter's stored form as it is solved; the
    time that takes is reported apart (``store_s``), so that ``solve_s`` is the solve alone, as the peer's edit
    time is its edit alone. The peak memory covers both, and the state dict written from the stored forms.
    """
    from erasepro_hub import erase as E
    from erasepro_hub import recipe as R
    from erasepro_hub.adapters.lora import store_site, to_state_dict
    from erasepro_hub.models.progressive import pass_sizes, solve_erasure

    recipe = scaling_recipe(concepts, templates, policy)
    start = time.perf_counter()
    base = E.load_base(recipe)
    load_s = time.perf_counter() - start
    plan = R.plan_from_recipe(recipe)
    import warnings

    def keep(key, delta):
        return store_site(delta, "lora", torch.float32).delta

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = solve_erasure(base.model, plan, keep=keep)
    seconds = time.perf_counter() - start - sol.timings["keep"]
    state = to_state_dict(sol.deltas, dtype=torch.float32, as_stored=True)
    te = [s.report for s in sol.sites if not s.key.startswith("unet.")]
    kv = [s.report for s in sol.sites if s.key.startswith("unet.")]
    sizes = pass_sizes(base.model, plan)
    return {
        "concepts": concepts,
        "templates": templates,
        "prompts": len(plan.pairs),
        "preserve_prompts": len(plan.preserve),
        "captions": len(plan.captions),
        "token_policy": policy,
        "constraints": sol.n_constrained_tokens,
        "load_s": load_s,
        "solve_s": seconds,
        "store_s": sol.timings["keep"],
        "captions_s": sol.timings.get("captions", 0.0),
        "peak_rss_gb": _peak_rss_gb(),
        "adapter_mb": sum(t.numel() * t.element_size() for t in state.values()) / 2**20,
        "te_width": te[0].input_dim if te else None,
        "kv_width": kv[0].input_dim,
        "te_within_capacity": all(r.within_capacity for r in te),
        "kv_within_capacity": all(r.within_capacity for r in kv),
        "residual_tol": plan.recipe.solver.residual_tol,
        "max_residual_te": max((r.residual for r in te), default=None),
        "max_residual_kv": max(r.residual for r in kv),
        "te_rank": max((r.constraint_rank for r in te), default=0),
        "kv_update_rank": max(r.update_rank for r in kv),
        "target_pass_tokens": sizes["tokens"],
        "rectangular_tokens": sizes["rectangular_tokens"],
        "soft_columns": sizes["soft_columns"],
        "soft_copies": sizes["soft_copies"],
    }


def ref_case(concepts: int, templates: int, policy: str) -> dict:
    """The peer on the prompts of :func:`scaling_case`, in its own process: pipeline loaded, then the edit timed."""
    import ref_uce

    from erasepro_hub import recipe as R

    peer = peer_prompts(R.plan_from_recipe(scaling_recipe(concepts, templates, policy)))
    start = time.perf_counter()
    pipe = ref_uce.load_pipeline(SD15)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        weights = ref_uce.uce_edit(pipe, peer["erase"], peer["guide"], peer["preserve"])
    seconds = time.perf_counter() - start
    return {
        "concepts": concepts,
        "templates": templates,
        "erase_prompts": len(peer["erase"]),
        "guides": sorted(set(peer["guide"])),
        "preserve_prompts": len(peer["preserve"]),
        "modules": len(weights),
        "load_s": load_s,
        "edit_s": seconds,
        "peak_rss_gb": _peak_rss_gb(),
    }


def run_case(flag: str, concepts: int, templates: int, policy: str, threads: int) -> dict:
    """A case of this script (``--case`` or ``--ref-case``) in a fresh process; its JSON result."""
    command = [sys.executable, __file__, flag, str(concepts), str(templates), policy, "--threads", str(threads)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=child_env(threads))
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def concepts100(threads: int, pairs: int = 3) -> dict:
    """100 concepts in template "{}": the ErasePro solve and the peer's edit, each in its own process, ``pairs``
    interleaved pairs (order alternating); the medians are the figures, every sample is kept."""
    policy = default_policy()
    runs: dict[str, list[dict]] = {"erasepro": [], "ref_uce": []}
    for index in range(pairs):
        order = ["erasepro", "ref_uce"] if index % 2 == 0 else ["ref_uce", "erasepro"]
        for name in order:
            if name == "erasepro":
                runs[name].append(run_case("--case", 100, 1, policy, threads))
                r = runs[name][-1]
                print(f"  100 concepts, erasepro: {r['solve_s']:.1f} s, {r['peak_rss_gb']:.2f} GB", file=sys.stderr)
            else:
                runs[name].append(run_case("--ref-case", 100, 1, policy, threads))
                r = runs[name][-1]
                print(f"  100 concepts, peer: {r['edit_s']:.1f} s, {r['peak_rss_gb']:.2f} GB", file=sys.stderr)
    solve = [r["solve_s"] for r in runs["erasepro"]]
    edit = [r["edit_s"] for r in runs["ref_uce"]]
    ours = min(runs["erasepro"], key=lambda r: abs(r["solve_s"] - statistics.median(solve)))  # the median run
    peer = min(runs["ref_uce"], key=lambda r: abs(r["edit_s"] - statistics.median(edit)))
    return {
        "concepts100_over_ref_uce": statistics.median(solve) / statistics.median(edit),
        "peak_rss_100_gb": statistics.median(r["peak_rss_gb"] for r in runs["erasepro"]),
        "concepts100_solve_s": statistics.median(solve),
        "concepts100_ref_uce_edit_s": statistics.median(edit),
        "concepts100_samples_s": {"erasepro": solve, "ref_uce": edit},
        "concepts100_peak_rss_samples_gb": {name: [r["peak_rss_gb"] for r in rs] for name, rs in runs.items()},
        "concepts100_ref_uce_peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs["ref_uce"]),
        "concepts100_ref_uce_load_s": peer["load_s"],
        "concepts100_load_s": ours["load_s"],
        "concepts100": ours,
        "concepts100_ref_uce": peer,
    }


def scaling(quick: bool, threads: int, done: list[dict]) -> list[dict]:
    """The scaling table, one process per row; ``done`` holds rows already measured (not run again)."""
    policy = default_policy()
    cases = [(1, 1, policy), (10, 1, policy)]
    cases += [] if quick else [(50, 1, policy), (100, 1, policy), (100, 1, policy + NO_MISSPELLINGS)]
    cases += [(1, 4, policy)] if quick else [(1, 2, policy), (1, 4, policy), (1, 8, policy), (1, 4, "concept-suffix")]
    cases += [] if quick else [(10, 1, "eos"), (100, 1, "eos")]
    known = {(r["concepts"], r["templates"], r["token_policy"]): r for r in done}
    rows = []
    for case in cases:
        if case in known:
            rows.append(known[case])
            continue
        rows.append(run_case("--case", *case, threads))
        print(f"  scaling {case[0]} concepts x {case[1]} templates ({case[2]}): {rows[-1]['solve_s']:.1f} s", file=sys.stderr)
    rows += [r for key, r in known.items() if key not in cases]
    return rows


# ----------------------------------------------------------------------------- report
def verdicts(headline: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = headline[key]
        out[key] = {"value": value, "target": f"{op} {bound:g}", "met": value <= bound}
    return out


PEER = (
    "Peer: UCE as its authors' reference script performs it (Gandikota et al., \"Unified Concept Editing in "
    "Diffusion Models\", WACV 2024; the procedure of `UCE()` in `trainscripts/uce_sd_erase.py` of "
    "github.com/rohitgandikota/unified-concept-editing), written afresh as `benchmarks/ref_uce.py`. As a process it "
    "imports diffusers, loads the whole pipeline (text encoder, UNet, VAE; float32, no safety checker), encodes "
    "every prompt by its own `encode_prompt` call and takes the last token before end-of-text, computes the "
    "original to_k/to_v outputs of each guide and preserve prompt, then per module accumulates "
    "`λW + Σ v* cᵀ` and `λI + Σ c cᵀ` concept by concept in float32, inverts in float32 and saves the full new "
    "to_k/to_v weights ({file_mb:.1f} MB). It is given the tool's own prompts: erase = the {erase} target prompts, "
    "guides = their anchors, preserve = the {preserve} preserve prompts. It has no counterpart of the tool's "
    "default caption preserve set ({captions} captions, read as a cached summary) nor of its {soft} misspelled "
    "targets, which the tool solves in addition; and it edits only the UNet's to_k/to_v, while erasepro also edits "
    "text-encoder layers. Its peak RSS counts the pages it touches: diffusers maps the weight files, so most of the "
    "UNet's and the VAE's weights, never read by the edit, are not resident."
)


def _agreement_line(agreement: dict) -> str:
    if "skipped" in agreement:
        return f"Peer vs the tool's `uce` at the last token: skipped ({agreement['skipped']})."
    return (
        f"Peer vs the tool's `uce` with `{agreement['setting']}`: relative Frobenius difference of ΔW over "
        f"{agreement['sites']} sites, max {agreement['max_rel_fro']:.1e}, median {agreement['median_rel_fro']:.1e}."
    )


def markdown(report: dict) -> str:
    m, d, load = report["machine"], report["details"], report["load_average"]
    c100, r100 = d["concepts100"], d["concepts100_ref_uce"]
    lines = [
        "# Benchmarks (SD-1.5-shaped random pipeline)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({report['threads']} torch/OpenMP threads here and in every child), "
        f"{m['memory_gb']} GB; Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, "
        f"transformers {m['transformers']}. Load average (1/5/15 min) before {load['before']}, after {load['after']}.",
        f"Command: `{report['command']}` ({report['date']}).",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    fmt = {"lora_rel_error": "{:.2e}", "peak_rss_100_gb": "{:.2f} GB", "adapter_over_dense": "{:.3f}"}
    for key, v in report["targets"].items():
        value = fmt.get(key, "{:.2f}").format(v["value"])
        lines.append(f"| `{key}` | {value} | {v['target']} | {'yes' if v['met'] else '**no**'} |")
    n = d["n_peer_prompts"]
    lines += [
        "",
        PEER.format(file_mb=d["ref_uce_file_mb"], erase=n["erase"], preserve=n["preserve"], captions=d["n_captions"],
                    soft=d["n_soft_pairs"]),
        "",
        f"Cold, whole processes (median of {d['cold_pair_repeats']} interleaved pairs, order alternating; caption summary "
        f"cached): `erasepro erase` {d['cold_erase_s']:.1f} s, {d['peak_rss_gb']:.2f} GB; peer {d['cold_ref_uce_s']:.1f} s "
        f"(load {d['ref_uce_load_s']:.1f} s, edit {d['ref_uce_edit_s']:.1f} s), {d['ref_uce_peak_rss_gb']:.2f} GB. "
        f"Samples: erasepro {_seconds(d['cold_samples_s']['erasepro'])}, peer {_seconds(d['cold_samples_s']['ref_uce'])}; "
        f"load average before each pair {d['cold_pair_load_average']}. First use of a base model (computes and caches "
        f"the caption summary): {d['cold_erase_first_use_s']:.1f} s, {d['peak_rss_first_use_gb']:.2f} GB.",
        f"100 concepts (template \"{{}}\", {c100['token_policy']}, {c100['preserve_prompts']} preserve prompts, "
        f"{c100['captions']} default captions), one process each, weights loaded, median of "
        f"{len(d['concepts100_samples_s']['erasepro'])} interleaved pairs: erasepro solve {d['concepts100_solve_s']:.1f} s "
        f"(load {c100['load_s']:.1f} s; each site brought to its stored form as it is solved, as `erase` does, timed "
        f"apart: {c100['store_s']:.1f} s in the median run), peak RSS {d['peak_rss_100_gb']:.2f} GB "
        f"(samples {', '.join(f'{x:.2f}' for x in d['concepts100_peak_rss_samples_gb']['erasepro'])} GB); peer edit "
        f"{d['concepts100_ref_uce_edit_s']:.1f} s (pipeline load {r100['load_s']:.1f} s), peak RSS "
        f"{d['concepts100_ref_uce_peak_rss_gb']:.2f} GB. Samples: erasepro {_seconds(d['concepts100_samples_s']['erasepro'])}, "
        f"peer {_seconds(d['concepts100_samples_s']['ref_uce'])}.",
        f"Adapter of the one-concept erasure: {d['adapter_tensor_bytes'] / 2**20:.2f} MB of tensors "
        f"({d['adapter_file_bytes'] / 2**20:.2f} MB file, {d['adapter_sites']} sites, rank ≤ {d['adapter_max_rank']}) "
        f"against {d['dense_delta_bytes'] / 2**20:.1f} MB of dense float32 ΔW "
        f"(file / dense {d['adapter_file_over_dense']:.3f}).",
        "",
        f"Solve times (median of {report['repeats']}, interleaved, weights loaded, {d['n_constrained_tokens']} constrained "
        f"tokens, {d['n_preserve_prompts']} preserve prompts, {d['n_captions']} default preserve captions (cached summary), "
        f"{d['n_soft_pairs']} misspelled targets): " + ", ".join(f"{k} {v:.2f} s" for k, v in d["solve_s"].items())
        + f" (ref_uce: the peer's edit on its loaded pipeline); one text-encoder pass over the same "
        f"{d['text_pass_prompts']} prompts {d['text_pass_s']:.2f} s (erasepro / text pass {d['erase_over_text_pass']:.2f}). "
        f"erasepro / peer edit {d['erasepro_over_ref_uce_edit']:.2f}, uce / peer edit {d['uce_over_ref_uce_edit']:.2f}. "
        f"Without the default captions: erasepro / uce = {d['erasepro_over_uce_no_captions']:.2f}; "
        f"without any preservation: {d['erasepro_over_uce_no_preserve']:.2f}; against UCE on ErasePro's tokens and "
        f"preserve positions (`uce.tokens: erasepro`): {d['erasepro_over_uce_erasepro_tokens']:.2f}. Where erasepro's "
        "solve goes (last repeat): " + ", ".join(f"{k} {v:.2f} s" for k, v in d["stage_timings_s"].items()) + ".",
        _agreement_line(d["peer_vs_uce_last_token"]),
        f"Apply: hooks {d['apply_hooks_s']:.2f} s, fused {d['apply_fused_s']:.2f} s; forward overhead once fused "
        f"{100 * d['fused_overhead']:+.1f} %, with hooks {100 * d['hooks_overhead']:+.1f} % ({d['forward']}).",
        "",
        "## Scaling (one process per row)",
        "",
        "| concepts | templates | policy | constraints | soft columns (copies) | target-pass tokens (rectangular) | solve s (of which captions) | peak RSS GB | adapter MB | TE: N ≤ d | max residual TE | max residual K/V | zero residual |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scaling"]:
        te_res = "–" if r["max_residual_te"] is None else f"{r['max_residual_te']:.1e}"
        worst = max(v for v in (r["max_residual_te"], r["max_residual_kv"]) if v is not None)
        lines.append(
            f"| {r['concepts']} | {r['templates']} | {r['token_policy']} | {r['constraints']} | "
            f"{r['soft_columns']} ({r['soft_copies']}) | {r['target_pass_tokens']} ({r['rectangular_tokens']}) | "
            f"{r['solve_s']:.1f} ({r['captions_s']:.1f}) | "
            f"{r['peak_rss_gb']:.2f} | {r['adapter_mb']:.1f} | {'yes' if r['constraints'] <= r['te_width'] else 'no'} | "
            f"{te_res} | {r['max_residual_kv']:.1e} | {'yes' if worst <= r['residual_tol'] else '**no** (least squares)'} |"
        )
    lines += [
        "",
        "Capacity: exact zero residual needs the constraints to be independent and at most the input width "
        f"({report['scaling'][0]['te_width']} at the edited text-encoder sites, {report['scaling'][0]['kv_width']} at to_k/to_v). "
        "Beyond it (LS) the solver returns the minimum-norm least-squares update, reports rank and residual per site, "
        "and warns (or fails under solver.strict). The caption summary is computed on the first solve under a policy "
        "that keeps other positions (eos keeps one token a caption, the others every position) and read from the "
        "cache after that. Misspelled targets are soft columns: they cost no capacity but widen the stored factors.",
    ]
    return "\n".join(lines) + "\n"


def _seconds(samples: list[float]) -> str:
    return "[" + ", ".join(f"{x:.1f}" for x in samples) + "] s"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads here, OMP/MKL threads in every child (default: the core count)")
    parser.add_argument("--case", nargs=3, metavar=("CONCEPTS", "TEMPLATES", "POLICY"), help=argparse.SUPPRESS)
    parser.add_argument("--ref-case", nargs=3, metavar=("CONCEPTS", "TEMPLATES", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    for flag, case in (("case", scaling_case), ("ref_case", ref_case)):
        if getattr(args, flag):
            concepts, templates, policy = getattr(args, flag)
            print(json.dumps(case(int(concepts), int(templates), policy)))
            return 0
    from build_sd15 import build

    build()
    repeats = 3 if args.quick else 5
    loadavg_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        cold = cold_pair(Path(tmp), repeats, args.threads)
        print(f"  cold pair: erasepro {cold['cold_erase_s']:.1f} s, peer {cold['cold_ref_uce_s']:.1f} s", file=sys.stderr)
        os.environ["ERASEPRO_CACHE"] = str(Path(tmp) / "cache")  # the caption summary cold_pair computed
        details = {**{k: v for k, v in cold.items() if k != "folder"}, **adapter_sizes(Path(cold["folder"]) / ADAPTER_FILE)}
        details.update(solve_ratios(repeats))
        print(f"  solve ratios: erasepro / uce {details['erasepro_over_uce']:.2f}", file=sys.stderr)
        details.update(apply_and_overhead(Path(cold["folder"]), 2 if args.quick else 5))
        details.update(concepts100(args.threads))
        rows = scaling(args.quick, args.threads, [details["concepts100"]])
    headline = {k: details[k] for k in TARGETS}
    report = {
        "command": "python benchmarks/run.py" + (" --quick" if args.quick else "")
        + (f" --threads {args.threads}" if args.threads != os.cpu_count() else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "threads": args.threads,
        "load_average": {"before": loadavg_before, "after": load_average()},
        "repeats": repeats,
        **headline,
        "targets": verdicts(headline),
        "details": details,
        "scaling": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "latest.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
