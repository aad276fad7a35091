"""The card's code runs as written: pushed to the local Hub, its Python blocks are executed (on the CPU).

The blocks are taken from the README the Hub serves, not from the template, and run in a fresh namespace
each, with only the device changed (``"cuda"`` → ``"cpu"``) and the denoising loop cut to two steps; a
``FutureWarning`` (a deprecated argument, a renamed function) fails the run.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import warnings

import pytest
import torch
from helpers import captured_logs, forge, kv_residuals, read_tensors

from erasepro_hub.manifest import load_manifest
from erasepro_hub.models.loading import load_builtin

from conftest import TOKENS
from test_cards import fixed_manifest, split_card

TOL = 1e-5
_names = itertools.count()


def repo() -> str:
    return f"alice/card-snippet-{next(_names)}"


@pytest.fixture
def quick_pipelines(monkeypatch):
    """Pipelines called by a snippet run two denoising steps (CPU time); every call is recorded."""
    from diffusers import StableDiffusionPipeline

    calls = []
    original = StableDiffusionPipeline.__call__

    def two_steps(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("prompt"))
        return original(self, *args, **{**kwargs, "num_inference_steps": 2})

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", two_steps)
    return calls


def python_blocks(card: str) -> list[str]:
    _, _, blocks = split_card(card)
    return [content for info, content in blocks if info == "python"]


def run_snippet(*blocks: str) -> dict:
    """Execute card blocks as one script on the CPU; returns its namespace."""
    source = "\n".join(blocks)
    assert source.count('.to("cuda")') == 1, "the snippet should move the pipeline to the GPU once"
    namespace: dict = {"__name__": "__card__"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        exec(compile(source.replace('.to("cuda")', '.to("cpu")'), "<card>", "exec"), namespace)
    return namespace


def fresh():
    return load_builtin("tiny-sd")[0]


def test_the_cards_python_runs_as_written_and_applies_the_erasure(demo_folder, tmp_path, as_alice, quick_pipelines):
    from huggingface_hub import hf_hub_download
    from PIL import Image

    from erasepro_hub import push

    folder = tmp_path / "demo"
    shutil.copytree(demo_folder, folder)
    repo_id = repo()
    result = push(folder, repo_id, tag="v1")
    card = open(hf_hub_download(repo_id, "README.md", revision=result.commit), encoding="utf-8").read()
    load, with_diffusers, with_erasepro = python_blocks(card)
    assert f'"{repo_id}"' in with_diffusers and 'revision="v1"' in with_diffusers
    original = fresh()
    assert min(kv_residuals(folder, original, original)[0].values()) > 0.05  # before: far from the anchor

    # either with diffusers alone …
    ns = run_snippet(load, with_diffusers)
    pipe = ns["pipe"]
    assert isinstance(ns["image"], Image.Image) and quick_pipelines == ["a painting in a museum"]
    adapters = pipe.get_list_adapters()
    assert set(adapters) == {"unet", "text_encoder"} and adapters["unet"] == adapters["text_encoder"]
    residuals, _ = kv_residuals(folder, pipe, original)
    assert max(residuals.values()) <= TOL, residuals  # the targets now give the anchor's keys and values

    # … or with erasepro_hub, verified and undoable
    ns = run_snippet(load, with_erasepro)
    pipe, handle = ns["pipe"], ns["handle"]
    assert handle.active and handle.source == f"{repo_id}@{result.commit}"
    residuals, _ = kv_residuals(folder, pipe, original)
    assert max(residuals.values()) <= TOL, residuals
    handle.remove()
    assert min(kv_residuals(folder, pipe, original)[0].values()) > 0.05


@pytest.fixture(scope="module")
def hub_base(tmp_path_factory, hub):
    """builtin:tiny-sd saved as a diffusers folder and pushed to the local Hub."""
    from huggingface_hub import HfApi

    from erasepro_hub.models.builtin import build_builtin

    folder = tmp_path_factory.mktemp("card-base") / "tiny-sd"
    build_builtin("tiny-sd").save_pretrained(folder, safe_serialization=True)
    api = HfApi(token=TOKENS["alice"])
    repo_id = repo()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="base")
    return repo_id, api.repo_info(repo_id).sha


def test_the_hub_base_loads_as_written_in_half_precision(hub_base):
    repo_id, sha = hub_base
    card = fixed_manifest(base_model={"id": repo_id, "revision": sha})
    from erasepro_hub.cards import render_card

    load = python_blocks(render_card(card, repo_id="alice/erasure", revision="v1"))[0]
    pipe = run_snippet(load)["pipe"]  # torch_dtype= would raise diffusers' FutureWarning here
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder.dtype == torch.float16
    assert pipe.device.type == "cpu"


def diffusers_log(load) -> list[str]:
    """What ``load()`` logs through diffusers (whatever the verbosity the tests run at)."""
    with captured_logs("diffusers", level=logging.WARNING) as messages:
        load()
    return messages


def test_the_loading_note_quotes_what_loading_logs(demo_folder, tmp_path):
    from erasepro_hub.adapters import load_erasure
    from erasepro_hub.cards import render_card

    # the demo touches the text encoder and the UNet: nothing to warn about, and no note
    assert not [m for m in diffusers_log(lambda: fresh().load_lora_weights(demo_folder, weight_name=WEIGHTS))
                if m.startswith("No LoRA keys")]
    assert "What loading prints" not in render_card(load_manifest(demo_folder))

    # the same erasure without its UNet part (a text-encoder-only erasure)
    folder = tmp_path / "te-only"
    shutil.copytree(demo_folder, folder)
    tensors, _ = read_tensors(folder / WEIGHTS)

    def drop_unet(data):
        for site in data["outputs"]["sites"]:
            if site["name"].startswith("unet."):
                site["update_rank"] = 0

    forge(folder, tensors={k: v for k, v in tensors.items() if not k.startswith("unet.")}, edit_manifest=drop_unet,
          restamp=True)
    card = render_card(load_manifest(folder))
    quoted = re.findall(r"^- `(No LoRA keys .*) …`$", card, re.M)
    assert quoted == ["No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'."]
    for load in (lambda: fresh().load_lora_weights(folder, weight_name=WEIGHTS), lambda: load_erasure(fresh(), folder)):
        logged = [m for m in diffusers_log(load) if m.startswith("No LoRA keys")]
        assert len(logged) == len(quoted) and all(m.startswith(q) for m, q in zip(logged, quoted)), logged


WEIGHTS = "pytorch_lora_weights.safetensors"
