"""The capture fanned out over Dask workers from Prefect (docs/distributed.md).

With ``capture.shards`` (or ``capture.site_groups``) above 1, the compress flow runs this fan-out just before the
DVC ``capture`` stage, when DVC says the stage is out of date: a sub-flow on a ``prefect_dask.DaskTaskRunner``
plans the shards on a worker, then runs one Prefect task per missing shard on the workers (each writes its
content-addressed file atomically, see ``slimdiff.shards``). The stage then finds every shard, verifies and merges
them; it computes in its own process only shards that are still missing (a plain ``dvc repro``).

``capture.cluster``: ``local`` starts a Dask ``LocalCluster`` of worker processes (nanny-supervised: a killed
worker is restarted and its shard re-run, resuming from the shard's checkpoint) for the length of the sub-flow;
``tcp://host:port`` uses a running Dask scheduler whose workers see this workspace at the same path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task

LOCAL = "local"


def sharding(params: dict[str, Any]) -> dict[str, Any]:
    """(shards, site_groups, cluster, workers) of ``params.yaml: capture``, checked; one-line errors."""
    c = params["capture"]
    out: dict[str, Any] = {}
    for key in ("shards", "site_groups"):
        value = c.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"params.yaml capture.{key} must be a whole number >= 1, got {value!r}")
        out[key] = value
    workers = c.get("workers")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"params.yaml capture.workers must be null or a whole number >= 1, got {workers!r}")
    out["workers"] = workers
    out["cluster"] = parse_cluster(c.get("cluster", LOCAL))
    out["sharded"] = out["shards"] * out["site_groups"] > 1
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
    if not settings["sharded"] or settings["cluster"] == LOCAL:
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


def capture_is_stale(workspace: Path) -> bool:
    """Whether DVC would run the ``capture`` stage (so a fan-out is worth starting)."""
    dvc = Path(sys.executable).with_name("dvc")
    result = subprocess.run([str(dvc) if dvc.exists() else "dvc", "status", "--json", "capture"], cwd=workspace,
                            capture_output=True, text=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if result.returncode != 0:
        return True  # the stage itself will report what is wrong
    try:
        return bool(json.loads(result.stdout or "{}"))
    except json.JSONDecodeError:
        return True


# ------------------------------------------------------------------------------------------------ worker side

_WORKER: dict[tuple, tuple] = {}


def _worker_pipeline(workspace: str, threads: int | None):
    """(params, pipe, plan) for this workspace, built once per worker process (keyed by the model files' stamps)."""
    from slimdiff.device import apply_threads
    from slimdiff.shards import plan_shards
    from slimdiff.stages import load_params, read_slimset

    if threads:
        apply_threads(threads)
    root = Path(workspace)
    params = load_params(root / "params.yaml")
    model = root / str(params["model"]["path"])
    stamp = tuple(sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in model.rglob("*") if p.is_file()))
    slimset = root / "outputs" / "slimset" / "slimset.jsonl"
    key = (workspace, stamp, slimset.stat().st_mtime_ns, (root / "params.yaml").stat().st_mtime_ns)
    if key not in _WORKER:
        from slimdiff.stages import _pipeline, sampler_settings

        params["model"]["path"] = str(model)
        params["model"]["device"] = _worker_device(params["model"].get("device", "auto"))
        pipe = _pipeline(params)
        c = params["capture"]
        plan = plan_shards(pipe, read_slimset(slimset), sampler_settings(params), shards=int(c.get("shards", 1)),
                           site_groups=int(c.get("site_groups", 1)), num_buckets=int(c["num_buckets"]),
                           batch_size=int(c["batch_size"]), model_id=str(params["model"].get("id", "")))
        _WORKER.clear()
        _WORKER[key] = (params, pipe, plan)
    return _WORKER[key]


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


