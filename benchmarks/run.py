"""Performance benchmarks on an SD-1.5-shaped random pipeline (docs/design.md §6). Figures, not tests.

    python benchmarks/run.py            # everything; writes benchmarks/results/latest.{json,md}
    python benchmarks/run.py --quick    # fewer repeats and scaling cases

All ratios are measured side by side in one run on the same prompts. The pipeline (CLIP ViT-L/14
text encoder, SD-1.5 UNet and VAE, random weights) is built once by build_sd15.py into
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

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "sd15-one-concept.yaml"
RESULTS = HERE / "results"
TARGETS = {
    "erasepro_over_uce": ("<=", 1.5),
    "erase_over_text_pass": ("<=", 3.0),
    "cold_erase_s": ("<=", 20.0),
    "peak_rss_gb": ("<=", 2.0),
    "lora_rel_error": ("<=", 1e-6),
    "apply_s": ("<=", 2.0),
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


def cold_erase(workdir: Path) -> dict:
    """`erasepro erase` as a fresh process: wall time and the child's peak resident memory.

    Run twice against an empty caption cache: the first run computes the default preserve set's
    summary (once per base model), the second finds it on disk, as every later erasure does.
    """
    out = workdir / "cold-erase"
    command = [str(Path(sys.executable).parent / "erasepro"), "erase", str(MANIFEST), "--out", str(out), "--overwrite"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ERASEPRO_CACHE=str(workdir / "cache"))
    walls, peaks = [], []
    for run in range(2):
        # each run under its own small parent, whose children's peak RSS is that run's alone
        peak_file = workdir / f"peak-{run}"
        wrapped = [sys.executable, "-c", _PEAK_OF_CHILD, str(peak_file), *command]
        start = time.perf_counter()
        result = subprocess.run(wrapped, cwd=ROOT, capture_output=True, text=True, env=env)
        walls.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        peaks.append(int(peak_file.read_text()) / 2**20)
    return {
        "cold_erase_s": walls[1],
        "cold_erase_first_use_s": walls[0],
        "peak_rss_gb": peaks[1],
        "peak_rss_first_use_gb": peaks[0],
        "adapter_mb": (out / "pytorch_lora_weights.safetensors").stat().st_size / 2**20,
        "folder": str(out),
    }


def without_preservation(recipe):
    """The recipe with neither preserve prompts nor the default caption set."""
    return recipe.model_copy(update={"preserve": recipe.preserve.model_copy(update={"mode": "none", "captions": "none"})})


def solve_ratios(repeats: int) -> dict:
    """Solve times (weights loaded) of erasepro and uce on the same prompts, and one text-encoder pass."""
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
    plan = R.plan_from_recipe(recipe)
    uce = R.plan_from_recipe(recipe.model_copy(update={"method": "uce"}))
    variants = {
        "erasepro": plan,
        "uce": uce,
        "erasepro_no_captions": dataclasses.replace(plan, captions=()),
        "erasepro_no_preserve": R.plan_from_recipe(without_preservation(recipe)),
        "uce_no_preserve": R.plan_from_recipe(without_preservation(recipe).model_copy(update={"method": "uce"})),
    }
    anchors = list(dict.fromkeys((p.anchor, p.prefix) for p in plan.pairs))
    from erasepro_hub.models.prompts import Prompt

    all_prompts = [Prompt(p.target, p.prefix) for p in plan.pairs] + [Prompt(a, pre) for a, pre in anchors]
    all_prompts += list(plan.preserve)
    ids = [encode(te.tokenizer, all_prompts).ids for te in base.model.text_encoders]

    def text_pass():
        with torch.no_grad():
            prompt_embeddings(base.model, ids)

    solve_erasure(base.model, plan)  # warm-up (allocator, first-call overheads)
    text_pass()
    times, solutions = {}, {}
    # interleave the variants so that machine noise hits them alike
    samples: dict[str, list[float]] = {name: [] for name in variants}
    text_samples = []
    for _ in range(repeats):
        for name, variant in variants.items():
            start = time.perf_counter()
            solutions[name] = solve_erasure(base.model, variant)
            samples[name].append(time.perf_counter() - start)
        _, one = median_time(text_pass, 1)
        text_samples += one
    times = {name: statistics.median(values) for name, values in samples.items()}
    text_s = statistics.median(text_samples)
    sol = solutions["erasepro"]
    errors = []
    for site in sol.sites:
        if site.delta.rank == 0:
            continue
        exact = site.delta.dense(torch.float64)
        stored = site.delta.to(torch.float32).dense(torch.float64)
        errors.append(float((stored - exact).abs().max() / exact.abs().max()))
    return {
        "load_edit_model_s": load_s,
        "solve_s": times,
        "solve_samples_s": samples,
        "text_pass_s": text_s,
        "text_pass_prompts": len(all_prompts),
        "erasepro_over_uce": times["erasepro"] / times["uce"],
        "erasepro_over_uce_no_captions": times["erasepro_no_captions"] / times["uce"],
        "erasepro_over_uce_no_preserve": times["erasepro_no_preserve"] / times["uce_no_preserve"],
        "erase_over_text_pass": times["erasepro"] / text_s,
        "lora_rel_error": max(errors) if errors else 0.0,
        "stage_timings_s": sol.timings,
        "n_constrained_tokens": sol.n_constrained_tokens,
        "n_preserve_prompts": len(plan.preserve),
        "n_captions": len(plan.captions),
        "n_soft_pairs": len(plan.soft_pairs),
    }


def apply_and_overhead(folder: Path, repeats: int) -> dict:
    """load_erasure onto a loaded SD-1.5-shaped pipeline; inference time base / unfused LoRA layers / fused.

    (The ``hooks`` keys are the unfused adapter: diffusers' LoRA layers since the loader goes through diffusers.)
    """
    from diffusers import StableDiffusionPipeline

    from erasepro_hub import load_erasure

    start = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(str(HERE / "cache" / "sd15"), use_safetensors=True)
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


def scaling_case(concepts: int, templates: int, policy: str) -> dict:
    """One configuration, run in its own process (so that its peak memory is its own)."""
    from erasepro_hub import erase as E
    from erasepro_hub import recipe as R
    from erasepro_hub.adapters.lora import stored_deltas, to_state_dict
    from erasepro_hub.manifest import load_manifest, to_data
    from erasepro_hub.manifest.schema import Recipe
    from erasepro_hub.models.progressive import solve_erasure

    data = to_data(load_manifest(MANIFEST).recipe())
    pool = ["{}", "a painting by {}", "art in the style of {}", "an oil painting of a wheat field by {}",
            "a portrait painted by {}", "a landscape in the manner of {}", "the work of {}", "one sketch by {}"]
    # distinct first words, so that no two target prompts share their first concept token
    firsts = FIRST_NAMES + SURNAMES
    data["concepts"] = [{"target": f"{firsts[i]} {SURNAMES[(i * 7 + 3) % len(SURNAMES)]}", "anchor": "art"}
                        for i in range(concepts)]
    data["prompts"]["templates"] = pool[:templates]
    data["solver"]["token_policy"] = policy
    recipe = Recipe.model_validate(data)
    base = E.load_base(recipe)
    plan = R.plan_from_recipe(recipe)
    import warnings

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = solve_erasure(base.model, plan)
    seconds = time.perf_counter() - start
    state = to_state_dict(stored_deltas(sol.deltas, "lora", torch.float32))
    te = [s.report for s in sol.sites if not s.key.startswith("unet.")]
    kv = [s.report for s in sol.sites if s.key.startswith("unet.")]
    return {
        "concepts": concepts,
        "templates": templates,
        "prompts": len(plan.pairs),
        "token_policy": policy,
        "constraints": sol.n_constrained_tokens,
        "solve_s": seconds,
        "captions_s": sol.timings.get("captions", 0.0),
        "peak_rss_gb": _peak_rss_gb(),
        "adapter_mb": sum(t.numel() * t.element_size() for t in state.values()) / 2**20,
        "te_width": te[0].input_dim if te else None,
        "kv_width": kv[0].input_dim,
        "te_within_capacity": all(r.within_capacity for r in te),
        "kv_within_capacity": all(r.within_capacity for r in kv),
        "residual_tol": plan.residual_tol,
        "max_residual_te": max((r.residual for r in te), default=None),
        "max_residual_kv": max(r.residual for r in kv),
        "te_rank": max((r.constraint_rank for r in te), default=0),
        "kv_update_rank": max(r.update_rank for r in kv),
    }


def scaling(quick: bool) -> list[dict]:
    cases = [(1, 1, "concept-eos"), (10, 1, "concept-eos"), (50, 1, "concept-eos")]
    cases += [] if quick else [(100, 1, "concept-eos")]
    cases += [(1, 2, "concept-eos"), (1, 4, "concept-eos"), (1, 8, "concept-eos"), (1, 4, "concept-suffix")]
    cases += [(10, 1, "eos"), (100, 1, "eos")] if not quick else [(10, 1, "eos")]
    rows = []
    for concepts, templates, policy in cases:
        result = subprocess.run(
            [sys.executable, __file__, "--case", str(concepts), str(templates), policy],
            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr[-2000:])
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"  scaling {concepts} concepts x {templates} templates ({policy}): {rows[-1]['solve_s']:.1f} s", file=sys.stderr)
    return rows


# ----------------------------------------------------------------------------- report
def verdicts(headline: dict) -> dict:
    out = {}
    for key, (op, bound) in TARGETS.items():
        value = headline[key]
        out[key] = {"value": value, "target": f"{op} {bound:g}", "met": value <= bound}
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Benchmarks (SD-1.5-shaped random pipeline)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['memory_gb']} GB; "
        f"Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}, transformers {m['transformers']}.",
        f"Command: `{report['command']}` ({report['date']}).",
        "",
        "| figure | value | target | met |",
        "|---|---|---|---|",
    ]
    fmt = {"lora_rel_error": "{:.2e}", "peak_rss_gb": "{:.2f} GB", "cold_erase_s": "{:.1f} s", "apply_s": "{:.2f} s"}
    for key, v in report["targets"].items():
        value = fmt.get(key, "{:.2f}").format(v["value"])
        lines.append(f"| `{key}` | {value} | {v['target']} | {'yes' if v['met'] else '**no**'} |")
    d = report["details"]
    lines += [
        "",
        f"Solve times (median of {report['repeats']}, weights loaded, {d['n_constrained_tokens']} constrained tokens, "
        f"{d['n_preserve_prompts']} preserve prompts, {d['n_captions']} default preserve captions (cached summary), "
        f"{d['n_soft_pairs']} misspelled targets): " + ", ".join(f"{k} {v:.2f} s" for k, v in d["solve_s"].items())
        + f"; one text-encoder pass over the same {d['text_pass_prompts']} prompts {d['text_pass_s']:.2f} s. "
        f"Without the default captions: erasepro / uce = {d['erasepro_over_uce_no_captions']:.2f}; "
        f"without any preservation: {d['erasepro_over_uce_no_preserve']:.2f}.",
        f"Cold erase: {d['cold_erase_s']:.1f} s and {d['peak_rss_gb']:.2f} GB with the caption summary cached; "
        f"{d['cold_erase_first_use_s']:.1f} s and {d['peak_rss_first_use_gb']:.2f} GB on first use of a base model "
        f"(computes and caches it). Adapter {d['adapter_mb']:.1f} MB. Apply: hooks {d['apply_hooks_s']:.2f} s, fused "
        f"{d['apply_fused_s']:.2f} s; forward overhead once fused {100 * d['fused_overhead']:+.1f} %, with hooks "
        f"{100 * d['hooks_overhead']:+.1f} % ({d['forward']}).",
        "",
        "## Scaling (one process per row)",
        "",
        "| concepts | templates | policy | constraints | solve s (of which captions) | peak RSS GB | adapter MB | TE: N ≤ d | max residual TE | max residual K/V | zero residual |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["scaling"]:
        te_res = "–" if r["max_residual_te"] is None else f"{r['max_residual_te']:.1e}"
        worst = max(v for v in (r["max_residual_te"], r["max_residual_kv"]) if v is not None)
        lines.append(
            f"| {r['concepts']} | {r['templates']} | {r['token_policy']} | {r['constraints']} | {r['solve_s']:.1f} ({r['captions_s']:.1f}) | "
            f"{r['peak_rss_gb']:.2f} | {r['adapter_mb']:.1f} | {'yes' if r['constraints'] <= r['te_width'] else 'no'} | "
            f"{te_res} | {r['max_residual_kv']:.1e} | {'yes' if worst <= r['residual_tol'] else '**no** (least squares)'} |"
        )
    lines += [
        "",
        "Capacity: exact zero residual needs the constraints to be independent and at most the input width "
        f"({report['scaling'][0]['te_width']} at the text-encoder mlp.fc2 sites, {report['scaling'][0]['kv_width']} at to_k/to_v). "
        "Beyond it (LS) the solver returns the minimum-norm least-squares update, reports rank and residual per site, "
        "and warns (or fails under solver.strict). The caption summary is computed on the first solve under a policy "
        "that keeps other positions (eos keeps one token a caption, the others every position) and read from the "
        "cache after that. Misspelled targets are soft columns: they cost no capacity but widen the stored factors.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", nargs=3, metavar=("CONCEPTS", "TEMPLATES", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(scaling_case(int(args.case[0]), int(args.case[1]), args.case[2])))
        return 0
    sys.path.insert(0, str(HERE))
    from build_sd15 import build

    build()
    repeats = 3 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        cold = cold_erase(Path(tmp))  # first child process: its ru_maxrss is its own
        os.environ["ERASEPRO_CACHE"] = str(Path(tmp) / "cache")  # the caption summary cold_erase computed
        details = {**solve_ratios(repeats), **{k: v for k, v in cold.items() if k != "folder"}}
        details.update(apply_and_overhead(Path(cold["folder"]), repeats))
        rows = scaling(args.quick)
    headline = {k: details[k] for k in TARGETS}
    report = {
        "command": "python benchmarks/run.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
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
