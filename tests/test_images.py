"""Image-level metrics on tiny random models, and ``erasepro eval --images`` under accelerate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erasepro_hub.metrics.images import (
    ImageOptions,
    clip_score,
    frechet_distance,
    generate,
    image_metrics,
    kernel_inception_distance,
    zero_shot_predictions,
)


def test_fid_closed_forms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    # same covariance, shifted mean: FID = ‖shift‖²
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-8)
    # y = a·x: FID = ‖μ − aμ‖² + Tr(Σ)(1 − a)²
    a = 3.0
    mu, cov = x.mean(0), torch.cov(x.T)
    expected = float(((1 - a) * mu).square().sum() + torch.trace(cov) * (1 - a) ** 2)
    assert frechet_distance(x, a * x) == pytest.approx(expected, rel=1e-8)


def test_kid_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    k = lambda p, q: (float(p @ q) / 2 + 1) ** 3  # noqa: E731
    xx = (k(x[0], x[1]) + k(x[1], x[0])) / 2
    yy = (k(y[0], y[1]) + k(y[1], y[0])) / 2
    xy = sum(k(p, q) for p in x for q in y) / 4
    assert kernel_inception_distance(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(400, 4, generator=g, dtype=torch.float64), torch.randn(400, 4, generator=g, dtype=torch.float64)
    same = kernel_inception_distance(p, q)  # two samples of one distribution: unbiased, near 0
    shifted = kernel_inception_distance(p, q + 1.0)
    assert abs(same) < 0.05 < shifted


def test_clip_score_and_zero_shot():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    txt = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), dim=-1)
    assert clip_score(img, txt).tolist() == pytest.approx([100.0, 0.0])  # negative cosine clipped at 0
    assert zero_shot_predictions(img, txt).tolist() == [0, 0]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP model with the real tokenizer, saved like a Hub checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    from erasepro_hub.models.builtin import deterministic_init
    from erasepro_hub.models.tokenizer import clip_tokenizer

    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config)
    deterministic_init(model, 1)
    model.save_pretrained(folder, safe_serialization=True)
    clip_tokenizer().save_pretrained(folder)
    return folder


def test_scorer_matches_the_model(tiny_clip):
    from PIL import Image

    from erasepro_hub.models.scoring import load_clip

    scorer = load_clip(str(tiny_clip))
    images = [Image.new("RGB", (64, 48), (i * 40, 100, 200 - i * 30)) for i in range(3)]
    feats = scorer.image_features(images)
    assert feats.shape == (3, 16) and torch.allclose(feats.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        ref = scorer.model.get_image_features(pixel_values=scorer.preprocess(images))
        ref = getattr(ref, "pooler_output", ref)
    assert torch.allclose(feats, torch.nn.functional.normalize(ref, dim=-1), atol=1e-6)
    text = scorer.text_features(["a photo of a cat", "a painting"])
    assert text.shape == (2, 16)


def test_generation_is_deterministic_and_metrics_compose(tiny_clip):
    from erasepro_hub.models.loading import load_builtin
    from erasepro_hub.models.scoring import load_clip

    pipe = load_builtin("tiny-sd")[0]
    options = ImageOptions(steps=2, height=64, width=64)
    a = generate(pipe, ["a painting by Vincent van Gogh", "a cat"], options)
    b = generate(pipe, ["a painting by Vincent van Gogh", "a cat"], options)
    assert len(a) == 2 and all((x.tobytes() == y.tobytes()) for x, y in zip(a, b))
    scorer = load_clip(str(tiny_clip))
    calls = []

    def detector(images):
        calls.append(len(images))
        return [0.25] * len(images)

    images = {"target": a[:1] * 2, "preserve": a + b}
    out = image_metrics(images, images, scorer=scorer, concepts=[("Vincent van Gogh", "a painting")],
                        target_prompts=["a painting by Vincent van Gogh", "Vincent van Gogh"],
                        labels=["Vincent van Gogh", "a painting", "a cat"], detector=detector)
    assert out["clip_score_target_base"] == pytest.approx(out["clip_score_target_edited"])
    assert out["clip_fid_preserve"] == pytest.approx(0.0, abs=1e-6)  # identical image sets
    assert out["detector_score_target_base"] == pytest.approx(0.25) and calls == [2, 2]


def test_eval_images_under_accelerate(demo_folder, tiny_clip, tmp_path):
    folder = tmp_path / "demo"
    shutil.copytree(demo_folder, folder)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    assert accelerate, "accelerate is a test dependency"
    command = [
        accelerate, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "erasepro_hub.cli", "eval", str(folder), "--images", "--clip-model",
        str(tiny_clip), "--steps", "2", "--size", "64", "--max-prompts", "3", "--json",
    ]
    env = dict(os.environ, ACCELERATE_CONFIG_FILE=str(tmp_path / "none.yaml"))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    images = summary["images"]
    assert images["n_target_images"] == 3 and images["n_preserve_images"] == 3
    for key in ("clip_score_target_base", "clip_score_target_edited", "zero_shot_target_accuracy_base",
                "clip_fid_preserve", "clip_kid_preserve"):
        assert isinstance(images[key], float)
    assert (folder / "samples.png").exists()
    card = (folder / "README.md").read_text()
    assert "Image-level metrics" in card and "samples.png" in card
    from erasepro_hub.adapters import open_folder

    assert open_folder(folder).manifest.metrics["images"]["steps"] == 2  # hashes updated: still verifies
