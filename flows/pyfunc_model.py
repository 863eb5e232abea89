"""MLflow "model from code" for a compressed slimdiff pipeline: prompts in, images out.

Logged as code (no pickled Python objects) with the ``slimdiff`` package as code beside it; the pipeline folder
travels as an artifact and is read with ``slimdiff.load`` (safetensors only), and the serving settings as the artifact
``serving.json`` (the deployment sampler, the dtype, the request limits; docs/serving.md). Request params (the
signature's params schema): ``steps``, ``guidance``, ``seed``, ``height``, ``width``; their defaults are the job's
deployment sampler.

This file is the whole serving runtime, in three parts:

- pure functions: the model's shape from its component configs (:func:`model_shape`), the request limits derived
  from it (:func:`default_limits`), request validation (:func:`validate_params`, :func:`validate_prompts`) and the
  working memory a request needs (:func:`predict_memory`);
- :class:`GenerationQueue`: one worker thread owns the pipeline and serves queued requests, coalescing requests with
  equal settings into one batch; a request's time limit is checked between denoising steps;
- :class:`SlimDiffPyfunc`: MLflow's ``load_context`` / ``predict``, which maps each failure to an HTTP status.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import MISSING, asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import mlflow
import numpy as np
import pandas as pd

PARAMS = ("steps", "guidance", "seed", "height", "width")
SERVING_FILE = "serving.json"
SERVING_FORMAT = 1
MAX_SEED = 2**63 - 1  # the params schema's "long"

# serve-time settings of the machine that serves (they override serving.json)
DEVICE_ENV = "SLIMDIFF_SERVE_DEVICE"  # auto | cpu | cuda | cuda:N
DTYPE_ENV = "SLIMDIFF_SERVE_DTYPE"  # float32 | float16 | bfloat16 (default: the dtype the model was compressed in)
MEMORY_ENV = "SLIMDIFF_SERVE_MAX_MEMORY"  # bytes, or 512MiB / 4GiB / 2G
TIME_LIMIT_ENV = "SLIMDIFF_SERVE_TIME_LIMIT"  # seconds per request, queue wait included
COALESCE_ENV = "SLIMDIFF_SERVE_COALESCE"  # on | off
SERVER_TIMEOUT_ENV = "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"  # MLflow's own limit (60 s): our time limit stays below
MEMORY_FRACTION = 0.5  # of the memory available after the model loaded, when no limit is set

# Working memory of a request: the activation tensors alive at the peak of the denoiser and of the VAE decoder,
# counted from the component configs (see predict_memory), times MEMORY_FACTOR for what the kernels add (oneDNN's
# blocked-layout copies of convolution inputs and outputs, allocator slack), plus MEMORY_OVERHEAD. The factor was
# measured on the compressed reference model on the CPU (peak RSS above the loaded model, docs/serving.md):
# measured/counted was 1.6-3.0 over 32-512 px and 1-16 prompts; 3.5 keeps every measurement below the prediction.
MEMORY_FACTOR = 3.5
MEMORY_OVERHEAD = 64 * 2**20


class ServingError(ValueError):
    """The served model cannot load or run as configured; one line naming the setting or file."""


class RequestError(ValueError):
    """A request the model refuses before any work: the message names the param and its valid range (HTTP 400)."""


class TooLarge(RequestError):
    """A valid request whose predicted working memory is over the server's limit (HTTP 400)."""


class Busy(RuntimeError):
    """The queue is full (HTTP 503: retry later)."""


class TimeLimit(RuntimeError):
    """A request ran past its time limit; its compute stopped (HTTP 504)."""


