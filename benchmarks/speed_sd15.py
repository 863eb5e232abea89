"""Speed at real shapes: every budget kind on a UNet with Stable Diffusion 1.5's exact configuration.

Random weights (seed 0; no download). In one process on this machine: a short capture (2 CFG-shaped calls)
and influence scores with unit gains (random weights make gains meaningless; this page measures speed),
the latency table of every compressible unit, then plans of every budget kind, at matched parameter removal
(40 %) and at matched predicted latency (70 %), each timed against the original side by side
(interleaved, median). End-to-end 25-step generation time is composed from measured components: text
encoder + 25 x UNet (CFG batch 2) + VAE decode (SD 1.5 configs, random weights).

Measuring writes benchmarks/results/speed.json (every figure of one run of one command, with the command, the
machine and the code version); rendering writes docs/benchmarks-speed.md and docs/img/speed_sd15.png from it alone.
The scores and the latency table are cached in ``--cache-dir`` under a key of the code version (git commit and the
hash of slimdiff's source files), the model's content hash and the settings they depend on; the results file says
whether a cache was reused.

    .venv/bin/python benchmarks/speed_sd15.py [--threads 1] [--repeats 3] [--points 16] [--no-cache]
    .venv/bin/python benchmarks/speed_sd15.py --render-only      # re-render the page from speed.json
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimdiff.runtime.attention as attention  # noqa: E402
from benchmarks.pages import provenance, read_results, run_record, write_results  # noqa: E402
from benchmarks.quality import interpolation_summary, interpolation_text  # noqa: E402
from slimdiff.planning.allocation import BudgetError, WidthPlan, allocate
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from slimdiff.arch.sites import sites_for
from slimdiff.pipeline.evaluation import latency
from slimdiff.arch import compressible_groups, find_groups
from slimdiff.scoring.influence import Granularity, InfluenceScores, score
from slimdiff.planning.latency import LatencyTable, measure_latency_table
from slimdiff.runtime.resize import resize_group
from tests.helpers import SD15_UNET_CONFIG

RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
DOC = ROOT / "docs" / "benchmarks-speed.md"
PLOT = ROOT / "docs" / "img" / "speed_sd15.png"
TITLE = "# Speed at real shapes: budgets in parameters, MACs and latency (SD 1.5-shaped UNet)"
STEPS = 25

SD15_VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                       layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
SD15_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")


def cfg_call(timestep: int, seed: int) -> tuple[tuple, dict]:
    """A CFG-shaped SD 1.5 call: batch 2, 64x64 latents (512 px), 77 text tokens."""
    generator = torch.Generator().manual_seed(seed)
    return ((torch.randn(2, 4, 64, 64, generator=generator),),
            {"timestep": timestep, "encoder_hidden_states": torch.randn(2, 77, 768, generator=generator)})


def build_scores(unet, calls: int, ffn_points: int, model_hash: str) -> InfluenceScores:
    groups = compressible_groups(unet)
    recorder = ActivationRecorder(unet, sites_for(groups), 1, 1000)
    with torch.inference_mode(), recorder:
        for index, timestep in enumerate(torch.linspace(900, 100, calls).round().long().tolist()):
            args, kwargs = cfg_call(timestep, index)
            unet(*args, **kwargs)
    stats = Capture(recorder.stats, {"bucket_edges": recorder.edges, "site_tokens": dict(recorder.site_tokens),
                                     "model_hash": model_hash})
    return score(unet, stats, None, Granularity(8, 1), max_ffn_points=ffn_points, require_gains=False, progress=True)


def structure(unet, widths: dict[str, int]):
    """A copy of ``unet`` with the plan's widths and random weights: what a compressed model runs."""
    model = copy.deepcopy(unet)
    groups = {g.name: g for g in find_groups(model)}
    generator = torch.Generator().manual_seed(1)
    for name, width in widths.items():
        if width < groups[name].width:
            resize_group(model, groups[name], width)
            with torch.no_grad():  # resized linears are uninitialised memory (NaN or denormals would time differently)
                for parameter in model.get_submodule(groups[name].path).parameters():
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return model.eval()


def unpadded_attend(query, key, value, attention_mask, scale):
    """The previous engine's attention: unequal head widths go straight to SDPA (the math kernel)."""
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scale)


