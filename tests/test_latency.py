"""Latency budgets: lookup tables, the allocator under measured latency, padded attention (issue 11)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from slimdiff.arch import compressible_groups
from slimdiff.arch.sites import sites_for
from slimdiff.decomposition.apply import decompose
from slimdiff.planning.allocation import BudgetError, allocate
from slimdiff.planning.latency import (
    LatencyCurve,
    LatencyTable,
    LatencyTableError,
    interpolation_checks,
    latency_units,
    measure_latency_table,
    pareto_widths,
)
from slimdiff.runtime.attention import SlimAttnProcessor, attend
from slimdiff.scoring.influence import Granularity, candidate_widths, score
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from tests.helpers import TINY_DENOISERS

DENOISER_MS = 100.0


def scored(name: str = "unet_sd1"):
    tiny = TINY_DENOISERS[name]
    model = tiny.build(0)
    with ActivationRecorder(model, sites_for(compressible_groups(model)), 2, 1000) as recorder, torch.no_grad():
        for i, t in enumerate((100, 400, 700, 900)):
            tiny.output(model, tiny.inputs(model, 2, t, i))
    capture = Capture(recorder.stats, {"bucket_edges": recorder.edges, "site_tokens": dict(recorder.site_tokens)})
    return tiny, model, capture, score(model, capture, None, Granularity(8, 1), require_gains=False)


@pytest.fixture(scope="module")
def tiny_scored():
    return scored()


def synthetic_table(scores, ms_of=lambda unit, w, full: 1.0 + 4.0 * w / full) -> LatencyTable:
    """One curve per attention (QK and VO together) and per FFN, at every grid width, from ``ms_of``."""
    units: dict[str, list] = {}
    for m in scores.modules:
        units.setdefault(m.name.rsplit(".", 1)[0] if m.kind != "ffn" else m.name, []).append(m)
    curves = []
    for path, modules in units.items():
        widths = modules[0].widths
        curves.append(LatencyCurve(path, [m.name for m in modules], list(widths),
                                   [ms_of(path, w, widths[-1]) for w in widths]))
    return LatencyTable("cpu", "float32", [2, 4, 8, 8], "", DENOISER_MS, {"ffn_step": 8, "rank_step": 1}, curves)


# ---- attention with unequal head widths --------------------------------------------------------

@pytest.mark.parametrize("qk_width,v_width", [(3, 8), (8, 3), (5, 5)])
def test_padded_attention_equals_unpadded_attention(qk_width, v_width):
    """Zero columns appended to the narrower side change nothing: the math kernel on the unpadded tensors agrees."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 33, qk_width, generator=generator, dtype=torch.float64)
    key = torch.randn(2, 4, 17, qk_width, generator=generator, dtype=torch.float64)
    value = torch.randn(2, 4, 17, v_width, generator=generator, dtype=torch.float64)
    logits = query @ key.transpose(-1, -2) * 0.3
    expected = torch.softmax(logits, dim=-1) @ value
    out = attend(query, key, value, None, 0.3)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_unequal_widths_keep_the_fused_kernel_shape():
    """The SDPA call sees equal head widths (what flash attention and the fused CPU kernel need)."""
    seen = []
    original = F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.shape[-1], key.shape[-1], value.shape[-1]))
        return original(query, key, value, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        attend(torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 3), torch.randn(1, 2, 5, 7), None, 0.5)
    finally:
        F.scaled_dot_product_attention = original
    assert seen == [(7, 7, 7)]


# ---- tables ----------------------------------------------------------------------------------------

def test_curve_interpolates_between_timed_widths_and_refuses_outside():
    curve = LatencyCurve("u", ["u.qk", "u.vo"], [2, 4, 8], [1.0, 3.0, 4.0])
    assert curve.at(4) == 3.0 and curve.at(3) == pytest.approx(2.0) and curve.at(6) == pytest.approx(3.5)
    with pytest.raises(LatencyTableError, match="outside the timed range 2..8"):
        curve.at(1)


