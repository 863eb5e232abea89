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
import warnings
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


def _auth_reason(error: BaseException) -> str | None:
    """For a server with authentication that refused this request (MLflow's UNAUTHENTICATED / PERMISSION_DENIED): who
    was refused, in a few words; else None."""
    code = getattr(error, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    try:
        _, who = _credentials()
    except TrackingError as partial:
        return str(partial)
    if code == "UNAUTHENTICATED":
        return f"the server refused the credentials of {who} (HTTP 401)" if who else \
            f"the server requires credentials (HTTP 401): set {USERNAME_ENV} and {PASSWORD_ENV}"
    return f"{who or 'anonymous access'} lacks the permission (HTTP 403)"


def _failure_reason(error: BaseException) -> tuple[str, bool]:
    """(the reason of an MLflow client error in a few words, whether the server did not answer). For a server that
    does not answer: the request and the connection error (MLflow's own message repeats the URL three times); for
    refused credentials, whose; else MLflow's first line."""
    import requests

    refused = _auth_reason(error)
    if refused is not None:
        return refused, False

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


# MLflow's client reads these for a tracking server with authentication (the basic-auth app, or a bearer token)
USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"


def _credentials() -> tuple[dict[str, str], str]:
    """(the Authorization header MLflow's client will send, who it names) from the environment."""
    import base64

    token = os.environ.get(TOKEN_ENV)
    user, password = os.environ.get(USERNAME_ENV), os.environ.get(PASSWORD_ENV)
    if user and password:
        basic = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {basic}"}, f"user {user!r} ({USERNAME_ENV}, {PASSWORD_ENV})"
    if bool(user) != bool(password):
        given, missing = (USERNAME_ENV, PASSWORD_ENV) if user else (PASSWORD_ENV, USERNAME_ENV)
        raise TrackingError(f"{given} is set but {missing} is not: set both for the tracking server's basic auth")
    if token:
        return {"Authorization": f"Bearer {token}"}, f"the token in {TOKEN_ENV}"
    return {}, ""


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before any stage runs, when the tracking URI cannot be reached or written, or (a server with
    authentication) refuses the environment's credentials (``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``,
    or ``MLFLOW_TRACKING_TOKEN``): an authenticated read of the experiments, before any stage runs."""
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
        headers, who = _credentials()
        request = urllib.request.Request(uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as error:
            if error.code == 401 and not who:
                raise TrackingError(f"tracking server {uri} requires credentials (HTTP 401) and none are set: set "
                                    f"{USERNAME_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV})") from None
            if error.code == 401:
                raise TrackingError(f"tracking server {uri} refused the credentials of {who} (HTTP 401)") from None
            if error.code == 403:
                raise TrackingError(f"tracking server {uri}: {who or 'anonymous access'} may not read experiments "
                                    f"(HTTP 403)") from None
            raise TrackingError(f"tracking server {uri} answered an experiments search with HTTP {error.code} "
                                f"({error.reason})" + (f" to {who}" if who else "")) from None
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


# Headline metrics stay MLflow metrics; per-group parameter counts, per-bucket breakdowns and the evaluation's
# settings go to logged tables / the metrics.json artifact instead of one single-bar chart each.
_NOT_HEADLINE = re.compile(r"^(params\.(original|compressed)\.groups\.|settings\.)|_by_bucket\.")
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
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the MLflow UI opens on runs, not GenAI traces


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
    """``{artifact file: DataFrame}``: parameters by group (original, compressed, kept fraction) and every
    ``*_by_bucket`` metric by timestep bucket."""
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
    return tables


def champion_of(name: str):
    """The version aliased ``champion`` of ``name`` and its run (``(version, run)``), or None when there is none."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = (model.aliases or {}).get("champion")
    if version is None:
        return None
    found = client.get_model_version(name, str(version))
    return found, (client.get_run(found.run_id) if found.run_id else None)


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
    from slimdiff.report import budget_text

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


UI_URL_ENV = "SLIMDIFF_MLFLOW_UI_URL"  # where people open the MLflow UI of a local tracking database


def ui_base(uri: str) -> str:
    """The MLflow UI's address: ``SLIMDIFF_MLFLOW_UI_URL`` when set, else the tracking server itself, else (a local
    database) ``mlflow ui``'s default ``http://127.0.0.1:5000``."""
    configured = os.environ.get(UI_URL_ENV, "").strip()
    if configured:
        return configured.rstrip("/")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where the MLflow UI shows the run (:func:`ui_base`; README: 'Open the UIs')."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table (MLflow 3 opens a bare experiment link on its GenAI overview)."""
    return f"{ui_base(uri)}/#/experiments/{experiment_id}/runs"


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
    from slimdiff.gain_shards import gain_shard_tags
    from slimdiff.shards import shard_tags

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


# ---- the registered model: a servable pyfunc -------------------------------------------------------------------------

# what the pyfunc imports (flows/pyfunc_model.py, slimdiff.load), pinned to this environment's versions in the model's
# requirements.txt; slimdiff itself travels as code with the model (code_paths), so no unpublished "slimdiff" is named
SERVING_PACKAGES = ("mlflow", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pandas", "scipy",
                    "huggingface_hub", "pyyaml", "matplotlib", "tqdm")


