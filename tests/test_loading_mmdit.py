"""Loading SD 3 and FLUX.1 diffusers folders: text encoders (T5 in its stored dtype) and single transformer tensors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from erasepro_hub.errors import BaseModelError, UnsupportedModelError
from erasepro_hub.models.base import EditModel, prompt_embeddings
from erasepro_hub.models.conditioning import CONDITIONING
from erasepro_hub.models.builtin import build_builtin
from erasepro_hub.models.loading import detect_family, load_edit_model
from erasepro_hub.models.prompts import Prompt

from conftest import TOKENS

T5_COMPONENT = {"tiny-sd3": "text_encoder_3", "tiny-flux": "text_encoder_2"}
FAMILY = {"tiny-sd3": "sd3", "tiny-flux": "flux"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{(name, T5 dtype): (pipeline, folder)}``: the tiny MMDiTs saved as diffusers folders (safetensors)."""
    root = tmp_path_factory.mktemp("mmdit")
    found = {}
    for name in FAMILY:
        for t5_dtype in (torch.float32, torch.bfloat16):
            pipe = build_builtin(name)
            getattr(pipe, T5_COMPONENT[name]).to(t5_dtype)
            folder = root / f"{name}-{str(t5_dtype).split('.')[-1]}"
            pipe.save_pretrained(folder, safe_serialization=True)
            found[name, t5_dtype] = pipe, folder
    return found


def copy_of(saved, tmp_path, name="tiny-flux", t5_dtype=torch.float32):
    folder = tmp_path / "copy"
    shutil.copytree(saved[name, t5_dtype][1], folder)
    return folder


def embeddings(model: EditModel, text: str):
    with torch.no_grad():
        return prompt_embeddings(model, [te.encode([Prompt(text)]).ids for te in model.text_encoders])


def pipeline_embeddings(pipe, name: str, text: str):
    """``(prompt embedding, pooled vector)`` as the pipeline computes them."""
    with torch.no_grad():
        if name == "tiny-sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(text, None, None, do_classifier_free_guidance=False)
        else:
            embeds, pooled, _ = pipe.encode_prompt(text, None)
    return embeds, pooled


# ----------------------------------------------------------------------------- what is loaded
@pytest.mark.parametrize("name", list(FAMILY))
def test_folder_loads_the_pipelines_weights_and_conditioning(saved, name):
    pipe, folder = saved[name, torch.float32]
    assert detect_family(folder) == FAMILY[name]
    model = load_edit_model(folder)
    reference = EditModel.from_pipeline(pipe)
    assert model.family == reference.family == FAMILY[name]
    assert [te.component for te in model.text_encoders] == [te.component for te in reference.text_encoders]
    for mine, theirs in ((model.kv_weights, reference.kv_weights), (model.pooled_weights, reference.pooled_weights)):
        assert list(mine) == list(theirs) and mine
        for key in mine:
            assert mine[key].dtype == torch.float32 and torch.equal(mine[key], theirs[key])
    layout = CONDITIONING[FAMILY[name]]
    assert list(model.kv_weights) == [f"transformer.{s}" for s in layout.sequence_sites]
    assert list(model.pooled_weights) == [f"transformer.{s}" for s in layout.pooled_sites]
    embeds, pooled = embeddings(model, "a cat")
    ref_embeds, ref_pooled = pipeline_embeddings(pipe, name, "a cat")
    assert embeds.shape == ref_embeds.shape and pooled.shape == ref_pooled.shape
    assert torch.allclose(embeds, ref_embeds, rtol=0, atol=1e-5)
    assert torch.allclose(pooled, ref_pooled, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILY))
def test_t5_stays_in_its_stored_dtype(saved, name):
    pipe, folder = saved[name, torch.bfloat16]
    model = load_edit_model(folder, dtype=torch.float32)
    for te in model.text_encoders:
        expected = torch.bfloat16 if te.component == T5_COMPONENT[name] else torch.float32
        assert {p.dtype for p in te.model.parameters()} == {expected}, te.component
    assert all(w.dtype == torch.float32 for w in model.final_weights.values())
    # the T5 outputs are what the pipeline's bfloat16 T5 computes (read loosely: bfloat16 arithmetic)
    embeds, pooled = embeddings(model, "a cat")
    ref_embeds, ref_pooled = pipeline_embeddings(pipe, name, "a cat")
    assert torch.allclose(embeds.float(), ref_embeds.float(), rtol=0, atol=1e-2 * float(ref_embeds.abs().max()))
    assert torch.allclose(pooled, ref_pooled, rtol=0, atol=1e-5)