def bisect(make_plan, measure, goal: float, lo: float, hi: float, iterations: int = 30):
    """The plan whose ``measure`` is closest to ``goal``; ``measure`` must decrease as the budget value grows.

    A value the allocator refuses is on the side of the range that removes too much: for a parameter budget
    (a fraction to remove) that is above it, for a fraction to keep (MACs, latency) below it.
    """
    best = None
    keeps = None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        try:
            plan = make_plan(mid)
        except BudgetError:
            if keeps is None:
                keeps = make_plan(hi).budget_kind != "params"
            lo, hi = (mid, hi) if keeps else (lo, mid)
            continue
        value = measure(plan)
        if best is None or abs(value - goal) < abs(measure(best) - goal):
            best = plan
        if value > goal:
            lo = mid
        else:
            hi = mid
    return best


def removed(plan: WidthPlan) -> float:
    return plan.removed / plan.params_before


def make_plans(scores: InfluenceScores, table: LatencyTable, p40: float, target: float) -> list[tuple[str, str, WidthPlan, bool]]:
    """Every budget kind at matched parameter removal (``p40``) and at matched predicted latency (``target``):
    (label, matched on, plan, time it unpadded)."""

    def fraction(plan: WidthPlan) -> float:
        return plan.latency["predicted_fraction"]

    plans: list[tuple[str, str, WidthPlan, bool]] = []  # (label, matched, plan, unpadded)
    untied = allocate(scores, p40, latency_table=table)
    plans.append((f"--budget {p40} (untied, previous engine: no padding)", "params", untied, True))
    plans.append((f"--budget {p40} (untied, padded to equal head widths)", "params", untied, False))
    plans.append((f"--budget {p40} --tie-qk-vo", "params", allocate(scores, p40, tie_qk_vo=True, latency_table=table), False))
    macs_p = bisect(lambda f: allocate(scores, f, budget_kind="macs", tie_qk_vo=True, latency_table=table),
                    removed, p40, 0.05, 0.999)
    plans.append((f"--macs {macs_p.settings['budget']:.3f} --tie-qk-vo", "params", macs_p, False))
    lat_p = bisect(lambda f: allocate(scores, f, budget_kind="latency", latency_table=table), removed, p40, 0.3, 0.999)
    plans.append((f"--latency {lat_p.settings['budget']:.3f}", "params", lat_p, False))
    plans.append((f"--latency {target}", "latency", allocate(scores, target, budget_kind="latency", latency_table=table), False))
    params_l = bisect(lambda b: allocate(scores, b, tie_qk_vo=True, latency_table=table), fraction, target, 0.01, 0.95)
    plans.append((f"--budget {params_l.settings['budget']:.3f} --tie-qk-vo", "latency", params_l, False))
    macs_l = bisect(lambda f: allocate(scores, f, budget_kind="macs", tie_qk_vo=True, latency_table=table), lambda p: -fraction(p), -target, 0.05, 0.999)
    plans.append((f"--macs {macs_l.settings['budget']:.3f} --tie-qk-vo", "latency", macs_l, False))
    uniform_l = bisect(lambda b: allocate(scores, b, "uniform", tie_qk_vo=True, latency_table=table), fraction, target,
                       0.01, 0.95)
    plans.append((f"uniform --budget {uniform_l.settings['budget']:.3f} --tie-qk-vo", "latency", uniform_l, False))

    return plans


def cache_key(what: str, code: dict, model_hash: str, settings: dict) -> str:
    """The name of a cache file: what it holds, and a hash of the code version, the model and the settings."""
    content = json.dumps({"what": what, "commit": code.get("commit"), "slimdiff_source": code["slimdiff_source"],
                          "model_hash": model_hash, **settings}, sort_keys=True)
    return f"{what}-{hashlib.sha256(content.encode()).hexdigest()[:20]}.json"


def cached(path: Path | None, load, compute, what: str) -> tuple[object, dict]:
    """(``load(path)``, how) when ``path`` exists, else (``compute()`` saved to ``path`` unless it is None, how);
    ``how`` says whether the cache was reused and how long computing took."""
    if path is not None and path.is_file():
        print(f"{what} from {path}", flush=True)
        made = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))
        return load(path), {"file": path.name, "reused": True, "cache_written": made, "seconds": None}
    start = time.perf_counter()
    value = compute()
    seconds = time.perf_counter() - start
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        value.save(path)
    print(f"{what} in {seconds:.0f} s", flush=True)
    return value, {"file": path.name if path is not None else None, "reused": False, "seconds": seconds}


