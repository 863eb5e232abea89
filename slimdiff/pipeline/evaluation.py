"""Evaluation of a compressed denoiser against its original (issue 6, part 1).

Everything here measures; nothing writes files (the DVC stage that stores the metrics JSON and the
MLflow logging live elsewhere). What a model costs (parameters, MACs) is counted by
``slimdiff.cost``.

- ``sqnr_db``: signal-to-quantisation-noise ratio in dB, the torchao convention.
- ``fidelity``: teacher-forced noise-prediction SQNR per timestep bucket, guidance-direction cosine,
  and final-image PSNR/SSIM of full generations with the same prompts and seeds.
- ``latency``: interleaved side-by-side CPU timing, median, thread count, speed-up.
- ``evaluate``: all of the above (and an optional alignment/Fréchet evaluator) in one JSON-safe dict.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import adapter_for
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.calls import detach_clone, first_call
from slimdiff.cost import _batch_of, count_params, macs_per_call
from slimdiff.device import synchronize
from slimdiff.failpoints import kill_point
from slimdiff.runtime.sampling import SamplerSettings, prompts_digest
from slimdiff.statistics.sums import bucket_edges


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def sqnr_db(reference: Tensor, test: Tensor) -> Tensor:
    """20 log10(||reference|| / ||reference - test||) in float64; +inf when ``test`` equals ``reference``."""
    if reference.shape != test.shape:
        raise ValueError(f"sqnr_db needs equal shapes, got {tuple(reference.shape)} and {tuple(test.shape)}")
    ref = reference.detach().to(torch.float64)
    signal = ref.norm()
    noise = (ref - test.detach().to(torch.float64)).norm()
    if noise == 0:
        return torch.tensor(math.inf, dtype=torch.float64)
    return 20 * torch.log10(signal / noise)


def _energy_sqnr_db(signal_energy: float, noise_energy: float) -> float:
    """SQNR of concatenated tensors from their summed energies (same as ``sqnr_db`` on the concatenation)."""
    if noise_energy == 0:
        return math.inf
    if signal_energy == 0:
        return -math.inf
    return 10 * math.log10(signal_energy / noise_energy)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of two tensors flattened per leading index: shape (a.shape[0],), float64."""
    a = a.detach().reshape(a.shape[0], -1).to(torch.float64)
    b = b.detach().reshape(b.shape[0], -1).to(torch.float64)
    return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-30)


def image_quality(reference: Tensor, test: Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB) and SSIM of images in [0, 1], (N, C, H, W), via torchmetrics.

    SSIM uses the standard 11-pixel Gaussian window, or the largest odd window that fits smaller images.
    """
    from torchmetrics.image import (
        PeakSignalNoiseRatio,
        StructuralSimilarityIndexMeasure,
    )

    if reference.shape != test.shape or reference.ndim != 4:
        raise ValueError(f"image_quality needs two (N, C, H, W) batches of equal shape, got "
                         f"{tuple(reference.shape)} and {tuple(test.shape)}")
    reference, test = reference.detach().float().cpu(), test.detach().float().cpu()
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    side = min(reference.shape[-2:])
    kernel = 11 if side >= 11 else max(3, side - (1 - side % 2))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel)
    return {"psnr_db": float(psnr(test, reference)), "ssim": float(ssim(test, reference)), "ssim_kernel_size": kernel}


def _prediction(output, sample: Tensor) -> Tensor:
    """The noise prediction of a denoiser output (tuple, output object or tensor), without learned sigma."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    elif not torch.is_tensor(output):
        output = output.sample
    if output.ndim == sample.ndim and output.shape[1] == 2 * sample.shape[1]:
        output = output[:, : sample.shape[1]]  # learned variance (PixArt, DiT): keep the noise half
    return output


