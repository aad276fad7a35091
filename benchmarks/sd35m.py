"""Benchmarks at Stable Diffusion 3.5 Medium shapes (random weights; T5-XXL reduced in depth). Figures, not tests.

    python benchmarks/sd35m.py                 # writes benchmarks/results/sd35m.{json,md}
    python benchmarks/sd35m.py --threads 2 --repeats 3 --t5-layers 2 4

The folders are built by build_sd35m.py (CLIP-L and CLIP-G at full depth, T5-XXL at ``--t5-layers`` of its 24
blocks in bfloat16, the transformer's two text-reading tensors at their real shapes). What is measured, side by
side in one run where it is a ratio:

* cold ``erasepro erase`` (load + solve + metrics + write) on one concept × 4 templates: wall time and peak RSS,
  per T5 depth; the peak memory with the full 24-block T5 is estimated from the deepest measured peak and the
  stored bytes of the missing blocks;
* ErasePro solve / own UCE solve (published last-token setting) on the loaded model, medians;
* the adapter's size against the dense updates, and the LoRA reconstruction error;
* capacity: the constraint columns of each final-stage site (``context_embedder``: 4096 inputs; the pooled-text
  linear: 2048) and of the text-encoder stages, for 1-100 concepts — counted from the tokenisation, the same
  call the solver makes.

The manifest is benchmarks/sd15-one-concept.yaml with the built folder as base model and
``preserve.captions: none``: the default caption set (328 captions through CLIP-G and T5 at 256 tokens) costs
minutes on a CPU, once per model (it is cached on disk), and is left out of these figures. There is no reference
UCE implementation for SD 3 to compare against (the published one edits SD 1.x UNets only).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build_sd35m  # noqa: E402
import run as common  # noqa: E402  (the SD-1.5 benchmark's helpers)

RESULTS = HERE / "results"
CONCEPT_COUNTS = (1, 10, 50, 100)


def recipe_for(folder: Path, concepts: int = 1, misspellings: bool = True):
    """The SD-1.5 benchmark manifest on ``folder`` without the caption set (``concepts`` generated names)."""
    from erasepro_hub.manifest import to_data
    from erasepro_hub.manifest.schema import Recipe

    data = to_data(common.scaling_recipe(concepts, 4, common.default_policy()))
    data["base_model"] = {"id": str(folder)}
    data["preserve"]["captions"] = "none"
    data["prompts"]["misspellings"] = misspellings
    if concepts == 1:
        data["concepts"] = [{"target": "Van Gogh", "anchor": "art"}]
    return Recipe.model_validate(data)


def write_manifest(recipe, path: Path) -> Path:
    from erasepro_hub.manifest import dump_yaml

    path.write_text(dump_yaml(recipe))
    return path


def cold(folder: Path, repeats: int, threads: int, workdir: Path) -> dict:
    """Whole ``erasepro erase`` processes after one untimed run: wall seconds and peak RSS (GB), and the folder of
    the last one."""
    manifest = write_manifest(recipe_for(folder), workdir / f"{folder.name}.yaml")
    env = common.child_env(threads)
    walls, peaks = [], []
    out = workdir / f"{folder.name}-out"
    command = [str(Path(sys.executable).parent / "erasepro"), "erase", str(manifest), "--out", str(out), "--overwrite"]
    common.timed_with_peak(command, workdir / "peak", env)  # untimed: brings the folder into the page cache
    for _ in range(repeats):
        wall, peak = common.timed_with_peak(command, workdir / "peak", env)
        walls.append(wall)
        peaks.append(peak)
    return {"wall_s": sorted(walls)[len(walls) // 2], "wall_samples_s": walls, "peak_rss_gb": max(peaks), "out": out}


def solve_ratio(folder: Path, repeats: int) -> dict:
    """ErasePro solve / own UCE solve (published last-token setting) on one loaded model, medians."""
    import warnings

    from erasepro_hub import erase as E
    from erasepro_hub import recipe as R
    from erasepro_hub.models.progressive import solve_erasure

    recipe = recipe_for(folder)
    base = E.load_base(recipe)
    uce, setting = common.last_token_uce(recipe)
    plans = {"erasepro": R.plan_from_recipe(recipe), "uce": R.plan_from_recipe(uce)}
    times, reports = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plan in plans.items():
            solve_erasure(base.model, plan)  # warm-up (first-call allocations)
            times[name], samples = common.median_time(lambda plan=plan: solve_erasure(base.model, plan), repeats)
            sol = solve_erasure(base.model, plan)
            reports[name] = {s.key: s.report for s in sol.sites}
            if name == "erasepro":
                rel_error = common.lora_rel_error(sol.deltas)
                timings = sol.timings
    final = {key: {"n_constraints": r.n_constraints, "input_dim": r.input_dim, "residual": r.residual,
                   "constraint_rank": r.constraint_rank, "update_rank": r.update_rank}
             for key, r in reports["erasepro"].items() if key.startswith("transformer.")}
    return {
        "erasepro_solve_s": times["erasepro"],
        "uce_solve_s": times["uce"],
        "erasepro_over_uce": times["erasepro"] / times["uce"],
        "uce_setting": setting,
        "lora_rel_error": rel_error,
        "erasepro_timings_s": {k: round(v, 3) for k, v in timings.items()},
        "final_sites": final,
        "te_sites": sum(1 for key in reports["erasepro"] if key.startswith("text_encoder")),
    }


def capacity(folder: Path) -> list[dict]:
    """Constraint columns per site kind against its input width, for growing concept counts (tokenisation only)."""
    from erasepro_hub import erase as E
    from erasepro_hub import recipe as R
    from erasepro_hub.models.progressive import _tokenize

    model = E.load_base(recipe_for(folder)).model
    widths = {
        "context_embedder": model.cross_attention_dim,
        "pooled_linear": next(iter(model.pooled_weights.values())).shape[1],
        "clip_l_fc2": model.text_encoders[0].model.config.intermediate_size,
        "clip_g_fc2": model.text_encoders[1].model.config.intermediate_size,
    }
    rows = []
    for n in CONCEPT_COUNTS:
        plan = R.plan_from_recipe(recipe_for(folder, n, misspellings=False))
        tokens = _tokenize(model, plan)
        clip = len(tokens.encoders[0].positions)
        counts = {"context_embedder": len(tokens.final), "pooled_linear": len(plan.pairs), "clip_l_fc2": clip,
                  "clip_g_fc2": clip}
        rows.append({"concepts": n, "prompts": len(plan.pairs), "columns": counts,
                     "within": {k: counts[k] <= widths[k] for k in counts}})
    return [{"widths": widths}, *rows]


def t5_block_gb(folder: Path) -> float:
    """The bytes (GB) of one T5 block as stored (its tensors in ``text_encoder_3``, read from the file header)."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(folder / "text_encoder_3" / "model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            if ".block.1." in key:
                piece = handle.get_slice(key)
                size = {"BF16": 2, "F16": 2, "F32": 4}[piece.get_dtype()]
                for n in piece.get_shape():
                    size *= int(n)
                total += size
    return total / 2**30