def time_component(fn, repeats: int) -> float:
    with torch.inference_mode():
        fn()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - start) * 1000)
    return statistics.median(runs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every timing")
    parser.add_argument("--compute-threads", type=int, default=2, help="torch threads for capture and scores")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--points", type=int, default=16, help="timed widths per unit")
    parser.add_argument("--calls", type=int, default=2)
    parser.add_argument("--ffn-points", type=int, default=8)
    parser.add_argument("--params-budget", type=float, default=0.4)
    parser.add_argument("--latency-target", type=float, default=0.7)
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "slimdiff-speed-sd15",
                        help="scores and latency table, under a key of code version, model hash and settings")
    parser.add_argument("--no-cache", action="store_true", help="compute the scores and the table afresh, save nothing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results file")
    parser.add_argument("--render-only", action="store_true", help="only re-render the page and plot from --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        results = load(args.out)
        if results is None:
            raise SystemExit(f"{args.out}: no results file; run the benchmark first")
        write_page(results)
        return 0

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from slimdiff.statistics.recording import model_content_hash

    began = time.perf_counter()
    results: dict = {**run_record(__file__, argv), "threads": args.threads,
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                  if k not in ("render_only", "out")},
                     "plans": [], "load_average": {"start": os.getloadavg()[0]}}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    results["model_hash"] = model_hash = model_content_hash(unet)
    results["groups"] = {g.name: {"kind": g.kind, "width": g.width} for g in compressible_groups(unet)}
    code = results["code"]
    cache = None if args.no_cache else args.cache_dir
    torch.set_num_threads(args.compute_threads)
    scores_path = cache / cache_key("scores", code, model_hash, {"calls": args.calls, "ffn_points": args.ffn_points}) if cache else None
    scores, scores_how = cached(scores_path, InfluenceScores.load,
                                lambda: build_scores(unet, args.calls, args.ffn_points, model_hash), "scores")
    torch.set_num_threads(args.threads)
    call = cfg_call(500, 99)
    table_path = (cache / cache_key("latency", code, model_hash, {"points": args.points, "repeats": args.repeats,
                                                                 "threads": args.threads}) if cache else None)
    table, table_how = cached(
        table_path, LatencyTable.load,
        lambda: measure_latency_table(unet, call, Granularity(8, 1), points=args.points, repeats=args.repeats,
                                      model_hash=model_hash, progress=True), "latency table")
    results["caches"] = {"directory": str(cache) if cache else None, "scores": scores_how, "latency_table": table_how}
    results["table"] = {"denoiser_ms": table.denoiser_ms, "compressible_ms": table.compressible_ms,
                        "units": len(table.curves), "timed_units": sum(1 for c in table.curves if not c.measured_as),
                        "seconds": table_how["seconds"], "interpolation": interpolation_summary(table)}
    print(f"denoiser {table.denoiser_ms:.0f} ms, compressible units {table.compressible_ms:.0f} ms", flush=True)

    plans = make_plans(scores, table, args.params_budget, args.latency_target)

    # components of a 25-step generation (measured once; the UNet part comes from each plan's timing)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG)).eval()
    tokens = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    vae = AutoencoderKL(**SD15_VAE_CONFIG).eval()
    latents = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    results["text_encoder_ms"] = time_component(lambda: text_encoder(tokens), args.repeats)
    results["vae_decode_ms"] = time_component(lambda: vae.decode(latents), args.repeats)
    del text_encoder, vae
    print(f"text encoder {results['text_encoder_ms']:.0f} ms, VAE decode {results['vae_decode_ms']:.0f} ms", flush=True)

    def end_to_end(unet_ms: float) -> float:
        return results["text_encoder_ms"] + STEPS * unet_ms + results["vae_decode_ms"]

    partial = args.out.with_suffix(".partial.json")
    for label, matched, plan, unpadded in plans:
        model = structure(unet, plan.widths)
        previous = attention.attend
        if unpadded:
            attention.attend = unpadded_attend
        try:
            measured = latency(unet, model, lambda: (call[0], dict(call[1])), args.repeats, 1, args.threads)
        finally:
            attention.attend = previous
        del model
        row = {
            "label": label, "matched": matched, "budget_kind": plan.budget_kind, "target": plan.settings["budget"],
            "allocator": plan.allocator, "tie_qk_vo": plan.settings["tie_qk_vo"], "unpadded": unpadded,
            "predicted_error": plan.predicted_error,
            "params_removed_fraction": removed(plan), "macs_ratio": plan.macs_before / plan.macs_after,
            "predicted_latency_fraction": plan.latency["predicted_fraction"],
            "predicted_upper_bound": plan.latency["upper_bound"],
            "interpolated_units": plan.latency.get("interpolated_units"),
            "interpolation_error_fraction": plan.latency.get("interpolation_error_fraction"),
            "original_ms": measured["original_ms"], "compressed_ms": measured["compressed_ms"],
            "measured_latency_fraction": measured["compressed_ms"] / measured["original_ms"],
            "denoiser_speedup": measured["speedup"],
            "end_to_end_speedup": end_to_end(measured["original_ms"]) / end_to_end(measured["compressed_ms"]),
            "widths": plan.widths,
        }
        results["plans"].append(row)
        print(f"{label}: removed {row['params_removed_fraction']:.1%}, predicted {row['predicted_latency_fraction']}, "
              f"measured {row['measured_latency_fraction']:.3f}, x{row['denoiser_speedup']:.2f} denoiser, "
              f"x{row['end_to_end_speedup']:.2f} end to end", flush=True)
        write_results(partial, {**results, "complete": False})  # progress survives a failure; never the results file
    results["seconds"] = time.perf_counter() - began
    results["load_average"]["end"] = os.getloadavg()[0]
    write_results(args.out, results)
    partial.unlink(missing_ok=True)
    write_page(read_results(args.out))
    print(f"wrote {args.out} and {DOC}")
    return 0


