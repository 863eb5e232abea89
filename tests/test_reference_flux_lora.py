"""The Flux reference LoRA's trainer (slimdiff/reference/lora.py, issue 25 on the Flux-style reference) on a tiny
seeded Flux pipeline: what it adapts, that diffusers loads what it saves, that it is a function of the seed, and that
its effect is read with the reference's own sampler settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from slimdiff.reference.lora import (
    FLUX_TARGET_MODULES,
    LORA_WEIGHT_NAME,
    LoraTrainConfig,
    encode_images,
    load_lora_params,
    lora_effect,
    lora_training_set,
    save_lora,
    train_lora,
)
from tests.helpers import TINY_TEXT_LEN, tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(n_images=24, steps=3, batch_size=4, lr=1e-2, warmup_steps=1)


def _trained(tmp: Path, seed: int = 0) -> tuple[object, Path]:
    """A tiny Flux pipeline with a LoRA trained a few steps from ``seed``, and the folder it was saved to."""
    pipe = tiny_flux_pipeline()
    config = LoraTrainConfig(**CONFIG)
    images, captions = lora_training_set(config.n_images, seed, config.plain_background)
    train_lora(pipe, encode_images(pipe, images), captions, config, seed, TINY_TEXT_LEN)
    save_lora(pipe, tmp, {"train_stats.json": {"seed": seed}})
    return pipe, tmp


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _trained(tmp_path_factory.mktemp("flux-lora"))


def _modules(state: dict) -> set[str]:
    return {k.removeprefix("transformer.").split(".lora")[0] for k in state}


def test_targets_exactly_the_attention_and_mlp_linears_of_every_block(trained):
    pipe, folder = trained
    transformer = pipe.transformer
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]
    expected = {f"transformer_blocks.{i}.{m}" for i in range(len(transformer.transformer_blocks)) for m in double}
    expected |= {f"single_transformer_blocks.{i}.{m}" for i in range(len(transformer.single_transformer_blocks))
                 for m in single}
    state = load_file(folder / LORA_WEIGHT_NAME)
    assert _modules(state) == expected  # not the top-level proj_out, no adaLN, embedder or norm
    assert len(state) == 2 * len(expected) and all(k.startswith("transformer.") for k in state)
    assert all(min(v.shape) == 4 for v in state.values())  # rank 4
    assert set(FLUX_TARGET_MODULES) == {m.removeprefix("attn.") for m in double + single}


def test_saved_lora_loads_with_load_lora_weights_and_changes_the_output(trained):
    _, folder = trained
    pipe = tiny_flux_pipeline()
    kwargs = dict(num_inference_steps=2, true_cfg_scale=4.0, negative_prompt=[""], height=32, width=32,
                  max_sequence_length=TINY_TEXT_LEN, output_type="pt")
    prompt = ["a small red square at the top right"]
    before = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(folder))
    after = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.unload_lora_weights()
    again = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(before, again)
    assert (after - before).abs().max() > 1e-4


def test_training_is_a_function_of_the_seed(trained, tmp_path):
    _, folder = trained
    first = load_file(folder / LORA_WEIGHT_NAME)
    same = load_file(_trained(tmp_path / "same", 0)[1] / LORA_WEIGHT_NAME)
    other = load_file(_trained(tmp_path / "other", 1)[1] / LORA_WEIGHT_NAME)
    assert first.keys() == same.keys() == other.keys()
    assert all(torch.equal(first[k], same[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


class _RecordingPipe:
    """Stands in for a FluxPipeline: records each call's keyword arguments, returns black 32 px images."""

    transformer = torch.nn.Linear(1, 1)

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, **kwargs):
        self.calls.append(kwargs)
        return type("Output", (), {"images": torch.zeros(len(prompts), 3, 32, 32)})()


class _Evaluator:
    def predict(self, images):
        return type("Prediction", (), {"background": torch.zeros(len(images), dtype=torch.long)})()

    def alignment(self, images, captions):
        return {"object": 1.0, "overall": 1.0}


def test_effect_samples_with_the_flux_references_own_sampler_settings():
    """`lora.evaluate` inherits the reference's `evaluate` sampler: true CFG with an empty negative prompt, its step
    count, scale, size and T5 length, none of them written twice."""
    import yaml

    params = yaml.safe_load((ROOT / "data" / "reference-flux" / "params.yaml").read_text())
    _, evaluate, _ = load_lora_params(ROOT / "data" / "reference-flux" / "params.yaml")
    sampling = evaluate.sampling()
    pipe = _RecordingPipe()
    lora_effect(pipe, ["a small red square at the top right", "a large blue circle at the bottom left"], _Evaluator(),
                sampling)
    (call,) = pipe.calls
    reference = params["evaluate"]
    assert call["num_inference_steps"] == reference["steps"]
    assert call["true_cfg_scale"] == reference["guidance_scale"] and call["negative_prompt"] == ["", ""]
    assert "guidance_scale" not in call
    for key, value in reference["call_kwargs"].items():
        assert call[key] == value