def test_a_float16_t5_stays_float16(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(saved, tmp_path, "tiny-sd3")
    weights = folder / "text_encoder_3" / "model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    model = load_edit_model(folder, dtype=torch.float32)
    t5 = model.encoder("text_encoder_3").model
    assert t5.shared.weight.dtype == torch.float16  # (transformers keeps T5's `wo` in float32, as the pipeline does)
    assert model.encoder("text_encoder").model.dtype == torch.float32


def test_the_transformer_and_vae_are_never_instantiated(saved, monkeypatch):
    import diffusers

    def boom(*args, **kwargs):
        raise AssertionError("a denoiser or VAE was loaded")

    for cls in (diffusers.SD3Transformer2DModel, diffusers.FluxTransformer2DModel, diffusers.AutoencoderKL):
        monkeypatch.setattr(cls, "from_pretrained", boom)
    for name in FAMILY:
        assert len(load_edit_model(saved[name, torch.float32][1]).final_weights) == 2


def test_a_sharded_transformer_is_read_through_its_index(saved, tmp_path):
    pipe, _ = saved["tiny-flux", torch.float32]
    folder = copy_of(saved, tmp_path)
    shutil.rmtree(folder / "transformer")
    pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size="100KB")
    index = folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    assert len(set(weight_map.values())) > 1
    reference = EditModel.from_pipeline(pipe)
    model = load_edit_model(folder)
    for key, weight in reference.final_weights.items():
        assert torch.equal(model.final_weights[key], weight)
    # a shard the index names but the folder lacks
    (folder / "transformer" / weight_map["context_embedder.weight"]).unlink()
    with pytest.raises(BaseModelError, match="is missing .the transformer weight index lists it"):
        load_edit_model(folder)


