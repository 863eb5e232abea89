"""Evaluation of a compressed denoiser against its original (issue 6, part 1).

Everything here measures; nothing writes files (the DVC stage that stores the metrics JSON and the
MLflow logging live elsewhere). Parameter counts use the same accounting as the compression itself
(``ModuleGroup.unit_params * width`` summed over compressible groups), so a factorised baseline is
charged for both of its factors.

- ``count_params``: total, compressible, per group kind and per group.
- ``count_macs`` / ``macs_per_call``: multiply-accumulates of one denoiser forward (Linear, Conv and
  the two attention matmuls; elementwise ops, norms and softmax are not counted).
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

from slimdiff.capture import SamplerSettings, bucket_edges, denoiser_of, prompts_digest
from slimdiff.device import synchronize
from slimdiff.arch.flux import single_block_columns
from slimdiff.groups import GROUP_KINDS, ModuleGroup, adapter_for, find_groups
from slimdiff.utils import flatten

DenoiserCall = tuple[tuple, dict]


# ---- parameters --------------------------------------------------------------------------------

def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _params_without_output_bias(module: nn.Module) -> int:
    """Parameters of a (possibly factorised) linear, not counting its output bias."""
    bias = getattr(module, "bias", None)
    return _params(module) - (bias.numel() if isinstance(bias, Tensor) else 0)


def group_params(denoiser: nn.Module, group: ModuleGroup) -> int:
    """Parameters a group holds now, counted from its modules (both factors of a factorised linear).

    Same accounting as ``ModuleGroup.unit_params * width``: q/k/v and FFN up-projection biases count,
    the to_out and FFN down-projection biases do not (they do not depend on the width).
    """
    module = denoiser.get_submodule(group.path)
    if group.kind == "qk_joint":
        return sum(_params(module.get_submodule(n)) for n in (*group.query, *group.key))
    if group.kind == "vo_joint":
        return (sum(_params(module.get_submodule(n)) for n in group.value)
                + sum(_params_without_output_bias(module.get_submodule(n)) for n in group.out))
    if group.kind in ("vo_single", "ffn_single"):  # the group's own columns of the fused proj_out
        attention, mlp = single_block_columns(module)
        inner = module.get_submodule(group.value[0] if group.kind == "vo_single" else group.up)
        return _params(inner) + module.proj_out.out_features * (attention if group.kind == "vo_single" else mlp)
    if group.kind == "adaln":
        return _params_without_output_bias(module)
    if group.kind.startswith("qk"):
        return _params(module.to_q) + _params(module.to_k)
    if group.kind.startswith("vo"):
        return _params(module.to_v) + _params_without_output_bias(module.to_out[0])
    return _params(module.net[0].proj) + _params_without_output_bias(module.net[2])


def count_params(denoiser: nn.Module, kinds: Sequence[str] = GROUP_KINDS) -> dict[str, Any]:
    """Parameter counts: ``total``, ``compressible`` (sum over the compressible groups of ``kinds``), ``by_kind`` and
    ``groups``."""
    groups = [g for g in find_groups(denoiser) if g.compressible and g.kind in kinds]
    per_group = {g.name: group_params(denoiser, g) for g in groups}
    by_kind = {kind: 0 for kind in GROUP_KINDS}
    for g in groups:
        by_kind[g.kind] += per_group[g.name]
    return {
        "total": _params(denoiser),
        "compressible": sum(per_group.values()),
        "by_kind": {k: v for k, v in by_kind.items() if any(g.kind == k for g in groups)},
        "groups": per_group,
    }


# ---- MACs --------------------------------------------------------------------------------------

def _batch_of(call: DenoiserCall) -> int:
    args, kwargs = call
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError("example call holds no tensor to read the batch size from")


def _conv_macs(module: nn.Module, output: Tensor) -> int:
    kernel = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * kernel


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "heads") and all(isinstance(getattr(m, p, None), nn.Module) for p in ("to_q", "to_k", "to_v"))}


def count_macs(model: nn.Module, call: DenoiserCall) -> dict[str, int]:
    """Multiply-accumulates of ``model(*args, **kwargs)`` for the whole batch of ``call``, as the kernels run them.

    Linear: input tokens x in x out (every ``nn.Linear``, so both factors of a factorised layer);
    Conv: output elements x in/groups x kernel; attention (from the q/k/v projection outputs of each attention
    call): Q K^T and P V each B x heads x Nq x Nk x the run width, the wider of the per-head QK and V widths
    (``slimdiff.slim.attend`` pads the narrower side), where Nq and Nk count every stream of a joint attention
    (``to_q`` and ``add_q_proj`` rows). Equals ``torch.utils.flop_counter.FlopCounterMode`` / 2 under the math SDPA
    kernel (tested per family). Returns ``linear``, ``conv``, ``attention`` and ``total``.
    """
    counts = {"linear": 0, "conv": 0, "attention": 0}
    shapes: dict[str, dict[str, tuple]] = {}

    def linear_hook(module, args, output):
        x = args[0]
        counts["linear"] += (x.numel() // module.in_features) * module.in_features * module.out_features

    def conv_hook(module, args, output):
        counts["conv"] += _conv_macs(module, output)

    def projection_hook(attn_name: str, role: str):
        def hook(module, args, output):
            shapes.setdefault(attn_name, {})[role] = tuple(output.shape)
        return hook

    def attention_hook(attn_name: str, heads: int):
        def hook(module, args, output):
            seen = shapes.pop(attn_name, {})
            if not {"q", "k", "v"} <= set(seen):
                return
            tokens = lambda role: sum(math.prod(seen[r][1:-1]) for r in (role, f"add_{role}") if r in seen)  # noqa: E731
            batch, width = seen["q"][0], max(seen["q"][-1], seen["v"][-1]) // heads
            counts["attention"] += 2 * batch * heads * tokens("q") * tokens("k") * width
        return hook

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(linear_hook))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                handles.append(module.register_forward_hook(conv_hook))
        for name, attn in _attention_modules(model).items():
            for role in ("q", "k", "v"):
                for stream, proj in ((role, getattr(attn, f"to_{role}")), (f"add_{role}", getattr(attn, f"add_{role}_proj", None))):
                    if isinstance(proj, nn.Module):
                        handles.append(proj.register_forward_hook(projection_hook(name, stream)))
            handles.append(attn.register_forward_hook(attention_hook(name, int(attn.heads))))
        args, kwargs = call
        with torch.inference_mode():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    counts["total"] = sum(counts.values())
    return counts


def macs_per_call(denoiser: nn.Module, example_call: DenoiserCall, batch: int | None = None) -> int:
    """MACs of one denoiser forward for a batch of 1 (one branch of classifier-free guidance).

    ``example_call`` is ``(args, kwargs)`` of any batch; every counted op is per sample, so the count
    of the whole call divided by its batch (read from the first tensor, or ``batch``) is exact.
    A guided sampling step costs two such calls.
    """
    batch = _batch_of(example_call) if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    total = count_macs(denoiser, example_call)["total"]
    return total // batch


def folder_macs(folder) -> dict[str, Any] | None:
    """MACs of one call of a saved compressed denoiser and of its original, per sample, at the capture's call shape
    (the spec the capture recorded), counted on the meta device: no weight is read. None when the folder's capture
    recorded no call (a model saved before calls were recorded)."""
    from pathlib import Path

    from accelerate import init_empty_weights

    from slimdiff.calls import meta_call
    from slimdiff.io import empty_denoiser, read_config

    folder = Path(folder)
    key, config = read_config(folder)
    spec = (config.get("info", {}).get("capture") or {}).get("call")
    if not spec:
        return None
    compressed = empty_denoiser(folder / key, config).to("meta")
    cls = type(compressed)
    with init_empty_weights(include_buffers=True):
        original = cls.from_config(cls.load_config(str(folder / key)))
    call = meta_call(spec)
    batch = _batch_of(call)
    before, after = count_macs(original.to("meta"), call)["total"] // batch, count_macs(compressed, call)["total"] // batch
    return {"original_per_call": before, "compressed_per_call": after, "fraction": after / before if before else None,
            "call_batch": batch}


# ---- signal metrics ----------------------------------------------------------------------------

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
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    if reference.shape != test.shape or reference.ndim != 4:
        raise ValueError(f"image_quality needs two (N, C, H, W) batches of equal shape, got "
                         f"{tuple(reference.shape)} and {tuple(test.shape)}")
    reference, test = reference.detach().float().cpu(), test.detach().float().cpu()
    psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
    side = min(reference.shape[-2:])
    kernel = 11 if side >= 11 else max(3, side - (1 - side % 2))
    ssim = StructuralSimilarityIndexMeasure(data_range=1.0, kernel_size=kernel)
    return {"psnr_db": float(psnr(test, reference)), "ssim": float(ssim(test, reference)), "ssim_kernel_size": kernel}


# ---- fidelity ----------------------------------------------------------------------------------

class _StopPipeline(Exception):
    """Raised from a hook to end a generation early."""


def _clone(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _prediction(output, sample: Tensor) -> Tensor:
    """The noise prediction of a denoiser output (tuple, output object or tensor), without learned sigma."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    elif not torch.is_tensor(output):
        output = output.sample
    if output.ndim == sample.ndim and output.shape[1] == 2 * sample.shape[1]:
        output = output[:, : sample.shape[1]]  # learned variance (PixArt, DiT): keep the noise half
    return output