@task(name="capture-plan", retries=1, retry_delay_seconds=2)
def plan_task(workspace: str, threads: int | None) -> dict[str, Any]:
    """The shard plan (computed on a worker: it loads and hashes the model) and which shards are missing."""
    from slimdiff.stages import SHARD_DIR

    _, _, plan = _worker_pipeline(workspace, threads)
    folder = Path(workspace) / SHARD_DIR
    missing = {s.index for s in plan.missing(folder)}
    return {"shards": [{**entry, "missing": entry["index"] in missing} for entry in plan.manifest()]}


@task(name="capture-shard", task_run_name="capture-shard-{index}", retries=2, retry_delay_seconds=2)
def shard_task(workspace: str, index: int, digest: str, threads: int | None) -> dict[str, Any]:
    """Capture one shard on this worker (resuming from its checkpoint when a killed try left one)."""
    import time

    from slimdiff.shards import capture_shard
    from slimdiff.stages import SHARD_DIR

    start = time.perf_counter()
    params, pipe, plan = _worker_pipeline(workspace, threads)
    shard = plan.shards[index]
    if shard.digest != digest:
        raise ValueError(f"shard {index}: this worker plans digest {shard.digest[:12]}, the flow planned {digest[:12]}: "
                         "the model, prompts or params changed during the run")
    capture_shard(pipe, plan, shard, Path(workspace) / SHARD_DIR, checkpoint_every=int(params["capture"].get("checkpoint_every", 100)))
    return {"index": index, "digest": digest, "seconds": time.perf_counter() - start, "pid": os.getpid(),
            "host": socket.gethostname()}


@flow(name="slimdiff-capture-shards", log_prints=True)
def capture_shards(workspace: str, threads: int | None = None) -> dict[str, Any]:
    """Plan on a worker, then one task per missing shard across the workers; fails if any shard fails for good."""
    root = str(Path(workspace).resolve())
    plan = plan_task.submit(root, threads).result()
    todo = [entry for entry in plan["shards"] if entry["missing"]]
    futures = [shard_task.submit(root, entry["index"], entry["digest"], threads) for entry in todo]
    done = [future.result() for future in futures]
    print(f"capture: {len(done)} of {len(plan['shards'])} shards computed on the cluster "
          f"({len(plan['shards']) - len(todo)} were already there)")
    return {"shards": plan["shards"], "computed": done}


def local_worker_environment() -> None:
    """Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (its default ``pre-spawn-environ``): glibc
    then maps and unmaps every large tensor, and a capture runs 1.8x slower (measured: 25 reference prompts 6.3 s
    against 11.2 s on one thread). Unset it for the workers of a local cluster; OMP/MKL stay at one thread each."""
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def task_runner(settings: dict[str, Any], jobs: int):
    """A DaskTaskRunner for ``settings`` (from :func:`sharding`) and the threads each local worker gets."""
    from prefect_dask import DaskTaskRunner

    if settings["cluster"] != LOCAL:
        return DaskTaskRunner(address=settings["cluster"]), None
    import torch

    cores = os.cpu_count() or 1
    workers = settings["workers"] or (torch.cuda.device_count() if torch.cuda.is_available() else cores)
    workers = max(1, min(workers, jobs))
    threads = max(1, cores // workers)
    kwargs = dict(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    local_worker_environment()
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs), threads


def fan_out_capture(workspace: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Run the capture's shards on the cluster when the capture is sharded and out of date; None otherwise."""
    settings = sharding(params)
    if not settings["sharded"] or not capture_is_stale(workspace):
        return None
    from flows.tasks import StageError

    runner, threads = task_runner(settings, settings["shards"] * settings["site_groups"])
    try:
        return capture_shards.with_options(task_runner=runner)(str(workspace), threads)
    except Exception as error:  # a shard that failed for good (its retries spent, or Dask's KilledWorker)
        message = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise StageError(f"stage capture: error: the shard fan-out on {settings['cluster']} failed "
                         f"({type(error).__name__}: {message}); re-run: finished shards are kept") from error
