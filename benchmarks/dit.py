"""DiT benchmark (issue 26 item 6): every method at three or more operating points on the Flux-style reference model,
quality against measured denoiser latency.

The model is the project's own trained FluxPipeline (data/reference-flux/model; docs/reference-flux-model.md) with the
sampler it was trained and measured with: 28 steps, true classifier-free guidance 4.0 with an empty negative prompt,
24 T5 tokens, 32 px (data/reference-flux/job/params.yaml). One capture (the first --calibration-prompts prompts of the
Flux job's SlimSet, with the extra sites the per-matrix baselines need) and one set of influence scores serve every
method. SlimDiff runs under each budget kind (parameters removed, MACs kept, measured latency kept; the latency table
timed once on this machine); uniform allocation and the baselines under parameter budgets. Each compressed model is
evaluated against the original on held-out test captions with the same seeds (slimdiff.pipeline.evaluation.evaluate:
teacher-forced noise SQNR, guidance cosine of each step's two calls, image PSNR, the evaluator's alignment and Fréchet
distance to the original's images, MACs, denoiser latency side by side with the original's). At the middle parameter
budget, slimdiff and uniform are also measured at held-out sampler settings (another step count, the flow-matching
schedule shifted) against the calibration sampler: the adaLN issue's check on learned weights.

    .venv/bin/python benchmarks/dit.py                       # measure (about an hour on 2 CPU cores), then render
    .venv/bin/python benchmarks/dit.py --render-only         # re-render docs/benchmarks-dit.md from the results file

Needs the Flux job's SlimSet (data/reference-flux/job/outputs/slimset/slimset.jsonl: run the job, README "Another
model") or --calibration FILE.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_bytes, write_results, write_sections  # noqa: E402
from benchmarks.quality import (describe, interpolation_summary, interpolation_text, library_versions,  # noqa: E402
                                method_options, row_of, with_denoiser)

JOB = ROOT / "data" / "reference-flux" / "job"
RESULTS = ROOT / "benchmarks" / "results" / "dit.json"
PAGE = ROOT / "docs" / "benchmarks-dit.md"
PLOT = ROOT / "docs" / "img" / "dit_vs_latency.png"
# (label, method, budget kind, operating points): a params point removes that fraction of the compressible parameters,
# a macs / latency point keeps that fraction of the compressible MACs / of the denoiser's measured latency
RUNS = (
    ("slimdiff", "slimdiff", "params", (0.2, 0.35, 0.5)),
    ("slimdiff (MACs)", "slimdiff", "macs", (0.8, 0.7, 0.65, 0.5)),
    ("slimdiff (latency)", "slimdiff", "latency", (0.85, 0.8, 0.75, 0.7, 0.65)),
    ("uniform", "slimdiff_uniform", "params", (0.2, 0.35, 0.5)),
    ("svd_llm", "svd_llm", "params", (0.2, 0.35, 0.5)),
    ("asvd", "asvd", "params", (0.2, 0.35, 0.5)),
    ("flap", "flap", "params", (0.2, 0.35, 0.5)),
    ("wanda_sp", "wanda_sp", "params", (0.2, 0.35, 0.5)),
)
HELD_OUT_BUDGET = 0.35


def job_params() -> dict:
    from slimdiff.pipeline.stages import load_params

    return load_params(JOB / "params.yaml")


def held_out(pipe, params: dict):
    """(name, sampler, pipeline with that scheduler) of the job's held-out samplers."""
    from slimdiff.pipeline.stages import held_out_samplers, with_scheduler

    return [(name, sampler, with_scheduler(pipe, scheduler)) for name, sampler, scheduler in held_out_samplers(params)]


def job_gain_target() -> str:
    """The Flux job's ``score.gain_target`` (params.yaml), what this benchmark's gains measure by default."""
    return str(job_params()["score"].get("gain_target", "call"))


def capture_and_score(pipe, calibration: list[str], sampler, batch_size: int, extra_sites: tuple[str, ...] = (),
                      gain_target: str = "call", model_id: str = "reference-flux"):
    """The capture (seeded) and the influence scores every method of this benchmark (and kind_calibration.py) shares;
    ``gain_target``: truncation gains on each call's output or on the guided prediction (``score.gain_target``)."""
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.compress import SlimDiffConfig
    from slimdiff.scoring.gains import measure_gains
    from slimdiff.scoring.influence import Granularity, score
    from slimdiff.statistics.recording import capture

    torch.manual_seed(0)
    stats = capture(pipe, calibration, sampler, num_buckets=4, batch_size=batch_size, extra_sites=extra_sites,
                    model_id=model_id)
    # the job's gains (truncation at half width), at the job's reg
    reference = SlimDiffConfig(gain_target=gain_target).gain_reference(stats)
    gains = measure_gains(pipe, calibration[:8], sampler, num_calls=4, reference=reference)
    scores = score(denoiser_of(pipe)[1], stats, gains, Granularity(rank_step=1))
    return stats, scores


