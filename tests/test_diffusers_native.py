"""Erasures in diffusers' own adapter registry: by name, listed, unloaded, fused — plain diffusers and ours."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from helpers import kv_residuals

from conftest import DEMO
from erasepro_hub import load_erasure, unload_erasure
from erasepro_hub.erase import erase
from erasepro_hub.models.loading import load_builtin

ADAPTER = "pytorch_lora_weights.safetensors"
TOL = 1e-5


@pytest.fixture(scope="module")
def monet_folder(tmp_path_factory):
    data = yaml.safe_load(DEMO.read_text())
    data.update(name="demo-monet", concepts=[{"target": "Claude Monet", "anchor": "a painting"}])
    data["preserve"]["concepts"] = ["Pablo Picasso", "a photo of a cat"]
    work = tmp_path_factory.mktemp("monet")
    (work / "monet.yaml").write_text(yaml.safe_dump(data))
    return erase(work / "monet.yaml", work / "out")


def fresh():
    return load_builtin("tiny-sd")[0]


def weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if "attn2" in n}


def test_two_erasures_by_name_through_plain_diffusers(demo_folder, monet_folder):
    pipe = fresh()
    pipe.load_lora_weights(demo_folder, weight_name=ADAPTER, adapter_name="gogh")
    pipe.load_lora_weights(monet_folder, weight_name=ADAPTER, adapter_name="monet")
    assert set(pipe.get_list_adapters()["unet"]) == {"gogh", "monet"}
    pipe.delete_adapters("monet")  # unload one
    assert pipe.get_list_adapters()["unet"] == ["gogh"]
    residuals, _ = kv_residuals(demo_folder, pipe, fresh())
    assert max(residuals.values()) <= TOL  # the one left is exact again
    base = weights(fresh())
    pipe.fuse_lora(adapter_names=["gogh"], lora_scale=1.0)
    fused = {n.replace(".base_layer", ""): p for n, p in weights(pipe).items() if "lora_" not in n}
    assert any(not torch.equal(fused[n], base[n]) for n in base if n in fused)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    after = weights(pipe)
    assert all(torch.allclose(after[n], base[n], atol=1e-6) for n in base)


def test_load_erasure_is_a_diffusers_adapter(demo_folder):
    pipe = fresh()
    handle = load_erasure(pipe, demo_folder, adapter_name="van_gogh")
    assert handle.backend == "diffusers" and handle.adapter_name == "van_gogh"
    assert pipe.get_list_adapters() == {"unet": ["van_gogh"], "text_encoder": ["van_gogh"]}
    residuals, _ = kv_residuals(demo_folder, pipe, fresh())
    assert max(residuals.values()) <= TOL
    pipe.unload_lora_weights()  # diffusers' own unload removes it ...
    assert not handle.active
    residuals, _ = kv_residuals(demo_folder, pipe, fresh())
    assert min(residuals.values()) > 0.05
    handle.remove()  # ... and the handle's undo is then a no-op
    load_erasure(pipe, demo_folder).remove()  # nothing left behind that would look like a stacked erasure


def test_fused_through_diffusers_and_undone_bit_for_bit(demo_folder):
    pipe = fresh()
    base = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    base.update(weights(pipe))
    handle = load_erasure(pipe, demo_folder, fuse=True)
    assert handle.fused and pipe.get_list_adapters()["unet"] == [handle.adapter_name]
    residuals, _ = kv_residuals(demo_folder, pipe, fresh())
    assert max(residuals.values()) <= TOL
    assert unload_erasure(pipe) == 1
    now = {n: p for n, p in pipe.text_encoder.named_parameters()}
    now.update(weights(pipe))
    assert set(now) == set(base) and all(torch.equal(now[n], base[n]) for n in base)


def test_weight_name_must_be_the_checked_file(demo_folder):
    from erasepro_hub.errors import AdapterFormatError

    with pytest.raises(AdapterFormatError, match="weight_name"):
        load_erasure(fresh(), demo_folder, weight_name="other.safetensors")


def test_the_old_names_still_work_and_warn(demo_folder):
    from erasepro_hub import load_adapter, unload_adapter

    pipe = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_adapter(pipe, demo_folder)
        assert unload_adapter(pipe) == 1
    assert sum(issubclass(w.category, FutureWarning) and str(w.message).startswith("erasepro_hub.load_adapter is renamed") for w in caught) == 1
    assert sum(issubclass(w.category, FutureWarning) and str(w.message).startswith("erasepro_hub.unload_adapter is renamed") for w in caught) == 1


def test_remove_undoes_a_fuse_the_user_made(demo_folder):
    pipe = fresh()
    base = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    handle = load_erasure(pipe, demo_folder)
    pipe.fuse_lora()  # the user's own diffusers habit
    handle.remove()
    assert pipe.get_list_adapters() == {}
    assert all(torch.equal(p, base[n]) for n, p in pipe.text_encoder.named_parameters())


def test_an_erasure_fused_then_unloaded_still_counts_as_applied(demo_folder):
    from erasepro_hub.errors import BaseMismatchError

    pipe = fresh()
    handle = load_erasure(pipe, demo_folder)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the update now lives in the weights
    assert handle.active
    with pytest.raises(BaseMismatchError, match="already carries the erasure"):
        load_erasure(pipe, demo_folder, verify_base=False)
    handle.remove()
    load_erasure(pipe, demo_folder).remove()


def test_a_load_that_fails_half_way_leaves_nothing(demo_folder, monkeypatch):
    pipe = fresh()
    base = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    real = pipe.load_lora_weights

    def fails_after_loading(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("simulated failure after part of the load")

    monkeypatch.setattr(pipe, "load_lora_weights", fails_after_loading)
    with pytest.raises(RuntimeError, match="simulated"):
        load_erasure(pipe, demo_folder)
    assert pipe.get_list_adapters() == {}
    assert all(torch.equal(p, base[n]) for n, p in pipe.text_encoder.named_parameters())
    monkeypatch.undo()
    load_erasure(pipe, demo_folder).remove()  # nothing half-loaded blocks the next load


@pytest.mark.parametrize("name", ["a.b", "forward", "update", "1abc", ""])
def test_adapter_names_peft_cannot_hold_are_refused_before_loading(demo_folder, name):
    pipe = fresh()
    with pytest.raises(ValueError, match="adapter_name"):
        load_erasure(pipe, demo_folder, adapter_name=name)
    assert pipe.get_list_adapters() == {}
