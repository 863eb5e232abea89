"""MLflow tracking and registry for compressed models: runs, lineage, aliases, the quality gate.

Plain functions (no Prefect): the flows call them inside tasks. Tracking defaults to a SQLite file
and an artifact folder inside the workspace; ``MLFLOW_TRACKING_URI`` points at a team server.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slimdiff.utils import flatten

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


class TrackingError(RuntimeError):
    """The tracking server cannot be used; the message names the URI and why."""


# Version tag that makes registration restartable: a version is created with all its tags and
# "pending" in one request, and marked "complete" once its aliases are set. A retry that finds its
# lineage on a "pending" version finishes that version instead of registering a second one.
REGISTRATION_TAG = "registration"


@contextmanager
def _tracking_step(uri: str, step: str):
    """Turn an MLflow or connection error during ``step`` into a one-line ``TrackingError`` naming the server.

    Not a silent fallback: the job fails. The outputs stay in the workspace and a re-run retries the
    tracking alone (every stage is up to date); a version this try registered is completed, not duplicated.
    """
    import requests
    from mlflow.exceptions import MlflowException

    try:
        yield
    except TrackingError:
        raise
    except (MlflowException, requests.RequestException) as error:
        reason, unreachable = _failure_reason(error)
        retry = "re-run when the server answers" if unreachable else "re-run to retry"
        raise TrackingError(f"tracking server {uri}: {step} failed ({reason}); the outputs are kept: {retry} "
                            f"(nothing is registered twice)") from None


def _failure_reason(error: BaseException) -> tuple[str, bool]:
    """(the reason of an MLflow client error in a few words, whether the server did not answer). For a server that
    does not answer: the request and the connection error (MLflow's own message repeats the URL three times);
    else MLflow's first line."""
    import requests

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, requests.ConnectionError):
            request = getattr(cause, "request", None)
            inner = cause.args[0] if cause.args else cause
            inner = getattr(inner, "reason", inner)  # urllib3's MaxRetryError holds the socket-level reason
            where = f" to {request.method} {request.path_url.split('?')[0]}" if request is not None else ""
            return f"no answer{where}: {inner}", True
        cause = cause.__cause__ or cause.__context__
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return (message if len(message) <= 300 else message[:300] + "..."), False


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
    """The workspace's commit (``-dirty`` with uncommitted changes to tracked files), or ``unknown (<why>)``.

    Not an error: a workspace outside git (a release archive, a container) is a legitimate place to run,
    and the ``lineage.*`` tags (dvc.lock hashes, which cover the code each stage ran) still pin the code.
    An auditor sees why the commit is missing instead of a bare "unknown".
    """
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=workspace,
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except FileNotFoundError:  # no git executable
        return "unknown (git is not installed)"
    except subprocess.CalledProcessError as error:  # not a repository, or a repository without a commit yet
        reason = (error.stderr or "").strip().splitlines()
        return f"unknown ({' '.join(map(str, error.cmd))} failed in {workspace}: {reason[0] if reason else f'exit {error.returncode}'})"


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