def compress_one(method: str, kind: str, point: float, denoiser, stats, scores, table) -> dict:
    """Compress ``denoiser`` in place; the report ``row_of`` reads (removed fraction, totals, settings)."""
    from slimdiff.baselines import compress_with
    from slimdiff.cost import count_params
    from slimdiff.decomposition.apply import decompose
    from slimdiff.planning.allocation import Budget, allocate

    if kind == "params":
        return compress_with(method, denoiser, stats, scores, point)
    before = count_params(denoiser)
    plan = allocate(scores, Budget(point), "slimdiff", budget_kind=kind, latency_table=table)
    decompose(denoiser, stats, plan.widths)
    after = count_params(denoiser)
    return {"removed_fraction": (before["compressible"] - after["compressible"]) / before["compressible"],
            "total_after": after["total"], "settings": {"allocator": "slimdiff", "budget_kind": kind},
            "plan_latency": plan.latency}


def relative_error(fidelity: dict) -> float:
    """The noise prediction's relative error sqrt(noise / signal) from its teacher-forced SQNR."""
    sqnr = fidelity["noise_sqnr_db"]
    return 0.0 if sqnr is None else 10 ** (-sqnr / 20)


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from slimdiff.baselines import baseline_sites
    from slimdiff.compress import read_prompts
    from slimdiff.device import apply_threads
    from slimdiff.calls import detach_clone, first_call
    from slimdiff.pipeline.evaluation import evaluate, fidelity, latency
    from slimdiff.pipeline.stages import sampler_settings
    from slimdiff.planning.latency import measure_pipeline_latency
    from slimdiff.reference import load_reference_flux_pipeline
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.scoring.influence import Granularity

    apply_threads(args.threads)
    params = job_params()
    sampler = sampler_settings(params)
    calibration = read_prompts(args.calibration)[: args.calibration_prompts]
    eval_prompts = read_prompts(ROOT / "data" / "reference" / "eval_prompts.jsonl")[: args.eval_prompts]
    pipe = load_reference_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    results = {**run_record(__file__, argv), "libraries": library_versions(), "threads": torch.get_num_threads(),
               "settings": {k: v for k, v in vars(args).items() if k != "render_only"}, "sampler": sampler.to_dict(),
               "rows": [], "held_out": []}
    started = time.perf_counter()
    stats, scores = capture_and_score(pipe, calibration, sampler, args.batch_size, baseline_sites(pipe.transformer),
                                      args.gain_target)
    latency_prompts = eval_prompts[: args.latency_batch]  # one call of this batch: the table and every measurement
    table = measure_pipeline_latency(pipe, latency_prompts, sampler, Granularity(rank_step=1), points=16,
                                     repeats=args.latency_repeats)
    call = first_call(pipe, latency_prompts, sampler)
    results["calibration_seconds"] = time.perf_counter() - started
    results["latency_table"] = {"denoiser_ms": table.denoiser_ms, "units": len(table.curves),
                                "interpolation": interpolation_summary(table)}
    print(f"capture, scores and latency table: {results['calibration_seconds']:.0f} s", flush=True)
    out = Path(args.out)
    partial = out.with_suffix(".partial.json")
    for label, method, kind, points in [run for run in RUNS if not args.only or run[0] in args.only]:
        points = tuple(args.points) if args.points else points
        results.setdefault("methods", {})[label] = {"method": method, "budget_kind": kind,
                                                    "options": method_options(method, {})}
        for point in points:
            denoiser = copy.deepcopy(pipe.transformer)
            removed = compress_one(method, kind, point, denoiser, stats, scores, table)
            compressed = with_denoiser(pipe, denoiser)
            metrics = evaluate(pipe, compressed, eval_prompts, sampler, evaluator, batch_size=args.batch_size,
                               measure_latency=False)
            timed = latency(pipe.transformer, denoiser, lambda: detach_clone(call), args.latency_repeats)
            metrics["latency"] = {"denoiser": timed, "denoiser_speedup": timed["speedup"]}
            row = {**row_of(method, point, len(calibration), removed, metrics), "label": label, "budget_kind": kind,
                   "speedup_quartiles": pair_quartiles(timed), "denoiser_runs_ms": {
                       "original": timed["original_runs_ms"], "compressed": timed["compressed_runs_ms"]}}
            if removed.get("plan_latency"):
                row["predicted_latency_fraction"] = removed["plan_latency"]["predicted_fraction"]
                row["interpolated_units"] = removed["plan_latency"]["interpolated_units"]
            results["rows"].append(row)
            print(f"{label:<19} {kind:<7} {point:.2f} sqnr {row['noise_sqnr_db']:6.2f} psnr {row['image_psnr_db']:6.2f} "
                  f"align {row['alignment_overall']:.3f} fd {row['fd_to_original']:.1f} speed-up {row['denoiser_speedup']:.2f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            if kind == "params" and point == HELD_OUT_BUDGET and method in ("slimdiff", "slimdiff_uniform"):
                prompts = eval_prompts[: args.held_out_prompts]
                entry = {"label": label, "budget": point,
                         "calibration": relative_error(fidelity(pipe, compressed, prompts, sampler,
                                                                batch_size=args.batch_size))}
                for name, other_sampler, other in held_out(pipe, params):
                    entry[name] = relative_error(fidelity(other, with_denoiser(other, denoiser), prompts, other_sampler,
                                                          batch_size=args.batch_size))
                results["held_out"].append(entry)
                print(f"held-out samplers, {label}: {entry}", flush=True)
            write_results(partial, {**results, "complete": False})
    results["seconds"] = time.perf_counter() - started
    write_results(out, results)
    partial.unlink(missing_ok=True)
    return results


# ---- rendering: from the results file alone -----------------------------------------------------------------------


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def pair_quartiles(timed: dict) -> list[float]:
    """Lower quartile, median and upper quartile of the per-pair speed-ups (original / compressed run, each pair timed
    back to back): how far the machine's noise moves one measurement."""
    ratios = sorted(o / c for o, c in zip(timed["original_runs_ms"], timed["compressed_runs_ms"]))
    return [float(q) for q in statistics.quantiles(ratios, n=4, method="inclusive")] if len(ratios) > 1 else ratios * 3


def goals(rows: list[dict]) -> list[str]:
    """Issue 26's goal, checked on the rows: at a measured speed-up >= 1.3x, slimdiff's alignment within 0.02 of the
    original's; and the best SQNR and FD of every method at equal measured speed-up, at every slimdiff point (each other
    method's points interpolated at slimdiff's speed-up, where they span it). Speed-ups, not milliseconds: each is
    timed side by side with the original, while the machine's speed drifts between rows."""
    original = rows[0]["alignment_original"]
    ours = [r for r in rows if r["method"] == "slimdiff" and r["denoiser_speedup"] >= 1.3]
    lines = ["## The goal, checked", ""]
    if not ours:
        fastest = max((r for r in rows if r["method"] == "slimdiff"), key=lambda r: r["denoiser_speedup"])
        lines.append(f"- No slimdiff point reaches a measured speed-up of 1.3x (fastest: {fastest['denoiser_speedup']:.2f}x, "
                     f"{fastest['label']} at {fastest['budget']:g}).")
    for r in ours:
        gap = original - r["alignment_overall"]
        lines.append(f"- {r['label']} at {r['budget']:g}: speed-up {r['denoiser_speedup']:.2f}x, alignment "
                     f"{r['alignment_overall']:.3f} vs original {original:.3f} (gap {gap:+.3f}: "
                     f"{'within' if gap <= 0.02 else 'not within'} 0.02).")
    lines.append("")
    lines.append("Every slimdiff point against the other methods at its measured speed-up:")
    for metric, better, what in (("noise_sqnr_db", max, "SQNR"), ("fd_to_original", min, "FD to the original")):
        for r in (x for x in rows if x["method"] == "slimdiff"):
            beaten, compared, outside = [], [], []
            for label in dict.fromkeys(x["label"] for x in rows if x["method"] != "slimdiff"):
                points = sorted((x["denoiser_speedup"], x[metric]) for x in rows if x["label"] == label)
                at = interpolate(points, r["denoiser_speedup"])
                if at is None:
                    outside.append(label)
                elif better(at, r[metric]) != r[metric]:
                    beaten.append(f"{label} ({at:.3g})")
                else:
                    compared.append(f"{label} ({at:.3g})")
            verdict = (f"better than slimdiff: {', '.join(beaten)}" if beaten else
                       f"slimdiff is best of the methods measured at this speed-up: {', '.join(compared)}" if compared else
                       "no other method's points reach this speed-up")
            lines.append(f"- {what} at x{r['denoiser_speedup']:.2f} ({r['label']} at {r['budget']:g}: {r[metric]:.3g}): {verdict}"
                         + (f"; not reaching it: {', '.join(outside)}" if outside and (beaten or compared) else "") + ".")
    return lines + [""]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of (x, y) points sorted by x at ``x``; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def speedup_text(row: dict) -> str:
    quartiles = row.get("speedup_quartiles")
    return (f"{row['denoiser_speedup']:.2f}" + (f" ({quartiles[0]:.2f}–{quartiles[2]:.2f})" if quartiles else ""))


def latency_plans_text(r: dict) -> list[str]:
    """What the latency table's interpolation checks allowed, and how many units each latency plan put at untimed widths."""
    table = r.get("latency_table")
    if not table:
        return []
    plans = [x for x in r["rows"] if x.get("interpolated_units") is not None and x["budget_kind"] == "latency"]
    text = (f"Latency table: {table['units']} units, the denoiser {table['denoiser_ms']:.2f} ms."
            + interpolation_text(table.get("interpolation")))
    if plans:
        text += (" Units at untimed widths in the latency plans: "
                 + ", ".join(f"{x['budget']:g}: {x['interpolated_units']}" for x in plans) + ".")
    return [text, ""]


def gains_text(settings: dict) -> str:
    """What the scores' truncation gains measured (results written before ``--gain-target`` measured each call's)."""
    if settings.get("gain_target", "call") == "guided":
        return ("truncation gains on the guided prediction u + s(c - u) of 4 steps' call pairs "
                "(`score.gain_target: guided`)")
    return "truncation gains on each of 4 denoiser calls' output (`score.gain_target: call`)"


def render(r: dict) -> list[tuple[Path, str, str]]:
    rows, s = r["rows"], r["settings"]
    title = "# Benchmark: transformers (the Flux-style reference)"
    lines = [title, "", *provenance(r), "",
             f"Model: data/reference-flux/model (FluxPipeline trained in-project; docs/reference-flux-model.md). Sampler: "
             f"{r['sampler']['num_inference_steps']} steps, true CFG {r['sampler']['guidance_scale']:g} "
             f"({r['sampler']['guidance_argument']}, empty negative prompt), {r['sampler']['max_sequence_length']} T5 "
             f"tokens, {r['sampler']['height']} px. Calibration: the first {s['calibration_prompts']} prompts of the Flux "
             f"job's SlimSet, one capture and one set of scores for every method; {gains_text(s)}. Evaluation: {s['eval_prompts']} "
             f"held-out test captions, seed 0 per prompt; SQNR teacher-forced; latency: one denoiser call (batch "
             f"{s['latency_batch']}, one CFG branch), median of {s['latency_repeats']}, side by side with the original in "
             "one process (the latency budget's table timed at the same batch; the speed-up's brackets: the quartiles of "
             "the per-pair ratios), "
             f"{r['threads']} torch thread(s). Budgets: `params` removes that fraction of the compressible parameters, "
             f"`macs`/`latency` keep that fraction of the compressible MACs / the denoiser's measured latency.", "",
             markdown_table(["method", "budget", "removed params", "noise SQNR dB", "guidance cos", "PSNR dB", "alignment",
                             "FD to original", "MACs ratio", "denoiser ms", "speed-up"],
                            [[x["label"], f"{x['budget_kind']} {x['budget']:g}", f"{x['removed_fraction_compressible']:.1%}",
                              f"{x['noise_sqnr_db']:.2f}", f"{x['guidance_cosine']:.3f}", f"{x['image_psnr_db']:.2f}",
                              f"{x['alignment_overall']:.3f} ± {x['alignment_se']:.3f}", f"{x['fd_to_original']:.1f}",
                              f"{x['macs_ratio']:.2f}", f"{x['denoiser_ms']:.2f}", speedup_text(x)]
                             for x in rows]), "",
             f"Original model: alignment {rows[0]['alignment_original']:.3f} on the same prompts, denoiser "
             f"{rows[0]['denoiser_ms_original']:.2f} ms.", "", *latency_plans_text(r), *goals(rows)]
    if r.get("held_out"):
        names = [k for k in r["held_out"][0] if k not in ("label", "budget", "calibration")]
        lines += ["## Held-out sampler settings (learned weights)", "",
                  f"Relative error of the noise prediction (sqrt(noise / signal), teacher-forced) on the first "
                  f"{s['held_out_prompts']} evaluation captions at {HELD_OUT_BUDGET:g} of the parameters removed: at the "
                  "calibration sampler and at the Flux job's held-out samplers (`evaluate.samplers`). Goal (issue 23): "
                  "held-out ≤ 1.25 × calibration, and slimdiff ≤ uniform there.", "",
                  markdown_table(["method", "calibration sampler", *names, *[f"{n} / calibration" for n in names]],
                                 [[h["label"], f"{h['calibration']:.4f}", *[f"{h[n]:.4f}" for n in names],
                                   *[f"{h[n] / h['calibration']:.2f}" for n in names]] for h in r["held_out"]]), ""]
    lines += ["Methods: " + "; ".join(f"`{label}`: {describe(m['method'], m['options'])}"
                                      for label, m in r.get("methods", {}).items()) + ".", "",
              "![quality vs measured speed-up](img/dit_vs_latency.png)", "",
              "Raw figures: `benchmarks/results/dit.json`; re-render: `.venv/bin/python benchmarks/dit.py --render-only`.", ""]
    return [(PAGE, title, "\n".join(lines))]


def draw(r: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for label in dict.fromkeys(x["label"] for x in rows):
        pts = sorted((x["denoiser_speedup"], x["noise_sqnr_db"], x["fd_to_original"], x["alignment_overall"])
                     for x in rows if x["label"] == label)
        for ax, k in zip(axes, (1, 2, 3)):
            ax.plot([p[0] for p in pts], [p[k] for p in pts], "o-", label=label)
    for ax, name in zip(axes, ("noise-prediction SQNR (dB)", "FD to the original's images", "alignment accuracy")):
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("denoiser speed-up (measured side by side with the original)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[2].axhline(rows[0]["alignment_original"], color="grey", lw=0.8, ls=":")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(PLOT, buffer.getvalue())
    return [PLOT]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", default=str(JOB / "outputs" / "slimset" / "slimset.jsonl"))
    parser.add_argument("--calibration-prompts", type=int, default=128)
    parser.add_argument("--gain-target", choices=("call", "guided"), default=None,
                        help="what the truncation gains measure (default: the Flux job's score.gain_target)")
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--held-out-prompts", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--latency-repeats", type=int, default=21)
    parser.add_argument("--latency-batch", type=int, default=16, help="denoiser batch the latency is measured at "
                        "(the latency budget's table and every model's measurement)")
    parser.add_argument("--only", nargs="+", choices=[run[0] for run in RUNS], default=None,
                        help="measure only these methods (a partial page; default: all)")
    parser.add_argument("--points", nargs="+", type=float, default=None,
                        help="operating points for the methods measured instead of their defaults (with --only and "
                             "--out: a supplementary file, not the page's)")
    parser.add_argument("--out", default=str(RESULTS), help="results file (default: benchmarks/results/dit.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: SLIMDIFF_THREADS, else auto)")
    parser.add_argument("--render-only", action="store_true", help="only re-render the page and plot from the results file")
    args = parser.parse_args(argv)
    if args.gain_target is None:
        args.gain_target = job_gain_target()
    if args.points is not None:
        if not args.only or Path(args.out).resolve() == RESULTS.resolve():
            parser.error("--points needs --only and an --out other than the page's results file")
        bad = [p for p in args.points if not 0 < p < 1]
        if bad:
            parser.error(f"--points are fractions in (0, 1), got {bad}")
    if not args.render_only:
        if not Path(args.calibration).is_file():
            raise SystemExit(f"{args.calibration}: no calibration prompts; run the Flux job first (README: Another model) "
                             "or pass --calibration FILE")
        measure(args, argv)
        if Path(args.out).resolve() != RESULTS.resolve():
            print(f"wrote {args.out} (the page renders from {RESULTS.relative_to(ROOT)})")
            return 0
    results = load()
    if results is None:
        raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
    write_sections(render(results))
    draw(results)
    print(f"wrote {PAGE.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
