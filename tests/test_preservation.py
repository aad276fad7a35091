"""The default preserve set: the banks shipped with the package, the caption summaries and their cache."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import DEMO

from erasepro_hub import banks
from erasepro_hub.erase import compute
from erasepro_hub.errors import ManifestError
from erasepro_hub.manifest import load_manifest, parse_manifest, to_data
from erasepro_hub.models import preservation
from erasepro_hub.models.base import prompt_embeddings
from erasepro_hub.models.loading import load_builtin
from erasepro_hub.models.progressive import FINAL_STAGE
from erasepro_hub.models.prompts import Prompt
from erasepro_hub.recipe import prompt_templates, resolve_recipe


def test_banks_and_captions_ship_with_the_package():
    for kind in banks.KINDS:
        templates = banks.bank(kind)
        assert len(templates) >= 20 and all(t.count("{}") == 1 for t in templates)
        assert len(set(templates)) == len(templates)
    captions = banks.captions("default-v1")
    assert len(captions) >= 300 and len(set(captions)) == len(captions)
    assert not any(c.startswith("#") for c in captions)
    with pytest.raises(ValueError, match="unknown prompt kind"):
        banks.bank("portrait")


def _recipe(**prompts):
    data = to_data(load_manifest(DEMO))
    data["prompts"] = prompts
    import yaml

    return parse_manifest(yaml.safe_dump(data)).recipe()


def test_a_kind_adds_its_bank_and_the_resolved_recipe_spells_it_out():
    recipe = _recipe(kind="style")
    assert prompt_templates(recipe) == list(banks.bank("style")[:3])
    mixed = _recipe(templates=["a sketch by {}", banks.bank("style")[1]], kind="style", bank_size=3)
    assert prompt_templates(mixed) == ["a sketch by {}", banks.bank("style")[1], banks.bank("style")[0],
                                       banks.bank("style")[2]]
    resolved = resolve_recipe(mixed, mixed.base_model)
    assert resolved.prompts.templates == prompt_templates(mixed)
    again = resolve_recipe(resolved, resolved.base_model)
    assert again == resolved  # resolving a resolved recipe changes nothing


def test_templates_or_a_kind_are_required():
    with pytest.raises(ManifestError, match="prompts: .*give templates"):
        _recipe(templates=[])
    with pytest.raises(ManifestError, match="prompts.kind"):
        _recipe(kind="portrait")


def test_summary_is_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(20, 50, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 20, dtype=torch.float64)[:, None]
    S = preservation.summarize((P @ P.T).float(), rank=6)
    assert S.shape == (20, 6) and S.dtype == torch.float32
    values, vectors = torch.linalg.eigh(P @ P.T)
    best = (vectors[:, -6:] * values[-6:]) @ vectors[:, -6:].T
    assert torch.allclose((S.double() @ S.double().T), best, rtol=1e-4, atol=1e-3)
    assert preservation.summarize(torch.zeros(5, 5), rank=3).shape == (5, 0)
    # orthogonal columns, as the solver takes them (solver.metric.Orthogonal): S^T S is diagonal to float32 rounding
    gram = S.double().T @ S.double()
    off = gram - torch.diag(gram.diagonal())
    norms = gram.diagonal().sqrt()
    assert float((off.abs() / (norms[:, None] * norms[None, :])).max()) <= 1e-6


def _summaries(model, captions, policy="concept-eos", **kwargs):
    te = model.text_encoders[0]
    stages = {"s1": (te, te.site_module(1, "mlp.fc2"), False)}
    return preservation.caption_summaries(
        model, captions, stages, FINAL_STAGE, policy=policy,
        embed=lambda ids: prompt_embeddings(model, ids), rank=16, **kwargs,
    )


def test_caption_summaries_are_cached_and_a_bad_entry_is_recomputed(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ERASEPRO_CACHE", str(tmp_path))
    _, model = load_builtin("tiny-sd")
    captions = [Prompt(c) for c in banks.captions("default-v1")[:40]]
    fresh = _summaries(model, captions)
    files = list((tmp_path / "captions").iterdir())
    assert len(files) == 1 and set(fresh) == {"s1", FINAL_STAGE}
    assert fresh["s1"].shape == (768, 16) and fresh[FINAL_STAGE].shape == (192, 16)
    # a second call reads the file: the same tensors, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(fresh.values(), _summaries(model, captions).values()))
    # a corrupt entry is ignored (with a warning) and rewritten
    files[0].write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        again = _summaries(model, captions)
    assert "unreadable caption cache entry" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.values(), again.values()))
    # other weights, other captions: another entry
    with torch.no_grad():
        model.text_encoders[0].model.get_submodule("encoder.layers.0.mlp.fc1").weight[0, 0] += 1.0
    _summaries(model, captions)
    _summaries(model, captions[:20])
    assert len(list((tmp_path / "captions").iterdir())) == 3
    # policies that keep the same positions share an entry; eos keeps other positions
    _summaries(model, captions[:20], policy="concept-suffix")
    assert len(list((tmp_path / "captions").iterdir())) == 3
    eos = _summaries(model, captions[:20], policy="eos")
    assert len(list((tmp_path / "captions").iterdir())) == 4
    assert not torch.equal(eos["s1"], _summaries(model, captions[:20])["s1"])


def test_a_cache_entry_whose_columns_are_not_orthogonal_is_recomputed(tmp_path, monkeypatch, caplog):
    """The solver takes a summary's columns as orthogonal (its Gram block as the diagonal); an entry that is not is
    not used."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("ERASEPRO_CACHE", str(tmp_path))
    _, model = load_builtin("tiny-sd")
    captions = [Prompt(c) for c in banks.captions("default-v1")[:40]]
    fresh = _summaries(model, captions)
    path, = (tmp_path / "captions").iterdir()
    assert all(preservation._orthogonal(t) for t in fresh.values())
    skewed = {name: t + 0.5 * t[:, :1] for name, t in load_file(path).items()}  # every column leans on the first
    assert not any(preservation._orthogonal(t) for t in skewed.values())
    save_file(skewed, str(path))
    with caplog.at_level(logging.WARNING):
        again = _summaries(model, captions)
    assert "not orthogonal" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(fresh.values(), again.values()))


