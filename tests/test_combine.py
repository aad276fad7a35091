"""`erasepro combine`: several manifests solved jointly into one erasure."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import kv

from conftest import DEMO
from erasepro_hub import load_erasure
from erasepro_hub.combine import SHARED, combined_recipe
from erasepro_hub.errors import ManifestError
from erasepro_hub.manifest import Preserve, Prompts, load_manifest, recipe_sha256
from erasepro_hub.models.loading import load_builtin
from erasepro_hub.models.prompts import Prompt, encode, pair_positions
from erasepro_hub.recipe import training_pairs


def second_manifest(tmp_path, **changes):
    data = yaml.safe_load(DEMO.read_text())
    data.update(name="demo-monet", concepts=[{"target": "Claude Monet", "anchor": "a painting"}])
    data["preserve"]["concepts"] = ["Pablo Picasso", "a photo of a cat"]
    data.update(changes)
    path = tmp_path / "monet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_the_combined_recipe_holds_every_concept_and_records_its_sources(tmp_path):
    other = second_manifest(tmp_path)
    recipe = combined_recipe([DEMO, other])
    assert [c.target for c in recipe.concepts] == ["Vincent van Gogh", "Claude Monet"]
    assert [s.name for s in recipe.sources] == ["demo-van-gogh", "demo-monet"]
    assert recipe.sources[1].recipe_sha256 == recipe_sha256(load_manifest(other))
    assert recipe.name == "demo-van-gogh_demo-monet"


def test_sources_that_would_solve_differently_are_refused(tmp_path):
    other = second_manifest(tmp_path, method="uce")
    with pytest.raises(ManifestError, match="method"):
        combined_recipe([DEMO, other])
    other = second_manifest(tmp_path, preserve={"concepts": ["a photo of a cat"], "positions": "window"})
    with pytest.raises(ManifestError, match="preserve.positions"):
        combined_recipe([DEMO, other])
    with pytest.raises(ManifestError, match="at least two"):
        combined_recipe([DEMO])
    with pytest.raises(ManifestError, match="more than one source"):
        combined_recipe([DEMO, DEMO])


@pytest.mark.parametrize(("section", "model", "merged"), [
    ("preserve", Preserve, {"concepts", "templates"}),
    ("prompts", Prompts, {"templates", "kind", "bank_size"}),
])
def test_every_setting_is_either_shared_or_merged(section, model, merged):
    shared = {field.split(".", 1)[1] for field in SHARED if field.startswith(section + ".")}
    assert not shared & merged
    assert shared | merged == set(model.model_fields), "a new setting must be added to SHARED or merged"


def _residual_of(folder, concept, edited, original):
    """max over K/V sites of ||K'(target) − K(anchor)|| / ||K(anchor)|| for one concept's training pairs."""
    pairs = [p for p in training_pairs(load_manifest(folder / "erasepro.yaml")) if p.concept == concept]
    manifest = load_manifest(folder / "erasepro.yaml")
    t = encode(original.tokenizer, [Prompt(p.target, p.prefix) for p in pairs])
    a = encode(original.tokenizer, [Prompt(p.anchor, p.prefix) for p in pairs])
    pos = pair_positions(manifest.solver.token_policy, pairs, t, a, list(range(len(pairs))))
    ref, _ = kv(original, [p.anchor for p in pairs])
    got, _ = kv(edited, [p.target for p in pairs])
    worst = 0.0
    for name in ref:
        for i in range(2):
            x = ref[name][i][pos.a_rows, pos.a_pos]
            y = got[name][i][pos.t_rows, pos.t_pos]
            worst = max(worst, float((y - x).norm() / x.norm()))
    return worst


def test_combine_erases_every_concept_jointly(tmp_path, capsys):
    from erasepro_hub.cli import main

    other = second_manifest(tmp_path)
    out = tmp_path / "both"
    assert main(["combine", str(DEMO), str(other), "--out", str(out)]) == 0
    original, edited = load_builtin("tiny-sd")[0], load_builtin("tiny-sd")[0]
    load_erasure(edited, out)
    with torch.no_grad():
        residuals = [_residual_of(out, concept, edited, original) for concept in (0, 1)]
    assert max(residuals) <= 1e-5, residuals
    assert load_manifest(out / "erasepro.yaml").sources[0].name == "demo-van-gogh"


def test_a_concept_one_source_preserves_and_another_erases_is_erased(tmp_path):
    other = second_manifest(tmp_path)
    data = yaml.safe_load(other.read_text())
    data["preserve"]["concepts"] = ["Vincent van Gogh", "a photo of a cat"]
    other.write_text(yaml.safe_dump(data))
    with pytest.warns(UserWarning, match="Vincent van Gogh"):
        recipe = combined_recipe([DEMO, other])  # the demo preserves Claude Monet; the other erases him
    assert "Claude Monet" not in recipe.preserve.concepts and "Vincent van Gogh" not in recipe.preserve.concepts


def test_unnamed_sources_give_a_valid_name(tmp_path):
    data = yaml.safe_load(second_manifest(tmp_path).read_text())
    del data["name"]
    path = tmp_path / "no name here.yaml"
    path.write_text(yaml.safe_dump(data))
    assert combined_recipe([DEMO, path]).name == "demo-van-gogh_no_name_here"