class _TeacherForcedReplay:
    """Forward hook on the original denoiser: replays each call's inputs through the compressed one.

    Accumulates, per timestep bucket, the energy of the original noise prediction and of the
    difference, and the cosine of the guidance direction: cond - uncond halves of a CFG batch, or, with
    ``paired_calls`` (true CFG: two calls a step, conditional first), of each step's two calls.
    Teacher forcing: the compressed denoiser always sees the original trajectory's inputs, so the
    numbers measure per-call error and errors do not compound over the sampling steps.
    """

    def __init__(self, original: nn.Module, compressed: nn.Module, num_buckets: int, num_train_timesteps: int, prompts: int,
                 paired_calls: bool = False):
        if original is compressed:
            raise ValueError("original and compressed denoisers are the same module; compress a copy")
        self.original, self.compressed = original, compressed
        self.num_buckets, self.num_train_timesteps, self.prompts = num_buckets, num_train_timesteps, prompts
        self.timestep_scale = adapter_for(original).TIMESTEP_SCALE
        self.signature = inspect.signature(original.forward)
        self.signal = [0.0] * num_buckets
        self.noise = [0.0] * num_buckets
        self.calls = [0] * num_buckets
        self.cos_sum = [0.0] * num_buckets
        self.cos_count = [0] * num_buckets
        self.guided_calls = 0
        self.paired_calls = paired_calls
        self.pending: tuple[Tensor, Tensor, Tensor] | None = None  # (timestep, reference, test) of a step's conditional call

    def bucket(self, bound: dict) -> int:
        if "timestep" not in bound:
            raise ValueError(f"{type(self.original).__name__}.forward was called without a timestep")
        # scaled to the scheduler's timesteps as the capture does (Flux is called with t / 1000)
        t = torch.as_tensor(bound["timestep"]).reshape(-1).to(torch.float64) * self.timestep_scale
        index = int(math.floor(float(t[0]) * self.num_buckets / self.num_train_timesteps))
        return min(max(index, 0), self.num_buckets - 1)

    def __call__(self, module, args, kwargs, output):
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        sample = next(iter(bound.values()))
        reference = _prediction(output, sample).to(torch.float64)
        test = _prediction(self.compressed(*args, **kwargs), sample).to(torch.float64)
        b = self.bucket(bound)
        self.signal[b] += float(reference.pow(2).sum())
        self.noise[b] += float((reference - test).pow(2).sum())
        self.calls[b] += 1
        if self.paired_calls:
            timestep = torch.as_tensor(bound["timestep"]).reshape(-1)[:1].detach().cpu()
            if self.pending is None:
                self.pending = (timestep, reference, test)
                return
            cond_timestep, cond_r, cond_t = self.pending
            self.pending = None
            if not torch.equal(cond_timestep, timestep) or cond_r.shape != reference.shape:
                raise RuntimeError("true classifier-free guidance: a step's two denoiser calls disagree on the timestep "
                                   "or the batch; the pipeline does not make one conditional and one unconditional call a step")
            cos = cosine(cond_r - reference, cond_t - test)
        elif reference.shape[0] == 2 * self.prompts:  # CFG batch: [uncond, cond]
            uncond_r, cond_r = reference.chunk(2)
            uncond_t, cond_t = test.chunk(2)
            cos = cosine(cond_r - uncond_r, cond_t - uncond_t)
        else:
            return
        self.cos_sum[b] += float(cos.sum())
        self.cos_count[b] += cos.numel()
        self.guided_calls += 1


def _generate(pipe, prompts: Sequence[str], sampler: SamplerSettings) -> Tensor:
    return pipe(**sampler.pipe_kwargs(pipe, list(prompts)), output_type="pt").images.detach().float().cpu()


def _batches(items: Sequence[str], size: int):
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _fidelity_run(original_pipe, compressed_pipe, prompts: Sequence[str], sampler: SamplerSettings,
                  num_buckets: int, batch_size: int, progress: bool = False) -> tuple[dict[str, Any], Tensor, Tensor]:
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("fidelity needs at least one prompt")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, original = denoiser_of(original_pipe)
    _, compressed = denoiser_of(compressed_pipe)
    # as in the capture: diffusers' own default for a scheduler config that omits it
    num_train_timesteps = int(original_pipe.scheduler.config.get("num_train_timesteps", 1000))
    edges = bucket_edges(num_buckets, num_train_timesteps)
    images_original, images_compressed = [], []
    replays = []
    for pipe in (original_pipe, compressed_pipe):
        pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(prompts), desc="evaluate (original, then compressed)", unit="prompt", disable=not progress)
    with torch.inference_mode():
        for batch in _batches(prompts, batch_size):
            replay = _TeacherForcedReplay(original, compressed, num_buckets, num_train_timesteps, len(batch),
                                          paired_calls=sampler.calls_per_step == 2)
            handle = original.register_forward_hook(replay, with_kwargs=True)
            try:
                images_original.append(_generate(original_pipe, batch, sampler))
            finally:
                handle.remove()
            replays.append(replay)
            images_compressed.append(_generate(compressed_pipe, batch, sampler))
            bar.update(len(batch))
            kill_point("evaluate batch")
    bar.close()
    signal = [sum(r.signal[b] for r in replays) for b in range(num_buckets)]
    noise = [sum(r.noise[b] for r in replays) for b in range(num_buckets)]
    calls = [sum(r.calls[b] for r in replays) for b in range(num_buckets)]
    cos_sum = [sum(r.cos_sum[b] for r in replays) for b in range(num_buckets)]
    cos_count = [sum(r.cos_count[b] for r in replays) for b in range(num_buckets)]
    labels = [f"t{edges[b]:g}-{edges[b + 1]:g}" for b in range(num_buckets)]
    guided = sum(r.guided_calls for r in replays) > 0
    images_original_t, images_compressed_t = torch.cat(images_original), torch.cat(images_compressed)
    metrics: dict[str, Any] = {
        "noise_sqnr_db": _energy_sqnr_db(sum(signal), sum(noise)),
        "noise_sqnr_db_by_bucket": {labels[b]: _energy_sqnr_db(signal[b], noise[b])
                                    for b in range(num_buckets) if calls[b]},
        "guidance_cosine": min(1.0, sum(cos_sum) / sum(cos_count)) if guided else None,
        "guidance_cosine_by_bucket": {labels[b]: min(1.0, cos_sum[b] / cos_count[b])
                                      for b in range(num_buckets) if cos_count[b]} if guided else None,
        "denoiser_calls_by_bucket": dict(zip(labels, calls)),
        **{f"image_{k}": v for k, v in image_quality(images_original_t, images_compressed_t).items()},
        "num_prompts": len(prompts),
        "teacher_forced": True,
    }
    return metrics, images_original_t, images_compressed_t


