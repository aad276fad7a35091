"""What stacking erasure adapters and fractional adapter weights do to the K/V residual, measured.

Two erasures on the embedded SD model (``manifests/demo.yaml``: Vincent van Gogh → "a painting", and
the same recipe for Claude Monet), loaded with plain diffusers under their adapter names. For each
setting the table gives, per concept, the worst relative K/V residual over the cross-attention sites
at the constrained positions of its training prompts (0: the target's keys and values are the anchor's;
the unedited model is the reference "no edit" row), and the combined erasure (`erasepro combine`).

    python benchmarks/stacking.py          # prints the Markdown table, writes benchmarks/results/stacking.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import kv  # noqa: E402  (the tests' K/V through diffusers' own encode_prompt)

from erasepro_hub.combine import combine  # noqa: E402
from erasepro_hub.erase import erase  # noqa: E402
from erasepro_hub.manifest import load_manifest  # noqa: E402
from erasepro_hub.models.loading import load_builtin  # noqa: E402
from erasepro_hub.models.prompts import Prompt, encode, pair_positions  # noqa: E402
from erasepro_hub.recipe import training_pairs  # noqa: E402

ADAPTER = "pytorch_lora_weights.safetensors"


def residual(folder: Path, edited, original) -> float:
    pairs = training_pairs(load_manifest(folder / "erasepro.yaml"))
    policy = load_manifest(folder / "erasepro.yaml").solver.token_policy
    t = encode(original.tokenizer, [Prompt(p.target, p.prefix) for p in pairs])
    a = encode(original.tokenizer, [Prompt(p.anchor, p.prefix) for p in pairs])
    pos = pair_positions(policy, pairs, t, a, list(range(len(pairs))))
    with torch.no_grad():
        ref, _ = kv(original, [p.anchor for p in pairs])
        got, _ = kv(edited, [p.target for p in pairs])
    return max(
        float((got[n][i][pos.t_rows, pos.t_pos] - ref[n][i][pos.a_rows, pos.a_pos]).norm() / ref[n][i][pos.a_rows, pos.a_pos].norm())
        for n in ref
        for i in range(2)
    )


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="erasepro-stacking-"))
    demo = ROOT / "manifests" / "demo.yaml"
    data = yaml.safe_load(demo.read_text())
    data.update(name="demo-monet", concepts=[{"target": "Claude Monet", "anchor": "a painting"}])
    data["preserve"]["concepts"] = ["Pablo Picasso", "a photo of a cat"]
    (work / "monet.yaml").write_text(yaml.safe_dump(data))
    gogh = erase(demo, work / "gogh")
    monet = erase(work / "monet.yaml", work / "monet")
    both = combine([demo, work / "monet.yaml"], work / "both")
    original = load_builtin("tiny-sd")[0]

    def measure(setup) -> dict:
        pipe = load_builtin("tiny-sd")[0]
        setup(pipe)
        return {"van_gogh": residual(gogh, pipe, original), "monet": residual(monet, pipe, original)}

    def loaded(*names_weights):
        def setup(pipe):
            for folder, name, _ in names_weights:
                pipe.load_lora_weights(str(folder), weight_name=ADAPTER, adapter_name=name)
            pipe.set_adapters([n for _, n, _ in names_weights], adapter_weights=[w for _, _, w in names_weights])
        return setup

    rows = {
        "no edit": measure(lambda pipe: None),
        "Van Gogh adapter alone": measure(loaded((gogh, "gogh", 1.0))),
        "Monet adapter alone": measure(loaded((monet, "monet", 1.0))),
        "both adapters active (weights 1, 1)": measure(loaded((gogh, "gogh", 1.0), (monet, "monet", 1.0))),
        "Van Gogh adapter at weight 0.5": measure(loaded((gogh, "gogh", 0.5))),
        "both adapters at weights 0.5, 0.5": measure(loaded((gogh, "gogh", 0.5), (monet, "monet", 0.5))),
        "combined erasure (erasepro combine)": measure(
            lambda pipe: pipe.load_lora_weights(str(both), weight_name=ADAPTER, adapter_name="both")
        ),
    }
    out = HERE / "results" / "stacking.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"model": "builtin:tiny-sd", "metric": "max K/V relative residual", "rows": rows}, indent=2) + "\n")
    print("| setting | Van Gogh residual | Monet residual |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['van_gogh']:.3g} | {r['monet']:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
