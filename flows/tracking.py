"""MLflow tracking and registry for compressed models: runs, lineage, aliases, the quality gate.

Plain functions (no Prefect): the flows call them inside tasks. Tracking defaults to a SQLite file
and an artifact folder inside the workspace; ``MLFLOW_TRACKING_URI`` points at a team server.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimdiff.utils import flatten

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI and why."""


def tracking_uri(workspace: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a SQLite database in the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(workspace / 'mlflow.db').resolve()}"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any stage runs, when the tracking URI cannot be reached or written."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise TrackingError(f"tracking server {uri} answered /health with HTTP {response.status}")
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise TrackingError(f"tracking server {uri} is unreachable ({reason})") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingError(f"tracking database folder {folder} does not exist or is not writable")
    elif uri.startswith("file:") or "://" not in uri:
        return
    else:
        raise TrackingError(f"unsupported tracking URI {uri!r}: use http(s)://, sqlite:/// or a local path")


def registered_name(params: dict[str, Any]) -> str:
    """Registry name derived from the base model: ``<prefix>-<model id>`` with unsafe characters replaced."""
    base = str(params["model"].get("id") or Path(params["model"]["path"]).name)
    return f"{params['mlflow']['registered_model_prefix']}-{re.sub(r'[^A-Za-z0-9._-]+', '-', base).strip('-')}"


def stage_hashes(lock_path: Path) -> dict[str, str]:
    """One hash per stage of ``dvc.lock``: sha256 of the stage's canonical lock entry (cmd, deps, params, outs)."""
    if not lock_path.is_file():
        raise FileNotFoundError(f"{lock_path} not found; run the DVC stages first")
    lock = yaml.safe_load(lock_path.read_text()) or {}
    return {
        name: hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()
        for name, entry in (lock.get("stages") or {}).items()
    }


def git_commit(workspace: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=workspace,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def folder_hash(folder: Path) -> str:
    """sha256 over every file's relative path and bytes: the content hash of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reason: str


def quality_gate(metrics: dict[str, Any], gate: dict[str, Any]) -> GateDecision:
    """Compare metrics with the thresholds in ``params.yaml: gate``; every threshold must hold."""
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
        if metric not in flat:
            failures.append(f"{metric} missing from metrics")
            continue
        value = float(flat[metric])
        (passes if holds(value, float(threshold)) else failures).append(f"{metric}={value:.4g} vs {key}={threshold}")
    if failures:
        return GateDecision(False, "failed: " + "; ".join(failures))
    return GateDecision(True, "passed: " + "; ".join(passes) if passes else "passed: no thresholds set")


def log_compression(workspace: Path, params: dict[str, Any], checkpoint_hash: str, stages_run: dict[str, bool]) -> dict[str, Any]:
    """Log one MLflow run for the workspace's current outputs and register the compressed model.

    Returns run id, registered name, version, and the gate decision.
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from slimdiff.evaluate import flatten_metrics

    outputs = workspace / "outputs"
    uri = tracking_uri(workspace)
    mlflow.set_tracking_uri(uri)
    name = registered_name(params)
    lineage = stage_hashes(workspace / "dvc.lock")
    existing = _version_with_lineage(name, lineage, checkpoint_hash)
    if existing is not None:
        # nothing changed since that version was registered: a re-run registers nothing new
        return {"run_id": existing.run_id, "name": name, "version": str(existing.version), "reused": True,
                "gate": existing.tags.get("gate.decision") == "champion", "reason": existing.tags.get("gate.reason", ""),
                "tracking_uri": uri}
    experiment = params["mlflow"]["experiment"]
    if mlflow.get_experiment_by_name(experiment) is None:
        location = (workspace / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    metrics = json.loads((outputs / "metrics.json").read_text())
    plan = json.loads((outputs / "plan" / "width_plan.json").read_text())
    slimset_stats = json.loads((outputs / "slimset" / "slimset_stats.json").read_text())
    decision = quality_gate(metrics, params.get("gate", {}))
    tags = {f"lineage.{stage}": value for stage, value in lineage.items()}
    tags.update({
        "git.commit": git_commit(workspace),
        "checkpoint_hash": checkpoint_hash,
        "base_model": str(params["model"].get("id", "")),
        "gate.decision": "champion" if decision.passed else "candidate",
        "gate.reason": decision.reason,
        "stages_run": ",".join(s for s, ran in stages_run.items() if ran) or "none",
    })
    with mlflow.start_run(run_name=f"{name}-b{params['allocate']['budget']}") as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        mlflow.log_metrics({re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in flatten_metrics(metrics).items()})
        slimset = pd.read_json(outputs / "slimset" / "slimset.jsonl", lines=True)
        dataset = mlflow.data.from_pandas(slimset, source=str((outputs / "slimset" / "slimset.jsonl").resolve()), name="slimset",
                                          digest=str(slimset_stats.get("digest", ""))[:36])
        mlflow.log_input(dataset, context="calibration")
        mlflow.set_tags(tags)
        mlflow.log_dict(plan, "width_plan.json")
        mlflow.log_dict(metrics, "metrics.json")
        mlflow.log_artifact(str(outputs / "plan" / "width_plan.png"))
        mlflow.log_artifacts(str(outputs / "report"), artifact_path="report")
        mlflow.log_artifact(str(workspace / "dvc.lock"))
        model_info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"pipeline": str(outputs / "model")},
            pip_requirements=["slimdiff", "torch", "diffusers", "transformers", "safetensors"],
            registered_model_name=name,
        )
    client = MlflowClient()
    version = str(model_info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "candidate", version)
    if decision.passed:
        client.set_registered_model_alias(name, "champion", version)
    return {"run_id": run.info.run_id, "name": name, "version": version, "reused": False, "gate": decision.passed,
            "reason": decision.reason, "tracking_uri": uri}


def _version_with_lineage(name: str, lineage: dict[str, str], checkpoint_hash: str):
    """A registered version whose stage hashes and checkpoint hash all equal these, if any."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient().search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in versions:
        tags = version.tags
        if tags.get("checkpoint_hash") == checkpoint_hash and all(tags.get(f"lineage.{k}") == v for k, v in lineage.items()):
            return version
    return None


def registered_checkpoint_hashes(workspace: Path, params: dict[str, Any]) -> set[str]:
    """Checkpoint hashes already recorded on registered versions of this model."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(workspace))
    try:
        versions = MlflowClient().search_model_versions(f"name='{registered_name(params)}'")
    except MlflowException:
        return set()
    return {v.tags.get("checkpoint_hash") for v in versions if v.tags.get("checkpoint_hash")}
