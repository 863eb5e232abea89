"""What people read: a version's description, the changes against the champion, the run's Prefect summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flows.gate import GateDecision
from flows.reference_run import REFERENCE_DIR, ReferenceCheck
from flows.run_metrics import KEY_METRICS, headline_metrics
from flows.tracking_server import UI_URL_ENV
from slimdiff.pipeline.evaluation import flatten


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def changes_vs_champion(params: dict[str, Any], metrics: dict[str, float], champion) -> list[str]:
    """Markdown lines: the settings that differ from the champion's run and the key metrics side by side."""
    if champion is None:
        return ["- no champion yet: this is the first version measured against the gate"]
    version, run = champion
    if run is None:
        return [f"- champion: version {version.version} (its run is not available to compare)"]
    theirs = run.data.params
    changed = [f"`{k}` {theirs.get(k, '(unset)')} → {str(v)[:500]}" for k, v in flatten(params).items()
               if k in theirs and theirs[k] != str(v)[:500]]
    lines = [f"- vs champion (version {version.version}, run `{run.info.run_id}`): "
             + (f"settings changed: {'; '.join(changed[:12])}{' …' if len(changed) > 12 else ''}" if changed else "same settings")]
    for key in KEY_METRICS:
        if key in metrics and key in run.data.metrics:
            before, after = run.data.metrics[key], metrics[key]
            lines.append(f"  - {key}: {_number(before)} → {_number(after)} ({after - before:+.3g})")
    return lines


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s" if minutes else f"{seconds:.1f} s"


def describe(name: str, params: dict[str, Any], plan: dict[str, Any], metrics: dict[str, float], decision: "GateDecision",
             champion, durations: dict[str, float] | None, total: float | None, reference: "ReferenceCheck | None" = None) -> str:
    """The run's and the registered version's description (markdown): what was compressed how, the gate, and what
    changed against the champion."""
    from slimdiff.pipeline.report import budget_text

    alias = "champion" if decision.passed else "candidate"
    lines = [f"**{name}**: {budget_text(plan)}, allocator `{plan['allocator']}`; compressible parameters "
             f"{plan['params']['compressible_before']:,} → {plan['params']['compressible_after']:,}.",
             "", f"- gate → `{alias}`: {decision.reason}", *changes_vs_champion(params, metrics, champion)]
    if reference is not None:
        lines.append(f"- reference run ({REFERENCE_DIR}/): {reference}")
    if durations:
        times = ", ".join(f"{stage} {_duration(seconds)}" for stage, seconds in durations.items())
        lines.append(f"- job {_duration(total) if total else '?'}: {times}")
    return "\n".join(lines)


def summary_markdown(workspace: Path, params: dict[str, Any], result: dict[str, Any], durations: dict[str, float]) -> str:
    """The Prefect artifact of a compress run: the gate decision, the MLflow run and version, stage times and the
    headline metrics."""
    metrics = headline_metrics(json.loads((workspace / "outputs" / "metrics.json").read_text()))
    alias = "champion" if result["gate"] else "candidate"
    link = f"[{result['run_id']}]({result['run_url']})" if result.get("run_url") else f"`{result['run_id']}`"
    uri = result["tracking_uri"]
    if uri.startswith(("http://", "https://")) or os.environ.get(UI_URL_ENV, "").strip():
        where = f"tracking URI `{uri}`"
    else:  # a local database: the link works once `mlflow ui` runs on that address
        where = (f"open `mlflow ui --backend-store-uri {uri} --port 5000` first, or set `{UI_URL_ENV}` to the address "
                 f"where your MLflow UI runs")
    lines = [f"# {result['name']} version {result['version']} → `{alias}`", "",
             f"- gate: {result['reason']}",
             f"- MLflow run: {link} ({where})"
             + (" — unchanged: the existing version was reused" if result.get("reused") else ""),
             *([f"- all runs: [{result['experiment_url']}]({result['experiment_url']})"] if result.get("experiment_url") else []),
             *([f"- reference run: {result['reference']}"] if result.get("reference") else []),
             f"- serve it: `mlflow models serve -m models:/{result['name']}@{alias} --env-manager local -p 5001`",
             "", "| stage | ran | seconds |", "|---|---|---|"]
    ran = result.get("stages_run") or {}
    for stage, seconds in durations.items():
        lines.append(f"| {stage} | {'yes' if ran.get(stage) else 'up to date'} | {seconds:.1f} |")
    lines += ["", "| metric | value |", "|---|---|"]
    wanted = [k for k in KEY_METRICS if k in metrics] + [k for k in sorted(metrics) if k not in KEY_METRICS
                                                         and k.startswith(("fidelity.", "alignment.ratio", "latency.", "macs."))]
    lines += [f"| {k} | {_number(metrics[k])} |" for k in wanted]
    return "\n".join(lines) + "\n"