def full_depth_memory(cold: dict, block_gb: float) -> dict:
    """Peak RSS with all 24 T5 blocks: the deepest measured peak plus the missing blocks' stored bytes (the
    T5 weights are held for the whole run; its activations do not grow with depth). The slope between the
    measured peaks is reported beside it."""
    depths = sorted(cold, key=int)
    deepest = depths[-1]
    estimate = cold[deepest]["peak_rss_gb"] + (24 - int(deepest)) * block_gb
    slope = None
    if len(depths) >= 2:
        first = depths[0]
        slope = (cold[deepest]["peak_rss_gb"] - cold[first]["peak_rss_gb"]) / (int(deepest) - int(first))
    return {"per_block_gb": block_gb, "peak_rss_gb": estimate, "measured_slope_gb_per_block": slope}


def markdown(report: dict) -> str:
    lines = ["# SD 3.5 Medium shapes (random weights)", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch threads "
             f"{report['threads']}; load average before/after {report['load_before']} / {report['load_after']}.",
             "T5-XXL reduced to the depths below (of 24 blocks), bfloat16; CLIP-L and CLIP-G full depth; "
             "`preserve.captions: none`.", "",
             "| T5 blocks | cold `erase` (median) | peak RSS |", "|---|---|---|"]
    for depth, c in report["cold"].items():
        lines.append(f"| {depth} | {c['wall_s']:.1f} s | {c['peak_rss_gb']:.2f} GB |")
    m = report["memory_24_blocks"]
    slope = m.get("measured_slope_gb_per_block")
    lines += ["", f"Peak RSS with the full 24-block T5 (estimate: the deepest measured peak plus the missing "
              f"blocks' stored bytes, {m['per_block_gb']:.3f} GB each in bfloat16): {m['peak_rss_gb']:.1f} GB"
              + (f"; the measured peaks grow only {slope:.3f} GB per block, so the estimate is on the high side."
                 if slope is not None else "."), ""]
    s = report["solve"]
    lines += [f"Solve on the loaded model ({report['solve_t5_blocks']} T5 blocks): ErasePro {s['erasepro_solve_s']:.2f} s, "
              f"own UCE ({s['uce_setting']}) {s['uce_solve_s']:.2f} s, ratio {s['erasepro_over_uce']:.2f}. "
              f"LoRA reconstruction error {s['lora_rel_error']:.1e}; adapter {report['adapter']['adapter_over_dense']:.3f} "
              "of the dense updates.", "", "Final-stage sites (one concept × 4 templates):", "",
              "| site | constraints | input width | rank | residual |", "|---|---|---|---|---|"]
    for key, f in s["final_sites"].items():
        lines.append(f"| `{key}` | {f['n_constraints']} | {f['input_dim']} | {f['constraint_rank']} | {f['residual']:.1e} |")
    widths, *rows = report["capacity"]
    names = list(widths["widths"])
    lines += ["", "Capacity (constraint columns / input width, default token policy, no misspellings):", "",
              "| concepts | prompts | " + " | ".join(f"{n} (/{widths['widths'][n]})" for n in names) + " |",
              "|---|---|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row['columns'][n]}{'' if row['within'][n] else ' (over)'}" for n in names]
        lines.append(f"| {row['concepts']} | {row['prompts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--t5-layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--report-only", action="store_true",
                        help="re-render results/sd35m.{json,md} from the last run's JSON (no measurement)")
    args = parser.parse_args()
    if args.report_only:
        report = json.loads((RESULTS / "sd35m.json").read_text())
        deepest = max(report["cold"], key=int)
        report["memory_24_blocks"] = full_depth_memory(report["cold"], t5_block_gb(build_sd35m.default_out(int(deepest))))
        return write(report)
    torch.set_num_threads(args.threads)
    folders = {depth: build_sd35m.build(depth) for depth in args.t5_layers}
    report: dict = {"machine": common.machine(), "threads": args.threads, "load_before": common.load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        report["cold"] = {}
        for depth, folder in folders.items():
            result = cold(folder, args.repeats if depth == args.t5_layers[0] else 1, args.threads, workdir)
            out = result.pop("out")
            if depth == args.t5_layers[0]:
                report["adapter"] = common.adapter_sizes(out / common.ADAPTER_FILE)
            report["cold"][depth] = result
    depths = sorted(report["cold"])
    report["memory_24_blocks"] = full_depth_memory(report["cold"], t5_block_gb(folders[depths[-1]]))
    report["solve_t5_blocks"] = depths[0]
    report["solve"] = solve_ratio(folders[depths[0]], args.repeats)
    report["capacity"] = capacity(folders[depths[0]])
    report["load_after"] = common.load_average()
    return write(report)


def write(report: dict) -> int:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sd35m.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / "sd35m.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
