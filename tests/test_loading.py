"""Loading a base model from a diffusers folder: only text encoders and cross-attention weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from erasepro_hub.adapters import read_adapter
from erasepro_hub.cli import main
from erasepro_hub.errors import BaseModelError, UnsupportedModelError
from erasepro_hub.models.builtin import build_builtin
from erasepro_hub.models.loading import detect_family, load_builtin, load_edit_model

from conftest import DEMO


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    folders = {}
    for name in ("tiny-sd", "tiny-sdxl"):
        folder = root / name
        build_builtin(name).save_pretrained(folder, safe_serialization=True)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("name, family", [("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")])
def test_folder_loads_the_same_weights_as_the_pipeline(saved, name, family):
    folder = saved[name]
    assert detect_family(folder) == family
    model = load_edit_model(folder)
    _, reference = load_builtin(name)
    assert model.family == family
    assert list(model.kv_weights) == list(reference.kv_weights)
    for key in model.kv_weights:
        assert torch.equal(model.kv_weights[key], reference.kv_weights[key])
    for te, ref in zip(model.text_encoders, reference.text_encoders):
        ids = ref.tokenizer(["a painting by Vincent van Gogh"], padding="max_length", return_tensors="pt").input_ids
        assert te.tokenizer(["a painting by Vincent van Gogh"], padding="max_length", return_tensors="pt").input_ids.equal(ids)
        with torch.no_grad():
            assert torch.equal(te.model(ids).last_hidden_state, ref.model(ids).last_hidden_state)


def test_erase_from_a_folder_matches_the_builtin(saved, demo_folder, tmp_path):
    data = yaml.safe_load(DEMO.read_text())
    data["base_model"] = {"id": str(saved["tiny-sd"])}
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert main(["erase", str(manifest), "--out", str(out)]) == 0
    a = read_adapter(out / "pytorch_lora_weights.safetensors").deltas
    b = read_adapter(demo_folder / "pytorch_lora_weights.safetensors").deltas
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].dense(), b[key].dense(), rtol=0, atol=1e-6 * float(b[key].dense().abs().max()))
    assert main(["regenerate", str(out), "--verify"]) == 0


def test_the_unet_is_never_instantiated(saved, monkeypatch):
    import diffusers

    def boom(*args, **kwargs):
        raise AssertionError("the UNet was loaded")

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", boom)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", boom)
    assert len(load_edit_model(saved["tiny-sd"]).kv_weights) == 8


def test_pickle_only_unet_is_refused(saved, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(saved["tiny-sd"], folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BaseModelError, match="safetensors only"):
        load_edit_model(folder)


def test_not_a_diffusers_folder(tmp_path: Path):
    with pytest.raises(BaseModelError, match="model_index.json"):
        load_edit_model(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')
    with pytest.raises(UnsupportedModelError, match="FluxPipeline"):
        load_edit_model(tmp_path)
