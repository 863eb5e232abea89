"""Does re-training the reference model reproduce its metrics? Side-by-side evaluation of several
reference-model folders (e.g. the committed weights and a CPU re-run of the DVC training stages)
over several sampling seeds, with the committed evaluator and the same prompts.

The spread over sampling seeds, and the binomial standard error of each accuracy, is the noise a
difference between the models is judged against: a metric reproduces when the difference of the
means is within 2 standard errors (seed spread and binomial SE combined). Measuring writes
benchmarks/results/reference_repro.json (the rows, each model's training facts, the command, the machine and the
code version); rendering writes docs/reference-reproducibility.md and docs/img/reference_repro_loss.png from it alone.

    .venv/bin/python benchmarks/reference_repro.py --model committed=data/reference/model \
        --model cpu-rerun=/path/to/retrained/model --seeds 1234 1235 1236
    .venv/bin/python benchmarks/reference_repro.py --render-only
    .venv/bin/python benchmarks/reference_repro.py --from-csv benchmarks/results/reference_repro.csv \
        --train-stats cpu-rerun=data/reference/cpu_rerun_train_stats.json      # rows of an earlier run (CSV)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import provenance, read_results, relative, run_record, write_bytes, write_results, write_sections  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "reference_repro.json"
LEGACY_CSV = RESULTS.with_suffix(".csv")  # the rows of runs before results files recorded their command
DOC = ROOT / "docs" / "reference-reproducibility.md"
PLOT = ROOT / "docs" / "img" / "reference_repro_loss.png"
TITLE = "# Reference model: does re-training reproduce it?"
REFERENCE_PARAMS = ROOT / "data" / "reference" / "params.yaml"  # slimdiff.reference.REFERENCE_DIR / "params.yaml"
# The training facts of a model whose folder is gone, for rows in the CSV of an earlier run (the committed page was
# rendered with these; commit b87cd67)
LEGACY_TRAIN_STATS = {"cpu-rerun": ROOT / "data" / "reference" / "cpu_rerun_train_stats.json"}
# what the page of the run that wrote the CSV recorded (commit 7889418; the CSV itself has no command or machine)
LEGACY_RUN = {"command": ".venv/bin/python benchmarks/reference_repro.py --model committed-gpu=data/reference/model "
                         "--model cpu-rerun=/work/repro/data/reference/model --seeds 1234 1235 1236",
              "recorded_machine": "x86_64 CPU, 2 cores, torch 2.13.0+cpu (as the page of that run recorded it, commit "
                                  "7889418; the CSV has no machine or code version)",
              "date": "2026-11-26"}

# (column, group, attribute): accuracies read from metrics["reference_alignment"].
ACCURACIES = [
    ("single_colour", "single", "colour"),
    ("single_shape", "single", "shape"),
    ("single_overall", "single", "overall"),
    ("two_overall", "two", "overall"),
    ("heldout_shape", "heldout", "shape"),
    ("heldout_overall", "heldout", "overall"),
]
FD_COLUMN = "fd_shapes_model_vs_real"


def parse_model(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--model {spec!r}: expected NAME=FOLDER, e.g. committed=data/reference/model")
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"--model {spec!r}: {folder} holds no diffusers pipeline (model_index.json)")
    return name, folder


def parse_stats(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--train-stats {spec!r}: expected NAME=FILE with an existing train_stats.json")
    return name, Path(path)


def measure(models: list[tuple[str, Path]], seeds: list[int], params: dict, dataset: Path | None,
            evaluator_dir: Path | None) -> list[dict]:
    import torch

    from slimdiff.reference import load_reference_pipeline
    from slimdiff.reference.data import load_split, make_split
    from slimdiff.reference.evaluator import FD_NAME, load_evaluator
    from slimdiff.reference.metrics import EvaluateConfig, evaluate_reference

    sizes = params.get("data", {}).get("sizes", {})
    splits = {name: load_split(dataset, name) if dataset else make_split(name, params["seed"], sizes.get(name))
              for name in ("test", "heldout")}
    evaluator = load_evaluator(evaluator_dir)
    base = EvaluateConfig(**params.get("evaluate", {}))
    rows = []
    for name, folder in models:
        pipe = load_reference_pipeline("cpu", folder)
        for seed in seeds:
            config = EvaluateConfig(**{**base.__dict__, "seed": seed})
            start = time.time()
            metrics, _, _ = evaluate_reference(pipe, evaluator, splits, config)
            row = {"model": name, "folder": str(folder), "seed": seed}
            counts = {"single": config.n_single, "two": config.n_two, "heldout": config.n_heldout}
            for column, group, attribute in ACCURACIES:
                row[column] = metrics["reference_alignment"][group][attribute]
                row[f"{column}_n"] = counts[group]
            row[FD_COLUMN] = metrics[FD_NAME]["model_vs_real"]
            row["fd_shapes_real_vs_real"] = metrics[FD_NAME]["real_vs_real"]
            row["seconds"] = round(time.time() - start, 1)
            row["threads"] = torch.get_num_threads()
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def read_rows(path: Path) -> list[dict]:
    """Rows of a saved CSV with numbers parsed back."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key, value in row.items():
            if key not in ("model", "folder"):
                row[key] = float(value) if "." in value or "e" in value else int(value)
    return rows


