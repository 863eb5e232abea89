"""Budgets in MACs, hardware-friendly widths and tied QK/VO widths (issue 11, first part)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimdiff.arch import compressible_groups
from slimdiff.arch.sites import sites_for
from slimdiff.cost import macs_per_call
from slimdiff.decomposition.apply import decompose
from slimdiff.device import DeviceError, resolve_rank_step
from slimdiff.planning.allocation import BudgetError, allocate
from slimdiff.scoring.influence import Granularity, score
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from tests.helpers import TINY_DENOISERS


def scored(name: str, granularity: Granularity = Granularity()):
    tiny = TINY_DENOISERS[name]
    model = tiny.build(0)
    with ActivationRecorder(model, sites_for(compressible_groups(model)), 4, 1000) as recorder, torch.no_grad():
        for i, t in enumerate((50, 300, 600, 900) * 2):
            tiny.output(model, tiny.inputs(model, 2, t, i))
    capture = Capture(recorder.stats, {"bucket_edges": recorder.edges, "site_tokens": dict(recorder.site_tokens)})
    return tiny, model, capture, score(model, capture, None, granularity, require_gains=False)


_SCORED: dict = {}


def _scored_cache(name: str):
    if name not in _SCORED:
        _SCORED[name] = scored(name)
    return _SCORED[name]


@pytest.fixture(scope="module", params=sorted(TINY_DENOISERS))
def tiny_scored(request):
    return _scored_cache(request.param)


def test_macs_removed_by_a_plan_equal_the_counted_macs(tiny_scored):
    """The plan's MAC arithmetic equals a hook count of the narrowed model's Linear and attention MACs."""
    tiny, model, capture, scores = tiny_scored
    plan = allocate(scores, 0.6, budget_kind="macs")
    compressed = copy.deepcopy(model)
    decompose(compressed, capture, plan.widths)
    call = ((), tiny.inputs(model, 2, 500, 99))
    counted = macs_per_call(model, call) - macs_per_call(compressed, call)
    assert counted == plan.macs_before - plan.macs_after
    # the target is met to within one width step of one module
    step = max(m.unit_macs * (m.full_width - max([w for w in scores.modules[i].widths if w < m.full_width] or [0]))
               for i, m in enumerate(plan.modules))
    assert 0.6 * plan.macs_before - step <= plan.macs_after <= 0.6 * plan.macs_before


@pytest.mark.parametrize("name", ["pixart", "unet_sd1", "unet_sd2"])
@pytest.mark.parametrize("removed", [0.2, 0.3, 0.5])
def test_macs_plan_predicts_no_more_error_than_a_parameter_plan_at_equal_macs(name, removed):
    """The MACs allocator spends the budget where MACs are: at the MACs a parameter plan keeps, its predicted
    error (summed SIS) is not higher (measured on these tiny models: 0-25 % lower).

    Both are greedy knapsack heuristics, not optima, so this is an observed property, not a theorem: on the tiny
    SDXL UNet at 50 % the MACs plan predicts 1.4 % more error than the parameter plan (left out here for that
    reason; the reference-model benchmark measures the image quality of both, docs/benchmarks-macs.md).
    """
    _, _, _, scores = _scored_cache(name)
    by_params = allocate(scores, removed, tie_qk_vo=True)  # a MACs plan holds QK and VO at one width: compare alike
    kept = by_params.macs_after / by_params.macs_before
    by_macs = allocate(scores, kept, budget_kind="macs")
    assert by_macs.macs_after <= round(kept * by_macs.macs_before)  # the target is a whole number of MACs
    assert by_macs.predicted_error <= by_params.predicted_error * (1 + 1e-12)


def test_tied_qk_vo_widths_are_equal(tiny_scored):
    _, _, _, scores = tiny_scored
    plan = allocate(scores, 0.3, tie_qk_vo=True)
    widths = plan.widths
    tied = [name for name in widths if name.endswith(".qk")]
    assert tied
    for qk in tied:
        assert widths[qk] == widths[qk[:-3] + ".vo"], qk
    assert plan.removed >= plan.target_removed


def test_rank_step_gives_hardware_friendly_widths():
    _, _, _, scores = scored("unet_sd2", Granularity(ffn_step=8, rank_step=8))
    plan = allocate(scores, 0.4)
    for entry in plan.modules:
        assert entry.width % 8 == 0 or entry.width == entry.full_width, entry


def test_rank_step_auto_and_bad_values():
    assert resolve_rank_step("auto", torch.device("cpu")) == 1
    assert resolve_rank_step("auto", torch.device("cuda", 0)) == 8
    assert resolve_rank_step("4", torch.device("cpu")) == 4
    for bad in ("0", "eight", "2.5"):
        with pytest.raises(DeviceError, match="rank step must be a whole number"):
            resolve_rank_step(bad, torch.device("cpu"))


def test_macs_budget_errors_name_the_valid_range(tiny_scored):
    _, _, _, scores = tiny_scored
    with pytest.raises(BudgetError, match=r"valid F are in \[0\.\d+, 1\)"):
        allocate(scores, 0.01, budget_kind="macs")
    with pytest.raises(BudgetError, match="0 < F < 1"):
        allocate(scores, 5, budget_kind="macs")
    bare = copy.copy(scores)
    bare.modules = [copy.copy(m) for m in scores.modules]
    for m in bare.modules:
        m.unit_macs = 0
    with pytest.raises(BudgetError, match="no MAC counts"):
        allocate(bare, 0.5, budget_kind="macs")


def test_cli_macs_budget_and_bad_budget_pairs(tmp_path, capsys):
    import json

    from slimdiff.cli import main
    from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

    source = tmp_path / "tiny"
    tiny_sd_pipeline().save_pretrained(source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS[:6]) + "\n")
    base = ["compress", str(source), "--prompts", str(prompts), "--steps", "2", "--batch-size", "3", "--quiet", "--device", "cpu"]
    out = tmp_path / "out"
    assert main([*base, "--macs", "0.7", "--tie-qk-vo", "--out", str(out)]) == 0
    plan = json.loads((out / "width_plan.json").read_text())
    assert plan["settings"]["budget_kind"] == "macs" and plan["settings"]["tie_qk_vo"] is True
    assert plan["macs"]["kept_fraction"] <= 0.7
    widths = {m["name"]: m["width"] for m in plan["modules"]}
    assert all(widths[n] == widths[n[:-3] + ".vo"] for n in widths if n.endswith(".qk"))
    capsys.readouterr()
    for extra, message in ((["--budget", "0.3", "--macs", "0.7"], "exactly one budget"), ([], "exactly one budget"),
                           (["--macs", "1.5"], "0 < F < 1"), (["--macs", "0.01"], "valid F are in")):
        target = tmp_path / f"o{len(message)}{len(extra)}"
        assert main([*base, *extra, "--out", str(target)]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not target.exists()


@pytest.mark.parametrize("name", sorted(TINY_DENOISERS))
def test_compressed_denoiser_traces_without_graph_breaks(name):
    """torch.compile sees the narrowed denoiser (slim attention processor included) as one graph."""
    from slimdiff.arch import compressible_groups
    from slimdiff.runtime.attention import SlimAttnProcessor
    from slimdiff.runtime.resize import resize_group

    tiny = TINY_DENOISERS[name]
    model = tiny.build(0)
    for group in compressible_groups(model):
        resize_group(model, group, max(1, group.width // 2))
    assert any(isinstance(getattr(m, "processor", None), SlimAttnProcessor) for m in model.modules())
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**tiny.inputs(model, 2, 500, 0))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
