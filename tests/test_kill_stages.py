"""Fault injection on the compress job (issue 14, item 3): SIGKILL inside every stage, and a real MLflow server
stopped in the middle of tracking. Real subprocesses throughout; CPU only.

**Kills.** One uninterrupted ``python -m flows.compress`` run (the module-scoped ``baseline``) is the reference.
A second workspace (the ``chain``), copied from the same prepared workspace, is killed once inside each stage of
``flows.tasks.STAGES``, in order: ``test_kill_inside_stage[<stage>]`` starts the job, waits until the stage is at
work, and SIGKILLs the job's whole process group (the flow with its temporary Prefect server, DVC, the stage
process), as an OOM killer or ``docker kill`` would. Each kill's job is also the re-run after the previous kill,
and ``test_rerun_after_every_kill_equals_the_uninterrupted_run`` re-runs the flow once more, to the end. The
killed job is the flow itself inside ``curate`` and ``dvc repro`` (the stage commands the flow runs, one by one)
inside the others: nine flow start-ups would double the time. Where each kill lands (seeded,
``random.Random(f"14:<stage>")``); every stage is killed mid-work, none merely at its start:

| stage | when |
|---|---|
| curate | ``outputs/slimset/slimset.jsonl`` written, its stats and plot not yet (a half-written output folder) |
| capture | just after a checkpoint of the partial sums (every 12 of the 48 prompts), + 0-50 ms |
| gains | once k of the 35 modules are in the checkpoint, k seeded in 3..30 |
| latency | while units are timed (its progress bar started), + 0-50 ms |
| score | while modules are scored (its progress bar started), + 0-100 ms |
| allocate | ``width_plan.json`` written, the plot and ``plan_metrics.json`` not yet |
| decompose | while the compressed model is being saved (``outputs/.model.*.tmp`` exists) |
| evaluate | by time (nothing to observe): a seeded 45-70 % of the stage's baseline wall time after DVC started it, i.e. during model loading or generation |
| report | ``outputs/report/`` created, the sample images being generated, + 0-100 ms |

After each kill: every process of the job is gone; ``dvc status`` reports the killed stage and none of those that
finished before it; every file under a final name in ``outputs/`` reads whole (JSON, JSONL, safetensors, PNG):
a torn file can only exist under a temporary name. After the final re-run: it ran only what ``dvc status``
reported; a killed capture and gains resumed from their checkpoints; every output equals the baseline's (bytes;
JSON without measured times; ``latency.json`` is a measurement and only has to load); the library loads every
artifact; no temporary or checkpoint is left; ``dvc status`` reports nothing; and the workspace's registry holds
exactly one version, aliased ``candidate`` and ``champion``, whose tags and registered weights equal the
baseline's.

**Tracking server.** A real ``mlflow server`` (sqlite backend in tmp, a free loopback port, job execution off)
behind a pass-through proxy that is the flow's ``MLFLOW_TRACKING_URI``. At one chosen request the proxy forwards
it, SIGKILLs the server and drops the answer (the server did the work, the client never learns it), and from then
on refuses connections. The server is restarted on the same backend and port, and the retry must register exactly
one version with its aliases. ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` makes the failure immediate: with MLflow's
default (7 retries, backoff factor 2) the job waits about 4 minutes on a dead server and then fails the same way.

Time on a loaded 2-core machine: about 8 minutes (baseline 2, kills and re-run 3.5, tracking server 2.5).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from flows.tasks import STAGES
from slimdiff import testing

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc") if (BIN / "dvc").exists() else "dvc"
MLFLOW = str(BIN / "mlflow") if (BIN / "mlflow").exists() else "mlflow"
SEED = 14
NAME = "slimdiff-tiny-sd"
# temporaries of slimdiff.utils.atomic_path / atomic_dir: ".<name>.<random>.tmp" (and ".old" while swapping)
TEMPORARY = re.compile(r"^\..+\.(tmp|old)$")
# values that are measured times (or derived from them): they differ between any two runs
TIMED = re.compile(r"latency|_ms$|speedup|prediction_error|measured_fraction|predicted_fraction|predicted_upper_bound")
# lineage tags that hash outputs holding measured times (latency table, plan and model config predictions, metrics)
TIMED_LINEAGE = {"lineage.latency", "lineage.allocate", "lineage.decompose", "lineage.evaluate", "lineage.report"}
TIMINGS: dict[str, float] = {}


# ------------------------------------------------------------------------------------------------ helpers


def make_workspace(root: Path) -> Path:
    """The flow tests' workspace (slimdiff.testing.make_workspace) with 48 SlimSet prompts and a checkpoint every 12,
    so capture and gains resume after a kill."""
    return testing.make_workspace(root, {"curate": {"n": 48}, "capture": {"checkpoint_every": 12}})


def copy_workspace(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    return target


def job_env(prefect_home: Path, tracking_uri: str = "") -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="INFO",
        MLFLOW_TRACKING_URI=tracking_uri,  # empty: the workspace's sqlite database
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
    )
    return env


def flow_command(workspace: Path) -> list[str]:
    return [sys.executable, "-m", "flows.compress", "--workspace", str(workspace)]


def kill_group(process: subprocess.Popen, alive: Callable[[], bool], timeout: float = 30) -> None:
    """SIGKILL the process group led by ``process``, reap the leader, and wait (up to ``timeout``) until ``alive()`` is False."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    import psutil

    members = []
    for process in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(process.info["pid"]) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process.info["pid"])
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


