"""The quality gate: the thresholds of ``params.yaml: gate`` against the run's metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from slimdiff.pipeline.evaluation import flatten


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (evaluate writes a NaN metric as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


NO_GATE = ("no gate: params.yaml has no gate thresholds, so nothing was checked and the version stays a candidate "
           "(add a gate section, e.g. gate.min_image_psnr_db, to promote versions to champion)")


def quality_gate(metrics: dict[str, Any], gate: dict[str, Any] | None) -> GateDecision:
    """Compare metrics with the thresholds in ``params.yaml: gate``; every threshold must hold.

    No gate section (or an empty one) promotes nothing: the version stays a candidate and the reason says why. A
    metric that is missing, null (NaN when measured) or not a number fails its threshold, naming the metric: the gate
    cannot pass on it, and the version stays a candidate. A threshold that is not a finite number is a settings error.
    """
    if not gate:
        return GateDecision(False, NO_GATE)
    flat = flatten(metrics)
    checks = {
        "min_alignment_ratio": ("alignment.ratio_to_original", lambda v, t: v >= t),
        "min_image_psnr_db": ("fidelity.image_psnr_db", lambda v, t: v >= t),
        "min_noise_sqnr_db": ("fidelity.noise_sqnr_db", lambda v, t: v >= t),
    }
    failures, passes = [], []
    for key, threshold in gate.items():
        if key not in checks:
            raise KeyError(f"unknown gate threshold {key!r}; known: {sorted(checks)}")
        metric, holds = checks[key]
        limit = _finite_number(threshold)
        if limit is None:
            raise ValueError(f"params.yaml gate.{key} must be a finite number, got {threshold!r}")
        value = _finite_number(flat.get(metric))
        if value is None:
            failures.append(f"metric {metric} is NaN/missing ({flat.get(metric, 'absent')!r}): the gate cannot pass")
            continue
        (passes if holds(value, limit) else failures).append(f"{metric}={value:.4g} vs {key}={threshold}")
    if failures:
        return GateDecision(False, "failed: " + "; ".join(failures))
    return GateDecision(True, "passed: " + "; ".join(passes))
