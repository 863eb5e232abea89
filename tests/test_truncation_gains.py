"""Truncation gains (docs/method.md §4): each group cut to a reference width by its own decomposition; the gain turns
the decomposition's predicted error into the measured change of the denoiser's output. Tiny seeded models of every
family; the model is left exactly as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from slimdiff.arch import compressible_groups
from slimdiff.compress import SlimDiffConfig
from slimdiff.decomposition.apply import decompose
from slimdiff.decomposition.closed_form import DEFAULT_REG
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring.gains import Gains, TruncationReference, measure_gains, propagation_gains
from slimdiff.scoring.influence import Granularity, score
from tests import helpers as testing
from tests.helpers import TINY_DENOISERS, TINY_DIT_DENOISERS, record_capture

# every group kind once: UNet self/cross QK and VO and GEGLU FFN (SD 2: a cross-attention QK exact at half width),
# PixArt's GELU FFN, SD3's joint attention, Flux's joint and single blocks and adaLN modulations
FAMILIES = {"unet_sd2": TINY_DENOISERS["unet_sd2"], "pixart": TINY_DENOISERS["pixart"],
            "sd3": TINY_DIT_DENOISERS["sd3"], "flux": TINY_DIT_DENOISERS["flux"]}
CAPTURE_TIMESTEPS = (5, 180, 420, 610, 820, 990) * 2
GAIN_TIMESTEPS = (100, 500, 900)


def change_per_call(model, compressed, calls) -> float:
    """Output change energy per sample, averaged over ``calls`` (what a gain is measured against)."""
    total = 0.0
    with torch.no_grad():
        for _, kwargs in calls:
            before = model(**kwargs, return_dict=False)[0].double()
            after = compressed(**kwargs, return_dict=False)[0].double()
            total += float((after - before).pow(2).sum()) / before.shape[0]
    return total / len(calls)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gain_times_the_score_at_the_reference_width_is_the_measured_change_and_the_model_is_restored(family):
    tiny = FAMILIES[family]
    model = tiny.build(0)
    capture = record_capture(model, tiny, CAPTURE_TIMESTEPS)
    calls = [((), tiny.inputs(model, 2, t, 100 + i)) for i, t in enumerate(GAIN_TIMESTEPS)]
    reference = TruncationReference(capture, DEFAULT_REG, keep=0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    gains, influence = propagation_gains(model, calls, reference=reference)

    # left exactly as it was: same modules, weights and attention processors
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")} == processors

    # what the allocator reads: every width on the grid, FFN errors exact at every width
    scores = score(model, capture, Gains(gains, influence), Granularity(rank_step=1), max_ffn_points=10**6)
    assert {m.name for m in scores.modules} == {g.name for g in compressible_groups(model)}
    stepped = 0
    for group, module in zip(compressible_groups(model), scores.modules):
        width = reference.width(group)
        assert 1 <= width < group.width
        while float(module.error()[module.widths.index(width)]) == 0 and width > 1:  # exact there: half the width
            width //= 2
            stepped += 1
        compressed = copy.deepcopy(model)  # the decompose stage's path, on a whole copy of the model
        decompose(compressed, capture, {group.name: width})
        measured = change_per_call(model, compressed, calls)
        sis = float(module.sis()[module.widths.index(width)])
        if float(module.error()[module.widths.index(width)]) > 0:
            assert sis == pytest.approx(measured, rel=1e-6, abs=1e-12), group.name
        else:
            assert gains[group.name] == 0 and measured == pytest.approx(0, abs=1e-9), group.name
    if family == "unet_sd2":  # its cross-attention QK is exact at half width (rank of the text tokens)
        assert stepped > 0


def test_reference_width_is_the_kept_fraction_below_full_width():
    tiny = TINY_DENOISERS["unet_sd1"]
    model = tiny.build(0)
    capture = record_capture(model, tiny, CAPTURE_TIMESTEPS[:4])
    for keep in (0.01, 0.5, 0.99):
        reference = TruncationReference(capture, DEFAULT_REG, keep)
        for group in compressible_groups(model):
            assert reference.width(group) == min(max(1, round(keep * group.width)), group.width - 1)


@pytest.mark.parametrize("keep", [0, 1, -0.5, 1.5, float("nan"), "half"])
def test_a_reference_width_outside_the_group_is_refused(keep):
    with pytest.raises(ValueError, match=r"0 < keep < 1; got"):
        TruncationReference(None, DEFAULT_REG, keep)


def test_config_refuses_unknown_gain_method_and_bad_keep():
    with pytest.raises(ValueError, match=r"unknown gain method 'gradient'; choose one of truncation, noise"):
        SlimDiffConfig(gain_method="gradient")
    with pytest.raises(ValueError, match=r"0 < gain_keep < 1; got 1.5"):
        SlimDiffConfig(gain_keep=1.5)
    assert SlimDiffConfig().gain_reference(None) is not None
    assert SlimDiffConfig(gain_method="noise").gain_reference(None) is None


def test_a_capture_of_another_model_is_refused_before_any_call():
    from slimdiff.statistics.recording import capture

    sampler = SamplerSettings(2, 4.0)
    other = testing.tiny_sd_pipeline(seed=1)
    stats = capture(other, list(testing.TINY_PROMPTS[:2]), sampler, num_buckets=2, batch_size=2, progress=False)
    pipe = testing.tiny_sd_pipeline(seed=0)
    with pytest.raises(ValueError, match=r"truncation gains: the capture was made on model \w{12}, this model is \w{12}"):
        measure_gains(pipe, list(testing.TINY_PROMPTS[:2]), sampler, num_calls=2,
                      reference=TruncationReference(stats, DEFAULT_REG))


@pytest.mark.parametrize("key, value, message", [
    ("gain_keep", "half", r"0 < gain_keep < 1; got 'half'"),
    ("gain_keep", 1, r"0 < gain_keep < 1; got 1"),
    ("gain_method", "gradients", r"unknown gain method 'gradients'; choose one of truncation, noise"),
])
def test_bad_gain_settings_in_params_yaml_fail_naming_the_setting(key, value, message):
    import yaml

    from slimdiff.pipeline.stages import config_from

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["score"][key] = value
    with pytest.raises(ValueError, match=message):
        config_from(params)
