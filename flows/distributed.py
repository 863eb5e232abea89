"""The capture and the gains fanned out over Dask workers from Prefect (docs/distributed.md).

With ``capture.shards`` (or ``capture.site_groups``) above 1, the compress flow runs this fan-out just before the
DVC ``capture`` stage, when DVC says the stage is out of date: a sub-flow on a ``prefect_dask.DaskTaskRunner``
runs one Prefect task per shard on the workers. Each plans the capture itself (cached per worker), skips a shard
whose file is there and writes its content-addressed file atomically (``slimdiff.statistics.shards``). The stage then finds
every shard, verifies and merges them; it computes in its own process only shards that are still missing (a plain
``dvc repro``). With ``score.gain_shards`` above 1 the gains go the same way before the ``gains`` stage, one task
per module subset (``slimdiff.scoring.gain_shards``).

``capture.cluster``: ``local`` starts a Dask ``LocalCluster`` of worker processes (nanny-supervised: a killed
worker is restarted and its shard re-run, resuming from the shard's checkpoint) for the length of the sub-flow;
``tcp://host:port`` uses a running Dask scheduler whose workers see this workspace at the same path.

Test-only (off unless set): ``SLIMDIFF_KILL_AFTER_CHECKPOINT=<folder>`` kills one worker after a first checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, task

LOCAL = "local"


def sharding(params: dict[str, Any]) -> dict[str, Any]:
    """(shards, site_groups, cluster, workers) of ``params.yaml: capture``, checked; one-line errors."""
    from slimdiff.pipeline.stages import gain_shards, shard_count

    c = params["capture"]
    out: dict[str, Any] = {key: shard_count(params, "capture", key) for key in ("shards", "site_groups")}
    workers = c.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"params.yaml capture.workers must be null or a whole number >= 1, got {workers!r}")
    out["workers"] = workers
    out["cluster"] = parse_cluster(c.get("cluster", LOCAL))
    out["sharded"] = out["shards"] * out["site_groups"] > 1
    out["gain_shards"] = gain_shards(params)
    return out


def parse_cluster(value: Any) -> str:
    """``local`` or a Dask scheduler address ``tcp://host:port`` (``host:port`` is read as tcp)."""
    if value is None or value == LOCAL:
        return LOCAL
    text = str(value).strip()
    address = text if "://" in text else f"tcp://{text}"
    scheme, _, rest = address.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme not in ("tcp", "tls") or not host or not port.isdigit():
        raise ValueError(f"params.yaml capture.cluster {value!r} is neither 'local' nor a Dask scheduler address "
                         "like tcp://host:8786")
    return address


def check_cluster(params: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Preflight: the sharding settings are valid and, for a sharded capture on an existing cluster, its scheduler
    answers. An unreachable address fails here with one line, before any stage runs."""
    settings = sharding(params)
    if not (settings["sharded"] or settings["gain_shards"] > 1) or settings["cluster"] == LOCAL:
        return settings
    address = settings["cluster"]
    host, _, port = address.partition("://")[2].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"capture.cluster {address} is unreachable ({reason}); start the Dask scheduler there "
                         "or set capture.cluster: local") from None
    from distributed import Client

    try:
        client = Client(address, timeout=timeout)
    except (OSError, TimeoutError) as error:
        raise ValueError(f"capture.cluster {address} answers but is not a usable Dask scheduler "
                         f"({(str(error).splitlines() or [type(error).__name__])[0][:120]})") from None
    client.close()
    return settings


def stage_is_stale(workspace: Path, stage: str) -> bool:
    """Whether DVC would run ``stage`` (so a fan-out is worth starting)."""
    dvc = Path(sys.executable).with_name("dvc")
    result = subprocess.run([str(dvc) if dvc.exists() else "dvc", "status", "--json", stage], cwd=workspace,
                            capture_output=True, text=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if result.returncode != 0:
        return True  # the stage itself will report what is wrong
    try:
        return bool(json.loads(result.stdout or "{}"))
    except json.JSONDecodeError:
        return True


# ------------------------------------------------------------------------------------------------ worker side

_WORKER: dict[tuple, dict[str, Any]] = {}


def _worker_state(workspace: str, threads: int | None) -> dict[str, Any]:
    """This worker's params, pipeline and plans for ``workspace``, built once per worker process (keyed by the model
    files', SlimSet's and params.yaml's stamps, so a changed input is never served from the cache)."""
    from slimdiff.device import apply_threads
    from slimdiff.pipeline.stages import load_params

    if threads:
        apply_threads(threads)
    root = Path(workspace)
    params = load_params(root / "params.yaml")
    model = root / str(params["model"]["path"])
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in model.rglob("*") if p.is_file()))
    slimset = root / "outputs" / "slimset" / "slimset.jsonl"
    key = (workspace, stamp, slimset.stat().st_mtime_ns, (root / "params.yaml").stat().st_mtime_ns)
    if key not in _WORKER:
        from slimdiff.arch.pipelines import denoiser_of
        from slimdiff.pipeline.stages import _pipeline
        from slimdiff.statistics.recording import model_content_hash

        params["model"]["path"] = str(model)
        params["model"]["device"] = _worker_device(params["model"].get("device", "auto"))
        _WORKER.clear()
        pipe = _pipeline(params)
        # hashed once per loaded model: the plans and every shard on this worker check against it
        _WORKER[key] = {"params": params, "pipe": pipe, "slimset": slimset, "root": root,
                        "model_hash": model_content_hash(denoiser_of(pipe)[1])}
    return _WORKER[key]