class Job:
    """A command in its own process group (a new session), stdout and stderr to a log file."""

    def __init__(self, command: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.command, self.log = command, log
        with open(log, "wb") as handle:
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=handle,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self._read, self._text = 0, ""

    def output(self) -> str:
        """Everything the job wrote so far (read incrementally: polled every few milliseconds)."""
        with open(self.log, "rb") as handle:
            handle.seek(self._read)
            data = handle.read()
        self._read += len(data)
        self._text += data.decode(errors="replace")  # a multi-byte character cut at the end is only cosmetic
        return self._text

    def tail(self, chars: int = 3000) -> str:
        return self.output()[-chars:]

    def wait_for(self, ready: Callable[[], bool], what: str, timeout: float = 300.0, interval: float = 0.005) -> float:
        deadline = time.monotonic() + timeout
        while not ready():
            if self.process.poll() is not None:
                pytest.fail(f"the job ended (rc {self.process.returncode}) before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(interval)
        return time.monotonic()

    def kill(self) -> list[int]:
        """SIGKILL the whole process group; return its members, all of them checked gone.

        Gone means reaped, not only dead: DVC's lock check takes a zombie for a live holder ("is busy, it is
        being blocked by PID ..."), and the orphans of the killed job (DVC, the stage) are reaped by init
        (about a second here)."""
        import psutil

        members = process_group(self.process.pid)
        kill_group(self.process, lambda: any(psutil.pid_exists(pid) for pid in members))
        survivors = [pid for pid in members if psutil.pid_exists(pid)]
        assert not survivors, f"processes of the killed job survived (or were never reaped): {survivors}"
        return members

    def finish(self, timeout: float = 600.0, watch: tuple[str, ...] = ()) -> tuple[int, dict[str, float]]:
        """Wait for the end; the first time each ``watch`` string appeared in the output (seconds after start)."""
        seen: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while True:
            done = self.process.poll() is not None
            if watch:
                text = self.output()
                for needle in watch:
                    if needle not in seen and needle in text:
                        seen[needle] = time.monotonic() - self.started
            if done:
                return self.process.returncode, seen
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"{' '.join(self.command)} did not finish in {timeout} s:\n{self.tail()}")
            time.sleep(0.05)


def untimed(value: Any) -> Any:
    """``value`` without the entries that are measured times (or derived from them)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not TIMED.search(str(k))}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def read_artifact(path: Path) -> Any:
    """Read one output file completely; fail naming it when it is torn (not whole JSON, safetensors, PNG...)."""
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in path.read_text().splitlines()]
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            load_file(str(path))  # every tensor readable
            return hashlib.sha256(path.read_bytes()).hexdigest()
        if path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as image:
                image.load()
            return hashlib.sha256(path.read_bytes()).hexdigest()
        if path.suffix in (".md", ".txt", "") or path.name.startswith("."):
            return path.read_bytes().decode("utf-8")
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except Exception as error:  # noqa: BLE001 - any failure to read is the finding
        pytest.fail(f"{path}: unreadable under its final name ({type(error).__name__}: {error})")


def temporaries(workspace: Path) -> list[str]:
    """Leftover atomic-write temporaries (files or folders) anywhere under outputs/."""
    outputs = workspace / "outputs"
    return sorted(str(p.relative_to(outputs)) for p in outputs.rglob(".*") if TEMPORARY.match(p.name)) if outputs.is_dir() else []


def check_outputs(workspace: Path) -> dict[str, Any]:
    """Read every file under a final name in outputs/, checkpoints included (a resumed run reads them), temporaries
    excluded; {relative path: content}."""
    outputs = workspace / "outputs"
    found: dict[str, Any] = {}
    if not outputs.is_dir():
        return found
    for path in sorted(outputs.rglob("*")):
        parts = path.relative_to(outputs).parts
        if any(TEMPORARY.match(part) for part in parts) or not path.is_file():
            continue
        found["/".join(parts)] = read_artifact(path)
    return found


def comparable(outputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs as compared across runs: JSON without measured times, report lines without them, no latency table."""
    result = {}
    for name, content in outputs.items():
        if name == "latency.json" or name.startswith(".checkpoints/"):
            continue  # the latency table is a measurement: only that it loads is checked
        if name.endswith(".json"):
            content = untimed(content)
        elif name.endswith(".md"):
            content = [line for line in content.splitlines() if not TIMED.search(line)]
        result[name] = content
    return result


def dvc_status(workspace: Path, env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run([DVC, "status", "--json"], cwd=workspace, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "{}")


def registry(uri: str, name: str = NAME) -> dict[str, Any]:
    """Versions (number, aliases, tags), the run count and the registered weights' digests at ``uri``."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = []
    for found in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        version = client.get_model_version(name, found.version)
        versions.append({"version": str(version.version), "aliases": sorted(version.aliases), "tags": dict(version.tags),
                         "run_id": version.run_id})
    experiment = client.get_experiment_by_name("slimdiff")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return {"versions": versions, "runs": [(r.info.run_id, r.info.status) for r in runs]}


def registered_weights(uri: str, version: str, destination: Path, name: str = NAME) -> dict[str, Any]:
    """Digests of the tensors of the registered pipeline (the pyfunc's ``pipeline`` artifact)."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(destination)))
    finally:
        mlflow.set_tracking_uri(previous)
    pipeline = next(p for p in local.rglob("model_index.json")).parent
    return {str(p.relative_to(pipeline)): read_artifact(p) for p in sorted(pipeline.rglob("*.safetensors"))}


def comparable_tags(tags: dict[str, str], workspace: Path) -> dict[str, str]:
    """Version tags without those that differ between any two runs (timed lineage, the stages this run ran)."""
    kept = {k: v for k, v in tags.items() if k not in TIMED_LINEAGE and k != "stages_run"}
    kept["git.commit"] = kept.get("git.commit", "").replace(str(workspace), "<workspace>")
    return kept


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kill")


@pytest.fixture(scope="module", autouse=True)
def report_timings(scratch):
    """Where the time went: printed after the module (shown with -s) and kept in ``<scratch>/timings.json``."""
    yield
    (scratch / "timings.json").write_text(json.dumps(TIMINGS, indent=1))
    print("\n" + "\n".join(f"{k}: {v:.1f} s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="module")
def prefect_home(scratch) -> Path:
    home = scratch / "prefect-home"
    home.mkdir()
    return home


@pytest.fixture(scope="module")
def prepared(scratch) -> Path:
    return make_workspace(scratch / "prepared")


@dataclass
class Baseline:
    workspace: Path
    durations: dict[str, float]
    outputs: dict[str, Any]
    registry: dict[str, Any]
    weights: dict[str, Any]
    log: str


@pytest.fixture(scope="module")
def baseline(prepared, prefect_home, scratch) -> Baseline:
    """One uninterrupted ``python -m flows.compress`` run; stage wall times as seen in its output."""
    workspace = copy_workspace(prepared, scratch / "baseline")
    start = time.monotonic()
    job = Job(flow_command(workspace), REPO, job_env(prefect_home), scratch / "baseline.log")
    watch = tuple(f"Running stage '{s}'" for s in STAGES) + tuple(f"stage {s}: done" for s in STAGES)
    returncode, seen = job.finish(900, watch)
    assert returncode == 0, job.tail()
    TIMINGS["baseline run (uninterrupted flow)"] = time.monotonic() - start
    durations = {s: seen[f"stage {s}: done"] - seen[f"Running stage '{s}'"] for s in STAGES}
    assert temporaries(workspace) == [] and dvc_status(workspace, job_env(prefect_home)) == {}
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    state = registry(uri)
    assert [v["version"] for v in state["versions"]] == ["1"], state
    assert state["versions"][0]["aliases"] == ["candidate", "champion"], state
    return Baseline(workspace, durations, check_outputs(workspace), state, registered_weights(uri, "1", scratch / "baseline-registered"),
                    job.output())


@dataclass
class Chain:
    workspace: Path
    logs: Path
    env: dict[str, str]
    kills: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def chain(prepared, prefect_home, scratch) -> Chain:
    logs = scratch / "chain-logs"
    logs.mkdir()
    return Chain(copy_workspace(prepared, scratch / "chain"), logs, job_env(prefect_home))


# ------------------------------------------------------------------------------------------------ kills


def _progress_started(label: str) -> Callable[[str], bool]:
    pattern = re.compile(rf"(^|[\r\n]){re.escape(label)}:\s+\d+%")
    return lambda section: bool(pattern.search(section))


def _gains_measured(workspace: Path) -> int:
    path = workspace / "outputs" / ".checkpoints" / "gains.json"
    try:
        return len(json.loads(path.read_text())["gains"])  # written atomically: always whole
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return 0


class Marker:
    """What shows that a stage is at work: a new file, a progress bar in its output, or a time."""

    def __init__(self, workspace: Path, stage: str, job: Job, before: dict[str, int], rng: random.Random, duration: float):
        self.workspace, self.stage, self.job, self.before, self.rng, self.duration = workspace, stage, job, before, rng, duration

    def new(self, pattern: str) -> bool:
        for path in self.workspace.glob(pattern):
            rel = str(path.relative_to(self.workspace))
            try:
                if self.before.get(rel) != path.stat().st_mtime_ns:
                    return True
            except FileNotFoundError:
                continue
        return False

    def section(self) -> str:
        return self.job.output().split(f"Running stage '{self.stage}'", 1)[-1]

    def plan(self) -> tuple[str, Callable[[], bool], float]:
        """(description, ready, extra delay in seconds after ready)."""
        rng, stage = self.rng, self.stage
        if stage == "curate":
            return "slimset.jsonl written, stats and plot not yet", lambda: self.new("outputs/slimset/slimset.jsonl"), 0.0
        if stage == "capture":
            return ("after a checkpoint of the partial sums", lambda: self.new("outputs/.checkpoints/capture.safetensors"),
                    rng.uniform(0.0, 0.05))
        if stage == "gains":
            k = rng.randint(3, 30)
            return f"after {k} of 35 modules measured", lambda: _gains_measured(self.workspace) >= k, 0.0
        if stage == "latency":
            started = _progress_started("latency table")
            return "while units are timed", lambda: started(self.section()), rng.uniform(0.0, 0.05)
        if stage == "score":
            started = _progress_started("score")
            return "while modules are scored", lambda: started(self.section()), rng.uniform(0.0, 0.1)
        if stage == "allocate":
            return ("width_plan.json written, plot and plan metrics not yet",
                    lambda: self.new("outputs/plan/width_plan.json"), 0.0)
        if stage == "decompose":
            return "while the compressed model is saved", lambda: self.new("outputs/.model.*.tmp"), 0.0
        if stage == "evaluate":
            fraction = rng.uniform(0.45, 0.7)
            return (f"{fraction:.0%} of its baseline wall time ({self.duration:.1f} s) after it started", lambda: True,
                    fraction * self.duration)
        if stage == "report":
            return ("report folder created, samples being generated", lambda: self.new("outputs/report"),
                    rng.uniform(0.0, 0.1))
        raise AssertionError(f"no kill point for stage {stage!r}")


def _files(folder: Path, root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.is_dir() else {}


@pytest.mark.parametrize("stage", STAGES)
def test_kill_inside_stage(stage, chain, baseline):
    """SIGKILL the job inside ``stage`` (the table in the module docstring says where): nothing of the kill
    can be read as a result, DVC records only the stages that finished, no process survives."""
    workspace = chain.workspace
    rng = random.Random(f"{SEED}:{stage}")
    via_flow = stage == "curate"
    command = flow_command(workspace) if via_flow else [DVC, "repro"]
    start = time.monotonic()
    before = _files(workspace / "outputs", workspace)
    job = Job(command, REPO if via_flow else workspace, chain.env, chain.logs / f"kill-{stage}.log")
    description, ready, delay = Marker(workspace, stage, job, before, rng, baseline.durations[stage]).plan()
    running = job.wait_for(lambda: f"Running stage '{stage}'" in job.output(), f"stage {stage} to start")
    job.wait_for(ready, f"stage {stage}: {description}", timeout=120)
    time.sleep(delay)
    at_kill = job.output()
    killed_after = time.monotonic() - running
    members = job.kill()

    # the kill landed inside the stage: DVC had not recorded it
    section = at_kill.split(f"Running stage '{stage}'", 1)[1]
    assert f"Running stage '" not in section and "didn't change, skipping" not in section, f"killed after {stage}:\n{section[-2000:]}"
    status = dvc_status(workspace, chain.env)
    assert stage in status, f"dvc status does not report the killed stage {stage}: {status}"
    finished_before = [s for s in STAGES if s != stage and (f"Running stage '{s}'" in at_kill or f"Stage '{s}' didn't change" in at_kill)]
    assert not set(finished_before) & set(status), f"stages that finished before the kill are reported changed: {status}"

    # nothing torn under a final name; temporaries may be left by the kill (the re-run must clean them)
    check_outputs(workspace)
    left = temporaries(workspace)
    chain.kills.append({"stage": stage, "job": "flow" if via_flow else "dvc repro", "where": description,
                        "seconds_into_stage": round(killed_after, 2), "work_finished": f"stage {stage}: done" in section,
                        "processes_killed": len(members), "temporaries_left": left, "dvc_status": sorted(status),
                        "job_seconds": round(time.monotonic() - start, 1)})
    TIMINGS[f"kill in {stage}"] = time.monotonic() - start
    print(f"\nkilled {stage} ({'flow' if via_flow else 'dvc repro'}): {description}, {killed_after:.2f} s after it started, "
          f"{len(members)} processes; temporaries left: {left or 'none'}; dvc status: {sorted(status)}")


def test_rerun_after_every_kill_equals_the_uninterrupted_run(chain, baseline, scratch):
    """The flow re-run after the kills: the same model, metrics and registered version as the uninterrupted run."""
    workspace = chain.workspace
    start = time.monotonic()
    job = Job(flow_command(workspace), REPO, chain.env, chain.logs / "rerun.log")
    returncode, _ = job.finish(900)
    output = job.output()
    assert returncode == 0, job.tail()
    TIMINGS["final re-run (flow)"] = time.monotonic() - start
    killed = [k["stage"] for k in chain.kills]
    (chain.logs / "kills.json").write_text(json.dumps(chain.kills, indent=1))
    print("\n" + "\n".join(json.dumps(k) for k in chain.kills))
    ran = next((line for line in output.splitlines() if line.startswith("stages run:")), "no 'stages run' line")
    print(ran)
    if chain.kills:
        # the re-run redoes exactly what DVC reported as changed after the last kill, nothing before it
        assert ran == f"stages run: {', '.join(s for s in STAGES if s in chain.kills[-1]['dvc_status'])}", ran
    left = sorted({t for k in chain.kills for t in k["temporaries_left"]})
    for name in left:  # the flow says what it cleaned up
        assert f"outputs/{name}" in output, (name, job.tail())

    # a killed capture and gains resumed from their checkpoints when re-run
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(chain.logs.glob("*.log")))
    if "capture" in killed:
        assert re.search(r"capture: resuming \S+ after \d+ prompts", logs), "the killed capture did not resume"
    if "gains" in killed:
        assert re.search(r"gains: resuming \S+ with \d+ modules measured", logs), "the killed gains did not resume"

    # no temporary or checkpoint left, DVC consistent
    assert temporaries(workspace) == [], f"temporaries left after the re-run: {temporaries(workspace)}"
    checkpoints = workspace / "outputs" / ".checkpoints"
    assert not checkpoints.is_dir() or not any(checkpoints.iterdir()), list(checkpoints.iterdir())
    assert dvc_status(workspace, chain.env) == {}

    # the outputs equal the uninterrupted run's, and the library loads each of them
    outputs = check_outputs(workspace)
    assert outputs.keys() == baseline.outputs.keys()
    mine, theirs = comparable(outputs), comparable(baseline.outputs)
    differing = sorted(name for name in theirs if mine[name] != theirs[name])
    assert not differing, f"outputs that differ from the uninterrupted run: {differing}"
    import slimdiff
    from slimdiff.allocate import WidthPlan
    from slimdiff.capture import Capture
    from slimdiff.influence import Gains, InfluenceScores
    from slimdiff.latency import LatencyTable

    out = workspace / "outputs"
    Capture.load(out / "capture.safetensors"), Gains.load(out / "gains.json"), InfluenceScores.load(out / "scores.json")
    WidthPlan.load(out / "plan" / "width_plan.json"), LatencyTable.load(out / "latency.json")
    slimdiff.load(out / "model")

    # exactly one registered version, equal to the uninterrupted run's (tags, aliases, weights)
    from flows.tracking import stage_hashes

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    state = registry(uri)
    assert [v["version"] for v in state["versions"]] == ["1"], state
    assert len(state["runs"]) == 1, state["runs"]
    version, reference = state["versions"][0], baseline.registry["versions"][0]
    assert version["aliases"] == reference["aliases"] == ["candidate", "champion"]
    assert comparable_tags(version["tags"], workspace) == comparable_tags(reference["tags"], baseline.workspace)
    lineage = {k[len("lineage."):]: v for k, v in version["tags"].items() if k.startswith("lineage.")}
    assert lineage == stage_hashes(workspace / "dvc.lock")
    assert registered_weights(uri, "1", scratch / "chain-registered") == baseline.weights


# ------------------------------------------------------------------------------------------------ tracking server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a loopback port, sqlite backend and artifact folder in tmp, in its own process group."""

    def __init__(self, root: Path):
        self.root, self.port, self.process, self.starts = root, free_port(), None, 0
        self.db, self.artifacts = root / "server.db", root / "artifacts"

    def start(self, timeout: float = 240.0) -> float:
        begin = time.monotonic()
        self.starts += 1
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true")
        with open(self.root / f"server-{self.starts}.log", "wb") as log:
            self.process = subprocess.Popen(
                [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - begin
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"mlflow server did not start:\n{(self.root / f'server-{self.starts}.log').read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is None:
            return
        kill_group(self.process, lambda: bool(process_group(self.process.pid)))
        self.process = None


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade", "content-length"}


class StoppingProxy:
    """A pass-through HTTP proxy in front of the server, used as the tracking URI. Armed with a path fragment,
    it forwards the first request whose path holds it, then SIGKILLs the server and drops the answer; from
    then on it refuses connections, as a stopped server does."""

    def __init__(self, server: MlflowServer):
        self.server, self.port = server, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.requests: list[str] = []
        self.stop_at: str | None = None
        self.stopped_at: str | None = None
        self.httpd: ThreadingHTTPServer | None = None
        self.lock = threading.Lock()

    def arm(self, fragment: str | None) -> None:
        self.stop_at, self.stopped_at, self.requests = fragment, None, []

    def listen(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes | None:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _drop(self) -> None:
                self.close_connection = True  # no answer: the client sees the connection closed

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    if proxy.stopped_at is not None:
                        return self._drop()
                    trigger = proxy.stop_at is not None and proxy.stop_at in self.path
                    proxy.requests.append(f"{self.command} {self.path}")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", proxy.server.port, timeout=300)
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    data = response.read()
                    connection.close()
                except OSError:
                    return self._drop()
                if trigger:
                    with proxy.lock:
                        proxy.stopped_at = f"{self.command} {self.path} (answered {response.status} by the server, answer dropped)"
                    proxy.server.stop()
                    threading.Thread(target=proxy.close, daemon=True).start()
                    return self._drop()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        httpd, self.httpd = self.httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()


@pytest.fixture(scope="module")
def tracking_server(scratch):
    root = scratch / "mlflow-server"
    root.mkdir()
    server = MlflowServer(root)
    TIMINGS["mlflow server start"] = server.start()
    proxy = StoppingProxy(server)
    proxy.listen()
    yield server, proxy
    proxy.close()
    server.stop()


def restart(server: MlflowServer, proxy: StoppingProxy) -> float:
    """The server again on the same backend and port, the proxy passing everything through."""
    proxy.close()
    proxy.arm(None)
    seconds = server.start()
    proxy.listen()
    return seconds


@pytest.fixture(scope="module")
def tracked_workspace(baseline, scratch) -> Path:
    """A copy of the finished baseline workspace without its tracking: every stage up to date, only tracking runs."""
    return copy_workspace(baseline.workspace, scratch / "tracked")


def test_server_stopped_while_registering_then_a_clean_retry(tracking_server, tracked_workspace, prefect_home, scratch):
    """The server stops right after it created the model version, before the client has the answer (the
    worst moment: the version exists, the job does not know it). The flow fails with one line naming the
    server; after a restart on the same backend the re-run registers nothing twice: one version, aliased."""
    server, proxy = tracking_server
    workspace = tracked_workspace
    env = job_env(prefect_home, tracking_uri=proxy.uri)
    proxy.arm("/model-versions/create")
    start = time.monotonic()
    job = Job(flow_command(workspace), REPO, env, scratch / "tracking-stopped.log")
    returncode, _ = job.finish(600)
    output = job.output()
    TIMINGS["flow with the server stopped mid-tracking"] = time.monotonic() - start
    assert proxy.stopped_at and "/model-versions/create" in proxy.stopped_at, (proxy.requests, job.tail())
    errors = [line for line in output.splitlines() if line.startswith("compress: error:")]
    print(f"\nserver stopped at {proxy.stopped_at}; exit code {returncode}; the user sees:\n" + "\n".join(errors or [job.tail(1500)]))
    assert returncode == 2, job.tail()
    assert len(errors) == 1, job.tail()
    assert errors[0].startswith(f"compress: error: tracking server {proxy.uri}: registering '{NAME}' failed "
                                f"(no answer to POST /api/2.0/mlflow/model-versions/create: "), errors[0]
    assert errors[0].endswith("the outputs are kept: re-run when the server answers (nothing is registered twice)"), errors[0]

    TIMINGS["mlflow server restart"] = restart(server, proxy)
    start = time.monotonic()
    retry = Job(flow_command(workspace), REPO, env, scratch / "tracking-retry.log")
    returncode, _ = retry.finish(600)
    TIMINGS["flow retry after the restart"] = time.monotonic() - start
    assert returncode == 0, retry.tail()
    print("\n".join(line for line in retry.output().splitlines() if line.startswith(("stages run:", "registered "))))
    from flows.tracking import stage_hashes

    state = registry(proxy.uri)
    assert [v["version"] for v in state["versions"]] == ["1"], state
    version = state["versions"][0]
    assert version["aliases"] == ["candidate", "champion"], version
    assert {k[len("lineage."):]: v for k, v in version["tags"].items() if k.startswith("lineage.")} == stage_hashes(workspace / "dvc.lock")
    assert len(state["runs"]) == 1 and state["runs"][0][1] == "FINISHED", state["runs"]


@pytest.mark.parametrize("stop_at", ["/mlflow-artifacts/artifacts/", "/registered-models/alias"])
def test_server_stopped_mid_tracking_in_process(stop_at, tracking_server, tracked_workspace, monkeypatch):
    """Two more moments, calling the track task's function directly (no flow start-up): during the first
    artifact upload (the run half logged) and right after the first alias was set. The failure is one
    TrackingError line; the retry after a restart leaves exactly one version with its aliases."""
    from flows.tracking import TrackingError, folder_hash, log_compression

    server, proxy = tracking_server
    if server.process is None:
        restart(server, proxy)
    workspace = tracked_workspace
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["mlflow"]["registered_model_prefix"] = f"stop{stop_at.strip('/').replace('/', '-')}"
    name = f"{params['mlflow']['registered_model_prefix']}-tiny-sd"
    checkpoint = folder_hash(workspace / "data" / "model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    import mlflow

    previous = mlflow.get_tracking_uri()
    start = time.monotonic()
    proxy.arm(stop_at)
    try:
        with pytest.raises(TrackingError) as failure:
            log_compression(workspace, params, checkpoint, {s: False for s in STAGES})
        message = str(failure.value)
        print(f"\nserver stopped at {proxy.stopped_at}; TrackingError: {message}")
        assert proxy.stopped_at and stop_at in proxy.stopped_at, proxy.requests
        assert "\n" not in message and message.startswith(f"tracking server {proxy.uri}: "), message
        restart(server, proxy)
        result = log_compression(workspace, params, checkpoint, {s: False for s in STAGES})
    finally:
        mlflow.set_tracking_uri(previous)
    TIMINGS[f"in-process stop at {stop_at} + restart + retry"] = time.monotonic() - start
    state = registry(proxy.uri, name)
    assert [v["version"] for v in state["versions"]] == ["1"], state
    assert str(result["version"]) == "1" and state["versions"][0]["aliases"] == ["candidate", "champion"], (result, state)
    print(f"retry: version {result['version']} (reused: {result['reused']}); runs: {state['runs']}")


