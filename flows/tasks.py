"""Prefect tasks: one per DVC stage, plus tracking. Flows in this package chain them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
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


def stale_temporaries(workspace: Path, stage: str) -> list[Path]:
    """What a killed run of ``stage`` left beside its outputs: the temporaries of ``slimdiff.utils.atomic_path`` /
    ``atomic_dir`` (``.<name>.<random>.tmp``, ``.<name>.<random>.old`` while a folder is swapped) next to each
    output of the stage in ``dvc.yaml`` and next to its checkpoint (``<folder>/.checkpoints/<name>``).

    A SIGKILL (OOM killer, ``docker kill``, power loss) during a write skips the cleanup of the temporary; DVC
    never sees it (it is not an output), so without this a killed model save leaves a partial pipeline copy
    in ``outputs/`` for good, one more per kill.
    """
    spec = yaml.safe_load((workspace / "dvc.yaml").read_text()) or {}
    entry = (spec.get("stages") or {}).get(stage) or {}
    found: list[Path] = []
    for item in [*(entry.get("outs") or []), *(entry.get("metrics") or []), *(entry.get("plots") or [])]:
        out = str(next(iter(item)) if isinstance(item, dict) else item)
        if "${" in out:
            continue  # templated outputs: not resolved here (none in this project's dvc.yaml)
        out_path = workspace / out
        for folder in (out_path.parent, out_path.parent / ".checkpoints"):
            if not folder.is_dir():
                continue
            # mkstemp/mkdtemp names: "." + name + "." + 8 random characters + suffix; nothing else matches
            pattern = re.compile(rf"^\.{re.escape(out_path.name)}\.[A-Za-z0-9_]{{8}}\.(tmp|old)$")
            found += [p for p in folder.iterdir() if pattern.match(p.name)]
    return sorted(set(found))


def remove_stale_temporaries(workspace: Path, stage: str) -> list[Path]:
    """Remove :func:`stale_temporaries` (before the stage runs; nothing reads them). Runs are sequential: a
    concurrent run of the same stage in the same workspace is unsupported anyway (DVC itself removes the
    stage's outputs before running it)."""
    removed = stale_temporaries(workspace, stage)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if removed:
        names = ", ".join(str(p.relative_to(workspace)) for p in removed)
        print(f"stage {stage}: removed {len(removed)} temporary file(s) left by an interrupted run: {names}", file=sys.stderr)
    return removed


def dvc_repro(workspace: Path, stage: str) -> bool:
    """Run one stage with ``dvc repro --single-item``; True if it ran, False if DVC found it unchanged.

    The stage's output (progress bars included) streams to this process's stderr as it comes. Temporaries
    that a killed earlier run of the stage left beside its outputs are removed first.
    """
    remove_stale_temporaries(workspace, stage)
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
