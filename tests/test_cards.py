"""Model cards: golden files, Hub-parsable metadata, and user strings that stay data."""

from __future__ import annotations

import os
import re

import pytest
import yaml

from erasepro_hub.cards import render_card
from erasepro_hub.errors import ManifestError
from erasepro_hub.manifest import Manifest, parse_manifest

from conftest import REPO

GOLDEN = REPO / "tests" / "golden"
TRICKY_TARGET = 'He said "stop": {{ 7*7 }} {% if true %}x{% endif %} ``` | <b>bold</b> #1'
TRICKY_ANCHOR = "café « naïve » ✓ 日本語: a: b"


def fixed_manifest(base_id: str = "alice/tiny-sd-base", **changes) -> Manifest:
    recipe = {
        "schema_version": 1,
        "name": "tricky",
        "description": "Line one with {{ braces }} and {% tags %}.\n---\nnot: front matter\n<script>x</script>",
        "base_model": {"id": base_id, "revision": "0123456789abcdef0123456789abcdef01234567" if "/" in base_id and not base_id.startswith("builtin") else None},
        "method": "erasepro",
        "concepts": [{"target": TRICKY_TARGET, "anchor": TRICKY_ANCHOR}, {"target": "parachute", "anchor": ""}],
        "prompts": {"templates": ["{}", "a photo of {}"]},
        "evaluation": {"preserve_prompts": ["multi\\nline? no: a 'quoted' prompt"]},
    }
    recipe.update(changes)
    site = {"name": "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "stage": "unet.cross_attention",
            "shape": [64, 192], "rank": 10, "update_rank": 10, "n_constraints": 10, "residual": 1e-15, "condition": 12.0,
            "delta_norm": 1.5, "delta_norm_rel": 0.25}
    data = {
        **recipe,
        "outputs": {"recipe_sha256": "0" * 64, "family": "sd1", "base_license": "creativeml-openrail-m",
                    "adapter_file": "pytorch_lora_weights.safetensors", "files": {"pytorch_lora_weights.safetensors": "1" * 64},
                    "base_fingerprints": {}, "sites": [site], "regenerate_atol": 1e-6},
        "metrics": {"residual_train": 3.5e-7, "residual_train_k": 3.4e-7, "residual_train_v": 3.6e-7,
                    "residual_heldout": 0.42, "preserve_drift": 0.2, "delta_norm_total": 1.5},
        "provenance": {"tool_version": "0.1.0", "python": "3.11", "platform": "test", "device": "cpu",
                       "libraries": {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.24.0"},
                       "command": ["erasepro", "erase"], "created_at": "2026-01-01T00:00:00+00:00", "solve_seconds": 0.1},
    }
    return Manifest.model_validate(data)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("ERASEPRO_UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from the golden file (ERASEPRO_UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize(
    "name, kwargs, base",
    [
        ("card_hub_base.md", {"repo_id": "alice/erasure", "revision": "v1", "revision_kind": "tag"}, "alice/tiny-sd-base"),
        ("card_builtin.md", {}, "builtin:tiny-sd"),
    ],
)
def test_golden_cards(name, kwargs, base):
    check_golden(name, render_card(fixed_manifest(base), **kwargs))


@pytest.mark.parametrize(
    "revision, kind, says",
    [
        ("v1", "tag", "follows that tag."),
        ("dev", "branch", "follows that branch."),
        ("release", None, "follows that tag or branch."),  # a card rendered without knowing what the name is
        ("main", None, "follows that branch."),
        ("a" * 40, None, None),  # a commit: nothing to follow
    ],
)
def test_the_card_says_what_the_revision_is_only_when_it_knows(revision, kind, says):
    text = render_card(fixed_manifest(), repo_id="alice/erasure", revision=revision, revision_kind=kind)
    assert f'revision="{revision}",' in text  # the snippet loads that revision
    if says is None:
        assert "follows that" not in text
    else:
        assert says in text


def test_card_parses_with_the_hub_client():
    from huggingface_hub import ModelCard

    card = ModelCard(render_card(fixed_manifest(), repo_id="alice/erasure", revision="v1"))
    assert card.data.base_model == "alice/tiny-sd-base"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.license == "creativeml-openrail-m"
    assert {"lora", "diffusers", "text-to-image", "stable-diffusion", "concept-erasure", "erasepro"} <= set(card.data.tags)
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {
        ("training prompts", "residual_train"): 3.5e-7,
        ("held-out prompts", "residual_heldout"): 0.42,
        ("preserve prompts", "preserve_drift"): 0.2,
    }
    assert card.data.to_dict()["model-index"][0]["name"] == "tricky"


def test_user_strings_are_data_not_template_or_markup():
    text = render_card(fixed_manifest(), repo_id="alice/erasure", revision="v1")
    front, body = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S).groups()
    assert isinstance(yaml.safe_load(front), dict)  # the description's "---" did not end the front matter
    assert "49" not in text  # {{ 7*7 }} was never evaluated
    assert "{{ 7*7 }}" in text and "{% if true %}" in text  # kept verbatim in the manifest block
    assert "<b>bold</b>" not in body.split("## How it was made")[0]  # no HTML outside the code block
    assert "<script>" not in body.split("## How it was made")[0]
    # the table row of the tricky concept has exactly three cell borders: pipes in it were escaped
    row = next(line for line in body.splitlines() if "He said" in line and line.startswith("|"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 3
    assert TRICKY_ANCHOR.replace(":", ":") in text  # non-ASCII kept
    # the manifest block's fence is longer than the ``` inside the concept, so the block is not cut short
    fence = re.search(r"^(`{3,})yaml$", body, re.M).group(1)
    assert len(fence) >= 4
    block = body.split(fence + "yaml\n", 1)[1].split("\n" + fence, 1)[0]
    assert yaml.safe_load(block)["concepts"][0]["target"] == TRICKY_TARGET


def test_newlines_in_concepts_are_refused():
    with pytest.raises(ManifestError, match="concepts.0.target"):
        parse_manifest(
            "schema_version: 1\nbase_model: {id: builtin:tiny-sd}\nprompts: {templates: ['{}']}\n"
            "concepts: [{target: \"two\\nlines\", anchor: a}]\n"
        )


def test_written_card_and_plot(demo_folder):
    from huggingface_hub import ModelCard

    card = ModelCard((demo_folder / "README.md").read_text())
    assert card.data.license == "apache-2.0" and card.data.base_model is None  # builtin: no Hub base
    png = (demo_folder / "delta_norms.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "![" in card.text and "delta_norms.png" in card.text


def test_card_command_rerenders_identically(demo_folder, tmp_path, capsys):
    import shutil

    from erasepro_hub.cli import main

    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    before = {n: (folder / n).read_bytes() for n in ("README.md", "delta_norms.png")}
    assert main(["card", str(folder)]) == 0
    assert {n: (folder / n).read_bytes() for n in before} == before
    assert main(["card", str(folder), "--repo-id", "alice/x", "--revision", "v2"]) == 0
    assert '"alice/x"' in (folder / "README.md").read_text()