# ---- rendering: from the results file alone -----------------------------------------------------------------------


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def machine_short(r: dict) -> str:
    if r.get("system"):
        s = r["system"]
        return f"{s['cores']}-core {s['arch']} CPU" + (f", {s['gpu']}" if s.get("gpu") else "")
    return r.get("device", "machine not recorded")


def draw(r: dict, path: Path = PLOT) -> list[Path]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.pages import write_bytes

    rows = [p for p in r["plans"] if not p.get("predicted_upper_bound")]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for p, marker in zip(rows, "osD^vP*Xph"):
        ax.scatter(p["predicted_latency_fraction"], p["measured_latency_fraction"], s=36, marker=marker,
                   label=f"{p['label'].split(' (')[0]} (x{p['denoiser_speedup']:.2f})")
    lo = min([p["measured_latency_fraction"] for p in rows] + [p["predicted_latency_fraction"] for p in rows] + [0.6]) - 0.02
    ax.plot([lo, 1], [lo, 1], "k--", lw=0.8, label="measured = predicted")
    ax.fill_between([lo, 1], [lo * 0.9, 0.9], [lo * 1.1, 1.1], color="grey", alpha=0.15, label="within 10 %")
    ax.set_xlabel("predicted latency (fraction of original)")
    ax.set_ylabel("measured latency (fraction of original)")
    ax.set_title(f"SD 1.5-shaped UNet, {machine_short(r)}, {r['threads']} thread(s)", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return [path]


def write_page(r: dict) -> None:
    from benchmarks.pages import write_sections

    write_sections(render(r))
    draw(r)


def _kept(widths: dict, groups: dict, chosen) -> tuple[float, float] | None:
    """(smallest, largest) kept fraction of the groups ``chosen(name, kind)`` selects."""
    fractions = [widths[n] / g["width"] for n, g in groups.items() if chosen(n, g["kind"]) and n in widths]
    return (min(fractions), max(fractions)) if fractions else None


def _percent(span: tuple[float, float]) -> str:
    lo, hi = round(span[0] * 100), round(span[1] * 100)
    return f"{lo} %" if lo == hi else f"{lo}-{hi} %"


def _where_time_goes(r: dict, best: dict) -> str:
    """What the best plan at matched latency does with the budget, from the widths in the file."""
    groups = r.get("groups")
    if not groups or "widths" not in best:
        # an older file keeps no widths: the figures of the run of 2026-11-27 that produced it
        return ("in this run it narrows the 4096-token self-attentions to 42 % of their width (the 40 % parameter "
                "plan leaves them whole) and the FFNs of every level to 13-14 %.")

    def big_self(name: str, kind: str) -> bool:  # the 64x64-latent levels: 4096 tokens
        return kind in ("qk_self", "vo_self") and name.startswith(("down_blocks.0.", "up_blocks.3."))

    def ffn(name: str, kind: str) -> bool:
        return kind == "ffn"

    params = next((p for p in r["plans"] if p["matched"] == "params" and p["tie_qk_vo"] and p["budget_kind"] == "params"), None)
    attention, ffns = _kept(best["widths"], groups, big_self), _kept(best["widths"], groups, ffn)
    text = f"in this run it narrows the 4096-token self-attentions to {_percent(attention)} of their width"
    if params and "widths" in params:
        theirs = _kept(params["widths"], groups, big_self)
        text += (" (the parameter plan leaves them whole)" if theirs[0] >= 0.995
                 else f" (the parameter plan keeps {_percent(theirs)})")
    return text + f" and the FFNs to {_percent(ffns)}."


def _at_matched_params(r: dict) -> str:
    rows = [p for p in r["plans"] if p["matched"] == "params" and not p.get("unpadded")]
    fastest = min(rows, key=lambda p: p["measured_latency_fraction"])
    least = min(rows, key=lambda p: p["predicted_error"])
    most = max(rows, key=lambda p: p["predicted_error"])
    return (f"`{fastest['label']}` measured fastest (x{fastest['denoiser_speedup']:.2f}), `{least['label']}` predicts the "
            f"least error ({least['predicted_error']:.4g}) and `{most['label']}` the most ({most['predicted_error']:.4g}): "
            "a parameter count says nothing about speed; a team that wants speed states it in latency.")


def _untimed_text(plans) -> str:
    latency = [p for p in plans if p["budget_kind"] == "latency" and p.get("interpolated_units") is not None]
    if not latency:
        return ""
    p = latency[0]
    bound = p.get("interpolation_error_fraction")
    return (f" The `{p['label']}` plan has {p['interpolated_units']} unit(s) at untimed widths"
            + (f" (their worst checks sum to {bound:.1%} of the denoiser's latency)." if p["interpolated_units"] and bound is not None
               else "."))


def render(r: dict) -> list[tuple[Path, str, str]]:
    a = r.get("settings") or r.get("args", {})
    t = r["table"]
    caches = r.get("caches", {})
    reused = [what.replace("_", " ") for what in ("scores", "latency_table") if caches.get(what, {}).get("reused")]
    table_seconds = (f", {t['seconds']:.0f} s" if t.get("seconds") else "")
    lines = [
        TITLE,
        "",
        "A `UNet2DConditionModel` with Stable Diffusion 1.5's exact configuration (random weights, seed 0; no download).",
        f"Every plan is timed against the original side by side in one process (interleaved, median of {a['repeats']}).",
        "",
        *provenance(r, f"{r.get('device', '?')}; torch {r.get('torch', '?')}", a),
        f"{r['threads']} torch thread(s) for every timing. Denoiser calls are CFG-shaped: batch 2, 64x64 latents (512 px), "
        "77 text tokens.",
    ]
    if r.get("load_average"):
        lines += [f"Machine load (1-minute load average): {r['load_average']['start']:.2f} at the "
                  f"start, {r['load_average'].get('end', float('nan')):.2f} at the end; interleaving the original and each plan "
                  "keeps their ratio fair under a steady load."]
    if r.get("args", {}).get("replan_only"):
        lines += ["", "**Not the figures of one run**: this file was written by the since-removed `--replan-only` option, "
                  "which recomputed the predicted columns (params removed, predicted error, predicted latency) from cached "
                  "scores and latency table onto the measured columns of an earlier run. Re-run the benchmark for figures "
                  "from one command in one run."]
    if reused:
        lines += ["", f"Reused from the cache of the same code version and model: {', '.join(reused)} "
                  f"(written {', '.join(caches[w.replace(' ', '_')]['cache_written'] for w in reused)})."]
    lines += [
        "",
        f"Latency table: the denoiser takes {t['denoiser_ms']:.0f} ms; its {t['units']} compressible units (attentions with QK",
        f"and VO at one width, FFNs) take {t['compressible_ms']:.0f} ms at full width, timed alone "
        f"({t['timed_units']} distinct shapes timed{table_seconds})." + interpolation_text(t.get("interpolation")),
        "",
        "| plan | matched on | params removed | compressible MACs ratio | predicted error (SIS) | predicted latency | "
        "measured latency | denoiser speed-up | 25-step generation speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in r["plans"]:
        predicted = ("≤ " if p.get("predicted_upper_bound") else "") + f"{p['predicted_latency_fraction']:.3f}"
        sis = f"{p['predicted_error']:.4g}" if p.get("predicted_error") is not None else "-"
        lines.append(f"| `{p['label']}` | {p['matched']} | {p['params_removed_fraction']:.1%} | {p['macs_ratio']:.3f} | {sis} | {predicted} | "
                     f"{p['measured_latency_fraction']:.3f} | x{p['denoiser_speedup']:.2f} | x{p['end_to_end_speedup']:.2f} |")
    tied = [p for p in r["plans"] if not p.get("predicted_upper_bound")]
    bounded = [p for p in r["plans"] if p.get("predicted_upper_bound")]
    worst = max(tied, key=lambda p: abs(p["measured_latency_fraction"] / p["predicted_latency_fraction"] - 1))
    at_target = {p["label"]: p for p in r["plans"] if p["matched"] == "latency"}
    best = min(at_target.values(), key=lambda p: p["predicted_error"] if p.get("predicted_error") is not None else float("inf"))
    above = [p["measured_latency_fraction"] / p["predicted_latency_fraction"] - 1 for p in bounded]
    if above:
        lo, hi = min(above) * 100, max(above) * 100
        span = f"{lo:+.1f} %" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:+.1f} % to {hi:+.1f} %"
        bound_text = (f"The untied row{'s' if len(above) > 1 else ''} here measured {span} against it (negative: faster "
                      "than the bound), within this run's timing noise; the unpadded row is the previous engine, which no "
                      "table predicts.")
    else:
        bound_text = "The unpadded row is the previous engine, which no table predicts."
    lines += [
        "",
        "Reading it:",
        "",
        f"- **Predicted vs measured latency**: every tied plan within "
        f"{abs(worst['measured_latency_fraction'] / worst['predicted_latency_fraction'] - 1):.1%} (worst: `{worst['label']}`).",
        f"- **At matched latency** (predicted {a['latency_target']}): `{best['label']}` gets there with the least predicted error "
        f"({best['predicted_error']:.4g}; the others: "
        + ", ".join(f"`{p['label']}` {p['predicted_error']:.4g}" for p in at_target.values() if p is not best)
        + f") and removes {best['params_removed_fraction']:.0%} of the compressible parameters. It spends the budget where "
        "time is spent: " + _where_time_goes(r, best) + _untimed_text(at_target.values()),
        f"- **At matched parameter removal** ({a['params_budget'] * 100:g} %): " + _at_matched_params(r),
        "- **Padding**: the untied parameter plan barely narrows the 4096-token attentions, so zero-padding its unequal "
        "head widths changes little here (within noise); per attention at those shapes it is x4 "
        "([method.md](method.md#budgets-in-measured-latency-issue-11)).",
        "- `≤`: QK and VO widths differ in some attention, which runs zero-padded to the wider width; the table's time "
        "there is an upper bound for the padded engine (the plot shows the tied plans, whose prediction is not a bound). "
        + bound_text,
        "- The predicted error of random weights is near-isotropic and says nothing about image quality; it is the "
        "allocator's objective, compared at equal latency.",
        "",
        f"25-step generation = text encoder ({r.get('text_encoder_ms', 0):.0f} ms) + 25 UNet calls + VAE decode "
        f"({r.get('vae_decode_ms', 0):.0f} ms), each measured here with SD 1.5's configs; the UNet time is each row's",
        "measured median.",
        "",
        "![predicted vs measured latency](img/speed_sd15.png)",
        "",
        f"Scores come from a {a['calls']}-call capture with unit gains (random weights: this page measures speed, not quality;",
        "quality at equal MACs and latency is on the reference model, [benchmarks-macs.md](benchmarks-macs.md)).",
        f"Raw figures: `{r.get('_source', 'benchmarks/results/speed.json')}`; re-render: "
        "`.venv/bin/python benchmarks/speed_sd15.py --render-only`.",
        "",
    ]
    return [(DOC, TITLE, "\n".join(lines))]


if __name__ == "__main__":
    raise SystemExit(main())
