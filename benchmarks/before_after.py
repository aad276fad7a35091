"""Solve time before and after a change, measured side by side in one run (alternating processes).

    python benchmarks/before_after.py REV [--repeats 3]

REV is checked out into a temporary git worktree; each measurement is a fresh process that imports
erasepro_hub from one tree or the other and times erasepro and uce solves of the SD-1.5 benchmark
manifest (weights loaded, median of the in-process repeats). Writes benchmarks/results/before_after.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# run with python -P (no current directory on sys.path), so PYTHONPATH decides which tree is imported
MEASURE = r"""
import erasepro_hub, sys
print(erasepro_hub.__file__, file=sys.stderr)
import dataclasses, json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
from erasepro_hub import erase as E
from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.progressive import solve_erasure
recipe = load_manifest(sys.argv[1]).recipe()
base = E.load_base(recipe)
try:  # where the tree under test keeps it
    from erasepro_hub.recipe import plan_from_recipe
except ImportError:
    plan_from_recipe = E.plan_from_recipe
plan = plan_from_recipe(recipe)
variants = {"erasepro": plan, "uce": plan_from_recipe(recipe.model_copy(update={"method": "uce"}))}
solve_erasure(base.model, plan)
times = {k: [] for k in variants}
for _ in range(int(sys.argv[2])):
    for name, p in variants.items():
        t = time.perf_counter(); solve_erasure(base.model, p); times[name].append(time.perf_counter() - t)
print(json.dumps({k: statistics.median(v) for k, v in times.items()}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    manifest = ROOT / "benchmarks" / "sd15-one-concept.yaml"
    results = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.rev], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            for _ in range(args.rounds):
                for label, path in (("before", tree), ("after", ROOT)):
                    env = dict(os.environ, PYTHONPATH=str(path), HF_HUB_OFFLINE="1")
                    out = subprocess.run([sys.executable, "-P", "-c", MEASURE, str(manifest), str(args.repeats)], cwd=ROOT,
                                         env=env, capture_output=True, text=True, check=True)
                    results[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
    summary = {}
    for label, rows in results.items():
        erasepro = sorted(r["erasepro"] for r in rows)[len(rows) // 2]
        uce = sorted(r["uce"] for r in rows)[len(rows) // 2]
        summary[label] = {"erasepro_s": erasepro, "uce_s": uce, "erasepro_over_uce": erasepro / uce, "runs": rows}
    report = {"command": f"python benchmarks/before_after.py {args.rev}", "before_revision": args.rev, **summary}
    out = ROOT / "benchmarks" / "results" / "before_after.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for label in ("before", "after"):
        s = summary[label]
        print(f"{label:6s} erasepro {s['erasepro_s']:.2f} s  uce {s['uce_s']:.2f} s  ratio {s['erasepro_over_uce']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
