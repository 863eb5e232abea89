"""Prefect tasks: one per DVC stage, plus tracking. Flows in this package chain them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import task

STAGES = ("curate", "capture", "gains", "latency", "score", "allocate", "decompose", "evaluate", "report")


class StageError(RuntimeError):
    """A DVC stage failed; the message carries the stage's own last error line."""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # stage commands say `python`: make it this interpreter, whatever the caller's PATH
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def dvc_repro(workspace: Path, stage: str) -> bool:
    """Run one stage with ``dvc repro --single-item``; True if it ran, False if DVC found it unchanged.

    The stage's output (progress bars included) streams to this process's stderr as it comes.
    """
    dvc = Path(sys.executable).with_name("dvc")
    command = [str(dvc) if dvc.exists() else "dvc", "repro", "--single-item", stage]
    process = subprocess.Popen(command, cwd=workspace, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    assert process.stdout is not None
    raw = getattr(sys.stderr, "buffer", None)
    for chunk in iter(lambda: process.stdout.read1(4096), b""):
        chunks.append(chunk)
        if raw is not None:
            raw.write(chunk)
        else:
            sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
    returncode = process.wait()
    output = b"".join(chunks).decode(errors="replace")
    if returncode != 0:
        lines = [l for l in output.replace("\r", "\n").splitlines() if l.strip()]
        stage_errors = [l for l in lines if l.startswith(f"stage {stage}: error")]
        raise StageError(stage_errors[-1] if stage_errors else f"stage {stage} failed: " + (lines[-1] if lines else "no output"))
    return f"Running stage '{stage}'" in output


@task(name="stage", task_run_name="{stage}", retries=0)
def run_stage(workspace: str, stage: str) -> bool:
    return dvc_repro(Path(workspace), stage)


@task(name="resumable-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10)
def run_resumable(workspace: str, stage: str) -> bool:
    """The long stages (capture, gains) checkpoint as they go: a retry resumes where the failed try stopped,
    so there is no timeout to guess; a run takes as long as its prompts need."""
    return dvc_repro(Path(workspace), stage)


RESUMABLE_STAGES = ("capture", "gains")


@task(name="track")
def track(workspace: str, params: dict[str, Any], checkpoint_hash: str, stages_run: dict[str, bool]) -> dict[str, Any]:
    from flows.tracking import log_compression

    return log_compression(Path(workspace), params, checkpoint_hash, stages_run)