def serving_requirements() -> list[str]:
    """``package==version`` for :data:`SERVING_PACKAGES` as installed here (torch without its local build tag, so that
    a serving machine's pip picks its own CPU or CUDA build of the same version)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            raise RuntimeError(f"{package} is not installed; the registered model's requirements name it") from None
    return pins


def pyfunc_signature(sampler: dict[str, Any]):
    """Prompts in (a ``prompt`` string column), images out (uint8, N x H x W x 3), with the sampler as a params
    schema whose defaults are the job's deployment sampler (``params.yaml: sampler``)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    def optional_int(value):
        return None if value is None else int(value)

    params = ParamSchema([
        ParamSpec("steps", "long", int(sampler["steps"])),
        ParamSpec("guidance", "double", float(sampler["guidance"])),
        ParamSpec("seed", "long", int(sampler.get("seed", 0))),
        ParamSpec("height", "long", optional_int(sampler.get("height"))),
        ParamSpec("width", "long", optional_int(sampler.get("width"))),
    ])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))]), params=params)


def slimdiff_package(workspace: Path | None = None) -> Path:
    """The ``slimdiff`` package that travels with the model: the workspace's copy when it has one (the code its
    stages ran), else the installed package."""
    import slimdiff

    local = workspace / "slimdiff" if workspace is not None else None
    return local if local is not None and (local / "__init__.py").is_file() else Path(slimdiff.__file__).parent


def deployment_sampler(params: dict[str, Any]) -> dict[str, Any]:
    """The served defaults: ``params.yaml: sampler`` (the capture's and the evaluation's sampler). Required: a model
    served with made-up defaults would answer with another sampler than the one it was compressed and measured with."""
    sampler = params.get("sampler")
    missing = [k for k in ("steps", "guidance") if not isinstance(sampler, dict) or sampler.get(k) is None]
    if missing:
        raise ValueError(f"params.yaml has no sampler {missing}: the served model's defaults are the capture's sampler "
                         "(sampler.steps, sampler.guidance, sampler.seed, sampler.height, sampler.width)")
    return {"steps": int(sampler["steps"]), "guidance": float(sampler["guidance"]), "seed": int(sampler.get("seed") or 0),
            "height": sampler.get("height"), "width": sampler.get("width")}


def log_pipeline_model(pipeline: Path, params: dict[str, Any], workspace: Path | None = None):
    """Log the compressed pipeline folder as the ``model`` pyfunc of the active run: code (no pickle), weights as an
    artifact read with safetensors, ``serving.json`` (the deployment sampler, the dtype it was compressed in, the
    device setting and the request limits derived from the model, with ``params.yaml: serve`` overrides), a signature
    with the sampler's params schema, pinned requirements and the ``slimdiff`` package as code. Returns MLflow's
    ``ModelInfo``.

    The serving settings travel as an artifact, not as MLflow's ``model_config``: MLflow logs a model config as run
    params (``sampler/steps`` beside the job's ``sampler.steps``). ``mlflow.pyfunc.load_model(..., model_config=...)``
    still overrides them at load time."""
    import mlflow

    import shutil
    import tempfile

    from flows.pyfunc_model import SERVING_FILE, model_shape, serving_document

    sampler = deployment_sampler(params)
    serve = dict(params.get("serve") or {})
    device = str(serve.pop("device", "auto"))
    dtype = (params.get("model") or {}).get("dtype")
    document = serving_document(model_shape(pipeline), sampler, None if dtype in (None, "auto") else str(dtype), device, serve)
    with tempfile.TemporaryDirectory(prefix="slimdiff-code-") as staging:
        code = Path(staging) / "slimdiff"  # the package without its __pycache__ folders
        shutil.copytree(slimdiff_package(workspace), code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        serving = Path(staging) / SERVING_FILE
        serving.write_text(json.dumps(document, indent=2) + "\n")
        with warnings.catch_warnings():
            # the signature is explicit; an input example would make MLflow load the pipeline and generate images
            # while logging (its serving-input check), so there is none, and MLflow's advice to add one is not shown
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            return mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"pipeline": str(pipeline), "serving": str(serving)},
                signature=pyfunc_signature(sampler), code_paths=[str(code)], pip_requirements=serving_requirements(),
            )


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


def _complete_registration(client, name: str, version: str, passed: bool, description: str = "") -> None:
    """Descriptions (the version's; the registered model's: how to serve it), aliases of a newly registered version
    (``candidate``; ``champion`` when the gate passed), then the mark that registration is complete. Each call is
    idempotent, so a retry may repeat any of them."""
    if description:
        client.update_model_version(name, version, description=description)
    client.update_registered_model(name, description=(
        f"slimdiff-compressed text-to-image pipeline: prompts in (column `prompt`), uint8 images out (N x H x W x 3); "
        f"params steps, guidance, seed, height, width (valid ranges in the model's serving.json). Serve the champion: "
        f"`mlflow models serve -m models:/{name}@champion --env-manager local -p 5001` (docs/serving.md)."))
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
        message = _auth_reason(error) or f"{error.error_code}: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"
        raise TrackingError(f"tracking server {mlflow.get_tracking_uri()}: cannot list the versions of {name!r} "
                            f"({message}); the outputs are kept: re-run to retry") from None


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
