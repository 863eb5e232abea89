"""MLflow "model from code" for a compressed slimdiff pipeline: prompts in, images out.

Logged as code (no pickled Python objects) with slimdiff's runtime as code beside it (``slimdiff.runtime`` and the
modules it stands on, none of the compressor); the pipeline folder travels as an artifact and is read with
``slimdiff.runtime.folder.load`` (safetensors only), and the serving settings as the artifact
``serving.json`` (the deployment sampler, the dtype, the request limits; docs/serving.md). Request params (the
signature's params schema): ``steps``, ``guidance``, ``seed``, ``height``, ``width``; their defaults are the job's
deployment sampler.

This file is the whole serving runtime, in three parts:

- pure functions: the model's shape from its component configs (:func:`model_shape`), the request limits derived
  from it (:func:`default_limits`), request validation (:func:`validate_params`, :func:`validate_prompts`) and the
  working memory a request needs (:func:`request_memory`);
- :class:`GenerationQueue`: one worker thread owns the pipeline and serves queued requests, coalescing requests with
  equal settings into one batch; a request's time limit is checked between denoising steps;
- :class:`SlimDiffPyfunc`: MLflow's ``load_context`` / ``predict``, which maps each failure to an HTTP status.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd

from slimdiff.runtime.generation import (
    GenerationQueue,
    Job,
    _available_memory,
    _call_parameters,
    _denoiser_key,
)
from slimdiff.runtime.requests import (
    COALESCE_ENV,
    DEVICE_ENV,
    DTYPE_ENV,
    MEMORY_ENV,
    MEMORY_FRACTION,
    PARAMS,
    SERVER_TIMEOUT_ENV,
    SERVING_FILE,
    SERVING_FORMAT,
    TIME_LIMIT_ENV,
    Busy,
    RequestError,
    RequestSettings,
    ServingError,
    TimeLimit,
    _read_json,
    check_request_memory,
    limits_from,
    model_shape,
    parse_bytes,
    prompts_of,
    request_memory,
    validate_params,
    validate_prompts,
)


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
                           "log it again with flows.model_logging.log_pipeline_model")
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

        from slimdiff.device import apply_threads, resolve_device
        from slimdiff.environment import quiet_libraries
        from slimdiff.runtime.folder import load

        quiet_libraries()  # diffusers' and transformers' loading bars and notices stay out of the server's log
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
        self.pipe = load(artifacts["pipeline"], device=self.device, dtype=dtype)  # None or auto: as stored
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
        return request_memory(self.shape, sum(len(j.prompts) for j in jobs), s.height, s.width, s.guidance,
                              self.dtype_bytes) <= self.memory_budget

    def _generate(self, jobs: list[Job], on_step: Callable[[int], None]) -> np.ndarray:
        from slimdiff.runtime.sampling import SamplerSettings, prompt_generator

        s = jobs[0].settings
        prompts = [p for job in jobs for p in job.prompts]
        # the call the capture and evaluation made (how the guidance is passed, the text length: the model's own),
        # with each job's seed for its prompts (a coalesced batch holds several requests)
        sampler = SamplerSettings(s.steps, s.guidance, s.height, s.width, s.seed,
                                  self.defaults.get("guidance_argument") or "guidance_scale",
                                  self.defaults.get("max_sequence_length"))
        kwargs = {**sampler.pipe_kwargs(self.pipe, prompts), "output_type": "np",
                  "generator": [prompt_generator(p, job.settings.seed) for job in jobs for p in job.prompts]}
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
            check_request_memory(self.shape, self.limits, settings, len(prompts), self.memory_budget, self.dtype_bytes,
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


mlflow.models.set_model(SlimDiffPyfunc())
