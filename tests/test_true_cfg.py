"""Sampler settings of pipelines with true classifier-free guidance and a text length (issue 26 item 4): FluxPipeline's
``true_cfg_scale`` with an empty negative prompt (two denoiser calls a step) and ``max_sequence_length``, through the
capture, the evaluation's guidance cosine and the calibration checks."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from slimdiff.pipeline.evaluation import fidelity
from slimdiff.runtime.sampling import SamplerSettings, guidance_kwargs
from slimdiff.statistics.recording import capture, check_calibration
from tests.helpers import TINY_PROMPTS, tiny_flux_pipeline, tiny_sd_pipeline

TRUE_CFG = SamplerSettings(2, 4.0, 32, 32, 0, "true_cfg_scale", 12)


@pytest.fixture(scope="module")
def flux():
    return tiny_flux_pipeline()


def denoiser_calls(pipe, sampler: SamplerSettings, prompts) -> list[dict]:
    seen = []

    def keep(module, args, kwargs):
        seen.append({"batch": kwargs["hidden_states"].shape[0], "text": kwargs["encoder_hidden_states"].shape[1],
                     "timestep": float(kwargs["timestep"].reshape(-1)[0])})

    handle = pipe.transformer.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(**sampler.pipe_kwargs(pipe, prompts), output_type="latent")
    finally:
        handle.remove()
    return seen


def test_settings_are_checked_with_the_bad_value_named():
    with pytest.raises(ValueError, match="guidance_argument must be one of guidance_scale, true_cfg_scale, got 'cfg'"):
        SamplerSettings(guidance_argument="cfg")
    with pytest.raises(ValueError, match="max_sequence_length must be a whole number >= 1 or None, got 0"):
        SamplerSettings(max_sequence_length=0)
    assert SamplerSettings(guidance_scale=4.0, guidance_argument="true_cfg_scale").calls_per_step == 2
    # true CFG at scale <= 1 is off in FluxPipeline: one call a step
    assert SamplerSettings(guidance_scale=1.0, guidance_argument="true_cfg_scale").calls_per_step == 1
    assert SamplerSettings(guidance_scale=4.0).calls_per_step == 1
    assert guidance_kwargs("true_cfg_scale", 4.0, 2) == {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]}


def test_a_pipeline_without_the_argument_fails_in_one_line():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="StableDiffusionPipeline takes no 'true_cfg_scale' argument"):
        SamplerSettings(guidance_argument="true_cfg_scale").pipe_kwargs(pipe, TINY_PROMPTS[:1])
    # Stable Diffusion's call takes **kwargs: an unknown setting would otherwise be dropped without a word
    with pytest.raises(ValueError, match="StableDiffusionPipeline takes no 'max_sequence_length' argument"):
        SamplerSettings(max_sequence_length=16).pipe_kwargs(pipe, TINY_PROMPTS[:1])


def test_true_cfg_makes_two_calls_a_step_with_the_set_text_length(flux):
    calls = denoiser_calls(flux, TRUE_CFG, TINY_PROMPTS[:3])
    assert len(calls) == TRUE_CFG.num_inference_steps * 2
    assert all(c["batch"] == 3 and c["text"] == 12 for c in calls)
    assert [c["timestep"] for c in calls[0::2]] == [c["timestep"] for c in calls[1::2]]
    unguided = denoiser_calls(flux, replace(TRUE_CFG, guidance_argument="guidance_scale", max_sequence_length=None),
                              TINY_PROMPTS[:3])
    assert len(unguided) == TRUE_CFG.num_inference_steps and unguided[0]["text"] == 512  # FluxPipeline's default


def test_capture_records_both_calls_and_its_settings(flux):
    prompts = TINY_PROMPTS[:4]
    stats = capture(flux, prompts, TRUE_CFG, batch_size=2, progress=False, timestep_grid_points=0)
    assert stats.metadata["denoiser_calls"] == 2 * TRUE_CFG.num_inference_steps * 2  # batches x steps x 2 calls
    assert stats.metadata["guidance_argument"] == "true_cfg_scale" and stats.metadata["max_sequence_length"] == 12
    check_calibration(stats, prompts, TRUE_CFG)
    with pytest.raises(ValueError, match=r"guidance_argument true_cfg_scale \(now guidance_scale\)"):
        check_calibration(stats, prompts, replace(TRUE_CFG, guidance_argument="guidance_scale"))
    with pytest.raises(ValueError, match=r"max_sequence_length 12 \(now 24\)"):
        check_calibration(stats, prompts, replace(TRUE_CFG, max_sequence_length=24))
    # a capture written before these settings existed was taken with the defaults
    for key in ("guidance_argument", "max_sequence_length"):
        del stats.metadata[key]
    check_calibration(stats, prompts, replace(TRUE_CFG, guidance_argument="guidance_scale", max_sequence_length=None))


def test_guidance_cosine_pairs_each_steps_two_calls(flux):
    prompts = TINY_PROMPTS[:2]
    same = fidelity(flux, copy.deepcopy(flux), prompts, TRUE_CFG, batch_size=2)
    assert same["guidance_cosine"] == pytest.approx(1.0, abs=1e-9)
    assert sum(same["denoiser_calls_by_bucket"].values()) == 2 * TRUE_CFG.num_inference_steps
    perturbed = copy.deepcopy(flux)
    with torch.no_grad():
        linear = perturbed.transformer.transformer_blocks[0].attn.to_v
        linear.weight.add_(0.5 * torch.randn(linear.weight.shape, generator=torch.Generator().manual_seed(0)))
    changed = fidelity(flux, perturbed, prompts, TRUE_CFG, batch_size=2)
    assert changed["guidance_cosine"] < 0.999
    # unguided: no guidance direction to compare
    assert fidelity(flux, perturbed, prompts, replace(TRUE_CFG, guidance_scale=1.0), batch_size=2)["guidance_cosine"] is None
