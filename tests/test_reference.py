"""Tests of the embedded reference model: data grammar, tokenizer, builders, training, evaluator."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slimdiff.reference import (
    REFERENCE_EVALUATOR_DIR,
    REFERENCE_MODEL_DIR,
    load_reference_pipeline,
)
from slimdiff.reference import data as d
from slimdiff.reference.evaluator import (
    ReferenceEvaluator,
    load_evaluator,
    uint8_to_unit,
)
from slimdiff.reference.model import ReferenceConfig, build_pipeline, transformer_share
from slimdiff.reference.tokenizer import build_tokenizer
from slimdiff.reference.train import (
    UnetTrainConfig,
    VaeTrainConfig,
    encode_latents,
    train_unet,
    train_vae,
)

TINY = {
    "vae": {"block_out_channels": [8, 8, 8], "norm_num_groups": 4},
    "text": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
    "unet": {"block_out_channels": [32, 32], "attention_head_dim": [2, 2], "norm_num_groups": 8,
             "transformer_layers_per_block": 1},
}


# ------------------------------------------------------------------------------------------ data


def test_caption_roundtrip_and_parse():
    scenes = d.sample_scenes(300, seed=5, heldout=None)
    for scene in scenes:
        assert d.parse_scene(scene.caption()) == scene
    objs = d.parse_caption("a small red circle at the top left and a large blue square at the bottom right on a gray background")
    assert objs == [
        {"shape": "circle", "colour": "red", "size": "small", "position": "top left", "background": "gray"},
        {"shape": "square", "colour": "blue", "size": "large", "position": "bottom right", "background": "gray"},
    ]
    assert d.parse_caption("a large green cross at the top right")[0]["background"] == "black"


@pytest.mark.parametrize(
    "bad",
    ["a small pink circle at the top left", "a small red circle at the middle", "two red circles",
     "a small red circle at the top left and a large red square at the top left"],
)
def test_parse_rejects_non_grammar(bad):
    with pytest.raises(ValueError):
        d.parse_caption(bad)


def test_splits_deterministic_and_heldout_pairs():
    a_img, a_cap = d.make_split("train", seed=3, size=40)
    b_img, b_cap = d.make_split("train", seed=3, size=40)
    assert a_cap == b_cap and np.array_equal(a_img, b_img)
    assert a_img.shape == (40, 32, 32, 3) and a_img.dtype == np.uint8
    _, c_cap = d.make_split("train", seed=4, size=40)
    assert c_cap != a_cap
    assert not any(d.parse_scene(c).has_heldout_pair() for c in a_cap)
    _, h_cap = d.make_split("heldout", seed=3, size=40)
    assert all(d.parse_scene(c).has_heldout_pair() for c in h_cap)


def test_render_places_colour_in_named_quadrant():
    scene = d.parse_scene("a large red square at the bottom right on a gray background")
    img = d.render_scenes([scene], seed=0)[0].astype(int)
    assert np.abs(img[24, 24] - np.array(d.COLOUR_RGB["red"])).max() <= 2  # centre of bottom-right quadrant
    assert np.abs(img[8, 8] - np.array(d.BACKGROUND_RGB["gray"])).max() <= 2


def test_caption_pool_unique_and_committed_file():
    pool = d.caption_pool(300, seed=0)
    assert len(set(pool)) == 300
    rows = d.read_caption_pool()
    assert len(rows) >= 2000 and len({r["caption"] for r in rows}) == len(rows)
    assert rows[0]["objects"] == d.parse_caption(rows[0]["caption"])
    assert [r["caption"] for r in rows] == d.caption_pool(len(rows), seed=0)  # seed 0 of params.yaml


def test_build_dataset_small(tmp_path):
    sizes = {name: 6 for name in d.SPLITS}
    ds = d.build_dataset(0, sizes)
    ds.save_to_disk(str(tmp_path / "ds"))
    images, captions = d.load_split(tmp_path / "ds", "test")
    ref_images, ref_captions = d.make_split("test", 0, 6)
    assert captions == ref_captions and np.array_equal(images, ref_images)


# ------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_single_token_words_and_roundtrip(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_tokenizer(24)
    for word in d.grammar_words():
        assert len(tok.tokenize(word)) == 1, word
    caption = "a small red circle at the top left and a large blue square at the bottom right on a gray background"
    ids = tok(caption).input_ids
    assert len(ids) == 23 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again(caption).input_ids == ids and again.model_max_length == 24


# ---------------------------------------------------------------------------------------- model


def test_tiny_pipeline_save_load_generate(tmp_path):
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = build_pipeline(ReferenceConfig.from_dict(TINY))
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    out = loaded(["a small red circle at the top left"], num_inference_steps=2, output_type="pt").images
    assert out.shape == (1, 3, 32, 32)
    inside, total = transformer_share(loaded.unet)
    assert 0 < inside < total


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown unet config keys"):
        ReferenceConfig.from_dict({"unet": {"channels": [1]}})


# ------------------------------------------------------------------------------------- training


def _tiny_unet_run(latents, captions, steps, ckpt=None):
    config = ReferenceConfig.from_dict(TINY)
    train = UnetTrainConfig(steps=steps, batch_size=4, warmup_steps=2, checkpoint_every=2)
    text, unet, _, _ = train_unet(config, train, latents, captions, seed=7, device="cpu", checkpoint_dir=ckpt)
    return {**{f"t.{k}": v for k, v in text.state_dict().items()}, **{f"u.{k}": v for k, v in unet.state_dict().items()}}


def test_training_bit_reproducible_and_resumable(tmp_path):
    images, captions = d.make_split("train", 0, 16)
    config = ReferenceConfig.from_dict(TINY)
    vae = train_vae(config, VaeTrainConfig(steps=2, batch_size=4), images, seed=0, device="cpu")
    assert vae.config.scaling_factor > 0
    latents = encode_latents(vae, images, "cpu")
    assert latents.shape == (16, 4, 8, 8)
    first = _tiny_unet_run(latents, captions, steps=4)
    second = _tiny_unet_run(latents, captions, steps=4)
    assert all(torch.equal(first[k], second[k]) for k in first)  # CPU training is bit-reproducible
    # Interrupted run: the checkpoint at step 2 of a 4-step run, then a resumed run to step 4.
    _tiny_unet_run(latents, captions, steps=4, ckpt=tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "progress.json").read_text())["step"] == 2
    resumed = _tiny_unet_run(latents, captions, steps=4, ckpt=tmp_path / "ck")
    assert all(torch.equal(first[k], resumed[k]) for k in first)
    with pytest.raises(ValueError, match="other settings"):  # a checkpoint of another config is never reused
        _tiny_unet_run(latents, captions, steps=6, ckpt=tmp_path / "ck")
    untrained = _tiny_unet_run(latents, captions, steps=1)
    assert not all(torch.equal(first[k], untrained[k]) for k in first)


# ------------------------------------------------------------------------------ committed assets


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_committed_evaluator_reads_real_images():
    assert _folder_bytes(REFERENCE_EVALUATOR_DIR) <= 5 * 2**20
    evaluator = load_evaluator()
    images, captions = d.make_split("test", seed=11, size=200)  # a fresh draw, not the stage's test split
    scores = evaluator.alignment(uint8_to_unit(images), captions)
    for attribute in ("shape", "colour", "size", "position", "background"):
        assert scores[attribute] >= 0.97, (attribute, scores)
    wrong = [c.replace("red", "TMP").replace("blue", "red").replace("TMP", "blue") for c in captions]
    assert evaluator.alignment(uint8_to_unit(images), wrong)["colour"] < scores["colour"] - 0.1
    # FD-shapes: near zero for a set against itself, larger against a shifted set.
    x = uint8_to_unit(images)
    same = evaluator.frechet_distance(x[:100], x[:100])
    other = evaluator.frechet_distance(x[:100], x[:100].flip(-1))
    assert abs(same) < 1e-2 and other > 10 * max(same, 1e-3)
    with pytest.raises(ValueError, match="uint8"):
        evaluator.alignment(torch.from_numpy(images).permute(0, 3, 1, 2), captions)


def test_committed_pipeline_loads_offline_and_follows_prompts():
    from diffusers import StableDiffusionPipeline

    assert _folder_bytes(REFERENCE_MODEL_DIR) <= 40 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(REFERENCE_MODEL_DIR)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    prompts = ["a large red square at the top left", "a large blue circle at the bottom right",
               "a large yellow triangle at the top right", "a large green cross at the bottom left"]
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompts, num_inference_steps=12, guidance_scale=4.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (4, 3, 32, 32)
    scores = load_evaluator().alignment(images, prompts)
    assert scores["colour"] >= 0.75 and scores["position"] >= 0.75, scores
    assert load_reference_pipeline().unet.dtype == torch.float32


# --------------------------------------------------------------------------- CLIPScore / Inception


def test_clip_score_with_tiny_local_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tok = build_tokenizer(24)
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 24,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok,
    )
    processor.save_pretrained(tmp_path)
    images, captions = d.make_split("test", seed=2, size=4)
    evaluator = load_evaluator(clip_path=tmp_path)
    score = evaluator.clip_score(uint8_to_unit(images), captions)
    assert np.isfinite(score) and 0 <= score <= 100
    with pytest.raises(FileNotFoundError, match="SLIMDIFF_CLIP_PATH"):
        ReferenceEvaluator(evaluator.net, clip_path=tmp_path / "missing").clip_score(uint8_to_unit(images), captions)


def test_inception_fid_needs_local_weights(tmp_path):
    evaluator = load_evaluator(inception_weights=tmp_path / "nope.pth")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="SLIMDIFF_INCEPTION_WEIGHTS"):
        evaluator.inception_fid(x, x)