def fidelity(original_pipe, compressed_pipe, prompts: Sequence[str], sampler: SamplerSettings = SamplerSettings(),
             num_buckets: int = 4, batch_size: int = 8) -> dict[str, Any]:
    """Fidelity of ``compressed_pipe`` to ``original_pipe`` on the same prompts and per-prompt seeds.

    Noise prediction (the denoiser's output: epsilon, v or sample, whatever the model predicts; the
    learned-variance half of a DiT/PixArt output is dropped), teacher-forced: every denoiser call of
    the original generation is replayed through the compressed denoiser with identical inputs, so
    errors do not compound along the trajectory. SQNR (dB) over all calls and per timestep bucket
    (energies summed over the bucket's calls), and the mean cosine between original and compressed
    guidance directions (cond - uncond prediction; ``None`` without classifier-free guidance).
    Images: both pipelines generate freely (errors do compound); mean per-image PSNR and SSIM.
    SQNR/PSNR are +inf for identical outputs; buckets that saw no call are left out.
    """
    return _fidelity_run(original_pipe, compressed_pipe, prompts, sampler, num_buckets, batch_size)[0]


def _invoke(model: Callable, inputs) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    args, kwargs = inputs
    return model(*args, **kwargs)


def latency(original: Callable, compressed: Callable, make_inputs: Callable[[], Any], repeats: int = 5,
            warmup: int = 1, threads: int | None = None) -> dict[str, Any]:
    """Wall time of ``original`` and ``compressed`` measured side by side in this process.

    ``make_inputs()`` returns fresh inputs for one call: a kwargs dict or ``(args, kwargs)`` (called
    before each run, outside the timed region, so e.g. generators restart). ``warmup`` untimed runs
    of each, then ``repeats`` timed runs interleaved in alternating order (o,c), (c,o), ... under
    ``torch.inference_mode``. Medians in milliseconds; ``speedup`` = original / compressed median.
    ``threads`` sets torch's intra-op threads for the measurement (restored after); the count used is reported.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    runs: dict[str, list[float]] = {"original": [], "compressed": []}
    models = {"original": original, "compressed": compressed}
    try:
        used_threads = torch.get_num_threads()
        with torch.inference_mode():
            for _ in range(warmup):
                for name in ("original", "compressed"):
                    _invoke(models[name], make_inputs())
            for index in range(repeats):
                order = ("original", "compressed") if index % 2 == 0 else ("compressed", "original")
                for name in order:
                    inputs = make_inputs()
                    synchronize()
                    start = time.perf_counter()
                    _invoke(models[name], inputs)
                    synchronize()
                    runs[name].append((time.perf_counter() - start) * 1000)
    finally:
        torch.set_num_threads(previous)
    original_ms, compressed_ms = statistics.median(runs["original"]), statistics.median(runs["compressed"])
    return {
        "original_ms": original_ms,
        "compressed_ms": compressed_ms,
        "speedup": original_ms / compressed_ms if compressed_ms > 0 else None,
        "original_runs_ms": runs["original"],
        "compressed_runs_ms": runs["compressed"],
        "threads": used_threads,
        "repeats": repeats,
        "warmup": warmup,
    }


def _json_safe(value):
    """Plain JSON types; non-finite floats become None (infinite SQNR/PSNR = identical outputs)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if torch.is_tensor(value):
        return _json_safe(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)


