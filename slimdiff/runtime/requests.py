"""A served model's requests: the model's shape, the limits derived from it, request validation and the working memory a request needs (pure functions)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import MISSING, asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

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
# counted from the component configs (see request_memory), times MEMORY_FACTOR for what the kernels add (oneDNN's
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
    coalesce: bool = False  # on: requests with equal settings share a batch (within one uint8 level, not bitwise)
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


def request_memory(shape: ModelShape, prompts: int, height: int, width: int, guidance: float, dtype_bytes: int = 4) -> int:
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


def check_request_memory(shape: ModelShape, limits: Limits, settings: RequestSettings, prompts: int, budget: int,
                 dtype_bytes: int, why: str) -> int:
    """The request's predicted working memory; :class:`TooLarge` naming the params, the prediction, the limit and
    what would fit when it is over ``budget``."""
    need = request_memory(shape, prompts, settings.height, settings.width, settings.guidance, dtype_bytes)
    if need <= budget:
        return need
    fits = max((n for n in range(1, prompts) if request_memory(shape, n, settings.height, settings.width, settings.guidance,
                                                                 dtype_bytes) <= budget), default=0)
    if fits:
        hint = f"at {settings.height}x{settings.width} at most {fits} prompt(s) fit"
    else:
        sides = range(limits.min_side, limits.max_side + 1, limits.size_multiple)
        side = max((s for s in sides if request_memory(shape, 1, s, s, settings.guidance, dtype_bytes) <= budget), default=0)
        hint = f"one prompt fits up to {side}x{side}" if side else "not even one prompt at the smallest size fits"
    raise TooLarge(f"params height={settings.height}, width={settings.width} with {prompts} prompt(s) need about "
                   f"{_fmt_bytes(need)} of working memory, over this server's limit of {_fmt_bytes(budget)} ({why}); {hint}")




def serving_document(shape: ModelShape, sampler: dict[str, Any], dtype: str | None, device: str = "auto",
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``serving.json`` that :func:`flows.model_logging.log_pipeline_model` logs beside the pipeline: the deployment
    sampler (the served defaults), the dtype the model was compressed in, the device setting and the request limits
    (:func:`default_limits` with ``overrides``, checked)."""
    limits = {**asdict(default_limits(shape, sampler)), **(overrides or {})}
    limits_from(limits)  # a bad override fails at log time, not at the first request
    if limits["max_steps"] > shape.max_scheduler_steps:
        raise ServingError(f"serving limit max_steps must be in 1..{shape.max_scheduler_steps} (the scheduler's training "
                           f"timesteps less its offset), got {limits['max_steps']}")
    return {"format": SERVING_FORMAT, "sampler": dict(sampler), "dtype": dtype, "device": device, "limits": limits}
