"""The manifest schema: strict, canonical, stably hashed; every shipped manifest validates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from erasepro_hub.errors import ManifestError
from erasepro_hub.manifest import Recipe, dump_yaml, load_manifest, parse_manifest, recipe_sha256

from conftest import DEMO, REPO

SHIPPED = sorted((REPO / "manifests").rglob("*.yaml"))


def test_every_shipped_manifest_validates():
    assert len(SHIPPED) >= 6
    for path in SHIPPED:
        manifest = load_manifest(path)
        assert manifest.outputs is None  # recipes, not results
        assert manifest.concepts and manifest.prompts.templates


def test_every_shipped_manifest_is_far_within_the_input_limits():
    from erasepro_hub.manifest.limits import MAX_PROMPTS, prompt_counts

    for path in SHIPPED:
        assert sum(prompt_counts(load_manifest(path)).values()) * 10 <= MAX_PROMPTS, path


def test_real_model_manifests_name_hub_models():
    kinds = {load_manifest(p).base_model.id for p in SHIPPED}
    assert "builtin:tiny-sd" in kinds
    assert any("stable-diffusion-xl" in k for k in kinds)
    assert any("v1-5" in k for k in kinds)


def test_canonical_yaml_round_trips_byte_for_byte():
    manifest = load_manifest(DEMO)
    text = dump_yaml(manifest)
    again = parse_manifest(text)
    assert dump_yaml(again) == text
    assert again == manifest


def test_hash_is_stable_and_ignores_spelled_out_defaults():
    minimal = parse_manifest(
        "schema_version: 1\nbase_model: {id: builtin:tiny-sd}\n"
        "concepts: [{target: Van Gogh, anchor: art}]\nprompts: {templates: ['a painting by {}']}\n"
    )
    explicit = parse_manifest(dump_yaml(minimal))
    assert recipe_sha256(minimal) == recipe_sha256(explicit)
    assert len(recipe_sha256(minimal)) == 64
    # the hash is a pure function of the content: a known value guards against accidental changes
    changed = parse_manifest(dump_yaml(minimal).replace("anchor: art", "anchor: painting"))
    assert recipe_sha256(changed) != recipe_sha256(minimal)


def test_hash_ignores_outputs_metrics_and_provenance(demo_folder):
    manifest = load_manifest(demo_folder / "erasepro.yaml")
    recipe = manifest.recipe()
    assert isinstance(recipe, Recipe)
    assert recipe_sha256(manifest) == recipe_sha256(recipe) == manifest.outputs.recipe_sha256
    # and the resolved manifest of the demo hashes like the demo recipe itself (builtin: nothing to resolve)
    assert recipe_sha256(load_manifest(DEMO)) == manifest.outputs.recipe_sha256


def test_models_are_frozen():
    from pydantic import ValidationError

    manifest = load_manifest(DEMO)
    with pytest.raises(ValidationError, match="frozen"):
        manifest.method = "uce"  # type: ignore[misc]


def test_unknown_keys_list_the_allowed_ones():
    with pytest.raises(ManifestError) as exc:
        parse_manifest(
            "schema_version: 1\nbase_model: {id: builtin:tiny-sd}\nconcepts: [{target: a, anchor: b, weight: 2}]\n"
            "prompts: {templates: ['{}']}\n"
        )
    assert exc.value.problems == [("concepts.0.weight", "unknown key 'weight'; allowed here: anchor, target")]


def test_every_problem_is_reported_at_once():
    with pytest.raises(ManifestError) as exc:
        parse_manifest("schema_version: 1\nmethod: esd\n")
    paths = {path for path, _ in exc.value.problems}
    assert {"base_model", "concepts", "prompts", "method"} <= paths


@pytest.mark.parametrize(
    "snippet, field",
    [
        ("concepts: [{target: a, anchor: b}, {target: a, anchor: c}]", "concepts"),
        ("concepts: [{target: \"a\\nb\", anchor: c}]", "concepts.0.target"),
        ("solver: {rank_rtol: 0}", "solver.rank_rtol"),
        ("solver: {token_policy: middle}", "solver.token_policy"),
        ("preserve: {mode: maybe}", "preserve.mode"),
        ("preserve: {weight: -1}", "preserve.weight"),
        ("adapter: {format: kohya}", "adapter.format"),
        ("name: 'has space'", "name"),
        ("text_encoder: {depth: -1}", "text_encoder.depth"),
        ("uce: {lam: 0}", "uce.lam"),
    ],
)
def test_field_errors(snippet, field):
    base = yaml.safe_load(DEMO.read_text())
    base.update(yaml.safe_load(snippet))
    with pytest.raises(ManifestError) as exc:
        parse_manifest(yaml.safe_dump(base))
    assert field in [path for path, _ in exc.value.problems]


def test_base_model_kinds():
    def ref(value):
        return parse_manifest(
            f"schema_version: 1\nbase_model: {{id: '{value}'}}\nconcepts: [{{target: a, anchor: b}}]\n"
            "prompts: {templates: ['{}']}\n"
        ).base_model

    assert ref("builtin:tiny-sd").kind == "builtin"
    assert ref("./models/sd15").kind == "local"
    assert ref("/abs/sd15").kind == "local"
    assert ref("stable-diffusion-v1-5/stable-diffusion-v1-5").kind == "hub"
    with pytest.raises(ManifestError):
        ref("just-a-name")


def test_load_manifest_accepts_a_folder(demo_folder):
    assert load_manifest(demo_folder).outputs is not None


def test_not_utf8(tmp_path: Path):
    path = tmp_path / "m.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ManifestError, match="UTF-8"):
        load_manifest(path)
