"""Which metrics a run logs as MLflow metrics, which as measurement settings, which as tables."""

from __future__ import annotations

import math
import re
from typing import Any

from slimdiff.pipeline.evaluation import flatten

# Headline metrics stay MLflow metrics; per-group parameter counts, per-bucket breakdowns and the evaluation's
# settings go to logged tables / the metrics.json artifact instead of one single-bar chart each.
_NOT_HEADLINE = re.compile(r"^(params\.(original|compressed)\.groups\.|settings\.|held_out\.)|_by_bucket\.")


# numbers of metrics.json that are how a measurement was taken, not results: logged as params ``measured_with.<key>``
_MEASUREMENT_SETTING = re.compile(r"(^|\.)(repeats|warmup|threads|batch|prompts|num_prompts)$|_kernel_size$")


# metrics.json keys that repeat another key's value under a second name: only the first of each pair is logged
# (while the two are equal; should they ever differ, both are)
DUPLICATE_METRICS = {
    "latency.denoiser.speedup": "latency.denoiser_speedup",
    "latency.macs_ratio": "macs.ratio",
    "plan.compressible_before": "params.original.compressible",
    "plan.compressible_after": "params.compressed.compressible",
    "plan.removed": "params.removed",
    "params.removed_compressible": "params.removed",
    "params.removed_fraction_of_compressible": "plan.removed_fraction",
    "plan.predicted_latency_fraction": "latency.predicted_fraction",
}


# the metrics a version description compares with the champion's
KEY_METRICS = ("plan.removed_fraction", "params.removed_fraction_of_total", "fidelity.image_psnr_db", "fidelity.noise_sqnr_db",
               "alignment.ratio_to_original", "frechet_distance_to_original", "latency.denoiser_speedup", "macs.ratio")


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and not _NOT_HEADLINE.search(k)}


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The metrics logged as MLflow metrics: every finite number of ``metrics.json`` except per-group parameter
    counts, per-timestep-bucket breakdowns and the evaluation settings (those are :func:`metric_tables`), the
    measurement settings (:func:`measurement_settings`: params) and the second name of a duplicated value
    (:data:`DUPLICATE_METRICS`)."""
    numbers = _numbers(metrics)
    return {k: v for k, v in numbers.items() if not _MEASUREMENT_SETTING.search(k)
            and not (k in DUPLICATE_METRICS and numbers.get(DUPLICATE_METRICS[k]) == v)}


def measurement_settings(metrics: dict[str, Any]) -> dict[str, str]:
    """How the metrics were measured (repeats, warm-up runs, threads, batch, prompts, the SSIM kernel): logged as
    params ``measured_with.<metrics.json key>``, not as metrics."""
    return {f"measured_with.{k}": f"{v:g}" for k, v in _numbers(metrics).items() if _MEASUREMENT_SETTING.search(k)}


def metric_tables(metrics: dict[str, Any]) -> dict[str, Any]:
    """``{artifact file: DataFrame}``: parameters by group (original, compressed, kept fraction), every
    ``*_by_bucket`` metric by timestep bucket, and the fidelity and alignment under each held-out sampler beside the
    calibration sampler's."""
    import pandas as pd

    tables: dict[str, Any] = {}
    params = metrics.get("params") or {}
    original, compressed = (params.get("original") or {}).get("groups") or {}, (params.get("compressed") or {}).get("groups") or {}
    if original:
        rows = [{"group": g, "kind": g.rsplit(".", 1)[-1], "params_original": int(n), "params_compressed": int(compressed.get(g, n)),
                 "kept_fraction": (compressed.get(g, n) / n) if n else None} for g, n in original.items()]
        tables["tables/params_by_group.json"] = pd.DataFrame(rows)
    buckets: dict[str, dict[str, Any]] = {}
    for key, value in flatten(metrics).items():
        match = re.match(r"^(.+)_by_bucket\.(.+)$", key)
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            # a dotted column name is read as a nested field by MLflow's table view (every cell blank): underscores
            buckets.setdefault(match.group(2), {"bucket": match.group(2)})[match.group(1).replace(".", "_")] = value
    if buckets:
        tables["tables/metrics_by_bucket.json"] = pd.DataFrame(list(buckets.values()))
    held_out = metrics.get("held_out") or {}
    if held_out:  # one row per sampler; the worst of each gated metric stays a headline metric (worst.*)
        def row(name: str, entry: dict[str, Any]) -> dict[str, Any]:
            values = {k.replace(".", "_"): v for k, v in flatten(entry).items()
                      if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
            return {"sampler": name, **values}

        calibration = {k: metrics[k] for k in ("fidelity", "alignment") if k in metrics}
        tables["tables/held_out_samplers.json"] = pd.DataFrame(
            [row("calibration sampler", calibration), *(row(n, e) for n, e in held_out.items())])
    return tables


def stage_resources(outputs) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, table rows) of each stage's measured peak memory (``outputs/.resources/<stage>.json``, written by the
    stage process that made its current outputs) beside the job's prediction (``outputs/memory_prediction.json``):
    ``resources.<stage>.peak_host_gib`` and ``predicted_host_gib``, the device's where either is non-zero. A stage
    without a record (never run in this workspace) has no row."""
    import json
    from pathlib import Path

    outputs = Path(outputs)
    try:
        predicted = json.loads((outputs / "memory_prediction.json").read_text()).get("stages", {})
    except (OSError, json.JSONDecodeError):
        predicted = {}
    gib = 2.0**30
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []
    for path in sorted((outputs / ".resources").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        stage = str(record.get("stage", path.stem))
        expected = predicted.get(stage, {})
        row = {"stage": stage, "seconds": record.get("seconds"),
               "peak_host_gib": record.get("peak_host_bytes", 0) / gib,
               "predicted_host_gib": expected.get("host_bytes", 0) / gib if expected else None,
               "peak_device_gib": record.get("peak_device_bytes", 0) / gib,
               "predicted_device_gib": expected.get("device_bytes", 0) / gib if expected else None}
        rows.append(row)
        for key in ("peak_host_gib", "predicted_host_gib", "peak_device_gib", "predicted_device_gib"):
            value = row[key]
            if value is not None and (value > 0 or key.endswith("host_gib")):
                metrics[f"resources.{stage}.{key}"] = round(float(value), 4)
    return metrics, rows
