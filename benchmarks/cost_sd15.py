"""Cost at real scale: a randomly initialised UNet with Stable Diffusion 1.5's exact configuration.

Real shapes, random weights (no download). Measures, in one process on this machine:
capture overhead against plain denoiser calls, covariance memory, gain/score/allocate/decompose
time, peak RAM, and denoiser latency original vs compressed at a 40 % budget (side by side,
interleaved, median). Writes docs/benchmarks-cost.md and benchmarks/results/cost_sd15.json.

    .venv/bin/python benchmarks/cost_sd15.py [--calls 3] [--gain-calls 1] [--ffn-points 16] [--budget 0.4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimdiff.device import apply_threads  # noqa: E402
from slimdiff.allocate import allocate  # noqa: E402
from slimdiff.capture import ActivationRecorder, Capture, sites_for  # noqa: E402
from slimdiff.groups import compressible_groups  # noqa: E402
from slimdiff.influence import Granularity, propagation_gains, score  # noqa: E402
from slimdiff.slim import decompose  # noqa: E402
from slimdiff.testing import SD15_UNET_CONFIG  # noqa: E402



def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def calls(n: int, seed: int = 0) -> list[dict]:
    """CFG-shaped UNet calls (batch 2 at 64x64 latents, 77 text tokens) spread over the schedule."""
    generator = torch.Generator().manual_seed(seed)
    timesteps = torch.linspace(950, 50, n).round().long()
    return [{"sample": torch.randn(2, 4, 64, 64, generator=generator), "timestep": int(t),
             "encoder_hidden_states": torch.randn(2, 77, 768, generator=generator)} for t in timesteps]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--gain-calls", type=int, default=1)
    parser.add_argument("--gain-modules", type=int, default=8, help="modules whose gains are timed (the rest is extrapolated)")
    parser.add_argument("--ffn-points", type=int, default=16)
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: SLIMDIFF_THREADS, else auto)")
    parser.add_argument("--overhead-only", action="store_true",
                        help="only re-measure the capture overhead (interleaved) and update the JSON and page")
    args = parser.parse_args()
    apply_threads(args.threads)
    results: dict = {"machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
                     "torch": torch.__version__, "args": vars(args)}
    torch.manual_seed(0)
    build = time.perf_counter()
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    results["build_s"] = time.perf_counter() - build
    results["unet_params"] = sum(p.numel() for p in unet.parameters())
    groups = compressible_groups(unet)
    results["compressible_params"] = sum(g.unit_params * g.width for g in groups)
    results["transformer_blocks"] = len({g.block for g in groups})
    inputs = calls(args.calls)
    print(f"UNet {results['unet_params'] / 1e6:.1f} M params, {results['compressible_params'] / 1e6:.1f} M compressible", flush=True)

    # plain and hooked calls interleaved, alternating which goes first, so machine load hits both alike
    recorder = ActivationRecorder(unet, sites_for(groups), args.buckets, 1000)
    plain = captured = 0.0
    with torch.inference_mode():
        unet(**inputs[0])  # warm-up
        for index, call in enumerate(inputs):
            for hooked in ((False, True) if index % 2 == 0 else (True, False)):
                if hooked:
                    with recorder:
                        captured += timed(lambda: unet(**call))
                else:
                    plain += timed(lambda: unet(**call))
    stats = Capture(recorder.stats, {"bucket_edges": recorder.edges})
    results["plain_calls_s"] = plain
    results["capture_calls_s"] = captured
    results["capture_overhead"] = captured / plain
    if args.overhead_only:
        out = ROOT / "benchmarks" / "results" / "cost_sd15.json"
        full = json.loads(out.read_text())
        full.update({k: results[k] for k in ("plain_calls_s", "capture_calls_s", "capture_overhead")})
        full["overhead_run"] = {"calls": args.calls, "threads": torch.get_num_threads(), "separate_run": True}
        out.write_text(json.dumps(full, indent=2) + "\n")
        write_doc(full)
        print(f"capture {captured:.1f} s vs plain {plain:.1f} s (interleaved): x{captured / plain:.2f}")
        return
    results["covariance_bytes"] = stats.nbytes
    results["peak_rss_after_capture_gib"] = peak_rss_gib()
    print(f"capture {captured:.1f} s vs plain {plain:.1f} s; covariances {results['covariance_bytes'] / 2**30:.2f} GiB", flush=True)

    # Gains need one perturbed forward per module and call: time a spread-out sample of modules and
    # extrapolate; the score below then uses unit gains (its cost does not depend on their values).
    gain_calls = [((), c) for c in calls(args.gain_calls, seed=1)]
    sample = [groups[i] for i in torch.linspace(0, len(groups) - 1, min(args.gain_modules, len(groups))).round().long().unique()]
    sampled = timed(lambda: propagation_gains(unet, gain_calls, sample, progress=True))
    results["gains_sampled_modules"] = len(sample)
    results["gains_sampled_s"] = sampled
    results["gains_s"] = sampled / len(sample) * len(groups)
    print(f"gains {sampled:.0f} s for {len(sample)} modules -> {results['gains_s']:.0f} s for all {len(groups)}", flush=True)
    scores_holder = {}
    results["score_s"] = timed(lambda: scores_holder.setdefault("s", score(unet, stats, None, Granularity(), max_ffn_points=args.ffn_points,
                                                                            require_gains=False, progress=True)))
    print(f"score {results['score_s']:.0f} s", flush=True)
    plans = {}
    results["allocate_s"] = timed(lambda: plans.setdefault("p", allocate(scores_holder["s"], args.budget)))
    plan = plans["p"]
    # decompose in place (one model in memory); the original is rebuilt from the same seed for timing
    compressed = unet
    results["decompose_s"] = timed(lambda: decompose(compressed, stats, plan.widths, progress=True))
    results["peak_rss_gib"] = peak_rss_gib()
    results["compressed_params"] = sum(p.numel() for p in compressed.parameters())
    results["removed_params"] = plan.removed
    print(f"decompose {results['decompose_s']:.0f} s; peak RSS {results['peak_rss_gib']:.1f} GiB", flush=True)
    del stats, scores_holder
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()

    latency = {"original": [], "compressed": []}
    with torch.inference_mode():
        compressed(**inputs[0])
        for _ in range(args.latency_repeats):  # interleaved so machine noise hits both alike
            for name, model in (("original", unet), ("compressed", compressed)):
                latency[name].append(timed(lambda: model(**inputs[0])))
    results["latency_ms"] = {k: 1000 * statistics.median(v) for k, v in latency.items()}
    results["speedup"] = results["latency_ms"]["original"] / results["latency_ms"]["compressed"]
    out = ROOT / "benchmarks" / "results" / "cost_sd15.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(results)
    print(json.dumps(results, indent=2))


def write_doc(r: dict) -> None:
    gib = 2**30
    lines = [
        "# Cost at real scale: SD 1.5-shaped UNet",
        "",
        "A `UNet2DConditionModel` with Stable Diffusion 1.5's exact configuration (random weights, seed 0; no",
        "download), compressed on this machine. Command:",
        "",
        "```bash",
        f".venv/bin/python benchmarks/cost_sd15.py --calls {r['args']['calls']} --gain-calls {r['args']['gain_calls']} "
        f"--ffn-points {r['args']['ffn_points']} --buckets {r['args']['buckets']} --budget {r['args']['budget']}"
        + (f" --threads {r['args']['threads']}" if r['args'].get('threads') else ""),
        "```",
        "",
        f"Machine: {r['machine']}; torch {r['torch']}. Denoiser calls are CFG-shaped: batch 2, 64x64 latents, 77 text tokens.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| UNet parameters | {r['unet_params'] / 1e6:.1f} M |",
        f"| compressible (16 transformer blocks: QK, VO self/cross, FFN) | {r['compressible_params'] / 1e6:.1f} M in {r['transformer_blocks']} blocks |",
        f"| plain denoiser calls ({r['args']['calls']}) | {r['plain_calls_s']:.1f} s |",
        f"| same calls with capture hooks, interleaved with the plain ones | {r['capture_calls_s']:.1f} s (overhead x{r['capture_overhead']:.2f})"
        + (" (a separate run: `--overhead-only`)" if r.get("overhead_run", {}).get("separate_run") else "") + " |",
        f"| covariance memory ({r['args']['buckets']} timestep buckets: pooled float64, per-bucket float32) | {r['covariance_bytes'] / gib:.2f} GiB |",
        f"| propagation gains ({r['args']['gain_calls']} call per module) | {r['gains_s']:.0f} s, extrapolated from "
        f"{r['gains_sampled_modules']} of {r['transformer_blocks'] * 5} modules timed ({r['gains_sampled_s']:.0f} s) |",
        f"| influence scores (FFN curves exact at {r['args']['ffn_points']} widths) | {r['score_s']:.0f} s |",
        f"| allocation at {r['args']['budget']:.0%} | {r['allocate_s']:.2f} s |",
        f"| decomposition | {r['decompose_s']:.0f} s |",
        f"| peak RAM of the whole process | {r['peak_rss_gib']:.1f} GiB (machine: 24 GiB) |",
        f"| parameters removed | {r['removed_params'] / 1e6:.1f} M ({r['removed_params'] / r['compressible_params']:.0%} of compressible, "
        f"{r['removed_params'] / r['unet_params']:.1%} of the UNet) |",
        f"| denoiser latency, original | {r['latency_ms']['original']:.0f} ms (median of {r['args']['latency_repeats']}) |",
        f"| denoiser latency, compressed | {r['latency_ms']['compressed']:.0f} ms |",
        f"| speed-up | x{r['speedup']:.2f} |",
        "",
        "Random weights give near-isotropic activations, so this page measures cost, not quality. Statistics: pooled",
        "float64 sums plus per-bucket float32 sums ([memory.md](memory.md)); the whole compression on one GPU:",
        "[benchmarks-gpu.md](benchmarks-gpu.md).",
        "",
    ]
    page = ROOT / "docs" / "benchmarks-cost.md"
    # the page's later sections belong to other scripts (capture_scaling.py, cost_dit.py): rewrite only this part
    others = ""
    if page.is_file():
        text = page.read_text()
        starts = [i for i in (text.find("\n<!-- "), text.find("\n## ")) if i >= 0]
        others = text[min(starts):] if starts else ""
    page.write_text("\n".join(lines).rstrip() + "\n" + others)


if __name__ == "__main__":
    main()
