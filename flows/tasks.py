"""Prefect tasks: one per DVC stage, plus tracking. Flows in this package chain them."""

from __future__ import annotations

import logging
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


# Prefect's run loggers: what the flows and tasks say (prints included, ``log_prints=True``) reaches the Prefect UI at
# INFO whatever ``PREFECT_LOGGING_LEVEL`` keeps for Prefect's own client, server and third-party loggers.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")
# the stage commands' own output lines, sent to the Prefect API only: the terminal already shows the raw stream
STAGE_LOGGER = "slimdiff.stage_output"


def configure_run_logging() -> None:
    """Our log lines at INFO in the Prefect UI; called at the start of every flow (idempotent)."""
    for name in RUN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    stage_logger = logging.getLogger(STAGE_LOGGER)
    if not any(getattr(h, "_slimdiff", False) for h in stage_logger.handlers):
        from prefect.logging.handlers import APILogHandler

        handler = APILogHandler()
        handler._slimdiff = True  # type: ignore[attr-defined]
        stage_logger.addHandler(handler)
    stage_logger.setLevel(logging.INFO)
    stage_logger.propagate = False


class _LineLogger:
    """Splits a byte stream into lines for the Prefect API: a carriage-return-updated progress bar becomes the one
    line it ends as (its last state), not one record per refresh."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk.decode(errors="replace")
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self._emit(line)

    def close(self) -> None:
        if self.pending:
            self._emit(self.pending)
        self.pending = ""

    def _emit(self, line: str) -> None:
        text = line.rstrip("\r").split("\r")[-1].rstrip()
        if text:
            self.logger.info(text)


# DVC's advice after every stage that changed dvc.lock ("To track the changes with git, run: git add dvc.lock", and
# how to enable auto staging): the workspace's dvc.lock is deliberately not committed (README: what a run changes in
# git), so the flow drops these lines from the stage output (terminal and Prefect log) instead of repeating them.
DVC_ADVICE = re.compile(r"^(To track the changes with git, run:|\tgit add .*dvc\.lock.*|To enable auto staging, run:|"
                        r"\tdvc config core\.autostage true)$")


class _DropDvcAdvice:
    """Passes a byte stream through line by line (a carriage-return-updated progress bar as it comes) without
    :data:`DVC_ADVICE` lines and the blank lines around them."""

    def __init__(self):
        self.partial, self.blanks, self.after_advice = "", 0, False

    def feed(self, chunk: bytes) -> str:
        self.partial += chunk.decode(errors="replace")
        out = []
        while True:
            cut = min((i for i in (self.partial.find("\n"), self.partial.find("\r")) if i >= 0), default=-1)
            if cut < 0:
                break
            line, end, self.partial = self.partial[:cut], self.partial[cut], self.partial[cut + 1:]
            if end == "\r":
                out.append(line + end)  # a progress bar's state: never advice
                continue
            if not line.strip():
                self.blanks += 1  # held until the next line says whether they surround advice
                continue
            if DVC_ADVICE.match(line):
                self.blanks, self.after_advice = 0, True
                continue
            out.append("" if self.after_advice else "\n" * self.blanks)
            self.blanks, self.after_advice = 0, False
            out.append(line + "\n")
        return "".join(out)

    def close(self) -> str:
        rest, self.partial = self.partial, ""
        return ("" if self.after_advice else "\n" * self.blanks) + rest


_ANY_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.(tmp|old)$")


def stale_temporaries(workspace: Path, stage: str) -> list[Path]:
    """What a killed run of ``stage`` left beside its outputs: the temporaries of ``slimdiff.files.atomic_path`` /
    ``atomic_dir`` (``.<name>.<random>.tmp``, ``.<name>.<random>.old`` while a folder is swapped) next to each
    output of the stage in ``dvc.yaml``, next to its checkpoint (``<folder>/.checkpoints/<name>``) and inside an
    output that is a folder (``outputs/report/.samples.png.<random>.tmp``).

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
        if out_path.is_dir() and not out_path.is_symlink():  # an output folder: the temporaries of files written into it
            found += [p for p in out_path.rglob(".*") if _ANY_TEMPORARY.match(p.name)]
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
    lines = _LineLogger(logging.getLogger(STAGE_LOGGER)) if _in_run_context() else None
    advice = _DropDvcAdvice()

    def show(text: str) -> None:
        if not text:
            return
        if raw is not None:
            raw.write(text.encode())
        else:
            sys.stderr.write(text)
        sys.stderr.flush()
        if lines is not None:
            lines.feed(text.encode())

    for chunk in iter(lambda: process.stdout.read1(4096), b""):
        chunks.append(chunk)
        show(advice.feed(chunk))
    returncode = process.wait()
    show(advice.close())
    if lines is not None:
        lines.close()
    output = b"".join(chunks).decode(errors="replace")
    if returncode != 0:
        lines = [l for l in output.replace("\r", "\n").splitlines() if l.strip()]
        stage_errors = [l for l in lines if l.startswith(f"stage {stage}: error")]
        raise StageError(stage_errors[-1] if stage_errors else f"stage {stage} failed: " + (lines[-1] if lines else "no output"))
    return f"Running stage '{stage}'" in output


def _in_run_context() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


# Task run names are the stage names as given (no random suffix): the Prefect UI lists curate, capture, ..., track.
@task(name="stage", task_run_name="{stage}", retries=0)
def run_stage(workspace: str, stage: str) -> bool:
    return dvc_repro(Path(workspace), stage)


@task(name="resumable-stage", task_run_name="{stage}", retries=2, retry_delay_seconds=10)
def run_resumable(workspace: str, stage: str) -> bool:
    """The long stages (capture, gains) checkpoint as they go: a retry resumes where the failed try stopped,
    so there is no timeout to guess; a run takes as long as its prompts need."""
    return dvc_repro(Path(workspace), stage)


RESUMABLE_STAGES = ("capture", "gains")


@task(name="track", task_run_name="track")
def track(workspace: str, params: dict[str, Any], checkpoint_hash: str, stages_run: dict[str, bool],
          started_at: float | None = None, durations: dict[str, float] | None = None, threads: int | None = None) -> dict[str, Any]:
    from flows.tracking import log_compression

    return log_compression(Path(workspace), params, checkpoint_hash, stages_run, started_at=started_at, durations=durations,
                           threads=threads)


@task(name="summary", task_run_name="summary")
def publish_summary(workspace: str, params: dict[str, Any], result: dict[str, Any], durations: dict[str, float]) -> str:
    """The run's Prefect artifact (markdown): metrics, gate decision, stage times, links to the MLflow run and version."""
    from prefect.artifacts import create_markdown_artifact

    from flows.descriptions import summary_markdown

    key = re.sub(r"[^a-z0-9-]+", "-", result["name"].lower()).strip("-")  # one artifact key per registered model
    markdown = summary_markdown(Path(workspace), params, result, durations)
    create_markdown_artifact(markdown=markdown, key=key,
                             description=f"{result['name']} version {result['version']}: gate {result['reason']}")
    return markdown
