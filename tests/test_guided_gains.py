"""Guided truncation gains (``score.gain_target: guided``, docs/method.md §4): the change a truncated group causes in
the classifier-free-guided prediction the sampler steps with, ``u + s (c - u)``, in both layouts of the unconditional
prediction: a doubled batch [unconditional; conditional] (Stable Diffusion) and two calls a step, conditional first
(FluxPipeline's true CFG). Checked against an independent replay of a whole generation."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from slimdiff.arch import compressible_groups
from slimdiff.calls import record_calls
from slimdiff.compress import SlimDiffConfig
from slimdiff.decomposition.apply import decompose
from slimdiff.decomposition.closed_form import DEFAULT_REG
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring.gains import TruncationReference, check_guided, guidance_layout, measure_gains
from slimdiff.scoring.influence import Granularity, score
from slimdiff.statistics.recording import capture
from tests import helpers as testing

PROMPTS = list(testing.TINY_PROMPTS[:2])
SAMPLERS = {
    # two steps, both measured: the replay below sees exactly the units the gains do
    "sd": (testing.tiny_sd_pipeline, SamplerSettings(2, 4.0), "batch"),
    "flux": (testing.tiny_flux_pipeline, SamplerSettings(2, 4.0, guidance_argument="true_cfg_scale"), "pairs"),
}


def guided_change_per_step(pipe, compressed, sampler: SamplerSettings) -> float:
    """Energy per prompt of the change of the guided prediction, averaged over the steps of a generation: each denoiser
    call of the original replayed through ``compressed`` and the guided predictions combined here."""
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def replay(module, args, kwargs, output):
        kwargs = {**kwargs, "return_dict": False}
        outputs.append((output[0].double(), compressed(*args, **kwargs)[0].double()))

    handle = denoiser.register_forward_hook(replay, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(**sampler.pipe_kwargs(pipe, PROMPTS), output_type="latent")
    finally:
        handle.remove()
    s = sampler.guidance_scale
    if sampler.calls_per_step == 2:  # (conditional, unconditional) a step
        steps = [(c, u) for c, u in zip(outputs[0::2], outputs[1::2])]
    else:  # [unconditional; conditional] in one call
        steps = [tuple(zip(*(o.chunk(2) for o in pair)))[::-1] for pair in outputs]
    assert len(steps) == sampler.num_inference_steps
    total = 0.0
    for (c_ref, c_test), (u_ref, u_test) in steps:
        before = u_ref + s * (c_ref - u_ref)
        after = u_test + s * (c_test - u_test)
        total += float((after - before).pow(2).sum()) / len(PROMPTS)
    return total / len(steps)


@pytest.mark.parametrize("family", sorted(SAMPLERS))
def test_guided_gain_times_the_score_is_the_measured_change_of_the_guided_prediction(family, capsys, tmp_path):
    build, sampler, layout = SAMPLERS[family]
    pipe = build(0)
    denoiser = pipe.transformer if family == "flux" else pipe.unet
    assert guidance_layout(sampler, denoiser) == layout
    stats = capture(pipe, PROMPTS, sampler, num_buckets=2, batch_size=2, progress=False)
    checkpoint = tmp_path / "gains.ckpt.json"
    per_call = measure_gains(pipe, PROMPTS, sampler, num_calls=2, checkpoint=checkpoint,
                             reference=TruncationReference(stats, DEFAULT_REG))
    gains = measure_gains(pipe, PROMPTS, sampler, num_calls=2, checkpoint=checkpoint,
                          reference=TruncationReference(stats, DEFAULT_REG, guided=True))
    assert "written with other settings; starting over" in capsys.readouterr().err  # call gains are not resumed
    assert gains.metadata["target"] == "guided" and per_call.metadata["target"] == "call"
    # call gains keep the fingerprint they had before the setting existed (their checkpoints and shard plans stand)
    assert gains.metadata["reference"]["guided"] is True and "guided" not in per_call.metadata["reference"]
    assert gains.metadata["calls"] == 2  # guided units: two steps

    scores = score(denoiser, stats, gains, Granularity(rank_step=1), max_ffn_points=10**6)
    reference = TruncationReference(stats, DEFAULT_REG, guided=True)
    checked = 0
    for group, module in zip(compressible_groups(denoiser), scores.modules):
        width = reference.width(group)
        while float(module.error()[module.widths.index(width)]) == 0 and width > 1:  # exact there, as the gain steps
            width //= 2
        if float(module.error()[module.widths.index(width)]) == 0:
            continue
        compressed = copy.deepcopy(denoiser)
        decompose(compressed, stats, {group.name: width})
        measured = guided_change_per_step(pipe, compressed, sampler)
        sis = float(module.sis()[module.widths.index(width)])
        assert sis == pytest.approx(measured, rel=1e-6, abs=1e-12), group.name
        checked += 1
    assert checked >= 3
    # the guided prediction weighs the guidance direction s times: the gains are not the per-call ones
    assert any(abs(gains.gains[n] - per_call.gains[n]) > 0.05 * per_call.gains[n] for n in per_call.gains)


def test_true_cfg_steps_are_recorded_whole_conditional_first():
    pipe = testing.tiny_flux_pipeline(0)
    sampler = SamplerSettings(5, 4.0, guidance_argument="true_cfg_scale")
    every = record_calls(pipe, PROMPTS, sampler)
    assert len(every) == 10
    kept = record_calls(pipe, PROMPTS, sampler, 2, whole_steps=True)
    assert len(kept) == 4  # the first and the last step, both calls of each
    for index, call in zip((0, 1, 8, 9), kept):
        assert torch.equal(call[1]["hidden_states"], every[index][1]["hidden_states"])
        assert torch.equal(call[1]["encoder_hidden_states"], every[index][1]["encoder_hidden_states"])
    conditional, unconditional = kept[0][1], kept[1][1]
    assert torch.equal(conditional["timestep"], unconditional["timestep"])
    assert not torch.equal(conditional["encoder_hidden_states"], unconditional["encoder_hidden_states"])
    # calls spread over all calls (not whole steps) are the ones kept before only chosen calls were kept
    spread = record_calls(pipe, PROMPTS, sampler, 4)
    for index, call in zip((0, 3, 6, 9), spread):
        assert torch.equal(call[1]["hidden_states"], every[index][1]["hidden_states"])


@pytest.mark.parametrize("build, sampler, message", [
    (lambda: testing.tiny_flux_pipeline(0, guidance_embeds=True), SamplerSettings(2, 3.5),
     r"no unconditional prediction \(FluxTransformer2DModel takes guidance_scale as embedded guidance\); "
     r"use score.gain_target: call"),
    (lambda: testing.tiny_sd_pipeline(0), SamplerSettings(2, 1.0),
     r"no unconditional prediction \(guidance_scale = 1 runs none \(it needs a scale > 1\)\)"),
    (lambda: testing.tiny_flux_pipeline(0), SamplerSettings(2, 1.0, guidance_argument="true_cfg_scale"),
     r"no unconditional prediction \(true_cfg_scale = 1 runs none"),
])
def test_guided_gains_without_classifier_free_guidance_are_refused_before_any_call(build, sampler, message):
    pipe = build()
    denoiser = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    calls = []
    handle = denoiser.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=message):
            measure_gains(pipe, PROMPTS, sampler, num_calls=2, reference=TruncationReference(None, DEFAULT_REG, guided=True))
    finally:
        handle.remove()
    assert not calls
    with pytest.raises(ValueError, match=message):
        check_guided(sampler, denoiser)


def test_gain_target_settings():
    with pytest.raises(ValueError, match=r"unknown gain target 'both'; choose one of call, guided"):
        SlimDiffConfig(gain_target="both")
    with pytest.raises(ValueError, match=r"gain target guided .* needs gain method truncation, got 'noise'"):
        SlimDiffConfig(gain_target="guided", gain_method="noise")
    assert SlimDiffConfig(gain_target="guided").gain_reference(None).guided
    assert not SlimDiffConfig().gain_reference(None).guided


def test_guided_gains_with_true_cfg_predict_both_calls_of_each_step_in_memory():
    import yaml

    from slimdiff.pipeline.memory import settings_from_params

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    calls = int(params["score"]["gain_calls"])
    device = torch.device("cpu")
    assert settings_from_params(params, device, torch.float32, calls_per_step=2).gain_calls == calls
    params["score"]["gain_target"] = "guided"
    assert settings_from_params(params, device, torch.float32, calls_per_step=2).gain_calls == 2 * calls
    assert settings_from_params(params, device, torch.float32, calls_per_step=1).gain_calls == calls
