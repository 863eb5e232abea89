"""The main job: run the DVC stages as Prefect tasks, then log, register and gate the compressed model.

    python -m flows.compress [--workspace .] [--budget 0.4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow

from flows.tasks import RESUMABLE_STAGES, STAGES, StageError, run_resumable, run_stage, track
from flows.tracking import TrackingError, check_tracking_uri, folder_hash, tracking_uri


def preflight(workspace: Path) -> dict[str, Any]:
    """Everything that can be checked before any stage runs: params, model folder, prompts, budget, tracking."""
    from slimdiff.stages import config_from, device_settings, load_params

    if not (workspace / "dvc.yaml").is_file():
        raise FileNotFoundError(f"{workspace / 'dvc.yaml'} not found: not a slimdiff workspace")
    params = load_params(workspace / "params.yaml")
    model = workspace / str(params["model"]["path"])
    if not (model / "model_index.json").is_file():
        raise FileNotFoundError(f"model path {params['model']['path']!r} is not a diffusers pipeline folder (no model_index.json)")
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
    device_settings(params)  # a device or dtype this machine cannot run fails here, before any stage
    check_tracking_uri(tracking_uri(workspace))
    return params


@flow(name="slimdiff-compress", log_prints=True)
def compress(workspace: str = ".", checkpoint_hash: str | None = None) -> dict[str, Any]:
    """Run curate -> ... -> report (DVC skips unchanged stages) and track the result in MLflow."""
    root = Path(workspace).resolve()
    params = preflight(root)
    stages_run: dict[str, bool] = {}
    for stage in STAGES:
        task = run_resumable if stage in RESUMABLE_STAGES else run_stage
        stages_run[stage] = task(str(root), stage)
    checkpoint = checkpoint_hash or folder_hash(root / str(params["model"]["path"]))
    result = track(str(root), params, checkpoint, stages_run)
    result["stages_run"] = stages_run
    print(f"registered {result['name']} version {result['version']} ({'champion' if result['gate'] else 'candidate'}): {result['reason']}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=".", help="folder with dvc.yaml and params.yaml (default: .)")
    args = parser.parse_args(argv)
    try:
        preflight(Path(args.workspace).resolve())
        result = compress(args.workspace)
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
