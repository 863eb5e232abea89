"""The committed reference run (``docs/reference-run/``) against this run's untimed metrics."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimdiff.pipeline.evaluation import flatten

# The committed reference run of the embedded default (docs/reference-run/): the job rewrites dvc.lock and the metric
# files in every run, so they are not tracked by git; this copy is, and every job compares its metrics with it.
REFERENCE_DIR = Path("docs") / "reference-run"


# params.yaml sections whose settings change what the stages compute
RESULT_SECTIONS = ("model", "curate", "sampler", "capture", "score", "allocate", "evaluate", "report")


# metrics that are measured times or derived from them (and the thread count): they differ between any two runs
TIMED_METRIC = re.compile(r"latency|_ms$|speedup|prediction_error|measured_fraction|predicted_fraction|upper_bound|threads")


@dataclass(frozen=True)
class ReferenceCheck:
    status: str  # "match" | "differs" | "not comparable" | "no reference"
    detail: str

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}"


def compare_with_reference(workspace: Path, params: dict[str, Any], metrics: dict[str, Any],
                           rtol: float = 1e-5, atol: float = 1e-9) -> ReferenceCheck:
    """This run's metrics against the committed reference run (``docs/reference-run/``), within ``rtol``/``atol``.

    Comparable when every result-affecting setting present in both ``params.yaml`` files is equal (a setting only
    one of them has is listed, not counted: new settings default to the old behaviour). Measured times are left
    out (``TIMED_METRIC``); a metric missing on either side is a difference. Floating-point sums differ slightly
    between machines (BLAS, thread count), which is why the outputs are not bit-reproducible and not committed.
    """
    folder = workspace / REFERENCE_DIR
    if not (folder / "metrics.json").is_file() or not (folder / "params.yaml").is_file():
        return ReferenceCheck("no reference", f"{REFERENCE_DIR}/ has no metrics.json and params.yaml in this workspace")
    reference_params = yaml.safe_load((folder / "params.yaml").read_text()) or {}
    mine = {k: v for k, v in flatten({s: params.get(s, {}) for s in RESULT_SECTIONS}).items()}
    theirs = {k: v for k, v in flatten({s: reference_params.get(s, {}) for s in RESULT_SECTIONS}).items()}
    differing = sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
    if differing:
        shown = ", ".join(f"{k} {theirs[k]!r} -> {mine[k]!r}" for k in differing[:5])
        return ReferenceCheck("not comparable", f"settings differ from the reference run's: {shown}"
                              + (f" (+{len(differing) - 5} more)" if len(differing) > 5 else ""))
    only = sorted(mine.keys() ^ theirs.keys())
    reference = json.loads((folder / "metrics.json").read_text())

    def numbers(tree: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in flatten(tree).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not TIMED_METRIC.search(k)}

    a, b = numbers(metrics), numbers(reference)
    missing = sorted(a.keys() ^ b.keys())
    worst, worst_key, off = 0.0, "", []
    for key in sorted(a.keys() & b.keys()):
        x, y = a[key], b[key]
        if math.isnan(x) and math.isnan(y):
            continue
        gap = abs(x - y)
        if not gap <= atol + rtol * abs(y):
            off.append(f"{key} {y:.6g} -> {x:.6g}")
        relative = gap / abs(y) if y else gap
        if relative > worst:
            worst, worst_key = relative, key
    settings_note = f"; settings only one side has: {', '.join(only)}" if only else ""
    if off or missing:
        parts = off[:5] + [f"{k} only on one side" for k in missing[:5]]
        return ReferenceCheck("differs", f"{len(off) + len(missing)} of {len(a.keys() | b.keys())} untimed metrics outside "
                              f"rtol {rtol:g}: {'; '.join(parts)}{settings_note}")
    return ReferenceCheck("match", f"{len(a)} untimed metrics within rtol {rtol:g} of {REFERENCE_DIR}/metrics.json "
                          f"(largest relative difference {worst:.1e}{f' in {worst_key}' if worst_key else ''}){settings_note}")