# ----------------------------------------------------------------------------- what is refused
def test_pickle_only_transformer_is_refused(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(BaseModelError, match="transformer holds only pickle .* safetensors only") as exc:
        load_edit_model(folder)
    assert "save_pretrained" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_or_corrupt_transformer_is_a_base_model_error(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(BaseModelError, match="diffusion_pytorch_model.safetensors is not a readable safetensors"):
        load_edit_model(folder)
    weights.unlink()
    with pytest.raises(BaseModelError, match="no transformer weights"):
        load_edit_model(folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{not json")
    with pytest.raises(BaseModelError, match="index.json is not valid JSON"):
        load_edit_model(folder)


def test_a_transformer_without_the_sites_is_refused(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(saved, tmp_path)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("time_text_embed.text_embedder")}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="time_text_embed.text_embedder.linear_1.weight"):
        load_edit_model(folder)


def edit_index(folder, **changes):
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index.update(changes)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "name, changes, shown",
    [
        ("tiny-flux", {"_class_name": "KandinskyPipeline"}, "KandinskyPipeline pipeline; erasepro_hub edits .*FLUX.1"),
        ("tiny-sd3", {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}, "without text_encoder_3, tokenizer_3"),
        ("tiny-flux", {"_class_name": "Flux2Pipeline", "text_encoder": ["transformers", "Mistral3ForConditionalGeneration"]},
         "text_encoder is a Mistral3ForConditionalGeneration"),
        ("tiny-flux", {"transformer": [None, None]}, "without transformer"),
    ],
    ids=["other-class", "sd3-without-t5", "flux2", "no-transformer"],
)
def test_other_pipelines_are_refused(saved, tmp_path, name, changes, shown):
    folder = copy_of(saved, tmp_path, name)
    edit_index(folder, **changes)
    with pytest.raises(UnsupportedModelError, match=shown) as exc:
        load_edit_model(folder)
    assert str(folder) in str(exc.value) and "\n" not in str(exc.value)


def test_a_missing_t5_folder_names_it(saved, tmp_path):
    folder = copy_of(saved, tmp_path, "tiny-sd3")
    shutil.rmtree(folder / "text_encoder_3")
    with pytest.raises(BaseModelError, match="lacks text_encoder_3/ or tokenizer_3/"):
        load_edit_model(folder)


# ----------------------------------------------------------------------------- download
def test_the_download_patterns_name_the_transformer_tensors_the_loader_reads():
    from erasepro_hub.hub.download import BASE_MODEL_PATTERNS, TRANSFORMER_TENSORS

    wanted = {f"{s}.weight" for family in ("sd3", "flux") for s in (*CONDITIONING[family].sequence_sites,
                                                                      *CONDITIONING[family].pooled_sites)}
    assert set(TRANSFORMER_TENSORS) == wanted
    for needed in ("tokenizer_3/*", "text_encoder_3/model-*.safetensors", "transformer/config.json",
                   "transformer/diffusion_pytorch_model.safetensors.index.json"):
        assert needed in BASE_MODEL_PATTERNS
    assert not [p for p in BASE_MODEL_PATTERNS if p.startswith("vae")]


def test_download_fetches_only_the_shards_that_hold_the_tensors_read(saved, tmp_path, hub, as_alice):
    from huggingface_hub import HfApi

    from erasepro_hub.hub.download import download_base_model

    pipe, _ = saved["tiny-flux", torch.float32]
    folder = copy_of(saved, tmp_path)
    shutil.rmtree(folder / "transformer")
    pipe.transformer.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size="100KB")
    weight_map = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(weight_map["weight_map"].values())
    needed = {weight_map["weight_map"][k] for k in ("context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight")}
    assert needed < shards
    api = HfApi(token=TOKENS["alice"])
    api.create_repo("alice/tiny-flux-sharded", exist_ok=True)
    api.upload_folder(repo_id="alice/tiny-flux-sharded", folder_path=str(folder), commit_message="base")
    local, sha = download_base_model("alice/tiny-flux-sharded", "main")
    assert len(sha) == 40
    assert not (local / "vae").exists() and not (local / "scheduler").exists()
    assert {p.name for p in (local / "transformer").glob("*.safetensors")} == needed
    model = load_edit_model(local)
    for key, weight in EditModel.from_pipeline(pipe).final_weights.items():
        assert torch.equal(model.final_weights[key], weight)


# ----------------------------------------------------------------------------- solving with a 16-bit T5
@pytest.mark.parametrize("name", list(FAMILY))
def test_a_folder_with_a_bfloat16_t5_solves_in_float32(saved, name):
    import yaml

    from erasepro_hub.erase import compute
    from erasepro_hub.manifest import parse_manifest

    from conftest import DEMO

    data = yaml.safe_load(DEMO.read_text())
    data["base_model"] = {"id": str(saved[name, torch.bfloat16][1])}
    data.update(preserve={"mode": "none", "captions": "none"}, evaluation={})
    data["prompts"]["misspellings"] = False
    comp = compute(parse_manifest(yaml.safe_dump(data)).recipe())
    final = {s.key: s.report for s in comp.solution.sites if s.key.startswith("transformer.")}
    assert set(final) == {"transformer.context_embedder", "transformer.time_text_embed.text_embedder.linear_1"}
    # zero residual on the T5 outputs as the bfloat16 T5 computes them (up-cast exactly)
    assert max(r.residual for r in final.values()) <= 1e-5


# ----------------------------------------------------------------------------- a T5-style tokenizer
def _t5_style_tokenizer(words):
    """A SentencePiece-like tokenizer as T5's is (Unigram pieces with ``▁`` word marks, no BOS, ``</s>`` appended,
    ``<pad>`` = 0), built in code over ``words`` and single characters (nothing is downloaded)."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -5.0) for w in sorted(words)]
    pieces += [(p + c, score) for c in string.ascii_letters + string.punctuation for p, score in (("", -12.0), ("▁", -11.0))]
    pieces = list(dict((p, s) for p, s in pieces).items())
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def test_a_t5_style_tokenizer_loads_encodes_like_the_pipeline_and_solves(tmp_path):
    """The T5 slot with a T5-style tokenizer (not the builtin's CLIP one): no BOS, ``▁`` pieces, ``</s>``."""
    import yaml

    from conftest import DEMO
    from erasepro_hub.erase import compute
    from erasepro_hub.manifest import parse_manifest

    text = DEMO.read_text()
    words = set(text.replace("{}", " ").replace('"', " ").replace(",", " ").split())
    pipe = build_builtin("tiny-sd3")
    pipe.register_modules(tokenizer_3=_t5_style_tokenizer(words))
    pipe.save_pretrained(tmp_path / "sd3", safe_serialization=True)
    model = load_edit_model(tmp_path / "sd3")
    assert type(model.text_encoders[2].tokenizer).__name__.startswith("T5Tokenizer")
    prompts = ["a painting by Vincent van Gogh", "a photo of a dog on a beach"]
    ids = [te.encode([Prompt(p) for p in prompts]).ids for te in model.text_encoders]
    assert ids[2][0, 0] != ids[0][0, 0]  # no BOS in the T5 slot
    embeds, pooled = prompt_embeddings(model, ids)
    expected, _, expected_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    assert torch.allclose(embeds, expected, atol=1e-5) and torch.allclose(pooled, expected_pooled, atol=1e-5)
    data = yaml.safe_load(text)
    data["base_model"] = {"id": str(tmp_path / "sd3")}
    data["preserve"]["captions"] = "none"
    comp = compute(parse_manifest(yaml.safe_dump(data)).recipe())
    final = {s.key: s.report for s in comp.solution.sites if s.key.startswith("transformer.")}
    assert max(r.residual for r in final.values()) <= 1e-5
    # the T5 rows count: more constraints than the CLIP rows alone give (a bidirectional prefix is paired too)
    clip_only = next(s.report for s in comp.solution.sites if s.key.startswith("text_encoder.")).n_constraints
    assert final["transformer.context_embedder"].n_constraints > clip_only
