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
            "shape": [64, 192], "constraint_rank": 10, "update_rank": 10, "n_constraints": 10, "residual": 1e-15, "condition": 12.0,
            "delta_norm": 1.5, "delta_norm_rel": 0.25}
    data = {
        **recipe,
        "outputs": {"recipe_sha256": "0" * 64, "family": "sd1", "base_license": "creativeml-openrail-m",
                    "adapter_file": "pytorch_lora_weights.safetensors", "files": {"pytorch_lora_weights.safetensors": "1" * 64},
                    "base_fingerprints": {}, "sites": [site]},
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


# ----------------------------------------------------------------------------- hostile strings
HOSTILE = "./ev` <img src=x onerror=alert(5)>`\n\n# Injected heading\n```\n<img src=y>"
HOSTILE_REVISION = "v1\n```\n<img src=x onerror=alert(5)>\n# Injected heading"
HOSTILE_CONCEPT = "<img src=x onerror=alert(5)> ``` # Injected [link](https://evil.example) *em* _em_ $x$ &lt;b&gt;"
PLOT = "delta_norms.png"
GALLERY = "<Gallery />"
SECTIONS = ["# ", "## How to use", "## Metrics", "## How it was made", "## Limitations"]


def split_card(text: str) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """(front matter, prose lines, fenced blocks as (info, content)) of a card, parsed by CommonMark's fence rules.

    Fails when a fence is opened and never closed (a block that swallows the rest of the card).
    """
    assert "\r" not in text
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, "no front matter"
    front = yaml.safe_load(match.group(1))
    assert isinstance(front, dict)
    prose: list[str] = []
    blocks: list[tuple[str, str]] = []
    lines = match.group(2).split("\n")
    i = 0
    while i < len(lines):
        opening = re.match(r"^ {0,3}(`{3,}|~{3,})(.*)$", lines[i])
        if opening and not (opening.group(1)[0] == "`" and "`" in opening.group(2)):
            fence = opening.group(1)
            closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
            end = next((j for j in range(i + 1, len(lines)) if closing.match(lines[j])), None)
            assert end is not None, f"the fence opened at body line {i + 1} is never closed"
            blocks.append((opening.group(2).strip(), "\n".join(lines[i + 1 : end])))
            i = end + 1
        else:
            prose.append(lines[i])
            i += 1
    return front, prose, blocks


def python_strings(source: str) -> set[str]:
    import ast

    nodes = ast.walk(ast.parse(source))
    return {node.value for node in nodes if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def assert_inert(text: str) -> tuple[dict, list[str], list[tuple[str, str]]]:
    """The card's structure is the template's: no HTML, no injected heading, every fence intact and parsable."""
    front, prose, blocks = split_card(text)
    for line in prose:
        if line == GALLERY and front.get("widget"):  # the Hub's gallery of the widget images, the card's own
            continue
        assert not re.search(r"<[A-Za-z/!?]", line), f"raw HTML in the card: {line!r}"
        assert not re.match(r"^ {0,3}(=+|-+)[ \t]*$", line), f"a setext heading underline: {line!r}"
    headings = [line for line in prose if re.match(r"^ {0,3}#{1,6}(\s|$)", line)]
    assert len(headings) == len(SECTIONS) and all(h.startswith(s) for h, s in zip(headings, SECTIONS)), headings
    assert not any(re.match(r"^ {0,3}#+\s*Injected", h) for h in headings)
    infos = [info for info, _ in blocks]
    assert set(infos) == {"python", "yaml", "bash"} and infos[-2:] == ["yaml", "bash"], infos
    for info, content in blocks:
        if info == "python":
            python_strings(content)  # parses
        elif info == "yaml":
            assert isinstance(yaml.safe_load(content), dict)
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # the text-level checks above still ran
        return front, prose, blocks
    html = MarkdownIt("commonmark").enable("table").render(text.split("\n---\n", 1)[1])
    # the only images are the card's own plots, the only links its own
    images = {re.search(r'src="([^"]*)"', tag).group(1) for tag in re.findall(r"<img\b[^>]*>", html)}
    assert images <= {PLOT, "samples.png"}
    assert set(re.findall(r'<a href="([^"]*)"', html)) <= {"https://huggingface.co/alice/tiny-sd-base"}
    assert "onerror" not in re.sub(r"&lt;.*?&gt;", "", html)  # only ever as escaped text
    assert not re.search(r"<(em|strong)>(em|me)</", html)  # the hostile strings' *em* and _em_ stay text
    assert len(re.findall(r"<h[1-6]>", html)) == len(SECTIONS)
    assert html.count("<pre><code") == len(blocks)
    return front, prose, blocks


@pytest.mark.parametrize(
    "base_model",
    [
        {"id": HOSTILE},  # a local folder
        {"id": "alice/tiny-sd-base", "revision": HOSTILE.replace("./", "")},  # a Hub base at a hostile revision
        {"id": "builtin:" + HOSTILE},  # an embedded model's name
    ],
    ids=["local-path", "hub-revision", "builtin-name"],
)
def test_hostile_base_model_strings_stay_text(base_model):
    manifest = fixed_manifest(base_model=base_model)
    text = render_card(manifest, repo_id="alice/erasure", revision="v1")
    _, prose, blocks = assert_inert(text)
    strings = set().union(*(python_strings(content) for info, content in blocks if info == "python"))
    # the snippet loads exactly the recorded base model: the strings survive as Python literals
    if base_model["id"].startswith("builtin:"):
        assert base_model["id"].removeprefix("builtin:") in strings
    else:
        assert base_model["id"] in strings
        assert base_model.get("revision", base_model["id"]) in strings
    recipe = yaml.safe_load(next(content for info, content in blocks if info == "yaml"))
    assert recipe["base_model"] == {"id": base_model["id"], "revision": base_model.get("revision")}
    # the title names the base model on one line; the paragraph after the description names it and its revision
    assert prose[1].startswith("# tricky: concept erasure for ")
    assert ("Injected heading" in prose[1]) == ("Injected" in base_model["id"])
    line = next(line for line in prose if line.startswith("This repository holds"))
    assert "Injected heading" in line and "alert(5)" not in line  # escaped as `alert\(5\)`, on this one line


def test_hostile_concepts_and_license_stay_text():
    from huggingface_hub import ModelCard

    license_ = "mit\n---\n<img src=x onerror=alert(5)>\n# Injected heading\n..."
    data = fixed_manifest(concepts=[{"target": HOSTILE_CONCEPT, "anchor": HOSTILE_CONCEPT[::-1]}]).model_dump()
    data["outputs"]["base_license"] = license_
    text = render_card(Manifest.model_validate(data), repo_id="alice/erasure", revision="v1")
    front, prose, blocks = assert_inert(text)
    row = next(line for line in prose if line.startswith("|") and "Injected" in line)
    assert len(re.findall(r"(?<!\\)\|", row)) == 3
    recipe = yaml.safe_load(next(content for info, content in blocks if info == "yaml"))
    assert recipe["concepts"][0] == {"target": HOSTILE_CONCEPT, "anchor": HOSTILE_CONCEPT[::-1]}
    # the licence stays one value of the front matter, as the Hub reads it
    assert front["license"] == license_ and ModelCard(text).data.license == license_


@pytest.mark.parametrize(
    "kwargs",
    [
        {"revision": HOSTILE_REVISION},
        {"revision": "v1`"},
        {"revision": "v1\tx"},
        {"revision": "v 1"},
        {"revision": "v1\u2028x"},
        {"revision": ""},
        {"repo_id": "alice/x\n```\n<img src=x>"},
        {"repo_id": "alice/x`"},
        {"repo_id": "<img src=x>"},
    ],
)
def test_fence_breaking_revisions_and_repo_ids_are_refused(kwargs):
    from erasepro_hub.errors import EraseProError

    kwargs = {"repo_id": "alice/erasure", "revision": "v1", **kwargs}
    with pytest.raises(EraseProError) as caught:
        render_card(fixed_manifest(), **kwargs)
    assert caught.value.exit_code == 2
    assert ("revision" if "revision" in str(caught.value) else "repository") in str(caught.value)


@pytest.mark.parametrize("flag, value", [("--revision", HOSTILE_REVISION), ("--repo-id", "alice/x\n```\n<img src=x>")])
def test_card_command_refuses_a_fence_breaking_revision_or_repo_id(demo_folder, tmp_path, capsys, flag, value):
    import shutil

    from erasepro_hub.cli import main

    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    before = (folder / "README.md").read_bytes()
    options = {"--repo-id": "alice/x", "--revision": "v1", flag: value}
    assert main(["card", str(folder), *(word for pair in options.items() for word in pair)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert (folder / "README.md").read_bytes() == before


def test_push_refuses_a_fence_breaking_tag_before_uploading(demo_folder, tmp_path, monkeypatch):
    import shutil

    import erasepro_hub
    import erasepro_hub.hub.publish as publish
    from erasepro_hub.errors import EraseProError

    uploads = []
    monkeypatch.setattr(publish, "push", lambda *args, **kwargs: uploads.append(args))
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    before = (folder / "README.md").read_bytes()
    with pytest.raises(EraseProError) as caught:
        erasepro_hub.push(folder, "alice/x", tag=HOSTILE_REVISION)
    assert caught.value.exit_code == 2 and not uploads
    assert (folder / "README.md").read_bytes() == before


def test_the_card_offers_the_two_loaders_as_alternatives():
    text = render_card(fixed_manifest(), repo_id="alice/erasure", revision="v1", revision_kind="tag")
    usage = text.split("## How to use", 1)[1].split("## Metrics", 1)[0]
    _, _, blocks = split_card(text)
    python = [content for info, content in blocks if info == "python"]
    # no single block applies the erasure twice, and the card says to run one or the other
    assert not any("load_lora_weights" in block and "load_erasure" in block for block in python)
    assert any("load_lora_weights" in block for block in python) and any("load_erasure(" in block for block in python)
    assert re.search(r"\bone\b.*\bnot both\b", usage, re.S | re.I)
    assert re.search(r"twice", usage)


# ----------------------------------------------------------------------------- what the Hub's LoRA pages read
def with_outputs(manifest: Manifest, *, family: str | None = None, sites=None, files=None, images=None) -> Manifest:
    """A copy of ``manifest`` with its family, sites, hashed files or image metrics replaced."""
    data = manifest.model_dump()
    if family is not None:
        data["outputs"]["family"] = family
    if sites is not None:
        template = data["outputs"]["sites"][0]
        data["outputs"]["sites"] = [{**template, "name": name, "update_rank": rank} for name, rank in sites]
    if files is not None:
        data["outputs"]["files"].update(files)
    if images is not None:
        data["metrics"]["images"] = images
    return Manifest.model_validate(data)


IMAGE_METRICS = {"clip_score_target_base": 31.5, "clip_score_target_edited": 20.25, "n_target_images": 4,
                 "n_preserve_images": 4, "clip_model": "openai/clip-vit-large-patch14", "steps": 25, "seed": 0}
SAMPLES = {"samples.png": "2" * 64}


@pytest.mark.parametrize(
    "family, family_tags, pipeline_class",
    [
        ("sd1", {"stable-diffusion", "stable-diffusion-diffusers"}, "StableDiffusionPipeline"),
        ("sd2", {"stable-diffusion", "stable-diffusion-diffusers"}, "StableDiffusionPipeline"),
        ("sdxl", {"stable-diffusion-xl", "stable-diffusion-xl-diffusers"}, "StableDiffusionXLPipeline"),
        ("sd3", {"sd3", "sd3-diffusers"}, "StableDiffusion3Pipeline"),
        ("flux", {"flux", "flux-diffusers"}, "FluxPipeline"),
    ],
)
def test_tags_are_the_ones_the_hubs_lora_pages_read(family, family_tags, pipeline_class):
    from huggingface_hub import ModelCard

    text = render_card(with_outputs(fixed_manifest(), family=family), repo_id="alice/erasure", revision="v1")
    assert f"from diffusers import {pipeline_class}\n" in text  # the usage snippet loads the family's pipeline
    card = ModelCard(text)
    tags = set(card.data.tags)
    assert {"template:sd-lora", "text-to-image", "lora", "diffusers", "concept-erasure", "erasepro"} <= tags
    assert family_tags <= tags
    others = {"stable-diffusion", "stable-diffusion-xl", "sd3", "flux"} - family_tags
    assert not others & tags  # no other family's tags
    assert len(card.data.tags) == len(tags)  # each once
    assert card.data.base_model == "alice/tiny-sd-base" and card.data.base_model_relation == "adapter"


@pytest.mark.parametrize(
    "files, images",
    [
        ({}, None),  # no image evaluation
        ({}, IMAGE_METRICS),  # image metrics, but the grid is not among the files push uploads
        (SAMPLES, None),  # a hashed grid without image metrics (evaluation re-run without images)
    ],
    ids=["no-eval", "grid-not-published", "no-image-metrics"],
)
def test_no_widget_or_sample_image_unless_the_release_holds_them(files, images):
    from huggingface_hub import ModelCard

    manifest = with_outputs(fixed_manifest(), files=files, images=images)
    text = render_card(manifest, repo_id="alice/erasure", revision="v1")
    card = ModelCard(text)
    assert "widget" not in card.data.to_dict()
    assert "samples.png" not in text and GALLERY not in text
    if images:  # the image metrics themselves are still reported
        assert "Image-level metrics" in text


def test_widget_and_sample_image_when_the_release_holds_them():
    from huggingface_hub import ModelCard

    manifest = with_outputs(fixed_manifest(), files=SAMPLES, images=IMAGE_METRICS)
    text = render_card(manifest, repo_id="alice/erasure", revision="v1")
    # the Hub's format: a prompt and the image it gave, the grid's first column (the first training prompt)
    assert ModelCard(text).data.widget == [{"text": TRICKY_TARGET, "output": {"url": "samples.png"}}]
    front, prose, _ = assert_inert(text)  # the prompt is one YAML value, the body has no HTML but the gallery
    assert front["widget"][0]["text"] == TRICKY_TARGET
    assert GALLERY in prose and "![Before (top) and after (bottom), same prompts and seeds](samples.png)" in prose
    # a hostile target stays data in the widget too
    hostile = fixed_manifest(concepts=[{"target": HOSTILE_CONCEPT, "anchor": "art"}])
    front, _, _ = assert_inert(render_card(with_outputs(hostile, files=SAMPLES, images=IMAGE_METRICS)))
    assert front["widget"] == [{"text": HOSTILE_CONCEPT, "output": {"url": "samples.png"}}]


def test_golden_card_with_image_evaluation():
    """Image metrics and a published grid (widget, gallery, image); text encoder and UNet edited (no loading note)."""
    manifest = with_outputs(fixed_manifest(), sites=[(TE, 4), (KV, 10)], files=SAMPLES, images=IMAGE_METRICS)
    check_golden("card_samples.md", render_card(manifest, repo_id="alice/erasure", revision="v1", revision_kind="tag"))


TE = "text_encoder.text_model.encoder.layers.1.mlp.fc2"
TE2 = "text_encoder_2.text_model.encoder.layers.1.mlp.fc2"
KV = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
UNET_LOG = "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'."
TE_LOG = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'."
TE2_LOG = "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder_2'."


@pytest.mark.parametrize(
    "family, sites, logs",
    [
        ("sd1", [(TE, 4)], [UNET_LOG]),  # text encoder only
        ("sd1", [(TE, 4), (KV, 0)], [UNET_LOG]),  # a UNet site whose update is zero is not in the file
        ("sd1", [(KV, 4)], [TE_LOG]),  # UNet only (UCE, erasepro-kv)
        ("sd1", [(TE, 4), (KV, 4)], []),
        ("sdxl", [(TE, 4), (TE2, 4)], [UNET_LOG]),
        ("sdxl", [(TE, 4), (KV, 4)], [TE2_LOG]),
        ("sdxl", [(TE, 4), (TE2, 4), (KV, 4)], []),
        ("bert", [(TE, 4)], []),  # diffusers does not load BERT text encoders: no such log
    ],
)
def test_the_loading_note_only_when_loading_logs_it(family, sites, logs):
    text = render_card(with_outputs(fixed_manifest(), family=family, sites=sites), repo_id="alice/erasure", revision="v1")
    usage = text.split("## How to use", 1)[1].split("## Metrics", 1)[0]
    assert ("What loading prints" in usage) == bool(logs)
    quoted = re.findall(r"^- `(No LoRA keys .*) …`$", usage, re.M)
    assert quoted == logs
    if logs:
        assert "expected" in usage.split("What loading prints", 1)[1]


@pytest.mark.parametrize("base", ["alice/tiny-sd-base", "./models/tiny-sd", "builtin:tiny-sd"])
def test_the_snippet_uses_dtype_and_a_device(base):
    manifest = fixed_manifest(base) if "/" not in base[:2] else fixed_manifest(base_model={"id": base})
    assert manifest.base_model.kind == {"a": "hub", ".": "local", "b": "builtin"}[base[0]]
    text = render_card(manifest, repo_id="alice/erasure", revision="v1")
    _, _, blocks = split_card(text)
    load = next(content for info, content in blocks if info == "python")
    assert "torch_dtype" not in text  # diffusers 0.42 deprecates it
    assert load.count('.to("cuda")') == 1
    assert ("dtype=torch.float16" in load) == (not base.startswith("builtin:"))
