"""The generation queue of a served model: one worker thread owns the pipeline, serves queued requests (coalescing equal settings) and stops a request at its time limit."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slimdiff.runtime.requests import (
    MEMORY_ENV,
    TIME_LIMIT_ENV,
    Busy,
    Limits,
    RequestSettings,
    ServingError,
    TimeLimit,
)


@dataclass(eq=False)
class Job:
    """One request in the queue; finished once (by the worker with images, or by the waiter at its deadline)."""

    prompts: list[str]
    settings: RequestSettings
    deadline: float  # time.monotonic()
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    step: int = 0  # denoising steps done (the worker's progress, for the time-limit message)
    images: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, images: Any = None, error: BaseException | None = None) -> bool:
        """Record the outcome unless one is recorded already; True if this call recorded it."""
        with self._lock:
            if self.done.is_set():
                return False
            self.images, self.error = images, error
            self.done.set()
            return True

    def time_limit_error(self, limit: float) -> TimeLimit:
        now = time.monotonic()
        where = (f"stopped after step {self.step} of {self.settings.steps}" if self.started is not None
                 else "it never started")
        waited = (self.started if self.started is not None else now) - self.arrived
        return TimeLimit(f"request exceeded the time limit of {limit:g} s ({TIME_LIMIT_ENV}): waited {waited:.1f} s in "
                         f"the queue, {where}; its compute has ended")


class _Stop(Exception):
    """Raised between denoising steps when no request of the batch wants its images any more."""


class GenerationQueue:
    """Requests wait here for the one worker thread that runs the pipeline; the worker takes the oldest request and,
    with ``coalesce``, every queued request whose settings equal it (up to ``max_batch`` prompts and the memory
    budget; it waits :attr:`Limits.batch_wait_s` at most for more), runs them as one batch and hands each its images.
    Between denoising steps it expires requests past their deadline and stops the batch when none still waits."""

    IDLE_EXIT_S = 300.0  # a worker idle this long ends (the next request starts one): a dropped model can be freed

    def __init__(self, generate: Generate, limits: Limits, time_limit: float, fits: Callable[[list[Job]], bool] | None = None,
                 on_start: Callable[[], None] | None = None):
        self.generate, self.limits, self.time_limit = generate, limits, time_limit
        self.fits = fits or (lambda jobs: True)
        self.on_start = on_start
        self.pending: deque[Job] = deque()
        self.condition = threading.Condition()
        self.worker: threading.Thread | None = None
        self.batches: list[int] = []  # prompts per batch run (for tests and the benchmark)
        self.last_run_s = 0.0  # the previous batch's generation time

    def submit(self, prompts: list[str], settings: RequestSettings) -> Job:
        job = Job(prompts, settings, time.monotonic() + self.time_limit)
        with self.condition:
            if len(self.pending) >= self.limits.max_queue:
                raise Busy(f"server busy: {len(self.pending)} requests are waiting (limit max_queue "
                           f"{self.limits.max_queue}); retry later")
            self.pending.append(job)
            if self.worker is None or not self.worker.is_alive():  # started lazily: after any fork of the server
                self.worker = threading.Thread(target=self._loop, name="slimdiff-generate", daemon=True)
                self.worker.start()
            self.condition.notify()
        return job

    def wait(self, job: Job) -> np.ndarray:
        """Block until the job's images are ready or its deadline passes; raises its error."""
        if not job.done.wait(timeout=max(0.0, job.deadline - time.monotonic())):
            job.finish(error=job.time_limit_error(self.time_limit))
        if job.error is not None:
            raise job.error
        return job.images

    def _take(self) -> list[Job]:
        """The oldest live job and, when coalescing, the queued jobs with the same settings that fit, waiting up to the
        batch window for more (caller holds the condition)."""
        while self.pending and self.pending[0].done.is_set():
            self.pending.popleft()  # expired while waiting
        if not self.pending:
            return []
        batch = [self.pending.popleft()]
        if self.limits.coalesce:
            self._join(batch)
            end = time.monotonic() + min(self.limits.batch_wait_s, 0.05 * self.last_run_s)
            while sum(len(j.prompts) for j in batch) < self.limits.max_batch and time.monotonic() < end:
                self.condition.wait(end - time.monotonic())
                self._join(batch)
        return batch

    def _join(self, batch: list[Job]) -> None:
        """Move the queued jobs with the batch's settings that fit into it."""
        count = sum(len(j.prompts) for j in batch)
        for job in list(self.pending):
            if job.done.is_set() or job.settings.batch_key != batch[0].settings.batch_key:
                continue
            if count + len(job.prompts) > self.limits.max_batch or not self.fits(batch + [job]):
                continue
            self.pending.remove(job)
            batch.append(job)
            count += len(job.prompts)

    def _loop(self) -> None:
        if self.on_start is not None:
            self.on_start()
        while True:
            with self.condition:
                batch = self._take()
                while not batch:
                    if not self.condition.wait(timeout=self.IDLE_EXIT_S):
                        batch = self._take()
                        if not batch:  # submit() sees no live worker (same lock) and starts a new one
                            self.worker = None
                            return
                    else:
                        batch = self._take()
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        now = time.monotonic()
        for job in batch:
            job.started = now

        def on_step(step: int) -> None:
            now = time.monotonic()
            for job in batch:
                job.step = step
                if now >= job.deadline:
                    job.finish(error=job.time_limit_error(self.time_limit))
            if all(job.done.is_set() for job in batch):
                raise _Stop

        try:
            on_step(0)
            self.batches.append(sum(len(j.prompts) for j in batch))
            del self.batches[:-1000]  # the recent ones: a long-running server keeps no growing history
            begin = time.monotonic()
            images = self.generate(batch, on_step)
            self.last_run_s = time.monotonic() - begin
        except _Stop:
            return
        except BaseException as error:  # noqa: BLE001 - every waiter gets the failure, the worker lives on
            message = (str(error).strip().splitlines() or [""])[0][:300]
            failure = RuntimeError(f"generation failed: {type(error).__name__}: {message}")
            for job in batch:
                job.finish(error=failure)
            return
        start = 0
        for job in batch:
            job.finish(images=images[start:start + len(job.prompts)])
            start += len(job.prompts)


def _available_memory(device) -> tuple[int, str]:
    """(bytes this process may still use, where the number comes from): CUDA's free memory on the device; on the CPU
    ``MemAvailable`` or the cgroup's remaining limit, whichever is smaller."""
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            remaining = int(limit) - used
            available = remaining if available is None else min(available, remaining)
    except (OSError, ValueError):
        pass
    if available is None:
        raise ServingError(f"cannot tell this machine's available memory: set {MEMORY_ENV} (e.g. 4GiB)")
    return available, "available memory"


def _denoiser_key(pipe) -> str:
    return "unet" if "unet" in pipe.components else "transformer"


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


# generate(jobs, on_step) -> uint8 images (sum of prompts, H, W, 3); on_step(step) is called after every step
Generate = Callable[[list[Job], Callable[[int], None]], np.ndarray]
