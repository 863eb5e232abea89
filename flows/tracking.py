"""MLflow tracking and registry for compressed models: runs, lineage, aliases, the quality gate.

Plain functions (no Prefect): the flows call them inside tasks. Tracking defaults to a SQLite file
and an artifact folder inside the workspace; ``MLFLOW_TRACKING_URI`` points at a team server.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import yaml

from flows.descriptions import describe
from flows.gate import quality_gate
from flows.model_logging import log_pipeline_model
from flows.reference_run import compare_with_reference
from flows.registry import (
    REGISTRATION_TAG,
    _complete_registration,
    _version_with_lineage,
    champion_of,
    registered_name,
)
from flows.run_metrics import headline_metrics, measurement_settings, metric_tables, stage_resources
from flows.tracking_server import _tracking_step, experiment_url, run_url, tracking_uri
from slimdiff.pipeline.evaluation import flatten


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


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the MLflow UI opens on runs, not GenAI traces










def log_compression(workspace: Path, params: dict[str, Any], checkpoint_hash: str, stages_run: dict[str, bool], *,
                    started_at: float | None = None, durations: dict[str, float] | None = None,
                    threads: int | None = None) -> dict[str, Any]:
    """Log one MLflow run for the workspace's current outputs and register the compressed model.

    ``started_at`` (epoch seconds, when the job started) becomes the run's start, so the run's duration is the
    job's; ``durations`` (seconds per stage) are logged as ``duration.<stage>_s`` with ``duration.total_s``.
    Returns run id, its UI link, registered name, version, and the gate decision.
    """
    import time

    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

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
        client = MlflowClient()
        with _tracking_step(uri, f"reading the run of {name!r} version {existing.version}"):
            run = client.get_run(existing.run_id) if existing.run_id else None
        if existing.tags.get(REGISTRATION_TAG) == "pending":
            # an earlier try registered it and stopped before its aliases (server gone, job killed): finish it
            description = run.data.tags.get("mlflow.note.content", "") if run is not None else ""
            with _tracking_step(uri, f"setting the aliases of {name!r} version {existing.version}"):
                _complete_registration(client, name, str(existing.version), passed, description)
        return {"run_id": existing.run_id, "name": name, "version": str(existing.version), "reused": True,
                "gate": passed, "reason": existing.tags.get("gate.reason", ""), "tracking_uri": uri,
                "reference": existing.tags.get("reference.check"),
                "run_url": run_url(uri, run.info.experiment_id, run.info.run_id) if run is not None else None,
                "experiment_url": experiment_url(uri, run.info.experiment_id) if run is not None else None}
    experiment = params["mlflow"]["experiment"]
    with _tracking_step(uri, f"opening experiment {experiment!r}"):
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            location = (workspace / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
            experiment_id = mlflow.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
        else:
            experiment_id = found.experiment_id
            if any(found.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):
                for key, value in EXPERIMENT_KIND.items():
                    MlflowClient().set_experiment_tag(experiment_id, key, value)
        mlflow.set_experiment(experiment)
    metrics = json.loads((outputs / "metrics.json").read_text())
    plan = json.loads((outputs / "plan" / "width_plan.json").read_text())
    stats_path = outputs / "slimset" / "slimset_stats.json"
    slimset_stats = json.loads(stats_path.read_text())
    if not slimset_stats.get("digest"):  # the dataset input's digest is the calibration set's lineage: never blank
        raise ValueError(f"{stats_path} has no digest of the SlimSet; re-run the curate stage")
    decision = quality_gate(metrics, params.get("gate"))  # no gate section: a candidate, never champion
    headline = headline_metrics(metrics)
    reference = compare_with_reference(workspace, params, metrics)
    with _tracking_step(uri, f"reading the champion of {name!r}"):
        champion = champion_of(name)
    total = (time.time() - started_at) if started_at is not None else None
    description = describe(name, params, plan, headline, decision, champion, durations, total, reference)
    tags = {f"lineage.{stage}": value for stage, value in lineage.items()}
    tags.update({
        "git.commit": git_commit(workspace),
        "checkpoint_hash": checkpoint_hash,
        "base_model": str(params["model"].get("id", "")),
        "gate.decision": "champion" if decision.passed else "candidate",
        "gate.reason": decision.reason,
        "stages_run": ",".join(s for s, ran in stages_run.items() if ran) or "none",
        "reference.check": str(reference)[:5000],
    })
    from slimdiff.scoring.gain_shards import gain_shard_tags
    from slimdiff.statistics.shards import shard_tags

    tags.update(shard_tags(outputs / "capture.safetensors"))  # sharded capture: lineage.capture.shard.<i> = digest
    tags.update(gain_shard_tags(outputs / "gains.json"))  # sharded gains: lineage.gains.shard.<i> = digest
    timing = {f"duration.{stage}_s": seconds for stage, seconds in (durations or {}).items()}
    slimset = pd.read_json(outputs / "slimset" / "slimset.jsonl", lines=True)
    run_name = f"{name}-b{params['allocate']['budget']}"
    with _tracking_step(uri, "logging the run"):
        created = MlflowClient().create_run(experiment_id, run_name=run_name, tags={"mlflow.note.content": description},
                                            start_time=int(started_at * 1000) if started_at is not None else None)
    with _tracking_step(uri, "logging the run"), mlflow.start_run(run_id=created.info.run_id) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(params).items()})
        mlflow.log_params(measurement_settings(metrics))
        if threads is not None:
            mlflow.log_param("job.torch_threads", threads)
        mlflow.log_metrics(headline)
        if timing:
            mlflow.log_metrics({**timing, "duration.total_s": total if total is not None else sum(durations.values())})
        resources, resource_rows = stage_resources(outputs)  # each stage's measured peak memory beside the prediction
        if resources:
            mlflow.log_metrics(resources)
            mlflow.log_table(pd.DataFrame(resource_rows), "tables/stage_resources.json")
        with warnings.catch_warnings():
            # MLflow registers its local-file dataset source for two URI schemes and warns that a path matches both
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
            dataset = mlflow.data.from_pandas(slimset, source=str((outputs / "slimset" / "slimset.jsonl").resolve()),
                                              name="slimset", digest=str(slimset_stats["digest"])[:36])
        mlflow.log_input(dataset, context="calibration")
        mlflow.set_tags(tags)
        mlflow.log_dict(plan, "width_plan.json")
        mlflow.log_dict(metrics, "metrics.json")
        for artifact, table in metric_tables(metrics).items():
            mlflow.log_table(table, artifact)
        mlflow.log_artifact(str(outputs / "plan" / "width_plan.png"))
        mlflow.log_artifacts(str(outputs / "report"), artifact_path="report")
        # ".lock" has no preview in the MLflow UI; the same YAML as dvc.lock.yaml has one
        mlflow.log_text((workspace / "dvc.lock").read_text(), "dvc.lock.yaml")
        # logged, not yet registered: the version is created below with its lineage in the same request
        model_info = log_pipeline_model(outputs / "model", params, workspace)
    # One request creates the version with every tag: a try that stops after it leaves a version that the
    # next try recognises by its lineage (and completes), never an untagged one that it would register again.
    with _tracking_step(uri, f"registering {name!r}"):
        version = str(mlflow.register_model(model_info.model_uri, name, tags={**tags, REGISTRATION_TAG: "pending"}).version)
    with _tracking_step(uri, f"setting the aliases of {name!r} version {version}"):
        _complete_registration(MlflowClient(), name, version, decision.passed, description)
    return {"run_id": run.info.run_id, "name": name, "version": version, "reused": False, "gate": decision.passed,
            "reason": decision.reason, "tracking_uri": uri, "run_url": run_url(uri, experiment_id, run.info.run_id),
            "experiment_url": experiment_url(uri, experiment_id),
            "reference": str(reference)}


# MLflow's client reads these for a tracking server with authentication (the basic-auth app, or a bearer token)
