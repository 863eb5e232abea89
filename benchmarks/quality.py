"""Quality benchmark: every method x budget on the reference model, same code path and accounting.

One capture (SlimSet prompts, deployment sampler, with the extra sites the per-matrix baselines
need) and one set of influence scores serve every method. Each compressed model is evaluated
against the original on held-out test captions with the same seeds: teacher-forced noise SQNR,
guidance cosine, final-image PSNR/SSIM, the evaluator's alignment accuracy and Fréchet distance,
MACs and CPU latency (side by side in one process). Writes benchmarks/results/quality.csv,
docs/benchmarks.md and two plots in docs/img/.

    .venv/bin/python benchmarks/quality.py [--budgets 0.2 0.3 0.4 0.5] [--eval-prompts 100]
    .venv/bin/python benchmarks/quality.py --calibration-sizes 64 128 256 500 --methods slimdiff --budgets 0.4
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimdiff.device import apply_threads  # noqa: E402
from slimdiff.baselines import BASELINES, baseline_sites, compress_with  # noqa: E402
from slimdiff.capture import SamplerSettings, capture  # noqa: E402
from slimdiff.compress import read_prompts  # noqa: E402
from slimdiff.evaluate import evaluate  # noqa: E402
from slimdiff.influence import measure_gains, score  # noqa: E402

METHOD_ORDER = ["slimdiff", "slimdiff_uniform", "slimdiff_modegpt", "svd_llm", "asvd", "svd", "flap", "wanda_sp"]


def library_versions() -> str:
    import diffusers
    import torchmetrics
    import transformers

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, torchmetrics {torchmetrics.__version__}"


def with_denoiser(pipe, denoiser):
    """The same pipeline with another UNet (shares every other component)."""
    return type(pipe)(**{**pipe.components, "unet": denoiser})


def calibrate(pipe, prompts, sampler, args):
    stats = capture(pipe, prompts, sampler, num_buckets=4, batch_size=args.batch_size, extra_sites=baseline_sites(pipe.unet),
                    model_id="reference")
    return stats, score(pipe.unet, stats, measure_gains(pipe, prompts[:8], sampler, num_calls=4))


def row_of(method: str, budget: float, calib: int, removed: dict, metrics: dict) -> dict:
    alignment = metrics.get("alignment", {})
    fid = metrics["fidelity"]
    lat = metrics.get("latency", {})
    n = metrics["settings"]["num_prompts"]
    acc = alignment.get("compressed", {}).get("overall", float("nan"))
    return {
        "method": method, "budget": budget, "calibration_prompts": calib,
        "removed_fraction_compressible": removed["removed_fraction"],
        "params_total": removed["total_after"],
        "noise_sqnr_db": fid["noise_sqnr_db"], "guidance_cosine": fid["guidance_cosine"],
        "image_psnr_db": fid["image_psnr_db"], "image_ssim": fid["image_ssim"],
        "alignment_overall": acc, "alignment_se": math.sqrt(max(acc * (1 - acc), 0) / n) if acc == acc else float("nan"),
        "alignment_original": alignment.get("original", {}).get("overall", float("nan")),
        "alignment_colour": alignment.get("compressed", {}).get("colour", float("nan")),
        "alignment_shape": alignment.get("compressed", {}).get("shape", float("nan")),
        "fd_to_original": metrics.get("frechet_distance_to_original", float("nan")),
        "macs_ratio": metrics["macs"]["ratio"],
        "denoiser_ms_original": lat.get("denoiser", {}).get("original_ms", float("nan")),
        "denoiser_ms": lat.get("denoiser", {}).get("compressed_ms", float("nan")),
        "denoiser_speedup": lat.get("denoiser_speedup", float("nan")),
    }


def main() -> None:
    from slimdiff.reference import load_reference_pipeline
    from slimdiff.reference.evaluator import load_evaluator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=sorted(BASELINES))
    parser.add_argument("--calibration", default=str(ROOT / "outputs" / "slimset" / "slimset.jsonl"),
                        help="calibration prompts (default: the main job's SlimSet)")
    parser.add_argument("--calibration-sizes", type=int, nargs="+", default=None,
                        help="calibration-size study: capture on the first k SlimSet prompts for each k")
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--name", default="quality", help="results name: benchmarks/results/<name>.csv, docs/<doc>")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: SLIMDIFF_THREADS, else auto)")
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the doc and plots from the saved CSV")
    args = parser.parse_args()
    if args.from_csv:
        with (ROOT / "benchmarks" / "results" / f"{args.name}.csv").open() as handle:
            rows = [{k: (v if k == "method" else float(v)) for k, v in r.items()} for r in csv.DictReader(handle)]
        for r in rows:
            r["calibration_prompts"] = int(r["calibration_prompts"])
        write_doc(rows, args)
        return
    apply_threads(args.threads)

    torch.manual_seed(0)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    sampler = SamplerSettings(args.steps, args.guidance, seed=0)
    calibration = read_prompts(args.calibration)
    eval_prompts = read_prompts(ROOT / "data" / "reference" / "eval_prompts.jsonl")[: args.eval_prompts]
    sizes = args.calibration_sizes or [len(calibration)]
    rows = []
    started = time.perf_counter()
    for size in sizes:
        t0 = time.perf_counter()
        stats, scores = calibrate(pipe, calibration[:size], sampler, args)
        print(f"calibration on {size} prompts: {time.perf_counter() - t0:.0f} s", flush=True)
        for budget in args.budgets:
            for method in args.methods:
                unet = copy.deepcopy(pipe.unet)
                removed = compress_with(method, unet, stats, scores, budget)
                metrics = evaluate(pipe, with_denoiser(pipe, unet), eval_prompts, sampler, evaluator,
                                   batch_size=args.batch_size, latency_repeats=args.latency_repeats)
                rows.append(row_of(method, budget, size, removed, metrics))
                r = rows[-1]
                print(f"{size:>4} {budget:.0%} {method:<17} sqnr {r['noise_sqnr_db']:6.2f} psnr {r['image_psnr_db']:6.2f} "
                      f"align {r['alignment_overall']:.3f} speedup {r['denoiser_speedup']:.2f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                write_outputs(rows, args)
    write_outputs(rows, args, final=True)


def write_outputs(rows: list[dict], args, final: bool = False) -> None:
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    with (results / f"{args.name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if final:
        write_doc(rows, args)


def summary(rows: list[dict]) -> list[str]:
    """Per budget: the best method on each fidelity metric, and whether slimdiff's alignment is within
    one standard error (of the difference) of the best alignment."""
    out = ["## Who is best, per budget", "",
           "| calib | budget | best SQNR | best PSNR | best SSIM | best alignment | slimdiff alignment within noise of best |",
           "|---|---|---|---|---|---|---|"]
    for key in dict.fromkeys((r["calibration_prompts"], r["budget"]) for r in rows):
        group = [r for r in rows if (r["calibration_prompts"], r["budget"]) == key]
        best = {m: max(group, key=lambda r: r[m]) for m in ("noise_sqnr_db", "image_psnr_db", "image_ssim", "alignment_overall")}
        ours = next((r for r in group if r["method"] == "slimdiff"), None)
        within = "—"
        if ours is not None:
            top = best["alignment_overall"]
            noise = math.sqrt(ours["alignment_se"] ** 2 + top["alignment_se"] ** 2)
            gap = top["alignment_overall"] - ours["alignment_overall"]
            within = f"yes (gap {gap:.3f} <= 2 x SE {noise:.3f})" if gap <= 2 * noise else f"no (gap {gap:.3f} > 2 x SE {noise:.3f})"
        out.append(f"| {key[0]} | {key[1]:.0%} | {best['noise_sqnr_db']['method']} | {best['image_psnr_db']['method']} | "
                   f"{best['image_ssim']['method']} | {best['alignment_overall']['method']} ({best['alignment_overall']['alignment_overall']:.3f}) | {within} |")
    out += ["",
            "Reading the table: parameters removed are counted the same way for every method (factorised baselines count both",
            "factors and stay dense where factorising would not save). The MACs ratio differs between methods at the same",
            "parameter budget because methods cut different modules: slimdiff's allocator removes most of the cross-attention",
            "query-key width (cheap in MACs, since text has few tokens), uniform allocation cuts the FFNs harder. The reference",
            "model is tiny (8x8 latents, 64 tokens), so its CPU latency is dominated by per-operator overhead that a narrower",
            "layer does not remove: the measured speed-ups scatter around 1.0 (0.91-1.13) whatever the MACs ratio. At real",
            "scale the FLOPs dominate: see benchmarks-cost.md (SD 1.5 shapes, 40 %: x1.09 denoiser speed-up).", ""]
    return out


def write_doc(rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    command = "python benchmarks/quality.py " + " ".join(a for a in sys.argv[1:] if a != "--from-csv")
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads ({platform.node() and '2-core dev machine'})"
    doc = ROOT / "docs" / ("benchmarks.md" if args.name == "quality" else f"benchmarks-{args.name}.md")
    lines = [f"# Benchmark: {args.name}", "",
             f"Machine: {machine}; {library_versions()}.", "", "Command:", "", "```bash", f".venv/bin/{command}", "```", "",
             f"Reference model, {args.eval_prompts} held-out test captions, {args.steps} steps, guidance {args.guidance}, "
             "seed 0 per prompt; all ratios measured side by side in one process. SQNR is teacher-forced (the compressed "
             "denoiser sees the original's inputs at every step). Alignment ± its binomial standard error.", "",
             "| calib | budget | method | removed | noise SQNR dB | guidance cos | PSNR dB | SSIM | alignment | FD to original | MACs ratio | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['calibration_prompts']} | {r['budget']:.0%} | {r['method']} | {r['removed_fraction_compressible']:.1%} | "
                     f"{r['noise_sqnr_db']:.2f} | {r['guidance_cosine']:.3f} | {r['image_psnr_db']:.2f} | {r['image_ssim']:.4f} | "
                     f"{r['alignment_overall']:.3f} ± {r['alignment_se']:.3f} | {r['fd_to_original']:.3g} | "
                     f"{r['macs_ratio']:.2f} | {r['denoiser_speedup']:.2f} |")
    if rows:
        lines += ["", f"Original model alignment on the same prompts: {rows[0]['alignment_original']:.3f}.", ""]
        lines += summary(rows)
    lines += [f"![quality vs parameters](img/{args.name}_vs_params.png)", "", f"![quality vs latency](img/{args.name}_vs_latency.png)", ""]
    doc.write_text("\n".join(lines))
    img = ROOT / "docs" / "img"
    img.mkdir(parents=True, exist_ok=True)
    for x_key, x_label, name in (("params_total", "denoiser parameters", "params"), ("denoiser_ms", "denoiser latency (ms)", "latency")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r[x_key], r["noise_sqnr_db"], r["alignment_overall"]) for r in rows if r["method"] == method)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=method)
        axes[0].set_ylabel("noise-prediction SQNR (dB)")
        axes[1].set_ylabel("alignment accuracy (overall)")
        for ax in axes:
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / f"{args.name}_vs_{name}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
