"""Reference model: every method at the same MACs, side by side; quality against measured latency.

Captures the reference model over the SlimSet (outputs/slimset; with the sites the baselines need), scores
it with the main job's gains (outputs/gains.json; run `bash scripts/run.sh` first) and the params.yaml
settings, and times a latency table on this machine. For each parameter budget, the `slimdiff` parameter
plan fixes the MACs; then, at those MACs: a `--macs` plan, a `--latency` plan (its F found by bisection to
the same MACs), `uniform` and every baseline of `slimdiff.baselines` (their parameter budget found by
bisection to the same MACs, counted by hooks on the compressed model). Each is evaluated in one process
against the original: noise SQNR, image PSNR, alignment and Fréchet distance to the original on test and
held-out-combination prompts, MACs ratio and CPU latency (interleaved). Measuring writes
benchmarks/results/macs_vs_params.json (with the command, the machine and the code version); rendering writes
docs/benchmarks-macs.md and docs/img/macs_vs_latency.png from it alone.

    .venv/bin/python benchmarks/macs_vs_params.py [--budgets 0.4] [--prompts 200] [--heldout 50] [--threads 1]
    .venv/bin/python benchmarks/macs_vs_params.py --render-only       # re-render from the results file
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import provenance, read_results, run_record, write_bytes, write_results, write_sections  # noqa: E402

OUT_JSON = ROOT / "benchmarks" / "results" / "macs_vs_params.json"
OUT_DOC = ROOT / "docs" / "benchmarks-macs.md"
# its own name: quality.py draws docs/img/quality_vs_latency.png for docs/benchmarks.md
OUT_PLOT = ROOT / "docs" / "img" / "macs_vs_latency.png"
TITLE = "# Every method at the same MACs on the reference model: quality and measured latency"
BASELINE_METHODS = ("slimdiff_modegpt", "svd_llm", "asvd", "svd", "wanda_sp", "flap")


def bisect_budget(make, macs_of, goal: int, lo: float, hi: float, keeps: bool, iterations: int = 14):
    """The result whose MACs are closest to ``goal``. ``keeps``: the budget is a fraction kept (MACs grow with
    it), else a fraction removed (MACs shrink with it). A refused value lies on the too-aggressive side."""
    best, best_gap = None, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        try:
            result = make(mid)
        except ValueError:
            lo, hi = (mid, hi) if keeps else (lo, mid)
            continue
        macs = macs_of(result)
        if best is None or abs(macs - goal) < best_gap:
            best, best_gap = (mid, result), abs(macs - goal)
        grow = macs < goal  # more MACs wanted
        lo, hi = (mid, hi) if grow == keeps else (lo, mid)
    return best


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict:
    from slimdiff.planning.allocation import allocate
    from slimdiff.baselines import baseline_sites, compress_with
    from slimdiff.statistics.recording import capture
    from slimdiff.compress import load_pipeline
    from slimdiff.pipeline.evaluation import evaluate
    from slimdiff.calls import first_call
    from slimdiff.cost import macs_per_call
    from slimdiff.scoring.gains import Gains
    from slimdiff.scoring.influence import score
    from slimdiff.planning.latency import measure_pipeline_latency
    from slimdiff.reference.data import sample_scenes
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.decomposition.apply import decompose
    from slimdiff.pipeline.stages import config_from, evaluation_prompts, load_params, read_slimset, sampler_settings

    from slimdiff.device import apply_threads

    apply_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    config = config_from(params)
    sampler = sampler_settings(params)
    pipe = load_pipeline(str(ROOT / params["model"]["path"]))
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    calibration = read_slimset(ROOT / "outputs" / "slimset" / "slimset.jsonl")[: args.calibration]
    gains = Gains.load(ROOT / "outputs" / "gains.json")
    stats = capture(pipe, calibration, sampler, num_buckets=config.num_buckets, batch_size=config.batch_size,
                    extra_sites=baseline_sites(unet), progress=True)
    scores = score(unet, stats, gains, config.granularity, config.reg, config.max_ffn_points)
    table = measure_pipeline_latency(pipe, calibration[:1], sampler, config.granularity, config.latency_points,
                                     config.latency_repeats)
    evaluator = load_evaluator(str(ROOT / params["evaluate"]["evaluator"]))
    heldout = [scene.caption() for scene in sample_scenes(args.heldout, seed=3, heldout=False)]
    prompts = evaluation_prompts(params)[: args.prompts - args.heldout] + heldout
    example = first_call(pipe, prompts[:1], sampler)

    def slim(plan):
        model = copy.deepcopy(unet)
        decompose(model, stats, plan.widths, config.reg)
        return model

    def baseline(method: str, budget: float):
        model = copy.deepcopy(unet)
        compress_with(method, model, stats, scores, budget)
        return model

    rows = []
    for budget in args.budgets:
        by_params = allocate(scores, budget, latency_table=table)
        reference = slim(by_params)
        goal = macs_per_call(reference, example)
        kept = by_params.macs_after / by_params.macs_before
        by_latency = bisect_budget(lambda f: allocate(scores, f, budget_kind="latency", latency_table=table),
                                   lambda plan: plan.macs_after, by_params.macs_after, 0.05, 0.9999, keeps=True)[1]
        candidates = [("slimdiff --budget", by_params, reference),
                      ("slimdiff --macs", allocate(scores, kept, budget_kind="macs", latency_table=table), None),
                      (f"slimdiff --latency {by_latency.settings['budget']:.4f}", by_latency, None),
                      ("uniform --macs", allocate(scores, kept, "uniform", budget_kind="macs", latency_table=table), None)]
        for method in BASELINE_METHODS:
            found = bisect_budget(lambda b: baseline(method, b), lambda m: macs_per_call(m, example), goal, 0.01, 0.9, keeps=False)
            candidates.append((f"{method} --budget {found[0]:.3f}", None, found[1]))
        for name, plan, model in candidates:
            started = time.perf_counter()
            model = model if model is not None else slim(plan)
            compressed = type(pipe)(**{**pipe.components, "unet": model})
            compressed.set_progress_bar_config(disable=True)
            metrics = evaluate(pipe, compressed, prompts, sampler, evaluator=evaluator, latency_repeats=args.latency_repeats,
                               threads=args.threads)
            rows.append({
                "budget": budget, "method": name,
                "params_removed_fraction": metrics["params"]["removed_fraction_of_compressible"],
                "compressible_macs_kept": plan.macs_after / plan.macs_before if plan is not None else None,
                "predicted_error": plan.predicted_error if plan is not None else None,
                "predicted_latency_fraction": (plan.latency or {}).get("predicted_fraction") if plan is not None else None,
                "macs_ratio": metrics["macs"]["ratio"],
                "noise_sqnr_db": metrics["fidelity"]["noise_sqnr_db"],
                "image_psnr_db": metrics["fidelity"]["image_psnr_db"],
                "alignment": metrics["alignment"]["compressed"]["overall"],
                "alignment_original": metrics["alignment"]["original"]["overall"],
                "fd_to_original": metrics["frechet_distance_to_original"],
                "denoiser_speedup": metrics["latency"]["denoiser_speedup"],
                "measured_latency_fraction": 1 / metrics["latency"]["denoiser_speedup"],
                "denoiser_ms": metrics["latency"]["denoiser"]["compressed_ms"],
                "seconds": time.perf_counter() - started,
            })
            print(json.dumps(rows[-1]), flush=True)
            partial = Path(args.out_json).with_suffix(".partial.json")  # nothing measured is lost if a later method fails
            write_results(partial, {"rows": rows, "complete": False})
            del compressed, model
    Path(args.out_json).with_suffix(".partial.json").unlink(missing_ok=True)
    return {**run_record(__file__, argv), "machine": f"{platform.machine()} CPU, {args.threads} torch thread(s)",
            "torch": torch.__version__, "prompts": len(prompts), "heldout_prompts": len(heldout),
            "latency_table_device": table.device, "rows": rows}


def draw(result: dict, path: Path = OUT_PLOT) -> list[Path]:
    """Quality (noise SQNR and FD to the original) against measured denoiser latency, every method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "noise_sqnr_db", "noise SQNR dB (higher is better)"),
                           (axes[1], "fd_to_original", "FD to original (lower is better)")):
        for row in result["rows"]:
            ax.scatter(row["measured_latency_fraction"], row[key], s=30, marker="o" if row["method"].startswith(("slimdiff", "uniform")) else "s")
            ax.annotate(row["method"].split(" --")[0] + (" --" + row["method"].split(" --")[1].split()[0] if " --" in row["method"] else ""),
                        (row["measured_latency_fraction"], row[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("measured denoiser latency (fraction of original, CPU)")
        ax.set_ylabel(label)
        if key == "fd_to_original":
            ax.set_yscale("log")
    fig.suptitle(f"reference model, every method at the MACs of slimdiff --budget {result['rows'][0]['budget']}; "
                 f"{result['machine']}", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes(Path(path), buffer.getvalue())
    return [Path(path)]


def load(path: Path = OUT_JSON) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(result: dict, doc: Path = OUT_DOC) -> list[tuple[Path, str, str]]:
    return [(Path(doc), TITLE, page(result))]


def page(result: dict) -> str:
    command = result.get("command")
    if command and command.startswith("benchmarks/"):  # files before the shared recorder kept the script's path only
        result = {**result, "command": "python " + command}
    lines = [
        TITLE,
        "",
        "For each parameter budget, the `slimdiff` parameter plan fixes the MACs per denoiser call; a `--macs` plan, a",
        "`--latency` plan (F bisected to the same compressible MACs; latency table timed on this machine), `uniform` and",
        "every baseline (parameter budget bisected to the same MACs, counted by hooks on the compressed model) are",
        "evaluated against the original side by side in one process: "
        f"{result['prompts']} prompts ({result['prompts'] - result['heldout_prompts']} test captions and "
        f"{result['heldout_prompts']} with held-out shape-colour combinations), 25 steps, guidance 4, seed 0 per prompt.",
        "Noise SQNR is teacher-forced; alignment is the evaluator's overall accuracy (original model in brackets).",
        "",
        *provenance(result, f"{result['machine']}; torch {result['torch']}"),
        f"Latency table timed on {result.get('latency_table_device', '?')}."
        + (f" Conditions: {result['conditions']}." if result.get("conditions") else ""),
        "",
        "| budget | method | params removed | compressible MACs kept | MACs ratio | predicted error | noise SQNR dB | "
        "PSNR dB | alignment (orig.) | FD to original | predicted latency | measured latency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in result["rows"]:
        lines.append(f"| {r['budget']:.0%} | {r['method']} | {r['params_removed_fraction']:.1%} | {fmt(r['compressible_macs_kept'], '.1%')} | "
                     f"{r['macs_ratio']:.3f} | {fmt(r['predicted_error'], '.4g')} | {r['noise_sqnr_db']:.2f} | {r['image_psnr_db']:.2f} | "
                     f"{r['alignment']:.3f} ({r['alignment_original']:.3f}) | {r['fd_to_original']:.3g} | "
                     f"{fmt(r.get('predicted_latency_fraction'), '.3f')} | {r['measured_latency_fraction']:.3f} |")
    lines += ["", f"![quality against measured latency](img/{OUT_PLOT.name})", "",
              "Reading it: at equal MACs the `--macs` plan predicts less error than the parameter plan by construction",
              "(it minimises SIS per MAC); the measured columns say whether that holds for the images. The reference UNet",
              "is small (32 px images, 8x8 latents): its CPU time is mostly per-op overhead, so its latency fractions stay",
              "near 1 whatever the MACs; speed at real shapes: [benchmarks-speed.md](benchmarks-speed.md).",
              "",
              "- At equal MACs the `--macs` plan is the best on every image metric (SQNR, PSNR, FD to the original) and beats",
              "  the parameter plan, `uniform` and every baseline; alignment differences are within its binomial standard error",
              "  (about 1.3 points at 200 prompts).",
              "- The `--latency` plan optimises the table's milliseconds, not MACs: on this overhead-dominated UNet its",
              "  compressible units hold about 15 % of the call, so matched to the same MACs it cuts where time is measurable",
              "  and predicts (and shows) more error. Its use is at real shapes, where it reaches a latency target with the",
              "  least predicted error ([benchmarks-speed.md](benchmarks-speed.md)).",
              "- Predicted latency: `-` for the baselines (no plan), and for untied plans in this run (the engine now gives",
              "  them an upper bound: QK/VO zero-padded to the wider width).",
              "", f"Raw figures: `{result.get('_source', 'benchmarks/results/macs_vs_params.json')}`; re-render: "
              "`.venv/bin/python benchmarks/macs_vs_params.py --render-only`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.4])
    parser.add_argument("--prompts", type=int, default=200, help="evaluation prompts in all, held-out ones included")
    parser.add_argument("--heldout", type=int, default=50, help="prompts with held-out shape-colour combinations")
    parser.add_argument("--calibration", type=int, default=None, help="SlimSet prompts to capture (default: all)")
    parser.add_argument("--out-json", default=str(OUT_JSON))
    parser.add_argument("--out-doc", default=str(OUT_DOC))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--from-json", default=None, help="only render, from this results file")
    parser.add_argument("--render-only", action="store_true", help="only render, from --out-json")
    args = parser.parse_args(argv)
    if args.render_only and not args.from_json:
        args.from_json = args.out_json
    if args.from_json:
        result = load(Path(args.from_json))
        if result is None:
            raise SystemExit(f"{args.from_json}: no results file; run the benchmark first")
    else:
        result = run(args, argv)
        write_results(Path(args.out_json), result)
        result = read_results(Path(args.out_json))
    write_sections(render(result, Path(args.out_doc)))
    draw(result, Path(args.out_doc).parent / "img" / OUT_PLOT.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
