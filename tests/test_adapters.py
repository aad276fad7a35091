"""The adapter file format and the folder checks."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
import yaml

from erasepro_hub.adapters import load_erasure, open_folder, read_adapter, save_adapter
from erasepro_hub.adapters.folder import safe_relative
from erasepro_hub.adapters.lora import HEADER_RECIPE, dense_as_lora, file_sha256, to_state_dict
from erasepro_hub.errors import AdapterFormatError, UnsafePathError, VerificationError
from erasepro_hub.models.loading import load_builtin
from erasepro_hub.solver import LowRankDelta

SHA = "0" * 64


def deltas():
    g = torch.Generator().manual_seed(0)
    return {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": LowRankDelta(
            torch.randn(64, 5, generator=g, dtype=torch.float64), torch.randn(5, 192, generator=g, dtype=torch.float64)
        ),
        "text_encoder.text_model.encoder.layers.0.mlp.fc2": LowRankDelta(
            torch.randn(192, 3, generator=g, dtype=torch.float64), torch.randn(3, 768, generator=g, dtype=torch.float64)
        ),
    }


def test_round_trip_and_key_forms(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(path, deltas(), recipe_sha256=SHA, version="test")
    adapter = read_adapter(path)
    assert adapter.metadata[HEADER_RECIPE] == SHA
    for key, delta in deltas().items():
        got = adapter.deltas[key]
        assert got.dtype == torch.float32 and got.rank == delta.rank  # full-rank factors keep every column
        err = (got.dense() - delta.dense()).abs().max() / delta.dense().abs().max()
        assert err <= 1e-6  # LoRA reconstruction of float32 factors
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        keys = set(handle.keys())
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_linear_layer.down.weight" in keys


def test_dense_format_is_exact():
    for key, delta in deltas().items():
        stored = dense_as_lora(delta)
        assert torch.equal(stored.dense(), delta.dense())
        assert stored.rank == min(delta.shape)
    state = to_state_dict(deltas(), fmt="dense")
    assert len(state) == 4


def test_zero_rank_sites_are_not_written(tmp_path):
    state = to_state_dict({"unet.x.attn2.to_k": LowRankDelta.zeros(4, 8)})
    assert state == {}


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) // 2], "truncated"),
        (lambda b: b[:5], "only 5 bytes"),
        (lambda b: struct.pack("<Q", 10**12) + b[8:], "truncated or not a safetensors"),
        (lambda b: b[:8] + b"x" + b[9:], "corrupted safetensors header"),
    ],
)
def test_damaged_files_are_detected(tmp_path, damage, message):
    path = tmp_path / "a.safetensors"
    save_adapter(path, deltas(), recipe_sha256=SHA, version="test")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(AdapterFormatError, match=message):
        read_adapter(path)


def test_unpaired_and_foreign_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "a.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(AdapterFormatError, match="no B"):
        read_adapter(path)
    save_file({"unet.x.weight": torch.zeros(2, 4)}, str(path))
    with pytest.raises(AdapterFormatError, match="unexpected tensor"):
        read_adapter(path)
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 4), "unet.x.lora_B.weight": torch.zeros(3, 5)}, str(path))
    with pytest.raises(AdapterFormatError, match="do not match"):
        read_adapter(path)


def test_tampered_header_recipe_is_detected(demo_folder, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    adapter = read_adapter(folder / "pytorch_lora_weights.safetensors")
    save_adapter(folder / "pytorch_lora_weights.safetensors", adapter.deltas, recipe_sha256=SHA, version="x")
    # the file hash changed too: first the hash check fires
    with pytest.raises(VerificationError, match="modified"):
        open_folder(folder)
    # with the manifest's hash of the file brought up to date, the header's recipe hash still gives it away
    manifest_path = folder / "erasepro.yaml"
    data = yaml.safe_load(manifest_path.read_text())
    data["outputs"]["files"]["pytorch_lora_weights.safetensors"] = file_sha256(folder / "pytorch_lora_weights.safetensors")
    manifest_path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    with pytest.raises(VerificationError, match="made from another recipe: its header says 0000000000000000"):
        open_folder(folder)


def test_tampered_metrics_and_missing_files(demo_folder, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    (folder / "metrics.json").write_text(json.dumps({"residual_train": 0}))
    with pytest.raises(VerificationError, match="metrics.json was modified"):
        open_folder(folder)
    (folder / "metrics.json").unlink()
    with pytest.raises(VerificationError, match="missing"):
        open_folder(folder)


def test_truncated_adapter_in_folder_leaves_pipeline_untouched(demo_folder, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    path = folder / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    pipe, _ = load_builtin("tiny-sd")
    before = {n: p.clone() for n, p in pipe.unet.named_parameters()}
    with pytest.raises(VerificationError):
        load_erasure(pipe, folder)
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_not_a_folder(tmp_path):
    with pytest.raises(AdapterFormatError, match="not an erasure folder"):
        open_folder(tmp_path / "missing")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "~/x", "a\\b"])
def test_paths_cannot_escape(name):
    with pytest.raises(UnsafePathError):
        safe_relative(name)


def test_manifest_listing_a_path_outside_is_refused(demo_folder, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(demo_folder, folder)
    text = (folder / "erasepro.yaml").read_text().replace("    metrics.json:", "    ../metrics.json:")
    (folder / "erasepro.yaml").write_text(text)
    with pytest.raises(UnsafePathError):
        open_folder(folder)
