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

    Each metric is taken at its worst over the calibration sampler and every held-out sampler (``metrics["worst"]``,
    written by the evaluate stage when ``evaluate.samplers`` are set), and the reason names the sampler. No gate
    section (or an empty one) promotes nothing: the version stays a candidate and the reason says why. A metric that
    is missing, null (NaN when measured) or not a number, under any sampler, fails its threshold, naming the metric:
    the gate cannot pass on it, and the version stays a candidate. A threshold that is not a finite number is a
    settings error.
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
        value, where = _finite_number(flat.get(metric)), ""
        if value is None:
            failures.append(f"metric {metric} is NaN/missing ({flat.get(metric, 'absent')!r}): the gate cannot pass")
            continue
        for name, entry in (metrics.get("held_out") or {}).items():
            other = flatten(entry).get(metric, "absent")
            if _finite_number(other) is None:
                failures.append(f"metric {metric} is NaN/missing under held-out sampler {name} ({other!r}): the gate "
                                "cannot pass")
                value = None
                break
        if value is None:
            continue
        worst = (metrics.get("worst") or {}).get(metric)
        if isinstance(worst, dict) and _finite_number(worst.get("value")) is not None:
            value, where = float(worst["value"]), f" (worst sampler: {worst.get('sampler')})"
        (passes if holds(value, limit) else failures).append(f"{metric}={value:.4g}{where} vs {key}={threshold}")
    if failures:
        return GateDecision(False, "failed: " + "; ".join(failures))
    return GateDecision(True, "passed: " + "; ".join(passes))