def _finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None (evaluate writes a NaN metric as null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def quality_gate(metrics: dict[str, Any], gate: dict[str, Any]) -> GateDecision:
    """Compare metrics with the thresholds in ``params.yaml: gate``; every threshold must hold.

    A metric that is missing, null (NaN when measured) or not a number fails its threshold, naming the
    metric: the gate cannot pass on it, and the version stays a candidate. A threshold that is not a
    finite number is a settings error.
    """
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
    with _tracking_step(uri, f"looking up the registered versions of {name!r}"):
        existing = _version_with_lineage(name, lineage, checkpoint_hash)
    if existing is not None:
        # nothing changed since that version was registered: a re-run registers nothing new
        passed = existing.tags.get("gate.decision") == "champion"
        if existing.tags.get(REGISTRATION_TAG) == "pending":
            # an earlier try registered it and stopped before its aliases (server gone, job killed): finish it
            with _tracking_step(uri, f"setting the aliases of {name!r} version {existing.version}"):
                _complete_registration(MlflowClient(), name, str(existing.version), passed)
        return {"run_id": existing.run_id, "name": name, "version": str(existing.version), "reused": True,
                "gate": passed, "reason": existing.tags.get("gate.reason", ""), "tracking_uri": uri}
    experiment = params["mlflow"]["experiment"]
    with _tracking_step(uri, f"opening experiment {experiment!r}"):
        if mlflow.get_experiment_by_name(experiment) is None:
            location = (workspace / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            mlflow.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    metrics = json.loads((outputs / "metrics.json").read_text())
    plan = json.loads((outputs / "plan" / "width_plan.json").read_text())
    stats_path = outputs / "slimset" / "slimset_stats.json"
    slimset_stats = json.loads(stats_path.read_text())
    if not slimset_stats.get("digest"):  # the dataset input's digest is the calibration set's lineage: never blank
        raise ValueError(f"{stats_path} has no digest of the SlimSet; re-run the curate stage")
    # no gate section: the version is promoted with the recorded reason "passed: no thresholds set"
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
    slimset = pd.read_json(outputs / "slimset" / "slimset.jsonl", lines=True)
    with _tracking_step(uri, "logging the run"), mlflow.start_run(run_name=f"{name}-b{params['allocate']['budget']}") as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        mlflow.log_metrics({re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k): v for k, v in flatten_metrics(metrics).items()})
        dataset = mlflow.data.from_pandas(slimset, source=str((outputs / "slimset" / "slimset.jsonl").resolve()), name="slimset",
                                          digest=str(slimset_stats["digest"])[:36])
        mlflow.log_input(dataset, context="calibration")
        mlflow.set_tags(tags)
        mlflow.log_dict(plan, "width_plan.json")
        mlflow.log_dict(metrics, "metrics.json")
        mlflow.log_artifact(str(outputs / "plan" / "width_plan.png"))
        mlflow.log_artifacts(str(outputs / "report"), artifact_path="report")
        mlflow.log_artifact(str(workspace / "dvc.lock"))
        # logged, not yet registered: the version is created below with its lineage in the same request
        model_info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"pipeline": str(outputs / "model")},
            pip_requirements=["slimdiff", "torch", "diffusers", "transformers", "safetensors"],
        )
    # One request creates the version with every tag: a try that stops after it leaves a version that the
    # next try recognises by its lineage (and completes), never an untagged one that it would register again.
    with _tracking_step(uri, f"registering {name!r}"):
        version = str(mlflow.register_model(model_info.model_uri, name, tags={**tags, REGISTRATION_TAG: "pending"}).version)
    with _tracking_step(uri, f"setting the aliases of {name!r} version {version}"):
        _complete_registration(MlflowClient(), name, version, decision.passed)
    return {"run_id": run.info.run_id, "name": name, "version": version, "reused": False, "gate": decision.passed,
            "reason": decision.reason, "tracking_uri": uri}


def _complete_registration(client, name: str, version: str, passed: bool) -> None:
    """Aliases of a newly registered version (``candidate``; ``champion`` when the gate passed), then the mark
    that registration is complete. Each call is idempotent, so a retry may repeat any of them."""
    client.set_registered_model_alias(name, "candidate", version)
    if passed:
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, REGISTRATION_TAG, "complete")


def registered_versions(name: str) -> list:
    """Every registered version of ``name`` at the current tracking URI; none only when the model is not
    registered yet. Any other registry error (server down, permission, bad answer) is a one-line
    ``TrackingError``: "no versions" would register a duplicate or recompress a known checkpoint."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return list(MlflowClient().search_model_versions(f"name='{name}'"))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":  # the one answer that means "no versions"
            return []
        message = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise TrackingError(f"tracking server {mlflow.get_tracking_uri()}: cannot list the versions of {name!r} "
                            f"({error.error_code}: {message})") from None


def _version_with_lineage(name: str, lineage: dict[str, str], checkpoint_hash: str):
    """A registered version whose stage hashes and checkpoint hash all equal these, if any."""
    for version in registered_versions(name):
        tags = version.tags
        if tags.get("checkpoint_hash") == checkpoint_hash and all(tags.get(f"lineage.{k}") == v for k, v in lineage.items()):
            return version
    return None


def registered_checkpoint_hashes(workspace: Path, params: dict[str, Any]) -> set[str]:
    """Checkpoint hashes already recorded on registered versions of this model."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(workspace))
    versions = registered_versions(registered_name(params))
    return {v.tags.get("checkpoint_hash") for v in versions if v.tags.get("checkpoint_hash")}
