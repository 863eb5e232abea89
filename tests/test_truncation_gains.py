"""Truncation gains (docs/method.md §4): each group cut to a reference width by its own decomposition; the gain turns
the decomposition's predicted error into the measured change of the denoiser's output. Tiny seeded models of every
family; the model is left exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch

from slimdiff.arch import compressible_groups
from slimdiff.compress import SlimDiffConfig
from slimdiff.decomposition.apply import decompose
from slimdiff.decomposition.closed_form import DEFAULT_REG
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring.gains import TruncationReference, measure_gains, propagation_gains
from tests import helpers as testing
from tests.helpers import TINY_DENOISERS, TINY_DIT_DENOISERS, record_capture

FAMILIES = {**TINY_DENOISERS, **{k: v for k, v in TINY_DIT_DENOISERS.items() if k in ("sd3", "flux")}}
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
def test_gain_times_predicted_error_is_the_measured_change_and_the_model_is_restored(family):
    tiny = FAMILIES[family]
    model = tiny.build(0)
    capture = record_capture(model, tiny, CAPTURE_TIMESTEPS)
    calls = [((), tiny.inputs(model, 2, t, 100 + i)) for i, t in enumerate(GAIN_TIMESTEPS)]
    reference = TruncationReference(capture, DEFAULT_REG, keep=0.5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    processors = {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}
    gains, _ = propagation_gains(model, calls, reference=reference)

    # left exactly as it was: same modules, weights and attention processors
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in weights.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")} == processors

    groups = compressible_groups(model)
    assert set(gains) == {g.name for g in groups}
    for group in groups:
        width = reference.width(group)
        assert 1 <= width < group.width
        while True:  # where the decomposition is exact at a width (predicted error 0), the gain is taken at half of it
            compressed = copy.deepcopy(model)  # the decompose stage's path, on a whole copy of the model
            (result,) = decompose(compressed, capture, {group.name: width})
            if result.predicted_error > 0 or width == 1:
                break
            width //= 2
        measured = change_per_call(model, compressed, calls)
        if result.predicted_error > 0:
            assert gains[group.name] * result.predicted_error == pytest.approx(measured, rel=1e-6, abs=1e-12), group.name
        else:
            assert gains[group.name] == 0 and measured == pytest.approx(0, abs=1e-9), group.name


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