def test_the_cache_key_covers_the_embedding_rows_the_captions_read_and_no_other(tmp_path, monkeypatch):
    """The key hashes only the token-embedding rows the captions' ids select: a change to another row leaves the
    summaries as they are (recomputed, bit for bit) and the key with them; a change to a row they read does not."""
    monkeypatch.setenv("ERASEPRO_CACHE", str(tmp_path))
    _, model = load_builtin("tiny-sd")
    captions = [Prompt(c) for c in banks.captions("default-v1")[:20]]
    first = _summaries(model, captions)
    read = set(model.encode(captions)[0].ids.unique().tolist())
    table = model.text_encoders[0].model.get_input_embeddings().weight
    unread = next(i for i in range(table.shape[0]) if i not in read)
    with torch.no_grad():
        table[unread] += 1.0
    recomputed = _summaries(model, captions, use_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(first.values(), recomputed.values()))
    _summaries(model, captions)
    assert len(list((tmp_path / "captions").iterdir())) == 1
    with torch.no_grad():
        table[max(read)] += 1.0
    changed = _summaries(model, captions)
    assert len(list((tmp_path / "captions").iterdir())) == 2
    assert not torch.equal(changed["s1"], first["s1"])


def test_an_unwritable_cache_still_solves(tmp_path, monkeypatch, caplog):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("ERASEPRO_CACHE", str(blocked))  # a file where the folder should be
    _, model = load_builtin("tiny-sd")
    with caplog.at_level(logging.WARNING):
        out = _summaries(model, [Prompt("a red car"), Prompt("a blue house")])
    assert "could not write the caption cache" in caplog.text and out["s1"].shape[0] == 768


def test_the_caption_set_keeps_unrelated_prompts_in_place():
    """The same erasure with and without the default caption set: unrelated prompts move less with it."""
    from erasepro_hub.metrics.features import feature_metrics
    from erasepro_hub.recipe import drift_prompts, training_pairs

    base = load_manifest(DEMO).recipe()
    data = to_data(base)
    data["preserve"]["captions"] = "none"
    import yaml

    without = parse_manifest(yaml.safe_dump(data)).recipe()
    results = {}
    for name, recipe in (("with", base), ("without", without)):
        comp = compute(recipe)
        metrics = feature_metrics(comp.model, comp.stored, pairs=training_pairs(recipe), token_policy="concept-eos",
                                  preserve=drift_prompts(recipe))
        results[name] = metrics["drift_unrelated"]
    assert results["with"] < results["without"]