# ---- the model's shape and its limits (pure: configs in, numbers out) ------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """What limits and memory depend on, read from the pipeline folder's component configs (no weights)."""

    pipeline_class: str
    denoiser_class: str
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    num_train_timesteps: int
    max_scheduler_steps: int  # the most steps the scheduler can take (DDIM with steps_offset 1: 999 of 1000)
    vae_scale_factor: int
    size_multiple: int  # height and width are multiples of it: the latent factor times the denoiser's patch
    native_size: tuple[int, int]  # (height, width) the pipeline generates by default
    text_tokens: int
    text_width: int


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ServingError(f"{path} not found: not a complete diffusers pipeline folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ServingError(f"{path} is not valid JSON ({error})") from None


def _side(value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[-1])
    return int(value), int(value)


def model_shape(folder: str | Path) -> ModelShape:
    """The :class:`ModelShape` of a saved pipeline folder (``model_index.json`` and its components' configs)."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    key = "unet" if "unet" in index else "transformer" if "transformer" in index else None
    if key is None or "vae" not in index:
        raise ServingError(f"{folder / 'model_index.json'} has no unet/transformer and vae: not a text-to-image pipeline")
    denoiser = _read_json(folder / key / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    scheduler_file = next((folder / "scheduler" / n for n in ("scheduler_config.json", "config.json")
                           if (folder / "scheduler" / n).is_file()), folder / "scheduler" / "scheduler_config.json")
    scheduler = _read_json(scheduler_file)
    text = _read_json(folder / "text_encoder" / "config.json") if (folder / "text_encoder" / "config.json").is_file() else {}
    text = text.get("text_config", text)
    tokenizer_file = folder / "tokenizer" / "tokenizer_config.json"
    tokenizer = _read_json(tokenizer_file) if tokenizer_file.is_file() else {}
    vae_factor = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    pipeline_class = str(index.get("_class_name", ""))
    patch = 1 if key == "unet" else int(denoiser.get("patch_size") or 1) * (2 if "Flux" in pipeline_class else 1)
    multiple = math.lcm(8, vae_factor * patch)  # diffusers' SD pipelines also require multiples of 8
    sample = _side(denoiser.get("sample_size")) or (128, 128)  # SD3/Flux pipelines default to 128 latent pixels
    native = (sample[0] * vae_factor, sample[1] * vae_factor)
    max_length = tokenizer.get("model_max_length")
    tokens = int(max_length) if isinstance(max_length, int) and 0 < max_length <= 4096 else 77
    train_steps = int(scheduler.get("num_train_timesteps", 1000))
    return ModelShape(pipeline_class, str(denoiser.get("_class_name", key)), denoiser, vae, train_steps,
                      train_steps - int(scheduler.get("steps_offset") or 0), vae_factor, multiple, native, tokens,
                      int(text.get("hidden_size", text.get("d_model", 768))))


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Logged in ``serving.json`` (defaults from :func:`default_limits`); the memory
    and time limits also come from the serving machine (``SLIMDIFF_SERVE_MAX_MEMORY``, ``SLIMDIFF_SERVE_TIME_LIMIT``)."""

    max_prompts: int  # prompts in one request
    max_batch: int  # prompts in one coalesced batch (several requests with equal settings)
    max_prompt_chars: int
    max_steps: int
    max_guidance: float
    size_multiple: int
    min_side: int
    max_side: int
    time_limit_s: float | None = None  # None: MLflow's request timeout minus 5 s
    max_memory: int | str | None = None  # bytes; None: half the memory available once the model is loaded
    max_queue: int = 64  # requests waiting for the worker; more are refused with HTTP 503
    coalesce: bool = True
    # with coalescing, how long a batch waits for more requests with its settings: at most this, and at most 5 % of
    # the previous batch's run time (a lone client pays <= 5 %; clients that send back to back meet in one batch)
    batch_wait_s: float = 0.05


def default_limits(shape: ModelShape, sampler: dict[str, Any]) -> Limits:
    """Limits derived from the model: steps up to max(100, 4 x the deployment steps) and never beyond what the
    scheduler can take (its training timesteps less its offset); sides from a quarter to twice the native size (or the deployment size if larger), in
    multiples of the latent factor; 8 prompts a request, 16 a coalesced batch, guidance up to 20."""
    multiple = shape.size_multiple
    native = max(shape.native_size)
    wanted = max([native] + [int(sampler[k]) for k in ("height", "width") if sampler.get(k)])
    max_side = max(multiple, 2 * wanted // multiple * multiple)
    min_side = max(multiple, native // 4 // multiple * multiple)
    steps = int(sampler.get("steps", 25))
    return Limits(max_prompts=8, max_batch=16, max_prompt_chars=2000,
                  max_steps=max(1, min(shape.max_scheduler_steps, max(100, 4 * steps))), max_guidance=20.0,
                  size_multiple=multiple, min_side=min_side, max_side=max_side)


def limits_from(config: dict[str, Any]) -> Limits:
    """:class:`Limits` from ``serving.json``'s ``limits`` (every field present); unknown or missing keys name
    themselves."""
    names = set(Limits.__dataclass_fields__)
    unknown = sorted(set(config) - names)
    if unknown:
        raise ServingError(f"serving limits: unknown setting(s) {unknown}; valid: {sorted(names)}")
    missing = sorted(n for n, f in Limits.__dataclass_fields__.items() if n not in config and f.default is MISSING)
    if missing:
        raise ServingError(f"serving limits: missing setting(s) {missing}")
    limits = Limits(**config)
    for name in ("max_prompts", "max_batch", "max_prompt_chars", "max_steps", "size_multiple", "min_side", "max_side",
                 "max_queue"):
        value = getattr(limits, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ServingError(f"serving limit {name} must be a whole number >= 1, got {value!r}")
    if limits.min_side > limits.max_side or limits.min_side % limits.size_multiple or limits.max_side % limits.size_multiple:
        raise ServingError(f"serving limits: min_side {limits.min_side} and max_side {limits.max_side} must be multiples of "
                           f"size_multiple {limits.size_multiple} with min_side <= max_side")
    if isinstance(limits.batch_wait_s, bool) or not isinstance(limits.batch_wait_s, (int, float)) \
            or not 0 <= limits.batch_wait_s <= 1:
        raise ServingError(f"serving limit batch_wait_s must be a number of seconds in 0..1, got {limits.batch_wait_s!r}")
    if limits.max_batch < limits.max_prompts:
        raise ServingError(f"serving limit max_batch ({limits.max_batch}) must be >= max_prompts ({limits.max_prompts})")
    return limits


# ---- requests (pure) -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSettings:
    steps: int
    guidance: float
    seed: int
    height: int
    width: int

    @property
    def batch_key(self) -> tuple:
        """Requests whose keys are equal can run as one batch (each prompt keeps its own seeded noise)."""
        return self.steps, self.guidance, self.height, self.width


def _whole(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)) \
            or not math.isfinite(float(value)) or float(value) != int(value) or not low <= int(value) <= high:
        raise RequestError(f"param {name} must be a whole number in {low}..{high}, got {value!r}")
    return int(value)


def validate_params(params: dict[str, Any] | None, defaults: dict[str, Any], limits: Limits,
                    native_size: tuple[int, int]) -> RequestSettings:
    """The request's settings: its params over ``defaults`` (the logged deployment sampler), each checked against
    ``limits``. Raises :class:`RequestError` naming the first bad param and its valid range; unknown params are
    refused, listing the valid ones."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise RequestError(f"unknown param(s) {unknown}; valid: {', '.join(PARAMS)}")
    merged = {**defaults, **{k: v for k, v in params.items() if v is not None}}
    steps = _whole("steps", merged.get("steps"), 1, limits.max_steps)
    guidance = merged.get("guidance")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not math.isfinite(float(guidance)) \
            or not 0 <= float(guidance) <= limits.max_guidance:
        raise RequestError(f"param guidance must be a number in 0..{limits.max_guidance:g}, got {guidance!r}")
    seed = _whole("seed", merged.get("seed", 0), 0, MAX_SEED)
    sides = {}
    for index, name in enumerate(("height", "width")):
        value = merged.get(name)
        if value is None:
            value = native_size[index]
        sides[name] = _whole(name, value, limits.min_side, limits.max_side)
        if sides[name] % limits.size_multiple:
            raise RequestError(f"param {name} must be a multiple of {limits.size_multiple} (the model's latent factor) in "
                               f"{limits.min_side}..{limits.max_side}, got {sides[name]}")
    return RequestSettings(steps, float(guidance), seed, sides["height"], sides["width"])


def validate_prompts(prompts: Sequence[Any], limits: Limits) -> list[str]:
    if not prompts:
        raise RequestError("no prompts in the input")
    if len(prompts) > limits.max_prompts:
        raise RequestError(f"a request holds 1..{limits.max_prompts} prompts, got {len(prompts)}")
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise RequestError(f"prompts must be strings, got {type(prompt).__name__} {str(prompt)[:80]!r}")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(f"a prompt holds at most {limits.max_prompt_chars} characters, got {len(prompt)}")
    return list(prompts)


def prompts_of(model_input: Any) -> list[Any]:
    """The prompts of an input: a DataFrame's ``prompt`` column, a dict ``{"prompt": [...]}`` or a list. MLflow turns
    ``{"prompt": [a, b]}`` into one row holding the list: its items are the prompts."""
    if hasattr(model_input, "columns"):
        if "prompt" not in model_input.columns:
            raise RequestError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
        cells = list(model_input["prompt"])
    elif isinstance(model_input, dict):
        cells = list(model_input.get("prompt", []))
    else:
        cells = list(model_input)
    prompts: list[Any] = []
    for cell in cells:
        prompts.extend(list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell])
    return prompts


# ---- memory (pure) ---------------------------------------------------------------------------------------------------


def _levels(config: dict[str, Any], key: str, count: int) -> list[int]:
    value = config.get(key, 1)
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * count


def _unet_floats(config: dict[str, Any], batch: int, height: int, width: int) -> int:
    """Activation values alive at the UNet's peak for a denoiser batch on a latent of height x width: every skip
    connection held for the up path, plus the largest working set of one level (a transformer block's feed-forward
    at that level's width: GEGLU's 8x projection, its product and the residual, ~18 values per channel and pixel; a
    resnet on the concatenated input without attention: input, norm and activation of 2x the channels)."""
    channels = [int(c) for c in config["block_out_channels"]]
    layers = _levels(config, "layers_per_block", len(channels))
    down = list(config.get("down_block_types") or ["CrossAttnDownBlock2D"] * len(channels))
    pixels = [math.ceil(height / 2**i) * math.ceil(width / 2**i) for i in range(len(channels))]
    skips = channels[0] * pixels[0] + sum(layers[i] * channels[i] * pixels[i]
                                          + (channels[i] * pixels[i + 1] if i + 1 < len(channels) else 0)
                                          for i in range(len(channels)))
    work = max((18 if "Attn" in down[i] else 6) * channels[i] * pixels[i] for i in range(len(channels)))
    work = max(work, 18 * channels[-1] * pixels[-1])  # the mid block's transformer
    return batch * (skips + work)


def _transformer_floats(config: dict[str, Any], batch: int, height: int, width: int, patch: int, text_tokens: int) -> int:
    """A DiT-style denoiser (PixArt, SD3, Flux): one block's working set, ~12 values per token and channel (q, k, v,
    attention output, the 4x feed-forward and the residual), image and text tokens together. Not calibrated."""
    heads = int(config.get("num_attention_heads") or 16)
    head_dim = int(config.get("attention_head_dim") or 72)
    tokens = math.ceil(height / patch) * math.ceil(width / patch) + text_tokens
    return batch * 12 * heads * head_dim * tokens


def _vae_floats(config: dict[str, Any], images: int, height: int, width: int) -> int:
    """Values alive at the VAE decoder's peak: its largest stage, a resnet whose input, norm and activation are held
    at once (3x the wider of its input and output channels), or an upsampler (the interpolated input and its
    convolution at the next resolution), on images of height x width; plus the float images of the output."""
    channels = list(reversed([int(c) for c in config["block_out_channels"]]))
    stages = len(channels)
    terms, previous = [], channels[0]
    for j, width_j in enumerate(channels):
        pixels = math.ceil(height / 2 ** (stages - 1 - j)) * math.ceil(width / 2 ** (stages - 1 - j))
        terms.append(3 * max(previous, width_j) * pixels)
        if j + 1 < stages:
            terms.append(2 * width_j * 4 * pixels)
        previous = width_j
    return images * (max(terms) + 3 * 4 * height * width)


def predict_memory(shape: ModelShape, prompts: int, height: int, width: int, guidance: float, dtype_bytes: int = 4) -> int:
    """Bytes of working memory that generating ``prompts`` images of height x width needs on top of the loaded model:
    the larger of the denoiser's and the VAE decoder's peaks (they do not overlap), counted from the configs, times
    :data:`MEMORY_FACTOR`, plus :data:`MEMORY_OVERHEAD`. Classifier-free guidance (guidance > 1, not Flux) doubles the
    denoiser batch; a VAE that upcasts (``force_upcast``) decodes in float32."""
    cfg = 2 if guidance > 1 and "Flux" not in shape.pipeline_class else 1
    latent_h, latent_w = height // shape.vae_scale_factor, width // shape.vae_scale_factor
    if shape.denoiser_class == "UNet2DConditionModel":
        denoiser = _unet_floats(shape.denoiser, prompts * cfg, latent_h, latent_w)
    else:
        patch = shape.size_multiple // shape.vae_scale_factor or 1
        denoiser = _transformer_floats(shape.denoiser, prompts * cfg, latent_h, latent_w, patch, shape.text_tokens)
    vae_bytes = 4 if shape.vae.get("force_upcast", False) else dtype_bytes
    peak = max(denoiser * dtype_bytes, _vae_floats(shape.vae, prompts, height, width) * vae_bytes)
    return int(MEMORY_FACTOR * peak) + MEMORY_OVERHEAD


def parse_bytes(text: Any, name: str = MEMORY_ENV) -> int:
    """``2000000000``, ``512MiB``, ``4GiB``, ``2G``, ``1.5GB`` -> bytes (binary units for both spellings)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise ServingError(f"{name} must be a size such as 4GiB, 512MiB or a number of bytes, got {str(text)!r}")
    return int(float(match.group(1)) * 1024 ** "_KMGT".index(match.group(2).upper() or "_"))


def _fmt_bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def check_memory(shape: ModelShape, limits: Limits, settings: RequestSettings, prompts: int, budget: int,
                 dtype_bytes: int, why: str) -> int:
    """The request's predicted working memory; :class:`TooLarge` naming the params, the prediction, the limit and
    what would fit when it is over ``budget``."""
    need = predict_memory(shape, prompts, settings.height, settings.width, settings.guidance, dtype_bytes)
    if need <= budget:
        return need
    fits = max((n for n in range(1, prompts) if predict_memory(shape, n, settings.height, settings.width, settings.guidance,
                                                                 dtype_bytes) <= budget), default=0)
    if fits:
        hint = f"at {settings.height}x{settings.width} at most {fits} prompt(s) fit"
    else:
        sides = range(limits.min_side, limits.max_side + 1, limits.size_multiple)
        side = max((s for s in sides if predict_memory(shape, 1, s, s, settings.guidance, dtype_bytes) <= budget), default=0)
        hint = f"one prompt fits up to {side}x{side}" if side else "not even one prompt at the smallest size fits"
    raise TooLarge(f"params height={settings.height}, width={settings.width} with {prompts} prompt(s) need about "
                   f"{_fmt_bytes(need)} of working memory, over this server's limit of {_fmt_bytes(budget)} ({why}); {hint}")


# ---- the worker: one thread owns the pipeline -----------------------------------------------------------------------


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


# generate(jobs, on_step) -> uint8 images (sum of prompts, H, W, 3); on_step(step) is called after every step
Generate = Callable[[list[Job], Callable[[int], None]], np.ndarray]


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


# ---- loading ---------------------------------------------------------------------------------------------------------


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


def _in_scoring_server() -> bool:
    """True inside ``mlflow models serve``'s uvicorn process (MLflow sets the model path variable for it)."""
    from mlflow.pyfunc import scoring_server

    return scoring_server._SERVER_MODEL_PATH in os.environ


def _fail_load(message: str):
    """A model that cannot load: one line. In ``mlflow models serve`` the server exits with it (no traceback chain:
    a server without its model cannot answer anything); elsewhere a :class:`ServingError` without a chain."""
    line = f"slimdiff model: {message}"
    if _in_scoring_server():
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(1)
    raise ServingError(line) from None


def serving_config(artifacts: dict[str, str], model_config: dict[str, Any] | None) -> dict[str, Any]:
    """The logged ``serving.json`` with MLflow's load-time ``model_config`` over it (``sampler``, ``dtype``,
    ``device``, and ``limits`` merged key by key)."""
    path = artifacts.get("serving")
    if path is None:
        raise ServingError(f"the model has no {SERVING_FILE} artifact (the deployment sampler and the request limits): "
                           "log it again with flows.tracking.log_pipeline_model")
    config = _read_json(Path(path))
    if config.get("format") != SERVING_FORMAT:
        raise ServingError(f"{SERVING_FILE}: unknown format {config.get('format')!r}; this code reads format {SERVING_FORMAT}")
    override = dict(model_config or {})
    limits = {**(config.get("limits") or {}), **(override.pop("limits", None) or {})}
    config.update(override)
    config["limits"] = limits
    sampler = config.get("sampler")
    missing = [k for k in ("steps", "guidance", "seed") if not isinstance(sampler, dict) or sampler.get(k) is None]
    if missing:
        raise ServingError(f"{SERVING_FILE} has no deployment sampler {missing} (the capture's settings are the served "
                           "defaults): log the model with params.yaml's sampler section")
    return config


class SlimDiffPyfunc(mlflow.pyfunc.PythonModel):
    """predict(a 'prompt' column: DataFrame, ``{"prompt": [...]}`` or a served request's ``dataframe_split``)
    -> uint8 images (N, H, W, 3). The signature checks the input before ``predict`` sees it."""

    def load_context(self, context) -> None:
        try:
            self._load(context.artifacts, context.model_config)
        except ServingError as error:
            _fail_load(str(error))
        except ValueError as error:  # slimdiff's CompressedModelError and DeviceError: one line naming the file/setting
            _fail_load((str(error).strip().splitlines() or [type(error).__name__])[0])

    def _load(self, artifacts: dict[str, str], model_config: dict[str, Any] | None) -> None:
        import torch

        import slimdiff
        from slimdiff.device import apply_threads, resolve_device, resolve_dtype

        # threads before any work: more threads than free cores makes every denoiser call wait (SLIMDIFF_THREADS)
        self.threads, self.threads_reason = apply_threads()
        config = serving_config(artifacts, model_config)
        self.defaults = dict(config["sampler"])
        self.shape = model_shape(artifacts["pipeline"])
        limits = limits_from(config["limits"])
        coalesce = os.environ.get(COALESCE_ENV, "").strip().lower()
        if coalesce:
            if coalesce not in ("on", "off", "1", "0", "true", "false"):
                raise ServingError(f"{COALESCE_ENV} must be on or off, got {coalesce!r}")
            limits = replace(limits, coalesce=coalesce in ("on", "1", "true"))
        self.device = resolve_device(os.environ.get(DEVICE_ENV) or config.get("device") or "auto")
        dtype = os.environ.get(DTYPE_ENV) or config.get("dtype")
        self.pipe = slimdiff.load(artifacts["pipeline"], device=self.device,
                                  dtype=resolve_dtype(dtype) if dtype not in (None, "auto") else None)
        self.pipe.set_progress_bar_config(disable=True)
        self.dtype = next(p.dtype for p in self.pipe.components[_denoiser_key(self.pipe)].parameters())
        self.dtype_bytes = torch.finfo(self.dtype).bits // 8
        self.step_callback = "callback_on_step_end" in _call_parameters(self.pipe)

        server_timeout = float(os.environ.get(SERVER_TIMEOUT_ENV) or 60)
        setting = os.environ.get(TIME_LIMIT_ENV) or limits.time_limit_s
        if setting is None:
            time_limit, self.time_why = max(1.0, server_timeout - 5), f"{SERVER_TIMEOUT_ENV} {server_timeout:g} s minus 5 s"
        else:
            try:
                time_limit = float(setting)
            except (TypeError, ValueError):
                time_limit = float("nan")
            if not time_limit > 0 or not math.isfinite(time_limit):
                raise ServingError(f"{TIME_LIMIT_ENV} / limits.time_limit_s must be a number of seconds > 0, got {setting!r}")
            self.time_why = TIME_LIMIT_ENV if os.environ.get(TIME_LIMIT_ENV) else "limits.time_limit_s"
        memory = os.environ.get(MEMORY_ENV) or limits.max_memory
        if memory is None:
            available, source = _available_memory(self.device)
            self.memory_budget = int(MEMORY_FRACTION * available)
            self.memory_why = f"{MEMORY_FRACTION:g} of the {source} after loading; {MEMORY_ENV} sets it"
        else:
            self.memory_budget = parse_bytes(memory)
            self.memory_why = MEMORY_ENV if os.environ.get(MEMORY_ENV) else "limits.max_memory"
        self.limits = replace(limits, time_limit_s=time_limit, max_memory=self.memory_budget)
        self.queue = GenerationQueue(self._generate, self.limits, time_limit, fits=self._fits,
                                     on_start=lambda: torch.set_num_threads(self.threads))
        _watch_unknown_params()

    # -- requests --

    def settings(self, params: dict | None) -> RequestSettings:
        """The request's settings (its params over the logged sampler), checked against the limits."""
        return validate_params(params, self.defaults, self.limits, self.shape.native_size)

    def _fits(self, jobs: list[Job]) -> bool:
        s = jobs[0].settings
        return predict_memory(self.shape, sum(len(j.prompts) for j in jobs), s.height, s.width, s.guidance,
                              self.dtype_bytes) <= self.memory_budget

    def _generate(self, jobs: list[Job], on_step: Callable[[int], None]) -> np.ndarray:
        from slimdiff.capture import prompt_generator

        s = jobs[0].settings
        prompts = [p for job in jobs for p in job.prompts]
        kwargs = dict(prompt=prompts, num_inference_steps=s.steps, guidance_scale=s.guidance, height=s.height,
                      width=s.width, generator=[prompt_generator(p, job.settings.seed) for job in jobs for p in job.prompts],
                      output_type="np")
        if self.step_callback:
            def callback(pipe, step, timestep, tensors):
                on_step(step + 1)
                return tensors

            kwargs["callback_on_step_end"] = callback
        images = self.pipe(**kwargs).images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)

    # the input hint is a DataFrame (what the signature's column schema gives predict): MLflow then neither infers a
    # signature from the hint nor warns that there is none
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        try:
            unknown = _unknown_params_of_this_request()
            if unknown:
                raise RequestError(f"unknown param(s) {unknown}; valid: {', '.join(PARAMS)}")
            prompts = validate_prompts(prompts_of(model_input), self.limits)
            settings = self.settings(params)
            check_memory(self.shape, self.limits, settings, len(prompts), self.memory_budget, self.dtype_bytes,
                         self.memory_why)
            return self.queue.wait(self.queue.submit(prompts, settings))
        except RequestError as error:
            raise _http(error, "INVALID_PARAMETER_VALUE") from None
        except Busy as error:
            raise _http(error, "TEMPORARILY_UNAVAILABLE") from None
        except TimeLimit as error:
            raise _http(error, "DEADLINE_EXCEEDED") from None
        except RuntimeError as error:
            raise _http(error, "INTERNAL_ERROR") from None


def _http(error: BaseException, code: str):
    """An MlflowException with ``code``: the scoring server answers with its HTTP status (400, 503, 504, 500) and the
    one-line message."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(str(error), error_code=getattr(databricks_pb2, code), error_class=f"SLIMDIFF_{type(error).__name__.upper()}")


def _denoiser_key(pipe) -> str:
    return "unet" if "unet" in pipe.components else "transformer"


def _call_parameters(pipe) -> set[str]:
    import inspect

    return set(inspect.signature(pipe.__call__).parameters)


# ---- unknown params: MLflow drops params outside the schema before predict; its warning names them ------------------

_UNKNOWN_ATTR = "_slimdiff_unknown_params"
_UNKNOWN_MESSAGE = re.compile(r"^Unrecognized params (\[.*?\]) are ignored")


class _UnknownParamsFilter(logging.Filter):
    """MLflow's params-schema check (``mlflow.models.utils._enforce_params_schema``) drops params the signature does not
    name and only logs a warning. This filter records the names on the current request's prediction context (set by
    ``PyFuncModel.predict`` for each call), so ``predict`` refuses the request; the warning itself is not repeated."""

    def filter(self, record: logging.LogRecord) -> bool:
        match = _UNKNOWN_MESSAGE.match(record.getMessage())
        if match is None:
            return True
        from mlflow.pyfunc.context import get_prediction_context

        context = get_prediction_context()
        if context is None:
            return True
        import ast

        try:
            names = sorted(str(n) for n in ast.literal_eval(match.group(1)))
        except (ValueError, SyntaxError):
            return True
        setattr(context, _UNKNOWN_ATTR, names)
        return False


def _watch_unknown_params() -> None:
    logger = logging.getLogger("mlflow.models.utils")
    if not any(isinstance(f, _UnknownParamsFilter) for f in logger.filters):
        logger.addFilter(_UnknownParamsFilter())
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)  # the warning must be emitted for the filter to see it


def _unknown_params_of_this_request() -> list[str]:
    from mlflow.pyfunc.context import get_prediction_context

    context = get_prediction_context()
    return list(getattr(context, _UNKNOWN_ATTR, None) or []) if context is not None else []


def serving_document(shape: ModelShape, sampler: dict[str, Any], dtype: str | None, device: str = "auto",
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``serving.json`` that :func:`flows.tracking.log_pipeline_model` logs beside the pipeline: the deployment
    sampler (the served defaults), the dtype the model was compressed in, the device setting and the request limits
    (:func:`default_limits` with ``overrides``, checked)."""
    limits = {**asdict(default_limits(shape, sampler)), **(overrides or {})}
    limits_from(limits)  # a bad override fails at log time, not at the first request
    if limits["max_steps"] > shape.max_scheduler_steps:
        raise ServingError(f"serving limit max_steps must be in 1..{shape.max_scheduler_steps} (the scheduler's training "
                           f"timesteps less its offset), got {limits['max_steps']}")
    return {"format": SERVING_FORMAT, "sampler": dict(sampler), "dtype": dtype, "device": device, "limits": limits}


mlflow.models.set_model(SlimDiffPyfunc())
