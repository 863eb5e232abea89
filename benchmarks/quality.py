"""Quality benchmark: every method x budget on the reference model, same code path and accounting.

One capture (SlimSet prompts, deployment sampler, with the extra sites the per-matrix baselines
need) and one set of influence scores serve every method. Each compressed model is evaluated
against the original on held-out test captions with the same seeds: teacher-forced noise SQNR,
guidance cosine, final-image PSNR/SSIM, the evaluator's alignment accuracy and Fréchet distance,
MACs and CPU latency (side by side in one process). Each baseline runs its official variant unless
``--option METHOD.NAME=VALUE`` picks another (slimdiff/baselines.py); the options every method ran with are
recorded. Measuring writes benchmarks/results/<name>.json (with the command, the machine and the code version);
rendering writes docs/benchmarks.md (docs/benchmarks-<name>.md for another --name) and two plots in docs/img/ from
it alone.

    .venv/bin/python benchmarks/quality.py [--budgets 0.2 0.3 0.4 0.5] [--eval-prompts 100]
    .venv/bin/python benchmarks/quality.py --name calibration --calibration-sizes 64 128 256 500 --methods slimdiff --budgets 0.4
    .venv/bin/python benchmarks/quality.py --render-only [--name calibration]     # re-render from the results file
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, relative, run_record, write_bytes, write_results, write_sections  # noqa: E402
from slimdiff.device import apply_threads  # noqa: E402
from slimdiff.baselines import BASELINES, baseline_sites, compress_with  # noqa: E402
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.statistics.recording import capture
from slimdiff.compress import read_prompts  # noqa: E402
from slimdiff.pipeline.evaluation import evaluate
from slimdiff.compress import SlimDiffConfig
from slimdiff.scoring.gains import measure_gains
from slimdiff.scoring.influence import score

METHOD_ORDER = ["slimdiff", "slimdiff_uniform", "slimdiff_modegpt", "svd_llm", "asvd", "svd", "flap", "wanda_sp"]
RESULTS_DIR = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
# The option values that select each baseline's variant before issue 23: what a results file without recorded options
# (written before the options were recorded, and before issue 23 changed the defaults) ran.
BEFORE_ISSUE_23 = {"svd_llm": {"shift": "always"}, "asvd": {"statistic": "rms"}, "wanda_sp": {"column_norm": "l2"},
                   "flap": {"attention_metric": "plain"}}
# the settings of compress_with's report that are options or describe the variant (scalars only)
OPTION_KEYS = ("allocator", "min_keep", "reg", "temperature", "ratio_of", "shift", "alpha", "statistic", "column_norm",
               "attention_metric", "activation_magnitude", "standardisation")


def library_versions() -> str:
    import diffusers
    import torchmetrics
    import transformers

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, torchmetrics {torchmetrics.__version__}"


def with_denoiser(pipe, denoiser):
    """The same pipeline with another denoiser (its ``unet`` or ``transformer``; shares every other component)."""
    from slimdiff.arch.pipelines import denoiser_of

    key, _ = denoiser_of(pipe)
    return type(pipe)(**{**pipe.components, key: denoiser})


def calibrate(pipe, prompts, sampler, args):
    stats = capture(pipe, prompts, sampler, num_buckets=4, batch_size=args.batch_size, extra_sites=baseline_sites(pipe.unet),
                    model_id="reference")
    gains = measure_gains(pipe, prompts[:8], sampler, num_calls=4, reference=SlimDiffConfig().gain_reference(stats))
    return stats, score(pipe.unet, stats, gains)


def method_options(method: str, given: dict) -> dict:
    """Every keyword option of ``method`` with the value it runs with: ``given`` over the defaults of its signature."""
    defaults = {p.name: p.default for p in inspect.signature(BASELINES[method]).parameters.values()
                if p.kind is p.KEYWORD_ONLY}
    return {**defaults, **given}


def parse_option(text: str) -> tuple[str, str, object]:
    """``METHOD.NAME=VALUE`` -> (method, name, value as a number when it reads as one)."""
    try:
        key, value = text.split("=", 1)
        method, name = key.split(".", 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected METHOD.NAME=VALUE, e.g. wanda_sp.column_norm=l2") from None
    if method not in BASELINES:
        raise argparse.ArgumentTypeError(f"--option {text!r}: unknown method {method!r}; choose one of {', '.join(BASELINES)}")
    for kind in (int, float):
        try:
            return method, name, kind(value)
        except ValueError:
            pass
    return method, name, value


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
        "settings": {k: v for k, v in removed.get("settings", {}).items() if k in OPTION_KEYS},
        **({"whitening": whitening_counts(removed["settings"]["whitening"])} if "whitening" in removed.get("settings", {}) else {}),
    }


def whitening_counts(methods: dict[str, str]) -> dict[str, int]:
    """How SVD-LLM whitened its matrices: plain Cholesky, Cholesky after the shift, anything else (its option "always",
    or the eigendecomposition where the shifted Cholesky failed too)."""
    counts = {"cholesky": 0, "shifted": 0, "other": 0}
    for how in methods.values():
        counts["cholesky" if how == "cholesky" else "shifted" if how.startswith("cholesky of G +") else "other"] += 1
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--methods", nargs="+", default=METHOD_ORDER, choices=sorted(BASELINES))
    parser.add_argument("--option", dest="options", type=parse_option, action="append", default=[],
                        metavar="METHOD.NAME=VALUE", help="a method's option (its variant; slimdiff/baselines.py), e.g. "
                        "wanda_sp.column_norm=l2; repeat for more")
    parser.add_argument("--calibration", default=str(ROOT / "outputs" / "slimset" / "slimset.jsonl"),
                        help="calibration prompts (default: the main job's SlimSet)")
    parser.add_argument("--calibration-sizes", type=int, nargs="+", default=None,
                        help="calibration-size study: capture on the first k SlimSet prompts for each k")
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--name", default="quality", help="results name: benchmarks/results/<name>.json, docs/<doc>")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: SLIMDIFF_THREADS, else auto)")
    parser.add_argument("--render-only", action="store_true", help="only re-render the page and plots from the results file")
    parser.add_argument("--from-csv", dest="render_only", action="store_true", help=argparse.SUPPRESS)  # the earlier name
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = RESULTS_DIR / f"{args.name}.json"
    if args.render_only:
        results = load(path)
        if results is None:
            raise SystemExit(f"{path}: no results file (nor {path.with_suffix('.csv').name}); run the benchmark first")
        write_page(results)
        return 0

    from slimdiff.reference import load_reference_pipeline
    from slimdiff.reference.evaluator import load_evaluator

    given: dict[str, dict] = {}
    for method, name, value in args.options:
        given.setdefault(method, {})[name] = value
    for method, options in given.items():  # fail before the hour of calibrating, not at the method
        if method not in args.methods:
            raise SystemExit(f"--option for {method!r}, which is not among --methods {' '.join(args.methods)}")
        unknown = sorted(set(options) - set(method_options(method, {})))
        if unknown:
            raise SystemExit(f"--option: method {method!r} has no option(s) {unknown}; its options: "
                             f"{', '.join(method_options(method, {})) or 'none'}")
    apply_threads(args.threads)
    results = {**run_record(__file__, argv), "name": args.name, "libraries": library_versions(),
               "threads": torch.get_num_threads(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("options", "render_only")},
               "methods": {m: {"options": method_options(m, given.get(m, {}))} for m in args.methods},
               "rows": []}
    torch.manual_seed(0)
    pipe = load_reference_pipeline()
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    sampler = SamplerSettings(args.steps, args.guidance, seed=0)
    calibration = read_prompts(args.calibration)
    eval_prompts = read_prompts(ROOT / "data" / "reference" / "eval_prompts.jsonl")[: args.eval_prompts]
    sizes = args.calibration_sizes or [len(calibration)]
    rows = results["rows"]
    started = time.perf_counter()
    partial = path.with_suffix(".partial.json")
    for size in sizes:
        t0 = time.perf_counter()
        stats, scores = calibrate(pipe, calibration[:size], sampler, args)
        print(f"calibration on {size} prompts: {time.perf_counter() - t0:.0f} s", flush=True)
        for budget in args.budgets:
            for method in args.methods:
                unet = copy.deepcopy(pipe.unet)
                removed = compress_with(method, unet, stats, scores, budget, **given.get(method, {}))
                metrics = evaluate(pipe, with_denoiser(pipe, unet), eval_prompts, sampler, evaluator,
                                   batch_size=args.batch_size, latency_repeats=args.latency_repeats)
                rows.append(row_of(method, budget, size, removed, metrics))
                r = rows[-1]
                print(f"{size:>4} {budget:.0%} {method:<17} sqnr {r['noise_sqnr_db']:6.2f} psnr {r['image_psnr_db']:6.2f} "
                      f"align {r['alignment_overall']:.3f} speedup {r['denoiser_speedup']:.2f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
                write_results(partial, {**results, "complete": False})  # progress; never the results file
    results["seconds"] = time.perf_counter() - started
    write_results(path, results)
    partial.unlink(missing_ok=True)
    write_page(read_results(path))
    print(f"wrote {path}")
    return 0


# ---- rendering: from the results file alone -----------------------------------------------------------------------


def load(path: Path) -> dict | None:
    """The results file, or the CSV of rows that earlier runs wrote (``legacy``: no command, machine or options)."""
    path = Path(path)
    if path.is_file():
        return read_results(path)
    csv_path = path.with_suffix(".csv")
    if not csv_path.is_file():
        return None
    with csv_path.open() as handle:
        rows = [{k: (v if k == "method" else float(v)) for k, v in r.items()} for r in csv.DictReader(handle)]
    for r in rows:
        r["calibration_prompts"] = int(r["calibration_prompts"])
    return {"name": path.stem, "rows": rows, "legacy": True, "_source": relative(csv_path)}


def doc_path(name: str) -> Path:
    return ROOT / "docs" / ("benchmarks.md" if name == "quality" else f"benchmarks-{name}.md")


def describe(method: str, options: dict) -> str:
    """What ``method`` computes with these options (slimdiff/baselines.py), official or earlier variant."""
    o = options
    if method.startswith("slimdiff"):
        kind = o.get("allocator") or (method.removeprefix("slimdiff_") if method != "slimdiff" else "slimdiff")
        temperature = f" (temperature {o['temperature']:g})" if o.get("temperature") is not None else ""
        allocator = {"slimdiff": "greedy spectral-influence allocation", "uniform": "the same kept fraction in every module",
                     "modegpt": f"MoDeGPT's allocation{temperature}"}.get(kind, f"the {kind!r} allocator")
        return f"SlimDiff's group decompositions, {allocator}"
    ratio = ("one kept-weight fraction per matrix (`ratio_of=\"params\"`)" if o.get("ratio_of") == "params"
             else "one rank ratio for every matrix")
    if method == "svd":
        return f"truncated SVD of each weight, {ratio}"
    if method == "svd_llm":
        if o.get("shift", "on_failure") == "on_failure":
            how = ("official (`shift=\"on_failure\"`): SVD of W S, S = cholesky(G) of the input's token-summed Gram G, "
                   "shifted to G + (1e-6 - lambda_min) I only where Cholesky fails")
        else:
            how = (f"earlier variant (`shift=\"always\"`): S from C + reg trace(C)/d I on every matrix (C = E[x x^T], "
                   f"reg {o.get('reg') if o.get('reg') is not None else 'default'})")
        return f"SVD-LLM, {how}; factors U_k Sigma_k^1/2 and Sigma_k^1/2 V_k^T S^-1, {ratio}"
    if method == "asvd":
        alpha = o.get("alpha", 0.5)
        if o.get("statistic", "abs_mean") == "abs_mean":
            how = f"official (`statistic=\"abs_mean\"`): SVD of W diag(s), s_j = mean|x_j|^{alpha:g} + 1e-6"
        else:
            how = f"earlier variant (`statistic=\"rms\"`): s_j = rms(x_j)^{alpha:g} floored at (1e-6 max rms)^{alpha:g}"
        return f"ASVD, {how}, {ratio}"
    if method == "wanda_sp":
        if o.get("column_norm", "mean_abs") == "mean_abs":
            how = "official (`column_norm=\"mean_abs\"`): channel j scores mean_i |W[i, j]| x rms(x_j)"
        else:
            how = "earlier variant (`column_norm=\"l2\"`): channel j scores ||W[:, j]||_2 x rms(x_j)"
        return f"Wanda-sp (FLAP repo), {how} on the output layer's input; the same kept fraction in every module, no reconstruction"
    if method == "flap":
        if o.get("attention_metric", "squared") == "squared":
            how = "official (`attention_metric=\"squared\"`): fluctuation Var(x_j) ||W[:, j]||^2, squared for attention"
        else:
            how = "earlier variant (`attention_metric=\"plain\"`): fluctuation Var(x_j) ||W[:, j]||^2, not squared for attention"
        return (f"FLAP, {how}; standardised per module, one global ranking of width steps, removed channels' mean folded "
                "into the output bias")
    return method


def baselines_text(r: dict) -> list[str]:
    methods = list(dict.fromkeys(row["method"] for row in r["rows"]))
    if all(m.startswith("slimdiff") for m in methods):
        return []
    recorded = r.get("methods")
    if recorded:
        options = {m: recorded.get(m, {}).get("options", {}) for m in methods}
        intro = ("Methods as run, with the options recorded in the results file (`slimdiff/baselines.py`, whose docstring "
                 "gives each baseline's source; official by default since issue 23, `--option METHOD.NAME=VALUE` picks "
                 "another variant):")
    else:
        options = {m: BEFORE_ISSUE_23.get(m, {}) for m in methods}
        intro = ("Methods as run. This results file records no options: it predates them and issue 23, so Wanda-sp, FLAP, "
                 "SVD-LLM and ASVD ran their earlier variants (the defaults then; `slimdiff/baselines.py` keeps each behind "
                 "the option named), not the official ones that are the defaults now:")
    lines = [intro]
    for m in methods:
        shown = {k: v for k, v in options[m].items() if v is not None}
        whitened = [(row["budget"], row["whitening"]) for row in r["rows"] if row["method"] == m and row.get("whitening")]
        lines.append(f"- `{m}`: {describe(m, options[m])}" + (f" (options: {', '.join(f'`{k}={v!r}`' for k, v in shown.items())})"
                                                                  if recorded and shown else "")
                     + ("; matrices whitened by plain Cholesky / after the shift / otherwise: "
                        + ", ".join(f"{b:.0%}: {w['cholesky']} / {w['shifted']} / {w['other']}" for b, w in whitened)
                        if whitened else "") + ".")
    lines += ["", "The factorised baselines keep one rank ratio for every matrix unless `ratio_of=\"params\"`; the structured "
              "ones narrow each head (SlimDiff's structure) instead of removing whole heads as the LLM codes do.", ""]
    return lines


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
    return out + [""]


def reading(rows: list[dict]) -> list[str]:
    speedups = [r["denoiser_speedup"] for r in rows if r["denoiser_speedup"] == r["denoiser_speedup"]]
    scatter = f" ({min(speedups):.2f}-{max(speedups):.2f})" if speedups else ""
    return ["Reading the table: parameters removed are counted the same way for every method (factorised baselines count both",
            "factors and stay dense where factorising would not save). The MACs ratio differs between methods at the same",
            "parameter budget because methods cut different modules: slimdiff's allocator removes most of the cross-attention",
            "query-key width (cheap in MACs, since text has few tokens), uniform allocation cuts the FFNs harder. The reference",
            "model is tiny (8x8 latents, 64 tokens), so its CPU latency is dominated by per-operator overhead that a narrower",
            f"layer does not remove: the measured speed-ups scatter around 1.0{scatter} whatever the MACs ratio. At real",
            "scale the FLOPs dominate: see [benchmarks-cost.md](benchmarks-cost.md) and [benchmarks-speed.md](benchmarks-speed.md)",
            "(SD 1.5 shapes).", ""]


def render(r: dict) -> list[tuple[Path, str, str]]:
    name, rows = r["name"], r["rows"]
    a = r.get("settings")
    title = f"# Benchmark: {name}"
    lines = [title, "", *provenance(r, predates="recorded commands, machines and baseline options")]
    if r.get("libraries"):
        lines[-1] += f" Libraries: {r['libraries']}; {r['threads']} torch thread(s)."
    lines.append("")
    if a:
        lines.append(f"Reference model, {a['eval_prompts']} held-out test captions, {a['steps']} steps, guidance {a['guidance']}, "
                     f"seed 0 per prompt; latency median of {a['latency_repeats']}; all ratios measured side by side in one process. "
                     "SQNR is teacher-forced (the compressed denoiser sees the original's inputs at every step). Alignment ± its "
                     "binomial standard error.")
    else:
        lines.append("Reference model, seed 0 per prompt (evaluation settings not recorded in this file; the benchmark's "
                     "defaults are 100 held-out test captions, 25 steps, guidance 4.0); all ratios measured side by side in one "
                     "process. SQNR is teacher-forced (the compressed denoiser sees the original's inputs at every step). "
                     "Alignment ± its binomial standard error.")
    lines += ["", markdown_table(
        ["calib", "budget", "method", "removed", "noise SQNR dB", "guidance cos", "PSNR dB", "SSIM", "alignment",
         "FD to original", "MACs ratio", "speed-up"],
        [[r_['calibration_prompts'], f"{r_['budget']:.0%}", r_['method'], f"{r_['removed_fraction_compressible']:.1%}",
          f"{r_['noise_sqnr_db']:.2f}", f"{r_['guidance_cosine']:.3f}", f"{r_['image_psnr_db']:.2f}", f"{r_['image_ssim']:.4f}",
          f"{r_['alignment_overall']:.3f} ± {r_['alignment_se']:.3f}", f"{r_['fd_to_original']:.3g}", f"{r_['macs_ratio']:.2f}",
          f"{r_['denoiser_speedup']:.2f}"] for r_ in rows])]
    if rows:
        lines += ["", f"Original model alignment on the same prompts: {rows[0]['alignment_original']:.3f}.", ""]
        lines += summary(rows)
        lines += baselines_text(r)
        lines += reading(rows)
    source = r.get("_source", f"benchmarks/results/{name}.json")
    lines += [f"![quality vs parameters](img/{name}_vs_params.png)", "", f"![quality vs latency](img/{name}_vs_latency.png)", "",
              f"Raw figures: `{source}`; re-render: `.venv/bin/python benchmarks/quality.py --render-only"
              + ("" if name == "quality" else f" --name {name}") + "`.", ""]
    return [(doc_path(name), title, "\n".join(lines))]


def draw(r: dict) -> list[Path]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, name = r["rows"], r["name"]
    img = IMG
    written = []
    for x_key, x_label, kind in (("params_total", "denoiser parameters", "params"), ("denoiser_ms", "denoiser latency (ms)", "latency")):
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for method in dict.fromkeys(row["method"] for row in rows):
            pts = sorted((row[x_key], row["noise_sqnr_db"], row["alignment_overall"]) for row in rows if row["method"] == method)
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], "o-", label=method)
        axes[0].set_ylabel("noise-prediction SQNR (dB)")
        axes[1].set_ylabel("alignment accuracy (overall)")
        for ax in axes:
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        path = img / f"{name}_vs_{kind}.png"
        write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def write_page(r: dict) -> None:
    write_sections(render(r))
    draw(r)


def interpolation_summary(table) -> dict | None:
    """The table's interpolation checks: units checked, units whose untimed widths a plan may use, the worst check."""
    checks = table.settings.get("interpolation")
    if checks is None:
        return None
    timed = [c for c in table.checked_curves() if not c.measured_as]  # one per distinct shape
    worst = max(checks, key=lambda c: abs(c["measured_ms"] / c["interpolated_ms"] - 1), default=None)
    return {"checked_units": len(timed), "trusted_units": sum(1 for c in timed if table.interpolates(c)),
            "checks": len(checks), "worst": worst}


def interpolation_text(summary: dict | None) -> str:
    """A sentence on a latency table's interpolation checks (``interpolation_summary``), or nothing."""
    from slimdiff.planning.latency import INTERPOLATION_TOLERANCE

    if not summary or not summary["checked_units"]:
        return ""
    w = summary["worst"]
    return (f" Interpolation between timed widths, checked at {summary['checks']} untimed widths of "
            f"{summary['checked_units']} shapes, held within {INTERPOLATION_TOLERANCE:.0%} of the unit's time on {summary['trusted_units']} (a plan may use their "
            f"untimed widths) and not on {summary['checked_units'] - summary['trusted_units']} (timed widths only); the "
            f"worst: `{w['unit']}` at width {w['width']}, {w['measured_ms']:.3g} ms measured against "
            f"{w['interpolated_ms']:.3g} ms interpolated.")


if __name__ == "__main__":
    raise SystemExit(main())
