"""The main job's stages on a GPU, on the reference model: each stage's time, peak host RSS and peak GPU memory
beside slimdiff.pipeline.memory's prediction, and the job's metrics (issue 21).

The stages are the commands ``dvc.yaml`` runs (``python -m slimdiff.pipeline.stages <stage>``), in order, in a copy of this
workspace with ``model.device: cuda``. The flow's orchestration around them (Prefect, DVC, MLflow) runs on the CPU and
is tested there; it is not on the GPU machine's image and its wheels do not fit what a device call can carry.

    python benchmarks/gpu/job.py --out gpu_job.json --doc docs/benchmarks-gpu.md   # on a CUDA machine (run.sh)
    python benchmarks/gpu/job.py --smoke --out /tmp/job.json                        # tiny Flux workspace, any device
    python benchmarks/gpu/job.py --render-only [--out benchmarks/results/gpu_job.json] [--doc docs/benchmarks-gpu.md]

Measuring writes --out (with the command, the machine and the code version); its section of the page is rendered from
that file alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_results, write_sections  # noqa: E402

STAGES = ("curate", "capture", "gains", "latency", "score", "allocate", "decompose", "evaluate", "report")
HEADING = "## The main job's stages on the GPU (benchmarks/gpu/job.py)"
RESULTS = ROOT / "benchmarks" / "results" / "gpu_job.json"
DOC = ROOT / "docs" / "benchmarks-gpu.md"
GIB = 2**30


def reference_workspace(root: Path, device: str, overrides: dict) -> Path:
    """A copy of this workspace's job inputs (params, dvc.yaml, the reference model, its captions, evaluation prompts
    and evaluator) with ``overrides`` applied to params.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    for part in ("model", "captions.jsonl", "eval_prompts.jsonl", "evaluator"):
        source = ROOT / "data" / "reference" / part
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / "data" / "reference" / part)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["device"] = device
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_stages(root: Path, in_process: bool) -> dict:
    """Each stage in order: exit code, wall time and its own resource record."""
    from slimdiff.pipeline.stages import load_params, predict_memory

    previous = os.getcwd()
    os.chdir(root)
    try:
        _, _, prediction = predict_memory(load_params("params.yaml"))
    finally:
        os.chdir(previous)
    rows = {}
    for stage in STAGES:
        start = time.monotonic()
        if in_process:
            from slimdiff.pipeline.stages import main

            os.chdir(root)
            try:
                code = main([stage])
            finally:
                os.chdir(previous)
            tail = ""
        else:
            done = subprocess.run([sys.executable, "-m", "slimdiff.pipeline.stages", stage], cwd=root, capture_output=True, text=True)
            code, tail = done.returncode, (done.stdout + done.stderr)[-1500:]
        record_path = root / "outputs" / ".resources" / f"{stage}.json"
        record = json.loads(record_path.read_text()) if record_path.is_file() and code == 0 else {}
        predicted = prediction.get(stage)
        rows[stage] = {"exit_code": code, "wall_seconds": time.monotonic() - start, **record,
                       "predicted_host_bytes": predicted.host if predicted else None,
                       "predicted_device_bytes": predicted.device if predicted else None,
                       "error_tail": tail if code else ""}
        print(f"{stage}: exit {code}, {rows[stage]['wall_seconds']:.1f} s"
              + (f", host {record['peak_host_bytes'] / GIB:.2f} GiB (predicted {predicted.host / GIB:.2f}), GPU "
                 f"{record['peak_device_bytes'] / GIB:.2f} GiB (predicted {predicted.device / GIB:.2f})"
                 if record and predicted else ""), flush=True)
        if code:
            break
    return rows


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(result: dict, doc: Path = DOC) -> list[tuple[Path, str, str]]:
    """Its section of the GPU page; a smoke run has none."""
    return [] if result.get("mode") == "smoke" else [(Path(doc), HEADING, section(result))]