def first_denoiser_call(pipe, prompts: Sequence[str], sampler: SamplerSettings) -> DenoiserCall:
    """The inputs ``(args, kwargs)`` of the first denoiser call of a generation (the rest is not run)."""
    _, denoiser = denoiser_of(pipe)
    calls: list[DenoiserCall] = []

    def keep(module, args, kwargs):
        calls.append((_clone(args), _clone(kwargs)))
        raise _StopPipeline

    handle = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            pipe(**sampler.pipe_kwargs(pipe, list(prompts)), output_type="latent")
    except _StopPipeline:
        pass
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError("the pipeline never called its denoiser")
    return calls[0]


class _TeacherForcedReplay:
    """Forward hook on the original denoiser: replays each call's inputs through the compressed one.

    Accumulates, per timestep bucket, the energy of the original noise prediction and of the
    difference, and the cosine of the guidance direction (cond - uncond halves of a CFG batch).
    Teacher forcing: the compressed denoiser always sees the original trajectory's inputs, so the
    numbers measure per-call error and errors do not compound over the sampling steps.
    """

    def __init__(self, original: nn.Module, compressed: nn.Module, num_buckets: int, num_train_timesteps: int, prompts: int):
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
        if reference.shape[0] == 2 * self.prompts:  # CFG batch: [uncond, cond]
            uncond_r, cond_r = reference.chunk(2)
            uncond_t, cond_t = test.chunk(2)
            cos = cosine(cond_r - uncond_r, cond_t - uncond_t)
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
            replay = _TeacherForcedReplay(original, compressed, num_buckets, num_train_timesteps, len(batch))
            handle = original.register_forward_hook(replay, with_kwargs=True)
            try:
                images_original.append(_generate(original_pipe, batch, sampler))
            finally:
                handle.remove()
            replays.append(replay)
            images_compressed.append(_generate(compressed_pipe, batch, sampler))
            bar.update(len(batch))
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


# ---- latency -----------------------------------------------------------------------------------

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


# ---- everything --------------------------------------------------------------------------------

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
    example = first_denoiser_call(original_pipe, prompts[:latency_prompts], sampler)
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
        denoiser_latency = latency(original, compressed, lambda: _clone(example), latency_repeats, latency_warmup, threads)
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