def summarise(rows: list[dict], column: str, name: str) -> tuple[float, float]:
    """Mean over seeds and its standard error (seed spread; for accuracies at least the binomial SE)."""
    values = np.array([r[column] for r in rows if r["model"] == name], dtype=float)
    mean = float(values.mean())
    se_seeds = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    if column == FD_COLUMN:
        return mean, se_seeds
    n = next(r[f"{column}_n"] for r in rows if r["model"] == name)
    # Binomial SE of a mean over len(values) runs of n prompts; floored at one error in n*runs so a
    # perfect score does not claim zero noise.
    p = min(max(mean, 1 / (n * len(values))), 1 - 1 / (n * len(values)))
    se_binomial = math.sqrt(p * (1 - p) / (n * len(values)))
    return mean, max(se_seeds, se_binomial)


def train_stats_of(models: list[tuple[str, Path]], given: dict[str, Path]) -> dict[str, dict | None]:
    """Each model's training facts: the file ``given`` names for it, else its folder's train_stats.json, else None."""
    out = {}
    for name, folder in models:
        path = Path(given.get(name, Path(folder) / "train_stats.json"))
        out[name] = json.loads(path.read_text()) if path.is_file() else None
    return out


# ---- rendering: from the results file alone -----------------------------------------------------------------------


def from_rows(rows: list[dict], train_stats: dict[str, Path], source: str, run: dict | None = None) -> dict:
    """Results from the CSV rows of an earlier run (the CSV records no command, machine or code version; ``run``:
    what that run's page recorded of them)."""
    models = list(dict.fromkeys((r["model"], r["folder"]) for r in rows))
    return {**(run or {}), "rows": rows, "models": [list(m) for m in models], "seeds": sorted({r["seed"] for r in rows}),
            "train_stats": train_stats_of([(n, Path(f) if Path(f).is_absolute() else ROOT / f) for n, f in models],
                                          train_stats),
            "seconds": sum(r["seconds"] for r in rows), "_source": source}


def load(path: Path = RESULTS) -> dict | None:
    """The results file, or the CSV rows of an earlier run beside it (with ``LEGACY_TRAIN_STATS``)."""
    path = Path(path)
    if path.is_file():
        return read_results(path)
    if path.with_suffix(".csv").is_file():
        return from_rows(read_rows(path.with_suffix(".csv")), LEGACY_TRAIN_STATS, relative(path.with_suffix(".csv")),
                         LEGACY_RUN)
    return None


