"""What the solver reports and does when the constraints exceed a site's capacity (N > d)."""

from __future__ import annotations

import pytest
import torch

from erasepro_hub.cli import main
from erasepro_hub.errors import CapacityWarning
from erasepro_hub.manifest import load_manifest

# 9 templates × about 28 constrained tokens (32-token window) ≈ 250 columns: more than the
# 192 inputs of every to_k/to_v of builtin:tiny-sd, fewer than the 768 of its mlp.fc2.
MANY = [
    "{}", "a painting by {}", "artwork in the style of {}", "an oil portrait by {}", "a sketch by {}",
    "a mural by {}", "the style of {}", "one landscape by {}", "inspired by {}",
]


def over_capacity(data):
    # the K/V stage alone (with the progressive default, the text-encoder stages already absorb the edit),
    # constraining the padding too (concept-suffix)
    data["prompts"]["templates"] = MANY
    data["method"] = "erasepro-kv"
    data.setdefault("solver", {})["token_policy"] = "concept-suffix"


def test_beyond_capacity_reports_rank_and_residual(erase_variant, capsys):
    folder = erase_variant("over-capacity", over_capacity)
    err = capsys.readouterr().err
    assert err.count("warning: zero residual is not reachable") == 8  # one per K/V site
    assert "253 constraints exceed the input width 192" in err
    manifest = load_manifest(folder / "erasepro.yaml")
    kv = [s for s in manifest.outputs.sites if s.name.startswith("unet.")]
    assert len(kv) == 8 == len(manifest.outputs.sites)
    for site in kv:  # least squares: rank capped at the input width, residual reported
        assert site.n_constraints > 192
        assert site.constraint_rank == 192
        assert site.residual > 1e-3
    assert manifest.metrics["residual_train"] > 1e-3


def test_the_progressive_solve_absorbs_it_in_the_wider_text_encoder_sites(erase_variant):
    """The same prompts with method erasepro: the 768-wide mlp.fc2 stages hold all 253 constraints."""
    def many(data):
        data["prompts"].update(templates=MANY)
        data.setdefault("solver", {})["token_policy"] = "concept-suffix"

    folder = erase_variant("over-capacity-progressive", many)
    manifest = load_manifest(folder / "erasepro.yaml")
    te = [s for s in manifest.outputs.sites if not s.name.startswith("unet.")]
    assert len(te) == 3  # layers 1-3 of the 4-layer encoder (text_encoder.first_layer: 1)
    for site in te:
        assert site.n_constraints == 253 and site.constraint_rank == 253 and site.residual <= 1e-10
    assert manifest.metrics["residual_train"] <= 1e-5


def test_beyond_capacity_under_strict_fails_and_writes_nothing(tmp_path, capsys):
    import yaml

    from conftest import DEMO

    data = yaml.safe_load(DEMO.read_text())
    over_capacity(data)
    data["solver"]["strict"] = True
    manifest = tmp_path / "strict.yaml"
    manifest.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["erase", str(manifest), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "zero residual is not reachable" in err and "exceed the input width 192" in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["strict.yaml"]


def test_eos_policy_brings_it_back_within_capacity(erase_variant):
    def eos(data):
        over_capacity(data)
        data["solver"]["token_policy"] = "eos"

    folder = erase_variant("eos-policy", eos)
    manifest = load_manifest(folder / "erasepro.yaml")
    for site in manifest.outputs.sites:
        assert site.n_constraints == len(MANY)
        assert site.residual <= 1e-10


def test_beyond_capacity_in_the_python_api_warns():
    from erasepro_hub.erase import compute
    from erasepro_hub.manifest import parse_manifest, to_data
    from conftest import DEMO

    data = to_data(load_manifest(DEMO))
    over_capacity(data)
    data["solver"]["token_policy"] = "concept-suffix"
    data["method"] = "erasepro-kv"
    import yaml

    with pytest.warns(CapacityWarning, match="exceed the input width 192"):
        comp = compute(parse_manifest(yaml.safe_dump(data)))
    report = comp.solution.sites[0].report
    assert report.constraint_rank == 192 and report.n_constraints == 253 and not report.within_capacity
    assert comp.stored[comp.solution.sites[0].key].dtype == torch.float32
