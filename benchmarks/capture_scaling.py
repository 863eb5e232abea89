"""Sharded capture on Dask workers from Prefect: scaling, scheduling overhead, per-worker memory, a Flux projection (issue 13).

    .venv/bin/python benchmarks/capture_scaling.py                      # all parts (about 8 minutes on 2 idle cores)
    .venv/bin/python benchmarks/capture_scaling.py --prompts 100 --skip-flux   # quicker

1. Scaling: the reference model's capture (data/reference/model, its SlimSet, the params.yaml sampler and batch size)
   split into ``--shards`` content-addressed shards and run by ``flows.distributed.capture_shards`` (Prefect flow,
   ``prefect_dask.DaskTaskRunner``) on a local Dask cluster of 1 and then 2 worker processes, one torch thread
   each. Workers are started and warmed (imports, model load, plan) before the clock starts; the timed part is
   the flow: plan task + one task per shard, shard files written. The merge is timed separately, and the same
   capture in one plain process (no Dask, no Prefect) is the baseline.
2. Scheduling overhead per shard: ``--noop`` empty Prefect tasks through the same task runner on the warm
   2-worker cluster.
3. Statistics per worker (computed, not measured: meta-device models, ``statistics_bytes``) for SD 1.5, SDXL and
   Flux-dev at 1, 2, 4, 8 site groups.
4. Flux-dev at 500 prompts on a 16-GPU pool: per-block costs (plain forward and forward with capture hooks) of one
   real-width double block and one single block measured on this CPU at reduced tokens, scaled to 1024 px by
   their FLOP counts, converted to H200 time by the CPU/H200 ratio of the SD 1.5 capture measured in this repo
   (docs/benchmarks-cost.md, docs/benchmarks-gpu.md). A projection: says so on the page.

Measuring writes benchmarks/results/capture_scaling.json (with the command, the machine and the code version; a part
taken over from the previous file by --skip-scaling / --skip-flux keeps the command that measured it); rendering writes
its section of docs/benchmarks-cost.md ("## Sharded capture on Dask workers (issue 13)"; the rest of the page is left
alone) from it alone: ``--render-only``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "capture_scaling.json"
DOC = ROOT / "docs" / "benchmarks-cost.md"
HEADING = "## Sharded capture on Dask workers (issue 13)"
GIB = 2**30


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------------ 1, 2: scaling


def make_workspace(args) -> Path:
    import yaml

    root = Path(tempfile.mkdtemp(prefix="capture-scaling-"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(path=str(ROOT / params["model"]["path"]), device="cpu", dtype="float32")
    params["capture"].update(shards=args.shards, batch_size=args.batch_size or params["capture"]["batch_size"])
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    lines = (ROOT / "outputs" / "slimset" / "slimset.jsonl").read_text().splitlines()[: args.prompts]
    (root / "outputs" / "slimset").mkdir(parents=True)
    (root / "outputs" / "slimset" / "slimset.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _warm(workspace: str) -> int:
    from flows.distributed import warm_worker

    return warm_worker(workspace, 1)


def scaling(args) -> dict:
    from distributed import Client, LocalCluster
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from flows.distributed import capture_shards, local_cluster_kwargs
    from slimdiff.statistics.recording import capture
    from slimdiff.compress import read_prompts
    from slimdiff.device import apply_threads
    from slimdiff.statistics.shards import merge_shards
    from slimdiff.pipeline.stages import SHARD_DIR, _pipeline, load_params, sampler_settings

    workspace = make_workspace(args)
    params = load_params(workspace / "params.yaml")
    out: dict = {"prompts": args.prompts, "shards": args.shards, "batch_size": int(params["capture"]["batch_size"]),
                 "steps": int(params["sampler"]["steps"]), "rounds": args.rounds,
                 "runs": {str(w): [] for w in args.workers}}

    @task
    def noop(i: int) -> int:
        return i

    @flow
    def noops(n: int) -> list[int]:
        return [f.result() for f in [noop.submit(i) for i in range(n)]]

    @flow
    def warm_prefect() -> None:
        return None

    warm_prefect()  # the temporary Prefect server starts outside the timings
    # rounds alternate the worker counts (1, 2, 1, 2, ...): each ratio compares neighbours in time on a noisy box
    for round_index, workers in [(r, w) for r in range(args.rounds) for w in args.workers]:
        began = time.perf_counter()
        # the cluster flows.distributed.task_runner starts for capture.cluster: local
        with LocalCluster(**local_cluster_kwargs(workers)) as cluster, Client(cluster) as client:
            client.run(_warm, str(workspace))
            startup = time.perf_counter() - began
            shutil.rmtree(workspace / SHARD_DIR, ignore_errors=True)
            print(f"load before {workers} worker(s): {load_average()}", flush=True)
            began, began_epoch = time.perf_counter(), time.time()
            result = capture_shards.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(
                str(workspace), args.shards, 1)
            wall = time.perf_counter() - began
            run = {"workers": workers, "startup_s": startup, "wall_s": wall,
                   "shard_s": [r["seconds"] for r in result["computed"]], "pids": sorted({r["pid"] for r in result["computed"]}),
                   # per worker: when its first shard started and its last one ended, from the flow's start
                   "timeline": {str(pid): {"first_start_s": min(r["started"] for r in result["computed"] if r["pid"] == pid) - began_epoch,
                                           "last_end_s": max(r["ended"] for r in result["computed"] if r["pid"] == pid) - began_epoch,
                                           "shards": sum(r["pid"] == pid for r in result["computed"])}
                                for pid in {r["pid"] for r in result["computed"]}},
                   "load_after": load_average()}
            if workers == max(args.workers) and args.noop and round_index == args.rounds - 1:
                began = time.perf_counter()
                noops.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(args.noop)
                run["noop_tasks"] = args.noop
                run["noop_wall_s"] = time.perf_counter() - began
            out["runs"][str(workers)].append(run)
            print(f"round {round_index + 1}, {workers} worker(s): {wall:.1f} s for {args.shards} shards (startup {startup:.1f} s)", flush=True)
    # the merge of the last run's shards, and the plain single-process capture of the same prompts
    apply_threads(1)
    pipe = _pipeline(params)
    from slimdiff.statistics.shards import plan_shards

    c = params["capture"]
    plan = plan_shards(pipe, read_prompts(workspace / "outputs" / "slimset" / "slimset.jsonl"), sampler_settings(params),
                       shards=args.shards, num_buckets=int(c["num_buckets"]), batch_size=int(c["batch_size"]),
                       model_id=str(params["model"].get("id", "")))
    began = time.perf_counter()
    merge_shards(plan, workspace / SHARD_DIR, workspace / "capture.safetensors")
    out["merge_s"] = time.perf_counter() - began
    out["capture_bytes"] = (workspace / "capture.safetensors").stat().st_size
    if args.baseline:
        prompts = read_prompts(workspace / "outputs" / "slimset" / "slimset.jsonl")
        began = time.perf_counter()
        capture(pipe, prompts, sampler_settings(params), num_buckets=int(c["num_buckets"]), batch_size=int(c["batch_size"]),
                progress=False)
        out["single_process_s"] = time.perf_counter() - began
    shutil.rmtree(workspace, ignore_errors=True)
    one, two = out["runs"].get("1"), out["runs"].get("2")
    if one and two:
        out["speedup_by_round"] = [a["wall_s"] / b["wall_s"] for a, b in zip(one, two)]
        out["speedup_2_vs_1"] = sum(r["wall_s"] for r in one) / sum(r["wall_s"] for r in two)
        # with the cluster's start and warm-up (process spawn, imports, model load) counted, as a cold local cluster pays
        out["speedup_with_startup"] = (sum(r["wall_s"] + r["startup_s"] for r in one)
                                       / sum(r["wall_s"] + r["startup_s"] for r in two))
    last = two[-1] if two else None
    if last and "noop_wall_s" in last:
        # each worker runs noop_tasks / workers tasks one after another
        out["overhead_per_shard_s"] = last["noop_wall_s"] / (last["noop_tasks"] / last["workers"])
    return out


# ------------------------------------------------------------------------------------------------ 3: memory per worker


def flux_config() -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def memory_per_worker(buckets: int) -> dict:
    from benchmarks.memory_table import MODELS, build_on_meta
    from slimdiff.arch.sites import site_width, sites_for
    from slimdiff.statistics.sums import statistics_bytes
    from slimdiff.arch import compressible_groups
    from slimdiff.statistics.shards import split_sites

    models = {"SD 1.5": MODELS["SD 1.5 UNet"], "SDXL base": MODELS["SDXL base UNet"],
              "Flux-dev": ("FluxTransformer2DModel", flux_config())}
    out = {}
    for name, (class_name, config) in models.items():
        model = build_on_meta(class_name, config)
        sites = sites_for(compressible_groups(model))
        widths = [site_width(model, s) for s in sites]
        params = sum(p.numel() for p in model.parameters())
        row = {"parameters": params, "weights_bf16_gib": 2 * params / GIB, "sites": len(sites), "largest_site": max(widths),
               "site_groups": {}}
        for groups in (1, 2, 4, 8, 16):
            parts = split_sites(sites, widths, groups)
            width_of = dict(zip(sites, widths))
            worst = max(statistics_bytes([width_of[s] for s in part], buckets) for part in parts)
            pooled = max(statistics_bytes([width_of[s] for s in part], 1) for part in parts)
            row["site_groups"][groups] = {"statistics_gib": worst / GIB, "pooled_float64_gib": pooled / GIB}
        out[name] = row
        del model
    return out


# ------------------------------------------------------------------------------------------------ 4: Flux projection


def flux_block_costs(token_sets: list[tuple[int, int]], repeats: int) -> dict:
    """CPU seconds of one real-width Flux-dev double block and one single block (plain forward, and forward with
    the capture's hooks on their sites) at each (image, text) token count of ``token_sets``; float32, one thread.
    The embedders and output layer (a 0-block model, timed the same way) are subtracted."""
    import torch
    from diffusers import FluxTransformer2DModel

    from slimdiff.arch import adapter_for
    from slimdiff.statistics.recorder import ActivationRecorder
    from slimdiff.arch.sites import sites_for
    from slimdiff.device import apply_threads
    from slimdiff.arch import compressible_groups

    apply_threads(1)

    def call_for(image_tokens: int, text_tokens: int) -> dict:
        side = int(image_tokens ** 0.5)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        g = torch.Generator().manual_seed(0)
        return dict(hidden_states=torch.randn(1, side * side, 64, generator=g),
                    encoder_hidden_states=torch.randn(1, text_tokens, 4096, generator=g),
                    pooled_projections=torch.randn(1, 768, generator=g), timestep=torch.full((1,), 0.5),
                    img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text_tokens, 3), guidance=torch.full((1,), 3.5))

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    out: dict = {"tokens": [list(t) for t in token_sets]}
    for kind, (double, single) in {"shell": (0, 0), "double": (1, 0), "single": (0, 1)}.items():
        torch.manual_seed(0)
        model = FluxTransformer2DModel(**{**flux_config(), "num_layers": double, "num_single_layers": single}).eval()
        sites = sites_for(compressible_groups(model)) if kind != "shell" else []
        rows = []
        for tokens in token_sets:
            call = call_for(*tokens)
            times: dict[str, list[float]] = {"plain": [], "hooked": []}
            with torch.inference_mode():
                model(**call)  # warm-up
                for _ in range(repeats):
                    began = time.perf_counter()
                    model(**call)
                    times["plain"].append(time.perf_counter() - began)
                    if sites:
                        with ActivationRecorder(model, sites, 1, 1000, timestep_scale=adapter_for(model).TIMESTEP_SCALE):
                            began = time.perf_counter()
                            model(**call)
                            times["hooked"].append(time.perf_counter() - began)
            rows.append({"plain": median(times["plain"]), "hooked": median(times["hooked"]) if sites else None})
        out[kind] = {"sites": len(sites), "by_tokens": rows}
        del model
    for kind in ("double", "single"):
        for row, shell in zip(out[kind]["by_tokens"], out["shell"]["by_tokens"]):
            row["plain"] -= shell["plain"]
            row["hooked"] -= shell["plain"]
    return out


def flux_flops(image_tokens: int, text_tokens: int) -> dict:
    """Multiply-adds x 2 of one double / single block's matmuls, attention and capture Gram matrices (per sample)."""
    d, mlp = 3072, 12288
    n = image_tokens + text_tokens
    attention = 2 * 2 * n * n * d  # QK^T and PV
    double_linear = 2 * (image_tokens + text_tokens) * (4 * d * d + 2 * d * mlp)
    single_linear = 2 * n * (3 * d * d + d * mlp + (d + mlp) * d)
    # Gram matrices of the hooked inputs: q input and MLP down input of each stream / of the single block
    double_gram = 2 * (image_tokens + text_tokens) * (d * d + mlp * mlp)
    single_gram = 2 * n * (d * d + (d + mlp) ** 2)
    return {"double": double_linear + attention, "single": single_linear + attention,
            "double_gram": double_gram, "single_gram": single_gram}


def _linear(points: list[tuple[float, float]], at: float) -> float:
    """The straight line through the first and last (x, y) point, evaluated at ``at``."""
    (x0, y0), (x1, y1) = points[0], points[-1]
    return y0 + (y1 - y0) * (at - x0) / (x1 - x0)


def flux_projection(costs: dict, memory: dict, args) -> dict:
    """Seconds for Flux-dev (19 double + 38 single blocks) at 1024 px: ``--flux-prompts`` prompts x 28 steps, no CFG
    (guidance-distilled), on one H200 and on a pool of ``--pool`` GPUs, two ways:

    - ratio: per-block CPU seconds at 4096 + 512 tokens (straight line through the measured token counts: weight
      and d^2 accumulation traffic are the constant part, per-token work the slope; attention's quadratic part
      added at the slope's FLOP rate), divided by the CPU/H200 ratio of SD 1.5's hooked prompt-step;
    - FLOPs: the block matmuls, attention and Gram matrices at ``--mfu`` of an H200's dense bf16 peak (989 TFLOP/s).
    """
    cost = json.loads((ROOT / "benchmarks" / "results" / "cost_sd15.json").read_text())
    gpu = json.loads((ROOT / "benchmarks" / "results" / "gpu.json").read_text())
    full = flux_flops(4096, 512)
    tokens = [sum(t) for t in costs["tokens"]]
    cpu_call = {}
    for kind, blocks in (("double", 19), ("single", 38)):
        rows = costs[kind]["by_tokens"]
        plain = _linear([(t, r["plain"]) for t, r in zip(tokens, rows)], 4608)
        slope = (rows[-1]["plain"] - rows[0]["plain"]) / (tokens[-1] - tokens[0])
        linear_flops_per_token = (full[kind] - 4 * 4608 ** 2 * 3072) / 4608
        attention = 4 * 4608 ** 2 * 3072 * slope / linear_flops_per_token
        # hooks: measured at the largest token count, plus the Gram FLOPs of the remaining tokens at the measured
        # matmul rate (their fixed part, the d^2 accumulation, does not grow with tokens; a line through two noisy
        # small differences would extrapolate noise)
        rate = linear_flops_per_token / slope if slope > 0 else float("nan")  # FLOP/s of this CPU on these matmuls
        last = costs["tokens"][-1]
        hooks = max(rows[-1]["hooked"] - rows[-1]["plain"], 0.0) + (full[f"{kind}_gram"] - flux_flops(*last)[f"{kind}_gram"]) / rate
        cpu_call[kind + "_flops_per_s"] = rate
        cpu_call[kind] = {"plain_s": (plain + attention) * blocks, "hooks_s": max(hooks, 0.0) * blocks}
    cpu_step = sum(v["plain_s"] + v["hooks_s"] for k, v in cpu_call.items() if isinstance(v, dict))
    ratio = _sd15_ratio(cost, gpu)
    steps = args.flux_prompts * 28
    by_ratio = cpu_step / ratio["cpu_over_h200"]
    flops = 19 * (full["double"] + full["double_gram"]) + 38 * (full["single"] + full["single_gram"])
    by_flops = flops / (989e12 * args.mfu)
    pool = args.pool * args.efficiency
    # site groups a worker needs so that its statistics (4 buckets) and the bf16 weights fit 90 % of an 80 GB GPU
    flux = memory["Flux-dev"]
    capacity = 0.9 * 80e9 / GIB - flux["weights_bf16_gib"]
    groups = min((int(g) for g, row in flux["site_groups"].items() if row["statistics_gib"] <= capacity), default=None)
    plain_cpu = sum(v["plain_s"] for v in cpu_call.values() if isinstance(v, dict))
    hooks_cpu = sum(v["hooks_s"] for v in cpu_call.values() if isinstance(v, dict))
    forward_flops = 19 * full["double"] + 38 * full["single"]
    split_ratio = (groups * plain_cpu + hooks_cpu) / ratio["cpu_over_h200"] if groups else None
    split_flops = (groups * forward_flops + flops - forward_flops) / (989e12 * args.mfu) if groups else None
    return {"cpu_per_step_s": cpu_step, "cpu_per_call": cpu_call, **ratio, "flops_per_step": flops, "mfu": args.mfu,
            "h200_per_step_s": {"ratio": by_ratio, "flops": by_flops}, "prompt_steps": steps,
            "one_h200_s": {"ratio": by_ratio * steps, "flops": by_flops * steps}, "pool_gpus": args.pool,
            "pool_efficiency": args.efficiency, "pool_s": {"ratio": by_ratio * steps / pool, "flops": by_flops * steps / pool},
            "site_groups_for_80gb": groups, "gpu_capacity_for_statistics_gib": capacity,
            "pool_with_site_groups_s": {"ratio": split_ratio * steps / pool if groups else None,
                                        "flops": split_flops * steps / pool if groups else None}}


def _sd15_ratio(cost: dict, gpu: dict) -> dict:
    calls = int(cost.get("args", {}).get("calls", 3))  # cost_sd15.py --calls (3 on its page)
    plain = float(cost["plain_calls_s"]) / calls  # one CFG prompt-step: a batch-2 UNet call, 64x64 latents
    hooked = plain * float(cost["capture_overhead"])
    h200 = float(gpu["capture_full_set_s"]) / (int(gpu["args"]["prompts"]) * int(gpu["args"]["steps"]))
    return {"sd15_cpu_hooked_step_s": hooked, "sd15_h200_hooked_step_s": h200, "cpu_over_h200": hooked / h200}


# ------------------------------------------------------------------------------------------------ page


def load(path: Path = RESULTS) -> dict | None:
    from benchmarks.pages import read_results

    return read_results(path) if Path(path).is_file() else None


def render(result: dict) -> list[tuple[Path, str, str]]:
    from benchmarks.pages import NOT_RECORDED, provenance

    s = result.get("scaling")
    machine = f"{result['machine']}; torch {result['torch']}, dask {result['dask']}, prefect {result['prefect']}"
    lines = [HEADING, "", "Both cores should be otherwise idle while it runs.", "", *provenance(result, machine),
             (f"Dask {result['dask']}, Prefect {result['prefect']}; one" if result.get("system") else "One")
             + " torch thread per worker. Load average (1, 5, 15 min) "
             f"before: {result['load_before']}, after: {result['load_after']}.", ""]
    by = (s or {}).get("measured_by")
    if by and by.get("command") != result.get("command"):
        lines += [("The scaling part was taken over from an earlier run: "
                   + (f"`{by['command']}`" if by.get("command") else f"{NOT_RECORDED} (file predates recorded commands)")
                   + (f" ({str(by['date'])[:10]})." if by.get("date") else ".")), ""]
    if s:
        one, two = s["runs"].get("1", []), s["runs"].get("2", [])

        def mean(runs: list, key: str) -> float:
            return sum(r[key] for r in runs) / len(runs) if runs else float("nan")

        def per_round(runs: list, fmt) -> str:
            return ", ".join(fmt(r) for r in runs) or "-"

        def wall(run: dict) -> str:
            return f"{run['wall_s']:.1f} s"

        lines += [f"Reference model capture: {s['prompts']} SlimSet prompts x {s['steps']} steps, batch {s['batch_size']}, "
                  f"{s['shards']} shards, through `flows.distributed.capture_shards` (Prefect + DaskTaskRunner) on a "
                  "local cluster from `flows.distributed.local_cluster_kwargs` (the one the flow starts), warm: workers "
                  f"started and the model loaded before the clock. {s.get('rounds', 1)} round(s), alternating 1 and 2 "
                  "workers, each on a fresh cluster.", "",
                  "| | 1 worker | 2 workers |", "|---|---|---|",
                  f"| capture flow wall time ({s['shards']} shard tasks), per round | "
                  f"{per_round(one, wall)} | {per_round(two, wall)} |",
                  f"| sum of shard task times (mean per round) | {sum(sum(r['shard_s']) for r in one) / max(len(one), 1):.1f} s | "
                  f"{sum(sum(r['shard_s']) for r in two) / max(len(two), 1):.1f} s |",
                  "| latest first-shard start (flow start to the last worker's first shard), per round | "
                  + " | ".join(per_round(runs, lambda r: f"{max(t['first_start_s'] for t in r['timeline'].values()):.1f} s")
                               for runs in (one, two)) + " |",
                  "| shards per worker, per round | " + " | ".join(
                      per_round(runs, lambda r: "/".join(str(t["shards"]) for t in r["timeline"].values())) for runs in (one, two)) + " |",
                  f"| cluster start + warm-up (not in the wall time), mean | {mean(one, 'startup_s'):.1f} s | "
                  f"{mean(two, 'startup_s'):.1f} s |", "",
                  f"**Speed-up with 2 workers: x{s.get('speedup_2_vs_1', float('nan')):.2f}** (total 1-worker wall time over "
                  f"total 2-worker wall time; per round {', '.join(f'x{x:.2f}' for x in s.get('speedup_by_round', []))}; "
                  "goal >= 1.7). Counting each cluster's start and warm-up as well (a cold local cluster's cost, paid once "
                  f"per fan-out): x{s.get('speedup_with_startup', float('nan')):.2f}."]
        if "single_process_s" in s:
            lines.append(f"The same capture in one plain process (no Dask, no Prefect, 1 thread): {s['single_process_s']:.1f} s.")
        lines.append(f"Streaming merge of the {s['shards']} shards into one capture file ({s['capture_bytes'] / 2**20:.1f} MiB): "
                     f"{s['merge_s']:.2f} s.")
        if "overhead_per_shard_s" in s:
            lines += ["", f"Scheduling overhead per shard: {s['overhead_per_shard_s'] * 1000:.0f} ms "
                      f"({two[-1]['noop_tasks']} empty Prefect tasks through the DaskTaskRunner on the 2-worker cluster in "
                      f"{two[-1]['noop_wall_s']:.1f} s; each worker ran half of them one after another)."]
    m = result.get("memory")
    if m:
        lines += ["", "Statistics per worker (GiB; 4 timestep buckets: pooled float64 + per-bucket float32; computed from "
                  "the real shapes on the meta device). A worker holds its site group's sums for its prompt shard; "
                  "weights (bf16) and activations come on top:", "",
                  "| site groups | " + " | ".join(m) + " |", "|---|" + "---|" * len(m)]
        for g in ("1", "2", "4", "8", "16"):
            lines.append(f"| {g} | " + " | ".join(f"{row['site_groups'][g]['statistics_gib']:.2f}" for row in m.values()) + " |")
        lines.append("| bf16 weights | " + " | ".join(f"{row['weights_bf16_gib']:.2f}" for row in m.values()) + " |")
    f = result.get("flux")
    if f:
        tok = result["flux_block_cpu_s"]["tokens"]
        lines += ["", f"Flux-dev at 1024 px (4096 image + 512 text tokens), {f['prompt_steps'] // 28} prompts x 28 steps "
                  "(guidance-distilled: one call per step). **A projection**, from per-block costs measured here: one "
                  "real-width double block and one single block timed on this CPU (float32, one thread, plain and with "
                  f"the capture's hooks) at {', '.join(f'{a} + {b}' for a, b in tok)} tokens, extended to 4608 tokens "
                  "along the measured line (attention's quadratic part added at the measured matmul FLOP rate; the hooks: their "
                  "cost at the largest token count plus the Gram FLOPs of the remaining tokens at that rate), "
                  f"load average while timed {result['flux_block_cpu_s'].get('load', {}).get('before', '?')} -> "
                  f"{result['flux_block_cpu_s'].get('load', {}).get('after', '?')} (command: "
                  f"`{result['flux_block_cpu_s'].get('command', result['command'])}`), "
                  f"times 19 double + 38 single blocks: {f['cpu_per_step_s']:.0f} CPU seconds per step "
                  f"(hooks {sum(v['hooks_s'] for v in f['cpu_per_call'].values() if isinstance(v, dict)):.0f} s of it). Two conversions to an H200:",
                  "", "| | ratio method | FLOP method |", "|---|---|---|",
                  f"| how | CPU/H200 ratio of SD 1.5's hooked prompt-step measured in this repo: "
                  f"{f['sd15_cpu_hooked_step_s']:.1f} s here, {f['sd15_h200_hooked_step_s'] * 1000:.1f} ms on an H200 "
                  f"(x{f['cpu_over_h200']:.0f}) | {f['flops_per_step'] / 1e12:.0f} TFLOP per step (blocks, attention, "
                  f"Gram matrices) at {f['mfu']:.0%} of 989 TFLOP/s |",
                  f"| one step, one H200 | {f['h200_per_step_s']['ratio']:.2f} s | {f['h200_per_step_s']['flops']:.2f} s |",
                  f"| capture, one H200 | {f['one_h200_s']['ratio'] / 3600:.1f} h | {f['one_h200_s']['flops'] / 3600:.1f} h |",
                  f"| capture, {f['pool_gpus']} GPUs at scaling efficiency {f['pool_efficiency']:.2f} | "
                  f"{f['pool_s']['ratio'] / 60:.0f} min | {f['pool_s']['flops'] / 60:.0f} min |",
                  f"| the same with {f['site_groups_for_80gb']} site groups (what an 80 GB GPU needs for 4 buckets, see "
                  f"above; each group re-runs the denoiser) | {f['pool_with_site_groups_s']['ratio'] / 60:.0f} min | "
                  f"{f['pool_with_site_groups_s']['flops'] / 60:.0f} min |", "",
                  "The ratio method carries SD 1.5's mix (convolutions, float16, small matrices) over to Flux's large bf16 "
                  "matmuls, where a GPU gains more on this CPU: read it as an upper bound, the FLOP method as the "
                  "expectation. Both exclude loading the 24 GB model on each worker and the merge (I/O-bound: every "
                  "site group's prompt shards stream through one process, one tensor at a time). Statistics above "
                  f"{f['gpu_capacity_for_statistics_gib']:.0f} GiB per worker do not fit beside the bf16 weights in 90 % "
                  "of an 80 GB GPU: with 4 buckets Flux needs the site groups of the last row; with 1 bucket (pooled "
                  "float64 only, a third of the bytes) fewer."]
    lines += ["", f"Raw figures: `{result.get('_source', 'benchmarks/results/capture_scaling.json')}`; re-render: "
              "`.venv/bin/python benchmarks/capture_scaling.py --render-only`. Design: [distributed.md](distributed.md).", ""]
    return [(DOC, HEADING, "\n".join(lines))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None, help="default: params.yaml capture.batch_size")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--noop", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (1 worker, 2 workers), alternating")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--skip-flux", action="store_true")
    parser.add_argument("--flux-tokens", type=int, nargs="+", default=[256, 64, 1024, 128],
                        help="(image, text) token pairs at which the Flux blocks are timed (at least two pairs)")
    parser.add_argument("--mfu", type=float, default=0.4, help="fraction of H200 bf16 peak for the FLOP projection")
    parser.add_argument("--flux-prompts", type=int, default=500)
    parser.add_argument("--pool", type=int, default=16)
    parser.add_argument("--efficiency", type=float, default=None, help="default: the measured 2-worker speed-up / 2")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-doc", dest="doc", action="store_false")
    parser.add_argument("--render-only", action="store_true", help="only re-render the page section from the results file")
    args = parser.parse_args(argv)
    from benchmarks.pages import read_results, run_record, write_results, write_sections

    if args.render_only:
        result = load(RESULTS)
        if result is None:
            raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
        write_sections(render(result))
        return 0
    import dask
    import prefect
    import torch

    record = run_record(__file__, argv)
    command = record["command"]
    result: dict = {**record, "torch": torch.__version__, "dask": dask.__version__, "prefect": prefect.__version__,
                    "python": platform.python_version(), "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU"
                    if not torch.cuda.is_available() else torch.cuda.get_device_name(0), "load_before": load_average()}
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.skip_scaling:
        result["scaling"] = scaling(args)
        result["scaling"]["measured_by"] = {"command": command, "date": record["date"]}
    elif "scaling" in previous:
        result["scaling"] = previous["scaling"]  # with the command that measured it
        earlier = previous.get("command")
        result["scaling"].setdefault("measured_by", {"command": earlier if earlier and "--skip-scaling" not in earlier else None,
                                                     "date": previous.get("date")})
    result["memory"] = memory_per_worker(4)
    if args.efficiency is None:
        speedup = (result.get("scaling") or {}).get("speedup_2_vs_1")
        args.efficiency = min(1.0, speedup / 2) if speedup else 0.9
    if not args.skip_flux or "flux_block_cpu_s" in previous:
        pairs = [tuple(args.flux_tokens[i:i + 2]) for i in range(0, len(args.flux_tokens), 2)]
        # --skip-flux: the block costs of the previous run (their own load is recorded with them)
        costs = previous["flux_block_cpu_s"] if args.skip_flux else flux_block_costs(pairs, repeats=args.repeats)
        if not args.skip_flux:
            costs["load"] = {"before": result["load_before"], "after": load_average()}
            costs["command"] = command
        result["flux_block_cpu_s"] = costs
        result["flux"] = flux_projection(costs, result["memory"], args)
    result["load_after"] = load_average()
    write_results(RESULTS, result)
    if args.doc:
        write_sections(render(read_results(RESULTS)))
    print(json.dumps({k: result.get(k) for k in ("load_before", "load_after")}), json.dumps(result.get("scaling", {}).get("speedup_2_vs_1")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
