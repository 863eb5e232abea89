"""Cost at real scale: a randomly initialised UNet with Stable Diffusion 1.5's exact configuration.

Real shapes, random weights (no download). Measures, in one process on this machine:
capture overhead against plain denoiser calls, covariance memory, gain/score/allocate/decompose
time, peak RAM, and denoiser latency original vs compressed at a 40 % budget (side by side,
interleaved, median). Measuring writes benchmarks/results/cost_sd15.json (with the command, the machine and the code
version); rendering writes the first part of docs/benchmarks-cost.md (its title section) from it alone.

    .venv/bin/python benchmarks/cost_sd15.py [--calls 3] [--gain-calls 1] [--ffn-points 16] [--budget 0.4]
    .venv/bin/python benchmarks/cost_sd15.py --render-only      # re-render the page section from the results file
"""

from __future__ import annotations

import argparse
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

from benchmarks.pages import provenance, read_results, run_record, write_results, write_sections  # noqa: E402
from slimdiff.device import apply_threads  # noqa: E402
from slimdiff.planning.allocation import allocate
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from slimdiff.arch.sites import sites_for
from slimdiff.arch import compressible_groups
from slimdiff.scoring.influence import Granularity, score
from slimdiff.scoring.gains import propagation_gains
from slimdiff.decomposition.apply import decompose
from tests.helpers import SD15_UNET_CONFIG

RESULTS = ROOT / "benchmarks" / "results" / "cost_sd15.json"
DOC = ROOT / "docs" / "benchmarks-cost.md"
TITLE = "# Cost at real scale: SD 1.5-shaped UNet"


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


def main(argv: list[str] | None = None) -> int:
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
                        help="only re-measure the capture overhead (interleaved) into the results file; the page says "
                        "which command measured it")
    parser.add_argument("--render-only", action="store_true", help="only re-render the page section from the results file")
    args = parser.parse_args(argv)
    if args.render_only:
        results = load(RESULTS)
        if results is None:
            raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
        write_sections(render(results))
        return 0
    from diffusers import UNet2DConditionModel

    apply_threads(args.threads)
    results: dict = {**run_record(__file__, argv),
                     "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)",
                     "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "render_only"}}
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
        # the overhead rows of the full run are replaced by this run's, which the page names with its own command
        full = {k: v for k, v in read_results(RESULTS).items() if not k.startswith("_")}
        full.update({k: results[k] for k in ("plain_calls_s", "capture_calls_s", "capture_overhead")})
        full["overhead_run"] = {"calls": args.calls, "threads": torch.get_num_threads(), "separate_run": True,
                                **{k: results[k] for k in ("command", "system", "code", "date")}}
        write_results(RESULTS, full)
        write_sections(render(read_results(RESULTS)))
        print(f"capture {captured:.1f} s vs plain {plain:.1f} s (interleaved): x{captured / plain:.2f}")
        return 0
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
    write_results(RESULTS, results)
    write_sections(render(read_results(RESULTS)))
    print(f"wrote {RESULTS} and {DOC}")
    return 0


# ---- rendering: from the results file alone -----------------------------------------------------------------------


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(r: dict) -> list[tuple[Path, str, str]]:
    gib = 2**30
    overhead = r.get("overhead_run", {})
    if overhead.get("separate_run"):
        separate = (f" (a separate run: `{overhead['command']}`, {str(overhead['date'])[:10]})" if overhead.get("command")
                    else " (a separate run: `--overhead-only`)")
    else:
        separate = ""
    lines = [
        TITLE,
        "",
        "A `UNet2DConditionModel` with Stable Diffusion 1.5's exact configuration (random weights, seed 0; no",
        "download), compressed on this machine.",
        "",
        *provenance(r, f"{r['machine']}; torch {r['torch']}", r["args"]),
        "Denoiser calls are CFG-shaped: batch 2, 64x64 latents, 77 text tokens.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| UNet parameters | {r['unet_params'] / 1e6:.1f} M |",
        f"| compressible (16 transformer blocks: QK, VO self/cross, FFN) | {r['compressible_params'] / 1e6:.1f} M in {r['transformer_blocks']} blocks |",
        f"| plain denoiser calls ({r['args']['calls']}) | {r['plain_calls_s']:.1f} s |",
        f"| same calls with capture hooks, interleaved with the plain ones | {r['capture_calls_s']:.1f} s (overhead x{r['capture_overhead']:.2f})"
        + separate + " |",
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
    for note in r.get("notes", []):  # remarks on this run, kept with its figures in the results file
        lines += [note, ""]
    lines += [f"Raw figures: `{r.get('_source', 'benchmarks/results/cost_sd15.json')}`; re-render: "
              "`.venv/bin/python benchmarks/cost_sd15.py --render-only`.", ""]
    # the page's later sections belong to capture_scaling.py and cost_dit.py
    return [(DOC, TITLE, "\n".join(lines))]


if __name__ == "__main__":
    raise SystemExit(main())