def flatten_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Finite numeric leaves of a nested metrics dict as ``{"a.b.c": value}`` (e.g. for ``mlflow.log_metrics``)."""
    return {k: float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluate(original_pipe, compressed_pipe, prompts: Sequence[str], sampler: SamplerSettings = SamplerSettings(),
             evaluator=None, *, num_buckets: int = 4, batch_size: int = 8, latency_repeats: int = 5,
             latency_warmup: int = 1, latency_prompts: int = 1, measure_latency: bool = True,
             threads: int | None = None, progress: bool = False) -> dict[str, Any]:
    """One JSON-safe metrics dict: parameters, MACs, CPU latency, fidelity, and (with ``evaluator``) alignment.

    ``evaluator`` is any object with ``alignment(images, captions) -> dict`` and
    ``frechet_distance(images_a, images_b) -> float``; it receives the generated images as float
    tensors (N, 3, H, W) in [0, 1] and the prompts as captions. Alignment is reported for both
    models' images; the Fréchet distance is between the original's and the compressed model's images.
    Latency uses ``latency_prompts`` prompts (CFG doubles the denoiser batch). Non-finite values
    (identical outputs) are written as null.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    if latency_prompts < 1:
        raise ValueError(f"latency_prompts must be >= 1, got {latency_prompts}")
    _, original = denoiser_of(original_pipe)
    _, compressed = denoiser_of(compressed_pipe)
    params_original, params_compressed = count_params(original), count_params(compressed)
    example = first_call(original_pipe, prompts[:latency_prompts], sampler)
    denoiser_batch = _batch_of(example)
    macs_original = macs_per_call(original, example)
    macs_compressed = macs_per_call(compressed, example)
    fidelity_metrics, images_original, images_compressed = _fidelity_run(
        original_pipe, compressed_pipe, prompts, sampler, num_buckets, batch_size, progress)
    metrics: dict[str, Any] = {
        "params": {
            "original": params_original,
            "compressed": params_compressed,
            "removed": params_original["total"] - params_compressed["total"],
            "removed_compressible": params_original["compressible"] - params_compressed["compressible"],
            "removed_fraction_of_compressible":
                (params_original["compressible"] - params_compressed["compressible"]) / params_original["compressible"],
            "removed_fraction_of_total": (params_original["total"] - params_compressed["total"]) / params_original["total"],
        },
        "macs": {
            "original_per_call": macs_original,
            "compressed_per_call": macs_compressed,
            "removed_fraction": (macs_original - macs_compressed) / macs_original,
            "ratio": macs_original / macs_compressed,
            "note": "one denoiser forward, batch 1 (one CFG branch); Linear, Conv and attention matmuls",
        },
        "fidelity": fidelity_metrics,
    }
    if measure_latency:
        denoiser_latency = latency(original, compressed, lambda: detach_clone(example), latency_repeats, latency_warmup, threads)
        generation_latency = latency(
            original_pipe, compressed_pipe,
            lambda: {**sampler.pipe_kwargs(original_pipe, prompts[:latency_prompts]), "output_type": "pt"},
            latency_repeats, latency_warmup, threads)
        metrics["latency"] = {
            "denoiser": {**denoiser_latency, "batch": denoiser_batch},
            "generation": {**generation_latency, "prompts": len(prompts[:latency_prompts])},
            "threads": denoiser_latency["threads"],
            "denoiser_speedup": denoiser_latency["speedup"],
            "macs_ratio": metrics["macs"]["ratio"],
        }
    if evaluator is not None:
        metrics["alignment"] = {
            "original": evaluator.alignment(images_original, prompts),
            "compressed": evaluator.alignment(images_compressed, prompts),
        }
        metrics["frechet_distance_to_original"] = float(evaluator.frechet_distance(images_original, images_compressed))
    metrics["settings"] = {
        "sampler": asdict(sampler),
        "num_prompts": len(prompts),
        "prompts_digest": prompts_digest(prompts),
        "num_buckets": num_buckets,
        "batch_size": batch_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if threads is None else threads,
        "denoiser_class": type(original).__name__,
        "null_means": "+inf (identical outputs: infinite SQNR/PSNR)",
    }
    return _json_safe(metrics)