def _capture_plan(state: dict[str, Any]):
    """The capture's shard plan (cached in ``state``)."""
    if "capture_plan" not in state:
        from slimdiff.pipeline.stages import (
            read_slimset,
            sampler_settings,
            shard_count,
            timestep_grid_setting,
        )
        from slimdiff.statistics.shards import plan_shards

        params = state["params"]
        c = params["capture"]
        state["capture_plan"] = plan_shards(
            state["pipe"], read_slimset(state["slimset"]), sampler_settings(params),
            shards=shard_count(params, "capture", "shards"), site_groups=shard_count(params, "capture", "site_groups"),
            num_buckets=int(c["num_buckets"]), batch_size=int(c["batch_size"]), model_id=str(params["model"].get("id", "")),
            model_hash=state["model_hash"], timestep_grid_points=timestep_grid_setting(c))
    return state["capture_plan"]


def _gain_plan(state: dict[str, Any]):
    """(plan, prompts, sampler, truncation reference) of the gains shards (cached in ``state`` for this capture file:
    truncation gains read it), as ``slimdiff.pipeline.stages.stage_gains`` plans."""
    from slimdiff.pipeline.stages import (
        CAPTURE_FILE,
        config_from,
        gain_reference,
        gain_shards,
        read_slimset,
        sampler_settings,
    )
    from slimdiff.scoring.gain_shards import plan_gain_shards

    capture = state["root"] / CAPTURE_FILE
    stamp = capture.stat().st_mtime_ns if capture.is_file() else None
    if state.get("gain_plan_capture", "unplanned") != stamp:
        state.pop("gain_plan", None)
        state["gain_plan_capture"] = stamp
    if "gain_plan" not in state:
        params = state["params"]
        config, sampler = config_from(params), sampler_settings(params)
        prompts = read_slimset(state["slimset"])[: config.gain_prompts]
        reference = gain_reference(config, capture)
        plan = plan_gain_shards(state["pipe"], prompts, sampler, shards=gain_shards(params), num_calls=config.gain_calls,
                                rel_noise=config.rel_noise, seed=sampler.seed, model_hash=state["model_hash"],
                                reference=reference)
        state["gain_plan"] = (plan, prompts, sampler, reference)
    return state["gain_plan"]


def warm_worker(workspace: str, threads: int | None = None) -> int:
    """Load the pipeline and plan the capture on this worker (what a benchmark does before its clock starts)."""
    _capture_plan(_worker_state(workspace, threads))
    return os.getpid()


def _worker_device(setting: str) -> str:
    """On a local cluster of a multi-GPU machine, worker i takes GPU i (mod the count); elsewhere the setting."""
    import torch

    if str(setting) not in ("auto", "cuda") or not torch.cuda.is_available():
        return str(setting)
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return str(setting)
    index = name if isinstance(name, int) else 0
    return f"cuda:{index % torch.cuda.device_count()}"


def plan_digest(manifest: list[dict]) -> str:
    """One hash of a whole shard plan (every shard's digest in order): workers that planned alike agree on it."""
    import hashlib

    return hashlib.sha256("".join(entry["digest"] for entry in manifest).encode()).hexdigest()


KILL_AFTER_CHECKPOINT = "SLIMDIFF_KILL_AFTER_CHECKPOINT"


