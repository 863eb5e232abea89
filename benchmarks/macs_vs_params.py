"""Reference model: a MACs-budget plan against a parameter-budget plan at the same kept MACs, side by side.

Reads the main job's artifacts (outputs/capture.safetensors, outputs/gains.json; run `bash scripts/run.sh`
first), scores them with the params.yaml settings, allocates a parameter plan at each budget and a
`--macs` plan that keeps the same compressible MACs (plus uniform at those MACs), decomposes each into a
copy of the reference UNet and evaluates all of them in one process against the original: noise SQNR,
image PSNR, alignment and Fréchet distance to the original on the evaluation prompts, MACs ratio and CPU
latency (interleaved). Writes benchmarks/results/macs_vs_params.json and docs/benchmarks-macs.md.

    .venv/bin/python benchmarks/macs_vs_params.py [--budgets 0.4] [--prompts 200] [--threads 1]
    .venv/bin/python benchmarks/macs_vs_params.py --from-json benchmarks/results/macs_vs_params.json
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

OUT_JSON = ROOT / "benchmarks" / "results" / "macs_vs_params.json"
OUT_DOC = ROOT / "docs" / "benchmarks-macs.md"


def run(args: argparse.Namespace) -> dict:
    from slimdiff.allocate import allocate
    from slimdiff.capture import Capture
    from slimdiff.compress import load_pipeline
    from slimdiff.evaluate import evaluate
    from slimdiff.influence import Gains, score
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.slim import decompose
    from slimdiff.stages import config_from, evaluation_prompts, load_params, sampler_settings

    torch.set_num_threads(args.threads)
    params = load_params(ROOT / "params.yaml")
    config = config_from(params)
    sampler = sampler_settings(params)
    pipe = load_pipeline(str(ROOT / params["model"]["path"]))
    pipe.set_progress_bar_config(disable=True)
    stats = Capture.load(ROOT / "outputs" / "capture.safetensors")
    gains = Gains.load(ROOT / "outputs" / "gains.json")
    scores = score(pipe.unet, stats, gains, config.granularity, config.reg, config.max_ffn_points)
    evaluator = load_evaluator(str(ROOT / params["evaluate"]["evaluator"]))
    prompts = evaluation_prompts(params)[: args.prompts]
    rows = []
    for budget in args.budgets:
        by_params = allocate(scores, budget)
        kept = by_params.macs_after / by_params.macs_before
        plans = {"slimdiff --budget": by_params, "slimdiff --macs": allocate(scores, kept, budget_kind="macs"),
                 "uniform --macs": allocate(scores, kept, "uniform", budget_kind="macs")}
        for name, plan in plans.items():
            started = time.perf_counter()
            compressed_unet = copy.deepcopy(pipe.unet)
            decompose(compressed_unet, stats, plan.widths, config.reg)
            compressed = type(pipe)(**{**pipe.components, "unet": compressed_unet})
            compressed.set_progress_bar_config(disable=True)
            metrics = evaluate(pipe, compressed, prompts, sampler, evaluator=evaluator, latency_repeats=args.latency_repeats,
                               threads=args.threads)
            rows.append({
                "budget": budget, "method": name, "params_removed_fraction": plan.removed / plan.params_before,
                "compressible_macs_kept": plan.macs_after / plan.macs_before,
                "predicted_error": plan.predicted_error,
                "macs_ratio": metrics["macs"]["ratio"],
                "noise_sqnr_db": metrics["fidelity"]["noise_sqnr_db"],
                "image_psnr_db": metrics["fidelity"]["image_psnr_db"],
                "alignment": metrics["alignment"]["compressed"]["overall"],
                "alignment_original": metrics["alignment"]["original"]["overall"],
                "fd_to_original": metrics["frechet_distance_to_original"],
                "denoiser_speedup": metrics["latency"]["denoiser_speedup"],
                "seconds": time.perf_counter() - started,
            })
            print(json.dumps(rows[-1]), flush=True)
    return {"machine": f"{platform.machine()} CPU, {args.threads} torch thread(s)", "torch": torch.__version__,
            "prompts": len(prompts), "command": " ".join(["benchmarks/macs_vs_params.py", *sys.argv[1:]]), "rows": rows}


def render(result: dict) -> str:
    lines = [
        "# MACs budget vs parameter budget on the reference model",
        "",
        "For each parameter budget, the `slimdiff` parameter plan; a `--macs` plan that keeps the same share of the",
        "compressible MACs (at the capture's resolution); and `uniform` at those MACs. Same capture, gains and scores",
        "(the main job's), each plan decomposed into a copy of the reference UNet and evaluated side by side in one",
        f"process on {result['prompts']} evaluation prompts (25 steps, guidance 4, seed 0 per prompt). Noise SQNR is",
        "teacher-forced; alignment is the evaluator's overall accuracy (original model in the last column).",
        "",
        "```bash",
        f".venv/bin/python {result['command']}",
        "```",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}.",
        "",
        "| budget | plan | params removed | compressible MACs kept | MACs ratio | predicted error | noise SQNR dB | "
        "PSNR dB | alignment (orig.) | FD to original | CPU speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['budget']:.0%} | {r['method']} | {r['params_removed_fraction']:.1%} | {r['compressible_macs_kept']:.1%} | "
                     f"{r['macs_ratio']:.3f} | {r['predicted_error']:.4g} | {r['noise_sqnr_db']:.2f} | {r['image_psnr_db']:.2f} | "
                     f"{r['alignment']:.3f} ({r['alignment_original']:.3f}) | {r['fd_to_original']:.3g} | x{r['denoiser_speedup']:.2f} |")
    lines += ["", "Reading it: at equal kept MACs the `--macs` plan predicts less error than the parameter plan by",
              "construction (it minimises SIS per MAC); the measured columns say whether that holds for the images. The",
              "reference UNet is small (32 px images, 8x8 latents): its CPU time is dominated by per-op overhead and",
              "convolutions, so a 1.22 MACs ratio does not show as wall-time here; speed at real shapes is the subject",
              "of the SD 1.5-shaped benchmarks.", "", "Raw figures: `benchmarks/results/macs_vs_params.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.4])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--latency-repeats", type=int, default=5)
    parser.add_argument("--from-json", default=None)
    args = parser.parse_args(argv)
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = run(args)
        OUT_JSON.write_text(json.dumps(result, indent=2) + "\n")
    OUT_DOC.write_text(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
