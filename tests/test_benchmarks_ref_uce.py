"""The benchmark's peer (benchmarks/ref_uce.py) computes UCE's closed form, checked independently in float64."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import ref_uce  # noqa: E402

from erasepro_hub.models.loading import load_builtin  # noqa: E402


def _last_token(pipe, prompt: str) -> torch.Tensor:
    """The text embedding at the token before end-of-text, in float64, by a direct encoder call."""
    tokens = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    hidden = pipe.text_encoder(tokens.input_ids)[0][0]
    return hidden[int(tokens.attention_mask.sum()) - 2].double()


@pytest.fixture(scope="module")
def pipe():
    return load_builtin("tiny-sd")[0]


def test_peer_matches_the_closed_form_in_float64(pipe):
    erase = ["Van Gogh", "a painting by Van Gogh"]
    guide = ["art", "a painting by art"]
    preserve = ["Claude Monet", "a photo of a dog"]
    lamb, s_e, s_p = 0.5, 1.0, 0.7
    with torch.no_grad():
        new = ref_uce.uce_edit(pipe, erase, guide, preserve, lamb=lamb, erase_scale=s_e, preserve_scale=s_p)
        c = {p: _last_token(pipe, p) for p in erase + guide + preserve}
    names, modules = ref_uce.cross_attention_modules(pipe.unet)
    assert names and sorted(new) == sorted(f"{n}.weight" for n in names)
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    for name, module in zip(names, modules):
        W = module.weight.detach().double()
        left, right = lamb * W, lamb * torch.eye(W.shape[1], dtype=torch.float64)
        for e, g in zip(erase, guide):
            left += s_e * torch.outer(W @ c[g], c[e])
            right += s_e * torch.outer(c[e], c[e])
        for p in preserve:
            left += s_p * torch.outer(W @ c[p], c[p])
            right += s_p * torch.outer(c[p], c[p])
        expected = left @ torch.linalg.inv(right)
        got = new[f"{name}.weight"]
        assert got.dtype == torch.float32 and got.shape == W.shape
        assert (got.double() - expected).abs().max() <= 1e-4 * expected.abs().max(), name
        assert not torch.equal(got, module.weight.detach()), "the edit changes the weights"
        assert not got.requires_grad


def test_one_guide_serves_every_erase_prompt(pipe):
    with torch.no_grad():
        one = ref_uce.uce_edit(pipe, ["Van Gogh", "Monet"], ["art"])
        two = ref_uce.uce_edit(pipe, ["Van Gogh", "Monet"], ["art", "art"])
    assert all(torch.equal(one[k], two[k]) for k in one)
