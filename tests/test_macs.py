"""MACs as the kernels run them (issue 23): the evaluated count equals torch's FLOP counter on every family, original
and compressed, and a plan's predicted MACs equal the evaluated ones (padded attention, QK left intact, image and
text tokens of joint attention)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from slimdiff.arch import adapter_for, compressible_groups
from slimdiff.arch.sites import sites_for
from slimdiff.cost import count_macs, macs_per_call
from slimdiff.decomposition.apply import decompose
from slimdiff.planning.allocation import BudgetError, allocate, macs_of
from slimdiff.scoring.influence import score
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from tests.helpers import TINY_DENOISERS, TINY_DIT_DENOISERS, cast

FAMILIES = {**TINY_DENOISERS, **TINY_DIT_DENOISERS}


def flop_counter_macs(model, inputs) -> int:
    """Half of torch's FLOP count of one call; the math SDPA kernel, whose matrix products torch counts."""
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**inputs, return_dict=False)
    return counter.get_total_flops() // 2


_SCORED: dict = {}


def scored(name: str):
    if name not in _SCORED:
        tiny = FAMILIES[name]
        model = tiny.build(0)
        scale = adapter_for(model).TIMESTEP_SCALE
        with ActivationRecorder(model, sites_for(compressible_groups(model)), 4, 1000, timestep_scale=scale) as recorder, \
                torch.no_grad():
            for i, t in enumerate((50, 300, 600, 900)):
                tiny.output(model, tiny.inputs(model, 2, t, i))
        capture = Capture(recorder.stats, {"bucket_edges": recorder.edges, "site_tokens": dict(recorder.site_tokens)})
        _SCORED[name] = (tiny, model, capture, score(model, capture, None, require_gains=False))
    return _SCORED[name]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_counted_macs_equal_the_flop_counter_original_and_compressed(name):
    tiny, model, capture, scores = scored(name)
    plan = allocate(scores, 0.4, tie_qk_vo=False)  # untied: QK and VO widths differ, attention runs padded
    compressed = copy.deepcopy(model)
    decompose(compressed, capture, plan.widths)
    inputs = tiny.inputs(model, 2, 500, 7)
    for which in (model, compressed):
        assert count_macs(which, ((), inputs))["total"] == flop_counter_macs(which, inputs), name


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_a_plans_predicted_macs_equal_the_evaluated_macs(name, tied):
    tiny, model, capture, scores = scored(name)
    plan = allocate(scores, 0.4, tie_qk_vo=tied)
    compressed = copy.deepcopy(model)
    decompose(compressed, capture, plan.widths)
    call = ((), tiny.inputs(model, 2, 500, 11))
    assert macs_per_call(model, call) - macs_per_call(compressed, call) == plan.macs_before - plan.macs_after


def test_narrowing_one_side_of_an_attention_saves_no_attention_macs():
    _, model, _, scores = scored("unet_sd1")
    qk = next(m for m in scores.modules if m.kind == "qk_self")
    vo = next(m for m in scores.modules if m.name == qk.name[:-3] + ".vo")
    full = {qk.name: qk.full_width, vo.name: vo.full_width}
    narrower_v = {**full, vo.name: vo.full_width // 2}
    both = {qk.name: qk.full_width // 2, vo.name: vo.full_width // 2}
    saved_v = macs_of([qk, vo], full) - macs_of([qk, vo], narrower_v)
    saved_both = macs_of([qk, vo], full) - macs_of([qk, vo], both)
    assert saved_v == vo.unit_macs * (vo.full_width - vo.full_width // 2)  # projections only
    assert saved_both == (qk.unit_macs + vo.unit_macs + 2 * qk.attention_pairs) * (qk.full_width - qk.full_width // 2)


def test_a_vo_beside_an_intact_qk_saves_only_its_projections():
    _, _, _, scores = scored("flux")
    vo = next(m for m in scores.modules if m.kind == "vo_joint")
    assert vo.attention_floor == vo.full_width and vo.attention_pairs > 0
    saved = macs_of([vo], {vo.name: vo.full_width}) - macs_of([vo], {vo.name: 1})
    assert saved == vo.unit_macs * (vo.full_width - 1)


def test_a_macs_budget_ties_qk_and_vo_and_refuses_them_untied():
    _, _, _, scores = scored("unet_sd1")
    plan = allocate(scores, 0.7, budget_kind="macs")
    widths = plan.widths
    assert plan.settings["tie_qk_vo"] is True and plan.macs_after <= 0.7 * plan.macs_before
    assert all(widths[n] == widths[n[:-3] + ".vo"] for n in widths if n.endswith(".qk"))
    with pytest.raises(BudgetError, match="MACs budget ties QK and VO"):
        allocate(scores, 0.7, budget_kind="macs", tie_qk_vo=False)


def test_joint_attention_counts_text_and_image_tokens():
    tiny, model, _, _ = scored("sd3")
    inputs = cast(tiny.inputs(model, 1, 500, 0), torch.float32)
    counts = count_macs(model, ((), inputs))
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(**inputs, return_dict=False)
    bmm = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}.get("aten.bmm", 0)
    assert counts["attention"] == bmm // 2 > 0


@pytest.mark.parametrize("make", ["tiny_sd_pipeline", "tiny_flux_pipeline"])
def test_info_json_reports_the_macs_fraction_at_the_capture_call_shape(make, tmp_path, capsys):
    import json

    import slimdiff
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.cli import main
    from slimdiff.runtime.sampling import SamplerSettings
    from tests import helpers as testing

    pipe = getattr(testing, make)()
    sampler = SamplerSettings(2, height=32, width=32) if "flux" in make else SamplerSettings(2)
    _, denoiser = denoiser_of(pipe)
    original = copy.deepcopy(denoiser)  # compress_pipeline narrows the pipeline's own denoiser
    result = slimdiff.compress_pipeline(pipe, ["a red circle", "a blue square", "a cat", "a dog"],
                                        slimdiff.SlimDiffConfig(budget=0.4, batch_size=4), sampler, progress=False)
    slimdiff.save(pipe, tmp_path / "model", result.info(), full_widths={m.name: m.full_width for m in result.plan.modules})
    assert main(["info", str(tmp_path / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"params", "compressible_before", "compressible_after", "macs_fraction"} <= set(info)
    # the same count on the real modules, at the recorded call's shape
    from slimdiff.calls import meta_call

    _, kwargs = meta_call(result.capture.metadata["call"])
    real = {k: (torch.zeros(v.shape, dtype=v.dtype) if torch.is_tensor(v) else
                {kk: torch.zeros(vv.shape, dtype=vv.dtype) for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in kwargs.items()}
    expected = count_macs(denoiser, ((), real))["total"] / count_macs(original, ((), real))["total"]
    assert info["macs_fraction"] == pytest.approx(expected, rel=1e-12) and info["macs_fraction"] < 1