def section(result: dict) -> str:
    rows = [[stage, r["exit_code"], f"{r['wall_seconds']:.1f}", _gib(r.get("peak_host_bytes")), _gib(r.get("predicted_host_bytes")),
             _gib(r.get("peak_device_bytes")), _gib(r.get("predicted_device_bytes"))] for stage, r in result["stages"].items()]
    metrics = result.get("metrics") or {}
    latency = (metrics.get("latency") or {}).get("denoiser") or {}
    lines = [HEADING, "", *provenance(result, f"{result['device']}; torch {result['torch']}"), "",
             "The job's "
             f"stages (`python -m slimdiff.pipeline.stages <stage>`, what `dvc repro` runs) on the reference model with "
             f"`model.device: {result['model_device']}`, settings {json.dumps(result['overrides'])}; measured peaks are "
             "each stage process's own (`VmHWM`, `torch.cuda.max_memory_reserved`), predicted ones "
             "`slimdiff.pipeline.memory`'s.", "",
             markdown_table(["stage", "exit", "seconds", "peak host RSS (GiB)", "predicted", "peak GPU (GiB)", "predicted"], rows),
             ""]
    if metrics:
        lines += [f"Metrics: image PSNR {metrics.get('fidelity', {}).get('image_psnr_db', float('nan')):.2f} dB, "
                  f"alignment ratio {(metrics.get('alignment') or {}).get('ratio_to_original')}, denoiser speed-up "
                  f"x{latency.get('speedup') or float('nan'):.2f} on the GPU.", ""]
    return "\n".join(lines)


def _gib(value) -> str:
    return "-" if not value else f"{value / GIB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny Flux workspace on whatever device there is, in-process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None, help=f"results file (required unless --render-only: "
                        f"default {RESULTS.relative_to(ROOT)})")
    parser.add_argument("--doc", default="", help="page to write this section into (none with --smoke)")
    parser.add_argument("--workspace", type=Path, default=None)
    parser.add_argument("--render-only", action="store_true", help="only render the section from --out into --doc "
                        "(default docs/benchmarks-gpu.md)")
    args = parser.parse_args(argv)
    if args.render_only:
        result = load(args.out or RESULTS)
        if result is None:
            raise SystemExit(f"{args.out or RESULTS}: no results file; run the benchmark first")
        write_sections(render(result, Path(args.doc or DOC)))
        return 0
    if args.out is None:
        parser.error("--out is required when measuring")
    from slimdiff.device import describe_device, resolve_device

    record = run_record(__file__, argv)

    device = resolve_device(args.device)
    root = args.workspace or Path(tempfile.mkdtemp(prefix="slimdiff-gpu-job-"))
    if args.smoke:
        from tests import helpers as testing

        overrides = {"allocate": {"budget": 0.3}}
        ws = testing.make_workspace(root / "ws", {**overrides, "model": {"device": device.type}}, family="flux")
    else:
        overrides = {"curate": {"n": 200}, "evaluate": {"n": 50, "latency_repeats": 5}, "report": {"samples": 8}}
        ws = reference_workspace(root / "ws", device.type, overrides)
    start = time.monotonic()
    stages = run_stages(ws, in_process=args.smoke)
    metrics_path = ws / "outputs" / "metrics.json"
    result = {**record, "mode": "smoke" if args.smoke else "full",
              "device": describe_device(device), "model_device": device.type, "torch": torch.__version__,
              "python": platform.python_version(), "overrides": overrides,
              "seconds": time.monotonic() - start, "stages": stages,
              "metrics": json.loads(metrics_path.read_text()) if metrics_path.is_file() else None,
              "complete": all(r["exit_code"] == 0 for r in stages.values()) and len(stages) == len(STAGES)}
    write_results(args.out, result, indent=1)
    if args.doc and not args.smoke:
        write_sections(render(read_results(args.out), Path(args.doc)))
    if args.workspace is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