def test_pareto_widths_drop_narrower_widths_that_are_not_faster():
    # width 2 is slower than 4 (a kernel that dislikes it), 6 is no faster than 8
    curve = LatencyCurve("u", ["u"], [2, 4, 6, 8], [3.5, 2.0, 5.0, 5.0])
    assert pareto_widths(curve, [2, 4, 6, 8]) == [4, 8]
    assert pareto_widths(curve, [6, 8]) == [8]


def test_predicted_latency_is_the_denoiser_minus_what_each_unit_saves(tiny_scored):
    _, _, _, scores = tiny_scored
    table = synthetic_table(scores)
    curve = table.curves[0]
    width = curve.widths[len(curve.widths) // 2]
    widths = {g: width for g in curve.groups}
    predicted, bound = table.predict_ms(widths)
    assert predicted == pytest.approx(DENOISER_MS - (curve.ms[-1] - curve.at(width)), rel=1e-12) and not bound
    assert table.predict_ms({}) == (DENOISER_MS, False)
    # unequal QK and VO widths run padded to the wider one: the table's time there bounds the unit from above
    untied = {curve.groups[0]: curve.widths[0], curve.groups[1]: width}
    assert table.predict_ms(untied) == (pytest.approx(DENOISER_MS - (curve.ms[-1] - curve.at(width)), rel=1e-12), True)


def test_measured_table_covers_every_group_and_round_trips(tmp_path, tiny_scored):
    tiny, model, _, _ = tiny_scored
    call = ((), tiny.inputs(model, 2, 500, 7))
    table = measure_latency_table(model, call, Granularity(8, 1), points=4, repeats=2, model_hash="h")
    groups = {g.name for g in compressible_groups(model)}
    assert {g for c in table.curves for g in c.groups} == groups
    units = latency_units(model)
    assert len(table.curves) == len(units)
    checks = table.settings["interpolation"]
    assert checks  # four timed widths leave untimed ones on the tiny model's wider units
    grid_of = {g.name: candidate_widths(g.width, Granularity(8, 1).step(g.kind)) for g in compressible_groups(model)}
    for curve in table.curves:
        assert curve.widths == sorted(curve.widths) and len(curve.widths) <= 4 and all(ms > 0 for ms in curve.ms)
        # every timed curve with untimed grid widths is checked there, beside its timed widths
        untimed = [w for w in grid_of[curve.groups[0]] if w not in curve.widths]
        mine = [c for c in checks if c["unit"] == curve.unit]
        if curve.measured_as or not untimed:
            assert not mine
        else:
            assert mine and all(c["width"] in untimed and c["measured_ms"] > 0 for c in mine)
            assert all(c["interpolated_ms"] == pytest.approx(curve.at(c["width"])) for c in mine)
        full = compressible_groups(model)[[g.name for g in compressible_groups(model)].index(curve.groups[0])].width
        assert curve.widths[-1] == full
        if "attn" in curve.unit:
            assert len(curve.groups) == 2  # QK and VO timed at one width
    by_unit = {}
    for c in checks:
        by_unit[c["unit"]] = max(by_unit.get(c["unit"], 0.0), abs(c["measured_ms"] - c["interpolated_ms"]))
    assert table.interpolation_errors() == pytest.approx(by_unit)
    for curve in table.curves:
        worst = by_unit.get(curve.measured_as or curve.unit)
        assert table.interpolates(curve) == (worst is not None and worst <= 0.05 * curve.ms[-1])
    # the tiny UNet repeats block shapes: those are timed once and share the numbers
    shared = [c for c in table.curves if c.measured_as]
    assert shared and all(c.ms == next(d for d in table.curves if d.unit == c.measured_as).ms for c in shared)
    assert table.sample_shape == [2, 4, 8, 8] and table.device == "cpu" and table.dtype == "float32"
    path = table.save(tmp_path / "latency.json")
    again = LatencyTable.load(path)
    assert again.to_dict() == table.to_dict()


@pytest.mark.parametrize("damage,message", [
    (lambda d: d.pop("curves"), "not a complete latency table"),
    (lambda d: d["curves"][0].update(ms=d["curves"][0]["ms"][:-1]), "malformed"),
    (lambda d: d["curves"][0].update(ms=[-1.0] * len(d["curves"][0]["ms"])), "malformed"),
    (lambda d: d.update(format="slimdiff-latency/0"), "latency table"),
])
def test_damaged_tables_are_refused_in_one_line(tmp_path, tiny_scored, damage, message):
    data = synthetic_table(tiny_scored[3]).to_dict()
    damage(data)
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        LatencyTable.load(path)
    assert "\n" not in str(error.value)


def test_table_for_another_job_is_refused(tiny_scored):
    table = synthetic_table(tiny_scored[3])
    table.check_matches(device="cpu", dtype="float32", sample_shape=[2, 4, 8, 8])
    for kwargs, what in (({"device": "NVIDIA H100 80GB HBM3 (cuda:0)"}, "device cpu"), ({"dtype": "float16"}, "dtype float32"),
                         ({"sample_shape": [2, 4, 16, 16]}, "call shape"), ({"model_hash": "other"}, "model"),
                         ({"granularity": {"ffn_step": 8, "rank_step": 8}}, "width grid")):
        with pytest.raises(LatencyTableError, match=what):
            table.check_matches(**kwargs)


# ---- the allocator under a latency budget ------------------------------------------------------

@pytest.mark.parametrize("keep", [0.97, 0.94, 0.91])
def test_latency_plan_meets_the_target_with_tied_timed_fast_widths(tiny_scored, keep):
    _, _, _, scores = tiny_scored
    # a kernel that dislikes width 3: slower than width 4, so no plan may choose it
    table = synthetic_table(scores, lambda unit, w, full: 1.0 + 4.0 * w / full + (2.0 if w == 3 and full == 16 else 0.0))
    plan = allocate(scores, keep, budget_kind="latency", latency_table=table)
    predicted = plan.latency["predicted_ms"]
    assert predicted <= keep * DENOISER_MS + 1e-9
    largest_step = max(c.ms[i] - c.ms[i - 1] for c in table.curves for i in range(1, len(c.ms)))
    assert predicted > keep * DENOISER_MS - largest_step
    assert plan.latency["predicted_fraction"] == pytest.approx(predicted / DENOISER_MS)
    widths = plan.widths
    assert all(widths[n] == widths[n[:-3] + ".vo"] for n in widths if n.endswith(".qk"))
    assert 3 not in {widths[n] for n in widths if n.endswith(".qk")}
    assert plan.settings["budget_kind"] == "latency" and plan.settings["tie_qk_vo"] is True


def test_greedy_spends_latency_where_error_per_millisecond_is_lowest(tiny_scored):
    """Two units with equal error curves: the one whose steps save more time is cut first."""
    _, _, _, scores = tiny_scored
    ffns = [m for m in scores.modules if m.kind == "ffn"][:2]
    fast_saver, slow_saver = ffns
    flat = copy.copy(scores)
    flat.modules = [copy.deepcopy(m) for m in ffns]
    for m in flat.modules:
        m.errors = [[float(m.full_width - w) for w in m.widths] for _ in m.errors]
        m.gain = 1.0
    table = synthetic_table(flat, lambda unit, w, full: (10.0 if unit == fast_saver.name else 1.0) * w / full + 0.1)
    step = table.curves[0].ms[-1] - table.curves[0].ms[-2]
    plan = allocate(flat, 1 - step / DENOISER_MS, budget_kind="latency", latency_table=table, min_keep=0.0)
    assert plan.widths[fast_saver.name] < fast_saver.full_width
    assert plan.widths[slow_saver.name] == slow_saver.full_width


def test_interpolation_checks_time_the_middle_of_untimed_gaps():
    grid = list(range(8, 129, 8))
    assert interpolation_checks(grid, grid) == []
    timed = [8, 48, 88, 128]  # three gaps of four untimed widths: one check in the middle of each
    assert interpolation_checks(grid, timed) == [32, 72, 112]
    assert interpolation_checks(grid, [8, 16, 128]) == [72]  # only one gap has untimed widths


def thinned_table(scores, checks_off_by: dict[str, float] | None):
    """``synthetic_table`` timed at every other grid width (untimed ones between); with interpolation checks off by
    ``checks_off_by[unit]`` (a fraction of the unit's full-width time) on the units named (None: a table measured
    before checks existed)."""
    table = synthetic_table(scores)
    for curve in table.curves:
        keep = [i for i in range(len(curve.widths)) if i % 2 == (len(curve.widths) - 1) % 2 or i == 0]
        curve.widths, curve.ms = [curve.widths[i] for i in keep], [curve.ms[i] for i in keep]
    if checks_off_by is not None:
        table.settings["interpolation"] = [
            {"unit": c.unit, "width": c.widths[-1] - 1, "interpolated_ms": c.ms[-1],
             "measured_ms": c.ms[-1] * (1 + checks_off_by[c.unit])} for c in table.curves if c.unit in checks_off_by]
    return table


def test_untimed_widths_are_chosen_only_where_the_units_checks_trust_interpolation(tiny_scored):
    _, _, _, scores = tiny_scored
    names = [c.unit for c in synthetic_table(scores).curves]
    ffns = [n for n in names if n.endswith(".ff") or ".ff." in n or "attn" not in n]
    assert ffns and len(ffns) < len(names)
    # FFNs interpolate within 1 % of their time, attentions are 20 % off (a kernel that dislikes untimed head widths)
    mixed = thinned_table(scores, {n: (0.01 if n in ffns else -0.2) for n in names})
    trusted, unchecked = thinned_table(scores, {n: 0.01 for n in names}), thinned_table(scores, None)
    assert [mixed.interpolates(c) for c in mixed.curves] == [c.unit in ffns for c in mixed.curves]
    assert all(trusted.interpolates(c) for c in trusted.curves) and unchecked.interpolation_errors() is None
    assert not any(unchecked.interpolates(c) for c in unchecked.curves)
    for name, table in (("mixed", mixed), ("trusted", trusted), ("unchecked", unchecked)):
        plan = allocate(scores, 0.9, budget_kind="latency", latency_table=table)
        untimed = [c for c in table.curves if any(plan.widths[g] not in c.widths for g in c.groups)]
        assert plan.latency["predicted_ms"] <= 0.9 * DENOISER_MS + 1e-9
        assert plan.latency["interpolated_units"] == len(untimed)
        if name == "unchecked":
            assert not untimed and plan.latency["interpolation_error_fraction"] is None
            continue
        assert untimed and all(table.interpolates(c) for c in untimed)  # never an untimed width where checks fail
        bound = sum(0.01 * c.ms[-1] for c in untimed)  # each priced unit's worst check
        assert plan.latency["interpolation_error_fraction"] == pytest.approx(bound / DENOISER_MS)
        assert "interpolated: checked within" in plan.table()


def test_latency_budget_errors(tiny_scored):
    _, _, _, scores = tiny_scored
    table = synthetic_table(scores)
    with pytest.raises(BudgetError, match=r"valid F are in \[0\.\d+, 1\)"):
        allocate(scores, 0.01, budget_kind="latency", latency_table=table)
    with pytest.raises(BudgetError, match="needs a latency table"):
        allocate(scores, 0.9, budget_kind="latency")
    with pytest.raises(BudgetError, match="ties QK and VO"):
        allocate(scores, 0.9, budget_kind="latency", latency_table=table, tie_qk_vo=False)
    with pytest.raises(BudgetError, match="0 < F < 1"):
        allocate(scores, 1.5, budget_kind="latency", latency_table=table)
    partial = copy.deepcopy(table)
    partial.curves = partial.curves[1:]
    with pytest.raises(LatencyTableError, match="no curve for"):
        allocate(scores, 0.9, budget_kind="latency", latency_table=LatencyTable(**{
            k: getattr(partial, k) for k in ("device", "dtype", "sample_shape", "model_hash", "denoiser_ms", "granularity",
                                             "curves")}))
    coarse = copy.deepcopy(table)
    coarse.granularity = {"ffn_step": 8, "rank_step": 8}
    with pytest.raises(LatencyTableError, match="width grid"):
        allocate(scores, 0.9, budget_kind="latency", latency_table=coarse)


def test_any_plan_records_its_predicted_latency_when_tied(tiny_scored):
    _, _, _, scores = tiny_scored
    table = synthetic_table(scores)
    tied = allocate(scores, 0.4, tie_qk_vo=True, latency_table=table)
    assert tied.latency["predicted_ms"] == pytest.approx(table.predict_ms(tied.widths)[0]) and not tied.latency["upper_bound"]
    untied = allocate(scores, 0.4, tie_qk_vo=False, latency_table=table)
    assert any(untied.widths[n] != untied.widths[n[:-3] + ".vo"] for n in untied.widths if n.endswith(".qk"))
    assert untied.latency["upper_bound"] is True and untied.latency["predicted_ms"] <= DENOISER_MS


def test_latency_plan_decomposes_and_runs(tiny_scored):
    """A latency plan is an ordinary width plan: the decomposed model runs and has the planned widths."""
    tiny, model, capture, scores = tiny_scored
    plan = allocate(scores, 0.95, budget_kind="latency", latency_table=synthetic_table(scores))
    compressed = copy.deepcopy(model)
    decompose(compressed, capture, plan.widths)
    out = tiny.output(compressed, tiny.inputs(compressed, 2, 500, 3))
    assert torch.isfinite(out).all()
    by_name = {g.name: g for g in compressible_groups(compressed)}
    assert {n: by_name[n].width for n in plan.widths} == plan.widths
    assert any(isinstance(getattr(m, "processor", None), SlimAttnProcessor) for m in compressed.modules())


# ---- command line ---------------------------------------------------------------------------------

def test_cli_allocate_with_a_latency_budget(tmp_path, capsys, tiny_scored):
    from slimdiff.cli import main

    _, _, _, scores = tiny_scored
    scores_file = scores.save(tmp_path / "scores.json")
    table_file = synthetic_table(scores).save(tmp_path / "latency.json")
    gpu_table = synthetic_table(scores)
    gpu_table.device = "NVIDIA H100 80GB HBM3 (cuda:0)"
    gpu_file = gpu_table.save(tmp_path / "latency_gpu.json")
    out = tmp_path / "plan.json"
    assert main(["allocate", str(scores_file), "--latency", "0.95", "--latency-table", str(table_file), "--out", str(out),
                 "--device", "cpu"]) == 0
    plan = json.loads(out.read_text())
    assert plan["target"]["kind"] == "latency" and plan["latency"]["predicted_fraction"] <= 0.95
    capsys.readouterr()
    for extra, message in ((["--latency", "0.9"], "needs --latency-table"),
                           (["--latency", "0.9", "--budget", "0.3"], "exactly one budget"),
                           (["--latency", "2", "--latency-table", str(table_file)], "0 < F < 1"),
                           (["--latency", "0.9", "--latency-table", str(gpu_file), "--device", "cpu"],
                            "measured for device NVIDIA H100 80GB HBM3 (cuda:0), this job has cpu")):
        target = tmp_path / f"p{len(message)}.json"
        assert main(["allocate", str(scores_file), *extra, "--out", str(target)]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not target.exists()


def closed_form_timings(monkeypatch) -> list[LatencyTable]:
    """Make ``slimdiff compress --latency`` time the pipeline as usual, then replace the measured times by closed-form
    ones: a unit at width w of full width f takes 1 + 4 w / f ms, the denoiser DENOISER_MS. The table keeps what it
    was measured on (device, call shape, model, units, widths); no assertion depends on timing noise. Returns the
    list the tables go to."""
    import slimdiff.compress as compress_module

    measure, tables = compress_module.measure_pipeline_latency, []

    def measured_then_closed_form(*args, **kwargs):
        table = measure(*args, **kwargs)
        for curve in table.curves:
            curve.ms = [1.0 + 4.0 * w / curve.widths[-1] for w in curve.widths]
        table.denoiser_ms = DENOISER_MS
        tables.append(table)
        return table

    monkeypatch.setattr(compress_module, "measure_pipeline_latency", measured_then_closed_form)
    return tables


def test_compress_with_a_latency_budget_end_to_end(tmp_path, monkeypatch):
    """`slimdiff compress --latency F` times the tiny pipeline here, allocates, decomposes and saves; the plan is decided
    from closed-form times (the tiny UNet's measured savings are a few percent of its time, within timing noise)."""
    from slimdiff.cli import main
    from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

    tables = closed_form_timings(monkeypatch)
    source = tmp_path / "tiny"
    tiny_sd_pipeline().save_pretrained(source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
    base = ["compress", str(source), "--prompts", str(prompts), "--steps", "2", "--batch-size", "2", "--quiet", "--device", "cpu"]
    assert main([*base, "--latency", "0.999", "--out", str(tmp_path / "out")]) == 0
    plan = json.loads((tmp_path / "out" / "width_plan.json").read_text())
    assert plan["settings"]["budget_kind"] == "latency"
    assert plan["latency"]["device"] == "cpu" and plan["latency"]["sample_shape"] == [2, 4, 8, 8]
    # closed form: the plan saves sum over units of 4 (f - w) / f ms: at least 0.1 ms, less than one width step more
    (table,) = tables
    widths = {m["name"]: m["width"] for m in plan["modules"]}
    assert all(widths[g] == widths[c.groups[0]] for c in table.curves for g in c.groups)  # QK and VO tied
    saved = sum(4.0 * (c.widths[-1] - widths[c.groups[0]]) / c.widths[-1] for c in table.curves)
    assert plan["latency"]["predicted_ms"] == pytest.approx(DENOISER_MS - saved, rel=1e-12)
    largest_step = max(c.ms[i] - c.ms[i - 1] for c in table.curves for i in range(1, len(c.ms)))
    assert 0.999 * DENOISER_MS - largest_step < plan["latency"]["predicted_ms"] <= 0.999 * DENOISER_MS
    assert plan["latency"]["predicted_fraction"] == pytest.approx(plan["latency"]["predicted_ms"] / DENOISER_MS)


def test_unreachable_latency_fails_before_the_capture(tmp_path, capsys, monkeypatch):
    import re

    import slimdiff.compress as compress_module
    from slimdiff.cli import main
    from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

    def no_capture(*args, **kwargs):
        raise AssertionError("the capture ran although the budget was unreachable")

    tables = closed_form_timings(monkeypatch)
    monkeypatch.setattr(compress_module, "capture", no_capture)
    source = tmp_path / "tiny"
    tiny_sd_pipeline().save_pretrained(source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
    out = tmp_path / "out"
    assert main(["compress", str(source), "--prompts", str(prompts), "--steps", "2", "--quiet", "--device", "cpu",
                 "--latency", "0.05", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "valid F are in" in err and len(err.strip().splitlines()) == 1
    # closed form: every unit saves less than 4 of the 100 ms, so the fastest plan keeps over 1 - 0.04 x units
    floor = float(re.search(r"valid F are in \[([0-9.]+), 1\)", err).group(1))
    assert 0.05 < 1 - 0.04 * len(tables[0].curves) <= floor < 1
    assert not out.exists()


def test_config_and_params_reject_untied_latency_budgets():
    from slimdiff.compress import SlimDiffConfig

    with pytest.raises(BudgetError, match="ties QK and VO"):
        SlimDiffConfig(budget=0.7, budget_kind="latency", tie_qk_vo=False)
    with pytest.raises(BudgetError, match="0 < F < 1"):
        SlimDiffConfig(budget=1.5, budget_kind="latency")
    assert SlimDiffConfig(budget=0.7, budget_kind="latency").tie_qk_vo is None


def test_padded_attention_traces_without_graph_breaks():
    """Unequal QK and VO widths (the padded path) still trace as one graph under torch.compile."""
    from slimdiff.runtime.resize import resize_group

    tiny = TINY_DENOISERS["unet_sd1"]
    model = tiny.build(0)
    for group in compressible_groups(model):
        share = 2 if group.kind.startswith("qk") else 4 if group.kind.startswith("vo") else 2
        resize_group(model, group, max(1, group.width // share))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # resized linears hold uninitialised memory
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    inputs = tiny.inputs(model, 2, 500, 0)
    with torch.no_grad():
        eager = tiny.output(model, inputs)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    assert torch.isfinite(eager).all()