def training_table(results: dict) -> list[str]:
    lines = ["| model | device | torch | VAE s | VAE val MAE (/255) | UNet s | UNet steps | final loss (mean of last 5 logs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, _ in results["models"]:
        stats = results["train_stats"].get(name)
        if stats is None:
            lines.append(f"| {name} | (no train_stats.json) | | | | | | |")
            continue
        device = stats.get("gpu") or stats.get("device", "?")
        log = np.array(stats.get("loss_log") or [[0, float("nan")]], dtype=float)
        lines.append(f"| {name} | {device} | {stats.get('torch', '?')} | {stats.get('vae_seconds', '?')} | "
                     f"{stats.get('vae_val_mae_255', '?')} | {stats.get('unet_seconds', '?')} | {stats.get('unet_steps', '?')} | "
                     f"{log[-5:, 1].mean():.4f} |")
    return [*lines, "", f"![UNet training loss of each model](img/{PLOT.name})"]


def draw(results: dict, path: Path = PLOT) -> list[Path]:
    """The loss curves side by side, from the training facts in the results."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, _ in results["models"]:
        stats = results["train_stats"].get(name)
        if stats is None:
            continue
        log = np.array(stats.get("loss_log") or [[0, float("nan")]], dtype=float)
        ax.plot(log[:, 0], log[:, 1], label=f"{name} ({stats.get('gpu') or stats.get('device', '?')})")
    ax.set_xlabel("UNet training step")
    ax.set_ylabel("running loss (v-pred., min-SNR)")
    ax.set_title("UNet + text encoder training, same seed and config")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())
    return [path]


def render(results: dict) -> list[tuple[Path, str, str]]:
    rows = results["rows"]
    models = [(n, f) for n, f in results["models"]]
    names = [name for name, _ in models]
    reference, others = names[0], names[1:]
    columns = [c for c, _, _ in ACCURACIES] + [FD_COLUMN]
    header = "| metric | " + " | ".join(f"{n} (mean ± SE)" for n in names)
    header += "".join(f" | {o} − {reference} | within 2 SE" for o in others) + " |"
    lines = [header, "|" + "---|" * (1 + len(names) + 2 * len(others))]
    for column in columns:
        stats = {n: summarise(rows, column, n) for n in names}
        digits = 1 if column == FD_COLUMN else 3
        cells = [f"{stats[n][0]:.{digits}f} ± {stats[n][1]:.{digits}f}" for n in names]
        for o in others:
            diff = stats[o][0] - stats[reference][0]
            se = math.hypot(stats[o][1], stats[reference][1])
            ok = abs(diff) <= 2 * se
            distance = f"{abs(diff) / se:.1f} SE" if se > 0 else "identical" if diff == 0 else "SE 0"
            cells += [f"{diff:+.{digits}f}", f"yes ({distance})" if ok else f"**no** ({distance})"]
        lines.append(f"| {column} | " + " | ".join(cells) + " |")
    real = np.mean([r["fd_shapes_real_vs_real"] for r in rows])
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in rows}))
    params = results.get("params", "data/reference/params.yaml")
    doc = [
        TITLE,
        "",
        "Generated by `benchmarks/reference_repro.py`; do not edit by hand. Raw rows: "
        f"`{results.get('_source', relative(RESULTS))}`.",
        "",
        "Models compared (first is the reference): " + ", ".join(f"`{n}` = `{p}`" for n, p in models) + ". "
        "A folder outside the repository is a local re-training output and is not committed; "
        "its training facts are in the table at the end.",
        f"Sampling seeds: {', '.join(str(s) for s in results['seeds'])}; the same prompts, sampler and committed evaluator "
        f"for every model (the `evaluate` section of `{params}`).",
        "",
        "SE: the larger of the seed-to-seed standard error and the binomial standard error of the accuracy "
        "(for FD-shapes, seed-to-seed only). A difference counts as reproduced when it is within 2 SE, where SE "
        "combines both models' SE. The noise of training itself (another training seed) is not measured here, "
        "so this rule is, if anything, strict. The binomial SE counts prompts; `heldout_shape` is scored per object "
        "(some held-out prompts have two), so its binomial SE is slightly generous.",
        "",
        *lines,
        "",
        f"FD-shapes between two real image sets of the same size: {real:.1f} (lower is closer to real images).",
        "",
        "## Training runs",
        "",
        *training_table(results),
        "",
        *provenance(results, results.get("recorded_machine"), settings={"seeds": " ".join(map(str, results["seeds"]))}),
        f"{threads} torch thread(s); {results['seconds'] / 60:.1f} min for {len(rows)} evaluations. Re-render: "
        "`.venv/bin/python benchmarks/reference_repro.py --render-only`.",
        "",
    ]
    return [(DOC, TITLE, "\n".join(doc))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", dest="models", type=parse_model, action="append", default=[],
                        help="NAME=FOLDER of a reference-model pipeline; give two or more, the first is the reference")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    parser.add_argument("--params", type=Path, default=REFERENCE_PARAMS)
    parser.add_argument("--dataset", type=Path, default=REFERENCE_PARAMS.parent / "dataset",
                        help="dataset folder of the DVC `dataset` stage (generated from the seed if missing)")
    parser.add_argument("--evaluator", type=Path, default=None, help="evaluator folder (default: the committed one)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--train-stats", type=parse_stats, action="append", default=[],
                        help="NAME=FILE: training facts of a model whose folder is gone or elsewhere "
                             "(e.g. cpu-rerun=data/reference/cpu_rerun_train_stats.json)")
    parser.add_argument("--render-only", action="store_true", help="rewrite the page from the results file without evaluating")
    parser.add_argument("--from-csv", type=Path, default=None,
                        help="rewrite the page from the CSV rows of an earlier run without evaluating")
    args = parser.parse_args(argv)
    if args.render_only:
        results = load(RESULTS)
        if results is None:
            parser.error(f"{relative(RESULTS)}: no results file (nor {LEGACY_CSV.name}); run the benchmark first")
        write_page(results)
        return 0
    if args.from_csv:
        if not args.from_csv.is_file():
            parser.error(f"--from-csv {args.from_csv}: no such file (earlier runs wrote benchmarks/results/reference_repro.csv)")
        write_page(from_rows(read_rows(args.from_csv), dict(args.train_stats), relative(args.from_csv)))
        return 0
    if len(args.models) < 2:
        parser.error("give at least two --model NAME=FOLDER to compare")
    if len({n for n, _ in args.models}) != len(args.models):
        parser.error("--model names must be unique")
    import yaml

    from slimdiff.device import apply_threads

    apply_threads(args.threads)
    record = run_record(__file__, argv)
    params = yaml.safe_load(args.params.read_text())
    dataset = args.dataset if args.dataset.is_dir() else None
    start = time.time()
    rows = measure(args.models, args.seeds, params, dataset, args.evaluator)
    results = {**record, "models": [[n, str(p)] for n, p in args.models], "seeds": list(args.seeds),
               "params": relative(args.params), "train_stats": train_stats_of(args.models, dict(args.train_stats)),
               "seconds": time.time() - start, "rows": rows}
    write_results(RESULTS, results)
    print(f"wrote {relative(RESULTS)}")
    write_page(read_results(RESULTS))
    return 0


def write_page(results: dict) -> None:
    write_sections(render(results))
    draw(results)
    names = [n for n, _ in results["models"]]
    failed = []
    for column in [c for c, _, _ in ACCURACIES] + [FD_COLUMN]:
        ref = summarise(results["rows"], column, names[0])
        for other in names[1:]:
            mine = summarise(results["rows"], column, other)
            if abs(mine[0] - ref[0]) > 2 * math.hypot(mine[1], ref[1]):
                failed.append(f"{column} ({other})")
    print(f"wrote {relative(DOC)}; " + (f"outside 2 SE: {', '.join(failed)}" if failed else "all within 2 SE"))


if __name__ == "__main__":
    raise SystemExit(main())
