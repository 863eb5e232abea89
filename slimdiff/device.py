"""Where the engine runs: the job's device and dtype, and where float64 linear algebra can run.

Every tensor the engine makes follows the model: statistics accumulate on the model's device,
gain noise is drawn there, and decompositions run in float64 on that device when it has usable
float64 (CUDA data-centre parts: P100, V100, A100, H100/H200, B200), otherwise on the CPU.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# ``auto``: the dtype a local checkpoint's denoiser is stored in (``slimdiff.compress.resolve_model_dtype``)
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
# compute capabilities whose float64 rate is a usable fraction (1/2) of float32; the others run float64 at 1/32-1/64
_FULL_FLOAT64_CAPABILITIES = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}


class DeviceError(ValueError):
    """A device or dtype that this machine cannot run; the message names it and what would be valid."""


def resolve_device(spec: str | torch.device) -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``; fails naming the spec when it cannot run here."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise DeviceError(f"unknown device {str(spec)!r}; valid: {', '.join(DEVICE_CHOICES)}")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build, no usable GPU"
        raise DeviceError(f"device {text!r} requested but CUDA is not available here (torch {torch.__version__}, {build}); "
                          "use --device cpu or auto")
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= count:
        raise DeviceError(f"device {text!r} requested but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32``, ``float16`` or ``bfloat16`` (the model's weights and activations). ``auto`` (the dtype a checkpoint
    is stored in) needs the checkpoint: ``slimdiff.compress.resolve_model_dtype``."""
    if isinstance(name, torch.dtype):
        if name in DTYPES.values():
            return name
        raise DeviceError(f"unsupported dtype {name}; valid: {', '.join(DTYPES)}")
    key = str(name).strip().lower().removeprefix("torch.")
    if key == "auto":
        raise DeviceError("dtype 'auto' is the dtype a checkpoint is stored in: resolve it with the checkpoint "
                          "(slimdiff.compress.resolve_model_dtype)")
    if key not in DTYPES:
        raise DeviceError(f"unknown dtype {str(name)!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[key]


def check_dtype_runs(device: torch.device, dtype: torch.dtype) -> None:
    """Fail before any work when ``device`` cannot run ``dtype``: a tiny convolution, norm, linear and attention."""
    name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"dtype bfloat16 is not supported on {torch.cuda.get_device_name(device)} ({device}); use float16 or float32")
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=generator, device=device).to(dtype)
        kernel = torch.randn(4, 4, 3, 3, generator=generator, device=device).to(dtype)
        hidden = F.group_norm(F.conv2d(x, kernel, padding=1), 2).flatten(2).transpose(1, 2)
        tokens = F.linear(hidden, torch.randn(8, 4, generator=generator, device=device).to(dtype))[:, None]
        out = F.scaled_dot_product_attention(tokens, tokens, tokens)
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("non-finite result")
    except (RuntimeError, NotImplementedError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DeviceError(f"dtype {name} does not run on {device} ({reason}); use another --dtype") from None


def linalg_device(device: torch.device) -> torch.device:
    """Where float64 decompositions run for a model on ``device``: that GPU if its float64 is usable, else the CPU."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in _FULL_FLOAT64_CAPABILITIES:
        return device
    return torch.device("cpu")


def width_multiple(device: torch.device) -> int:
    """Per-head width multiple the device's fast kernels like: 8 on CUDA (fused attention and tensor cores
    want head widths in multiples of 8), 1 elsewhere."""
    return 8 if device.type == "cuda" else 1


def resolve_rank_step(value: int | str, device: torch.device) -> int:
    """``score.rank_step`` / ``--rank-step``: a whole number >= 1, or ``auto`` = ``width_multiple(device)``."""
    if str(value).strip().lower() == "auto":
        return width_multiple(device)
    try:
        step = int(value)
    except (TypeError, ValueError):
        raise DeviceError(f"rank step must be a whole number >= 1 or 'auto', got {value!r}") from None
    if step < 1 or str(step) != str(value).strip():
        raise DeviceError(f"rank step must be a whole number >= 1 or 'auto', got {value!r}")
    return step


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter (the CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """A human name: 'NVIDIA H100 80GB HBM3 (cuda:0)' or 'cpu'."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return str(device)


def synchronize(device: torch.device | None = None) -> None:
    """Wait for queued GPU work (on ``device``, or the current CUDA device when CUDA is in use), so a host clock
    times what the device did; nothing on the CPU."""
    if device is not None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# ---- CPU threads ---------------------------------------------------------------------------------------------------

THREADS_ENV = "SLIMDIFF_THREADS"


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (containers) when one is set."""
    import math
    import os
    from pathlib import Path

    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def busy_cores(interval: float = 0.2) -> float:
    """Cores kept busy by other processes: the larger of the 1-minute load average and the busy CPU time measured
    over ``interval`` seconds (``/proc/stat``, while this process sleeps). 0.0 where neither can be read."""
    import os
    import time
    from pathlib import Path

    def cpu_times() -> tuple[int, int] | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    busy = 0.0
    first = cpu_times()
    if first is not None:
        time.sleep(interval)
        second = cpu_times()
        total, idle = second[0] - first[0], second[1] - first[1]
        if total > 0:
            busy = (total - idle) / total * (os.cpu_count() or 1)
    try:
        busy = max(busy, os.getloadavg()[0])
    except (AttributeError, OSError):
        pass
    return busy


def choose_threads(setting: str | int | None = None) -> tuple[int, str]:
    """(torch intra-op threads, why) for ``setting`` — default the environment variable ``SLIMDIFF_THREADS``, else
    ``auto``: a whole number >= 1 is taken as is; ``auto`` is the usable cores minus the cores other processes keep
    busy (:func:`busy_cores`), rounded, at least 1. More threads than free cores is the expensive mistake: torch's
    OpenMP threads wait for each other at every operation, so one thread descheduled by another process stalls
    all of them (2 threads on a 2-core machine busy elsewhere ran the pipeline 50x slower than 1 thread)."""
    import os

    raw = setting if setting is not None else os.environ.get(THREADS_ENV, "").strip() or "auto"
    text = str(raw).strip().lower()
    if text == "auto":
        cores, busy = usable_cores(), busy_cores()
        threads = max(1, min(cores, round(cores - busy)))
        return threads, f"{THREADS_ENV}=auto: {cores} usable core(s), {busy:.1f} busy elsewhere"
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1 or str(threads) != text:
        raise DeviceError(f"{THREADS_ENV} must be a whole number >= 1 or 'auto', got {str(raw)!r}")
    return threads, f"{THREADS_ENV}={threads}"


def apply_threads(setting: str | int | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads by :func:`choose_threads` (the one place that does it: stages, the MLflow pyfunc,
    the flows); returns (threads, why)."""
    threads, why = choose_threads(setting)
    torch.set_num_threads(threads)
    return threads, why