@contextmanager
def kill_after_checkpoint(pipe, index: int, digest: str, folder: Path) -> Iterator[None]:
    """Test-only fault injection around one try of a capture shard; nothing unless ``SLIMDIFF_KILL_AFTER_CHECKPOINT``
    names a folder. Then the try appends {index, digest, pid, resumed_from} to ``<folder>/tries.jsonl`` (resumed_from:
    the prompts its shard's checkpoint held at the start), and at the first denoiser call after this try wrote the
    checkpoint, the first such try of the run claims ``<folder>/killed.json`` (created exclusively: one kill per folder),
    records {index, digest, pid} there and SIGKILLs its own process: a worker lost mid-shard, at a known point."""
    target = os.environ.get(KILL_AFTER_CHECKPOINT)
    if not target:
        yield
        return
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.statistics.shards import read_header

    root = Path(target)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / f".{digest}.ckpt"

    def stamp() -> tuple[int, int] | None:
        try:
            status = checkpoint.stat()
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns

    before = stamp()
    try:
        resumed = read_header(checkpoint)["metadata"]["checkpoint"]["done"] if before else 0
    except (OSError, ValueError, KeyError):
        resumed = None  # unreadable: the capture says so and starts over
    entry = {"index": index, "digest": digest, "pid": os.getpid(), "resumed_from": resumed}
    with open(root / "tries.jsonl", "a") as log:  # one short line per append: whole lines from every process
        log.write(json.dumps(entry) + "\n")

    def kill(module, args, kwargs) -> None:
        if stamp() in (None, before):
            return  # this try has not checkpointed yet
        try:
            claim = os.open(root / "killed.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # the run's one kill has happened
        os.write(claim, json.dumps({"index": index, "digest": digest, "pid": os.getpid()}).encode())
        os.fsync(claim)
        os.close(claim)
        os.kill(os.getpid(), signal.SIGKILL)

    handle = denoiser_of(pipe)[1].register_forward_pre_hook(kill, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@task(name="capture-shard", task_run_name="capture-shard-{index}", retries=2, retry_delay_seconds=2)
def shard_task(workspace: str, index: int, threads: int | None) -> dict[str, Any]:
    """Plan on this worker (cached per worker) and capture shard ``index`` of the plan, resuming from its checkpoint
    when a killed try left one; a shard whose file is there is not recomputed. Every task plans for itself, so all
    workers load their model at once instead of one planning while the others wait."""
    import time

    from slimdiff.pipeline.stages import SHARD_DIR
    from slimdiff.statistics.shards import capture_shard

    started, start = time.time(), time.perf_counter()
    state = _worker_state(workspace, threads)
    params, pipe, plan = state["params"], state["pipe"], _capture_plan(state)
    manifest = plan.manifest()
    out = {"index": index, "plan_digest": plan_digest(manifest), "shards": manifest, "pid": os.getpid(),
           "host": socket.gethostname(), "started": started}
    if index >= len(plan.shards):  # fewer shards than capture.shards x site_groups (fewer prompts or sites)
        return {**out, "computed": False, "seconds": time.perf_counter() - start, "ended": time.time()}
    shard = plan.shards[index]
    folder = Path(workspace) / SHARD_DIR
    computed = not plan.path(folder, shard).is_file()
    with kill_after_checkpoint(pipe, index, shard.digest, folder):
        capture_shard(pipe, plan, shard, folder, checkpoint_every=int(params["capture"].get("checkpoint_every", 100)),
                      model_hash=state["model_hash"])
    return {**out, "digest": shard.digest, "computed": computed, "seconds": time.perf_counter() - start,
            "ended": time.time()}


@flow(name="slimdiff-capture-shards", log_prints=True)
def capture_shards(workspace: str, jobs: int, threads: int | None = None) -> dict[str, Any]:
    """One task per shard index below ``jobs`` (shards x site groups) across the workers; fails if any shard fails
    for good, or if two workers planned different shards (the model, prompts or params changed during the run)."""
    root = str(Path(workspace).resolve())
    results = [future.result() for future in [shard_task.submit(root, i, threads) for i in range(jobs)]]
    return _collect("capture", results)


@task(name="gains-shard", task_run_name="gains-shard-{index}", retries=2, retry_delay_seconds=2)
def gain_shard_task(workspace: str, index: int, threads: int | None) -> dict[str, Any]:
    """Plan the gains on this worker (cached) and measure shard ``index``'s modules, resuming from its checkpoint;
    a shard whose file is there is not measured again."""
    import time

    from slimdiff.pipeline.stages import GAIN_SHARD_DIR, config_from, factorisation_recorder
    from slimdiff.scoring.gain_shards import measure_gain_shard

    started, start = time.time(), time.perf_counter()
    state = _worker_state(workspace, threads)
    plan, prompts, sampler, reference = _gain_plan(state)
    manifest = plan.manifest()
    out = {"index": index, "plan_digest": plan_digest(manifest), "shards": manifest, "pid": os.getpid(),
           "host": socket.gethostname(), "started": started}
    if index >= len(plan.shards):  # fewer modules than score.gain_shards
        return {**out, "computed": False, "seconds": time.perf_counter() - start, "ended": time.time()}
    shard = plan.shards[index]
    folder = Path(workspace) / GAIN_SHARD_DIR
    computed = not plan.path(folder, shard).is_file()
    record = factorisation_recorder(config_from(state["params"]), reference, state["pipe"], Path(workspace))
    measure_gain_shard(state["pipe"], plan, shard, prompts, sampler, folder, model_hash=state["model_hash"],
                       reference=reference, record=record)
    return {**out, "digest": shard.digest, "computed": computed, "seconds": time.perf_counter() - start,
            "ended": time.time()}


@flow(name="slimdiff-gains-shards", log_prints=True)
def gains_shards(workspace: str, jobs: int, threads: int | None = None) -> dict[str, Any]:
    """One task per gains shard index below ``jobs`` across the workers (module subsets; see slimdiff.scoring.gain_shards)."""
    root = str(Path(workspace).resolve())
    results = [future.result() for future in [gain_shard_task.submit(root, i, threads) for i in range(jobs)]]
    return _collect("gains", results)


def _collect(what: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    plans = {r["plan_digest"] for r in results}
    if len(plans) > 1:
        raise ValueError(f"the workers planned {len(plans)} different {what} runs: the model, prompts or params.yaml "
                         "changed during the run; re-run it")
    manifest = results[0]["shards"]
    computed = [r for r in results if r["computed"]]
    finished = sorted(r["index"] for r in results if "digest" in r)  # each has its file now (computed or not)
    print(f"{what}: {len(computed)} of {len(manifest)} shards computed on the cluster "
          f"({len(manifest) - len(computed)} were already there)")
    return {"shards": manifest, "computed": computed, "finished": finished}


def local_worker_environment() -> None:
    """Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (its default ``pre-spawn-environ``): glibc
    then maps and unmaps every large tensor, and a capture runs 1.8x slower (measured: 25 reference prompts 6.3 s
    against 11.2 s on one thread). Unset it for the workers of a local cluster; OMP/MKL stay at one thread each.
    Dask's statistical profiler (a stack sample every 10 ms, for the dashboard) is off: a local capture cluster
    starts no dashboard, and the sampler would take the GIL from the shard's thread on a core it shares."""
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                     "distributed.worker.profile.enabled": False})


def prefect_api_url() -> str:
    """The Prefect API this process talks to: the configured server, or the temporary one Prefect started here."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url)


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``LocalCluster`` arguments for ``workers`` one-thread worker processes that report to this process's Prefect
    API. Without ``PREFECT_API_URL`` each worker's first task starts a Prefect server of its own (measured: 9 s
    before a worker runs its first shard, and one more server process per worker competing for the cores)."""
    local_worker_environment()
    return dict(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                env={"PREFECT_API_URL": prefect_api_url()})


def task_runner(settings: dict[str, Any], jobs: int):
    """A DaskTaskRunner for ``settings`` (from :func:`sharding`) and the threads each local worker gets."""
    from prefect_dask import DaskTaskRunner

    if settings["cluster"] != LOCAL:
        api = prefect_api_url()
        if any(host in api for host in ("://127.0.0.1", "://localhost", "://[::1]")):
            print(f"capture: warning: this flow's Prefect API is {api}, which the workers of {settings['cluster']} "
                  "cannot reach: each records its shard tasks in a Prefect server of its own. Set PREFECT_API_URL "
                  "to a server both sides reach (docs/distributed.md)", file=sys.stderr)
        return DaskTaskRunner(address=settings["cluster"]), None
    import torch

    cores = os.cpu_count() or 1
    workers = settings["workers"] or (torch.cuda.device_count() if torch.cuda.is_available() else cores)
    workers = max(1, min(workers, jobs))
    threads = max(1, cores // workers)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(workers)), threads


def fan_out_capture(workspace: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Run the capture's shards on the cluster when the capture is sharded and out of date; None otherwise."""
    settings = sharding(params)
    if not settings["sharded"] or not stage_is_stale(workspace, "capture"):
        return None
    return _fan_out("capture", capture_shards, workspace, settings, settings["shards"] * settings["site_groups"])


def fan_out_gains(workspace: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Run the gains shards on the cluster when ``score.gain_shards`` > 1 and the gains are out of date; None otherwise."""
    settings = sharding(params)
    if settings["gain_shards"] <= 1 or not stage_is_stale(workspace, "gains"):
        return None
    return _fan_out("gains", gains_shards, workspace, settings, settings["gain_shards"])


def _fan_out(stage: str, sub_flow, workspace: Path, settings: dict[str, Any], jobs: int) -> dict[str, Any]:
    from flows.tasks import StageError

    runner, threads = task_runner(settings, jobs)
    try:
        return sub_flow.with_options(task_runner=runner)(str(workspace), jobs, threads)
    except Exception as error:  # a shard that failed for good (its retries spent, or Dask's KilledWorker)
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise StageError(f"stage {stage}: error: the shard fan-out on {settings['cluster']} failed "
                         f"({type(error).__name__}: {message}); re-run: finished shards are kept") from error
