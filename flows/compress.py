"""The main job: run the DVC stages as Prefect tasks, then log, register and gate the compressed model.

    python -m flows.compress [--workspace .] [--budget 0.4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import flow

from flows.distributed import check_cluster, fan_out_capture, fan_out_gains
from flows.tasks import (
    RESUMABLE_STAGES,
    STAGES,
    StageError,
    configure_run_logging,
    publish_summary,
    run_resumable,
    run_stage,
    track,
)
from flows.tracking import folder_hash
from flows.tracking_server import TrackingError, check_tracking_uri, tracking_uri


def preflight(workspace: Path, show_memory: bool = True) -> dict[str, Any]:
    """Everything that can be checked before any stage runs: params, model folder, prompts, budget, tracking, memory
    (``show_memory``: print each stage's predicted peak memory)."""
    from slimdiff.environment import quiet_libraries
    from slimdiff.pipeline.stages import (
        check_memory,
        check_model_supported,
        config_from,
        device_settings,
        held_out_samplers,
        load_params,
        sampler_settings,
    )

    quiet_libraries()  # before the memory footprint imports the pipeline's classes (transformers' notices)
    if not (workspace / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{workspace / 'dvc.yaml'} not found: not a slimdiff workspace")
    params = load_params(workspace / "params.yaml")
    model = workspace / str(params["model"]["path"])
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"model path {params['model']['path']!r} is not a diffusers pipeline folder (no model_index.json)")
    if "code" not in params:
        raise ValueError("params.yaml has no code: the folder holding slimdiff/, relative to the workspace (dvc.yaml's "
                       "code dependencies are read there): code: . at the repository root")
    if not (workspace / str(params["code"]) / "slimdiff" / "pipeline" / "stages.py").is_file():
        raise FileNotFoundError(f"params.yaml code: {params['code']!r} does not hold slimdiff/ (dvc.yaml's code "
                                "dependencies are read there; the path is relative to the workspace)")
    # the sampler settings, the denoiser class (an adapter for it) and the call arguments the sampler passes
    check_model_supported(model, sampler_settings(params), guided_gains=params["score"].get("gain_target") == "guided")
    for source in params["curate"]["sources"]:
        path = workspace / str(source)
        if "/" in str(source) and not str(source).startswith(("data/", "./", "/")) and not path.exists():
            continue  # a hub dataset id; curate reports it if it cannot be loaded
        if not path.is_file():
            raise FileNotFoundError(f"prompt source {source!r} not found")
        if path.stat().st_size == 0:
            raise ValueError(f"prompt source {source!r} is empty")
    config_from(params)  # budget, budget kind, granularity: the one mapping of params.yaml to settings
    for key in ("device", "dtype"):
        if key not in params["model"]:
            raise ValueError(f"params.yaml has no model.{key} (the DVC stages read it); e.g. model.device: auto, model.dtype: float32")
    # paths in params.yaml are relative to the workspace (where the stages run)
    located = {**params, "model": {**params["model"], "path": str(model)}}
    device_settings(located)  # a device or dtype this machine cannot run fails here, before any stage
    held_out_samplers(located)  # evaluate.samplers: an unknown scheduler or a bad step count fails here
    # the tracking server and its credentials (a few requests) before the memory footprint (it builds the pipeline's
    # classes): an unreachable server or refused credentials fail with their one line and nothing else
    check_tracking_uri(tracking_uri(workspace))
    check_memory(located, show=show_memory)  # each stage's predicted peak memory; one that would not fit fails here
    check_cluster(params)  # capture.shards / capture.cluster: an unreachable cluster fails here (flows/distributed.py)
    if os.environ.get("SLIMDIFF_THREADS", "auto").strip().lower() != "auto":
        from slimdiff.device import choose_threads

        choose_threads()  # a bad SLIMDIFF_THREADS fails here, naming the value
    return params


@contextmanager
def stage_threads() -> Iterator[int]:
    """One thread count for every stage of this job: ``SLIMDIFF_THREADS`` (``auto`` by default) is resolved once,
    here, and the stage commands inherit the number, so the latency table and the evaluate stage's measurement
    run with the same threads. The caller's environment is restored afterwards."""
    from slimdiff.device import THREADS_ENV, choose_threads

    threads, why = choose_threads()
    print(f"torch threads for every stage: {threads} ({why})")
    previous = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(threads)
    try:
        yield threads
    finally:
        if previous is None:
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = previous


@flow(name="slimdiff-compress", log_prints=True)
def compress_flow(workspace: str = ".", checkpoint_hash: str | None = None) -> dict[str, Any]:
    """Run curate -> ... -> report (DVC skips unchanged stages) and track the result in MLflow."""
    configure_run_logging()
    started_at = time.time()  # the MLflow run starts here: its duration is the whole job's
    root = Path(workspace).resolve()
    params = preflight(root)
    stages_run: dict[str, bool] = {}
    durations: dict[str, float] = {}
    fanned_out: dict[str, dict[str, list[int]]] = {}  # stage -> shard indices the cluster finished / computed itself
    with stage_threads() as threads:
        for stage in STAGES:
            task = run_resumable if stage in RESUMABLE_STAGES else run_stage
            begin = time.perf_counter()
            fan_out = {"capture": fan_out_capture, "gains": fan_out_gains}.get(stage)
            if fan_out is not None:  # sharded capture / gains: the shards run on Dask workers before the stage merges
                done = fan_out(root, params)
                if done is not None:
                    fanned_out[stage] = {"finished": done["finished"],
                                         "computed": sorted(entry["index"] for entry in done["computed"])}
            stages_run[stage] = task(str(root), stage)
            durations[stage] = time.perf_counter() - begin
    checkpoint = checkpoint_hash or folder_hash(root / str(params["model"]["path"]))
    result = track(str(root), params, checkpoint, stages_run, started_at=started_at, durations=durations, threads=threads)
    result["stages_run"] = stages_run
    result["durations"] = durations
    result["fanned_out"] = fanned_out
    publish_summary(str(root), params, result, durations)
    print(f"registered {result['name']} version {result['version']} ({'champion' if result['gate'] else 'candidate'}): {result['reason']}"
          + (f"; MLflow run {result['run_url']}" if result.get("run_url") else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".", help="folder with dvc.yaml and params.yaml (default: .)")
    args = parser.parse_args(argv)
    try:
        # fail fast, before the flow (and a Prefect server) starts; the flow checks again and prints the memory table
        preflight(Path(args.workspace).resolve(), show_memory=False)
        result = compress_flow(args.workspace)
    except (FileNotFoundError, ValueError, KeyError, TrackingError, StageError) as error:
        print(f"compress: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    alias = "champion" if result["gate"] else "candidate"
    ran = [stage for stage, did in result["stages_run"].items() if did]
    print(f"stages run: {', '.join(ran) or 'none (all up to date)'}")
    print(f"registered {result['name']} version {result['version']} as '{alias}'"
          f"{' (unchanged, existing version)' if result.get('reused') else ''}; gate {result['reason']}")
    print(f"MLflow run {result['run_id']} at {result['tracking_uri']}; outputs in {Path(args.workspace).resolve() / 'outputs'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
