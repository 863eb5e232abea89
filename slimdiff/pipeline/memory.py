"""Memory of every stage of the job, predicted from the model's config and the job's settings before any work.

``footprint`` reads what decides memory from the model folder without reading a weight: every component is built
from its config on the meta device (parameter counts; stored dtypes from the safetensors headers), and one denoiser
call of the capture's batch runs on the meta device (shapes only) to record the tokens each statistics site sees and
the largest activation. ``predict`` turns a footprint and the job's settings into the peak host RSS and peak device
memory of each stage, as a sum of named terms (docs/memory.md gives the formula term by term):

- every model stage holds the process (``BASE_HOST``: Python with torch, diffusers and transformers), the pipeline's
  weights in the job's dtype, and a few of the largest activations of a denoiser call;
- capture: the statistics of its sites (pooled float64 sums and per-bucket sums), one call's Gram matrix; with
  ``capture.site_groups`` a worker holds its group's sites only, and a local cluster runs ``workers`` of them at once;
- score: one group at a time: its sites as read from the capture file, and the working set of its decomposition
  (an FFN's eigendecomposition and per-bucket covariances dominate: a few (f x f) float64 matrices);
- decompose: one group's pooled statistics and the solve at its planned width (the score stage's factorisation is
  reused), plus one safetensors shard while saving from a GPU;
- evaluate and report: the original and the compressed denoiser, and the generated images.

The model is assumed on ``model.device``; on a GPU the float64 linear algebra runs there when it has usable float64
(``slimdiff.device.linalg_device``), else on the host.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

GIB = 2**30


class InsufficientMemoryError(ValueError):
    """The job's predicted memory exceeds what the machine has; the message names the stage, both figures and the
    settings that would fit."""


# the stage process itself: Python, torch, diffusers, transformers and the slimdiff modules imported, a small model
# run once (measured on this project's CPU box: the reference run's stages, docs/memory.md); a CUDA process adds its
# context and kernels on the host
BASE_HOST = {"cpu": int(0.75 * GIB), "cuda": int(2.5 * GIB)}

# the CUDA context and allocator slack on the device
BASE_DEVICE = int(1.0 * GIB)

# live tensors of the size of the largest activation during a denoiser call (its input, output and a temporary)
ACTIVATION_COPIES = 3

SAVE_SHARD_BYTES = 2 * 10**9  # slimdiff.runtime.folder.MAX_SHARD_SIZE: a GPU model passes through the host one shard at a time

STREAM_CHUNK = 64 << 20  # slimdiff.files.STREAM_CHUNK_BYTES

F64 = 8


@dataclass
class GroupShape:
    """What sizes a group's decomposition: its kind, the widths of its statistics and weights."""

    name: str
    kind: str
    sites: tuple[str, ...]
    dim_x: int  # query / value / hidden input width (stacked streams, bias row included)
    dim_y: int  # key input width (QK), else = dim_x
    heads: int
    head_dim: int
    out: int  # output width of the decomposed map (VO, FFN, adaLN)
    widths: int  # candidate widths on the grid


@dataclass
class Footprint:
    """Shapes and counts that decide a job's memory (no weight read)."""

    components: dict[str, dict[str, Any]]  # name -> {"params": n, "stored": dtype name}
    denoiser: str
    sites: dict[str, int]  # statistics site -> width
    site_tokens: dict[str, int]  # tokens per sample each site sees in one denoiser call
    groups: list[GroupShape]
    call_batch: int  # denoiser batch of one capture call (prompts x guidance branches)
    call_input_elements: int  # elements of one call's inputs (sample, text states, ...)
    activation_elements: int  # the largest module output of one capture call
    image_elements: int  # one generated image (3 x H x W)
    decode_elements: int  # the VAE decoder's largest activation for one image (its widest level at full size)
    unit_params: list[int] = field(default_factory=list)  # parameters of each latency unit's module
    group_module_params: int = 0  # the largest module that holds a group (truncation gains copy one at a time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stored_dtype(folder: Path) -> str | None:
    """The floating dtype of a component's safetensors files (header only), or None when it has none."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                if dtype in ("F64", "F32", "F16", "BF16"):
                    return {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
    return None


# the libraries a model_index.json may name for a component: a model folder is input, and its index must not make the
# job import an arbitrary module
COMPONENT_LIBRARIES = ("diffusers", "transformers")


def meta_pipeline(model: str | Path, stored_dtype: str | None = None):
    """The pipeline of a local diffusers folder with every torch component built from its config on the meta device
    (tokenizers and the scheduler loaded as usual: small). Returns (pipeline, {component: stored dtype}); a folder of
    configs without weights (a published model's) takes ``stored_dtype`` for every component. A folder that cannot
    be built raises ``ValueError`` in one line naming the component and why."""
    import importlib

    import diffusers  # imported before quiet_libraries silences it
    from accelerate import init_empty_weights

    from slimdiff.arch.pipelines import read_model_index
    from slimdiff.environment import quiet_libraries

    quiet_libraries()
    folder = Path(model)
    index = read_model_index(folder)
    pipeline_cls = getattr(diffusers, index["_class_name"])  # checked by read_model_index
    components, stored = {}, {}
    for name, spec in index.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, list):  # a pipeline argument stored in the index (requires_safety_checker)
            components[name] = spec
            continue
        if spec[:1] == [None]:  # a component the folder leaves out
            components[name] = None
            continue
        where = f"{folder / 'model_index.json'} component {name!r}"
        if (len(spec) != 2 or not isinstance(spec[0], str) or not isinstance(spec[1], str)
                or not (spec[0] in COMPONENT_LIBRARIES or hasattr(diffusers.pipelines, spec[0]))):
            raise ValueError(f"{where} is {spec!r}; expected [library, class] with library one of "
                             f"{', '.join(COMPONENT_LIBRARIES)} or a diffusers pipeline module (e.g. stable_diffusion)")
        library, class_name = spec
        # a pipeline module (SD 1.5's ["stable_diffusion", "StableDiffusionSafetyChecker"]) as diffusers resolves it
        source = importlib.import_module(library) if library in COMPONENT_LIBRARIES else getattr(diffusers.pipelines, library)
        cls = getattr(source, class_name, None) if class_name.isidentifier() else None
        if not isinstance(cls, type):
            raise ValueError(f"{where} names {library}.{class_name}, which {library} does not have")
        sub = folder / name
        config = sub / "config.json"
        if not sub.is_dir() or (issubclass(cls, nn.Module) and not config.is_file()):
            raise ValueError(f"{where} ({class_name}): {config if sub.is_dir() else sub} is missing")
        try:
            if issubclass(cls, nn.Module):
                with init_empty_weights(include_buffers=True):
                    if library == "diffusers":
                        module = cls.from_config(cls.load_config(str(sub)))
                    else:
                        from transformers import AutoConfig

                        module = cls(AutoConfig.from_pretrained(str(sub)))
                components[name] = module.to("meta")
                stored[name] = stored_dtype or _stored_dtype(sub) or "float32"
            else:
                components[name] = cls.from_pretrained(str(sub))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{where} ({class_name}) cannot be built from {sub}: "
                             f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None
    try:
        return pipeline_cls(**components), stored
    except (TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{folder}: {pipeline_cls.__name__} cannot be built from the components its model_index.json "
                         f"lists ({', '.join(components) or 'none'}): {str(error).splitlines()[0]}") from None


class _Stop(Exception):
    pass


def footprint(model: str | Path, sampler, batch_size: int, stored_dtype: str | None = None) -> Footprint:
    """The footprint of a capture of ``batch_size`` prompts per call with ``sampler`` on the model at ``model`` (a
    diffusers folder; ``stored_dtype`` for a folder of configs without weights)."""
    from slimdiff.arch import compressible_groups
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.arch.sites import site_width, sites_for
    from slimdiff.planning.latency import latency_units
    from slimdiff.scoring.influence import Granularity, group_widths

    pipe, stored = meta_pipeline(model, stored_dtype)
    key, denoiser = denoiser_of(pipe)
    components = {name: {"params": sum(p.numel() for p in module.parameters()), "stored": stored[name]}
                  for name, module in pipe.components.items() if isinstance(module, nn.Module)}
    calls: list = []

    def first_call(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = denoiser.register_forward_pre_hook(first_call, with_kwargs=True)
    scheduler_set_timesteps = pipe.scheduler.set_timesteps

    @functools.wraps(scheduler_set_timesteps)  # pipelines read its signature
    def set_timesteps_on_cpu(*a, **k):  # schedulers copy their sigmas to the CPU, which a meta tensor cannot
        k["device"] = "cpu"
        return scheduler_set_timesteps(*a, **k)

    pipe.scheduler.set_timesteps = set_timesteps_on_cpu
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            pipe(**sampler.pipe_kwargs(pipe, ["a"] * batch_size), output_type="latent")
    except _Stop:
        pass
    finally:
        handle.remove()
    meta = lambda v: v.to("meta") if torch.is_tensor(v) else ({k: meta(x) for k, x in v.items()} if isinstance(v, dict) else v)  # noqa: E731
    args, kwargs = tuple(meta(a) for a in calls[0][0]), {k: meta(v) for k, v in calls[0][1].items()}
    tensors = [v for v in (*args, *kwargs.values()) if torch.is_tensor(v)]
    groups = compressible_groups(denoiser)
    sites = {s: site_width(denoiser, s) for s in sites_for(groups)}
    seen: dict[str, int] = {}
    largest = [0]
    hooks = []

    def record(name: str):
        def hook(module, inputs, output):
            if name in sites and inputs and torch.is_tensor(inputs[0]):
                x = inputs[0]
                seen.setdefault(name, int(x.shape[-2]) if x.dim() >= 3 else 1)
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for out in outs:
                if torch.is_tensor(out):
                    largest[0] = max(largest[0], out.numel())
        return hook

    site_modules = {s.partition("[")[0]: s for s in sites}
    for name, module in denoiser.named_modules():
        hooks.append(module.register_forward_hook(record(site_modules.get(name, name))))
    try:
        with torch.inference_mode():
            denoiser(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    sample = tensors[0]
    batch = int(sample.shape[0])
    granularity = Granularity()
    shapes = [_group_shape(denoiser, g, group_widths(g, granularity)) for g in groups]
    height, width = _image_size(pipe, sampler)
    vae = pipe.components.get("vae")
    vae_channels = max(getattr(vae.config, "block_out_channels", [128])) if vae is not None else 0
    try:
        units = [sum(p.numel() for p in denoiser.get_submodule(u.path).parameters()) for u in latency_units(denoiser)]
    except ValueError:
        units = []
    holders = max((sum(p.numel() for p in denoiser.get_submodule(g.path).parameters()) for g in groups), default=0)
    return Footprint(components, key, sites, {s: seen.get(s, 0) for s in sites}, shapes, batch,
                     sum(t.numel() for t in tensors), largest[0], 3 * height * width, vae_channels * height * width, units,
                     holders)


def _image_size(pipe, sampler) -> tuple[int, int]:
    from slimdiff.arch.pipelines import denoiser_of

    _, denoiser = denoiser_of(pipe)
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = getattr(pipe, "default_sample_size", None) or getattr(denoiser.config, "sample_size", 64)
    return int(sampler.height or default * scale), int(sampler.width or default * scale)


def _group_shape(denoiser: nn.Module, group, widths: Sequence[int]) -> GroupShape:
    from slimdiff.arch.sites import group_sites, site_width

    sites = tuple(group_sites(group))
    module = denoiser.get_submodule(group.path)
    bias = lambda names: sum(int(module.get_submodule(n).bias is not None) for n in names)  # noqa: E731
    if group.kind in ("ffn", "ffn_single"):
        f = group.width
        return GroupShape(group.name, group.kind, sites, f, f, 1, f, group.out_features, len(widths))
    if group.kind == "adaln":
        return GroupShape(group.name, group.kind, sites, group.in_features + 1, group.in_features + 1, 1, group.full_rank,
                          group.out_features, len(widths))
    if group.kind == "qk_joint":
        dim_x = sum(site_width(denoiser, s) for s in sites) + bias(group.query)
        dim_y = sum(site_width(denoiser, s) for s in sites) + bias(group.key)
    elif group.kind in ("vo_joint", "vo_single"):
        dim_x = dim_y = sum(site_width(denoiser, s) for s in sites) + bias(group.value)
    else:
        dim_x = group.in_features + int(group.bias_in)
        dim_y = (group.out_features if group.kind.startswith("qk") else group.in_features) + int(group.bias_in)
    return GroupShape(group.name, group.kind, sites, dim_x, dim_y, group.heads, group.width,
                      group.out_features if group.kind.startswith("vo") else 0, len(widths))


@dataclass
class MemorySettings:
    """The job settings memory depends on (``settings_from_params`` reads them from params.yaml)."""

    dtype: torch.dtype = torch.float32
    device: str = "cpu"  # cpu | cuda
    linalg_on_device: bool = False  # float64 decompositions on the GPU (usable float64), else on the host
    num_buckets: int = 4
    shards: int = 1
    site_groups: int = 1
    workers: int = 1  # capture shards running at once on this machine (a local cluster); 1 for a remote cluster
    gain_calls: int = 4  # denoiser calls the gains keep (guided gains with true CFG: two a step measured)
    gain_prompts: int = 8
    gain_method: str = "truncation"  # truncation gains decompose one group at a time, as the decompose stage does
    latency_points: int = 0  # 0: no latency table (no latency budget)
    max_ffn_points: int = 64
    evaluate_prompts: int = 200
    report_samples: int = 8

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bucket_bytes(self) -> int:
        return 8 if self.dtype == torch.float64 else 4


@dataclass
class StageMemory:
    """Peak host RSS and peak device memory of one stage, and the terms they sum (bytes)."""

    host: int
    device: int
    host_terms: dict[str, int]
    device_terms: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {"host_bytes": self.host, "device_bytes": self.device, "host_terms": self.host_terms,
                "device_terms": self.device_terms}


def _site_bytes(width: int, buckets: int, bucket_bytes: int, pooled_only: bool = False) -> int:
    pooled = F64 * (width * width + 2 * width)  # sum x x^T, sum x, sum |x|
    return pooled if pooled_only or buckets == 1 else pooled + buckets * bucket_bytes * (width * width + width)


def score_working_set(shape: GroupShape, buckets: int) -> int:
    """Float64 bytes one group's scoring holds at its peak (on the linear-algebra device)."""
    if shape.kind in ("ffn", "ffn_single"):
        f, o = shape.dim_x, shape.out
        square = F64 * f * f
        eigendecomposition = 6 * square  # covariance, regularised copy, symmetrised input, eigenvectors, workspace (2)
        curves = (5 + buckets) * square + 2 * F64 * f * o + 2 * F64 * f * shape.widths  # + per-bucket covariances, a solve
        return max(eigendecomposition, curves)
    if shape.kind == "adaln":
        d, o = shape.dim_x, shape.out
        return F64 * (6 * d * d + 4 * d * o)
    d_x, d_y, inner = shape.dim_x, shape.dim_y, shape.heads * shape.head_dim
    return F64 * (5 * (d_x * d_x + d_y * d_y) + 4 * inner * (d_x + d_y) + 2 * inner * shape.out)


def decompose_working_set(shape: GroupShape) -> int:
    """Float64 bytes applying one group's recorded factorisation holds at its peak."""
    if shape.kind in ("ffn", "ffn_single"):
        f, o = shape.dim_x, shape.out
        return F64 * (5 * f * f + 3 * f * o)  # covariance, regularised copy (+ identity), the solve at one width
    return F64 * (2 * shape.dim_x * max(shape.head_dim * shape.heads, 1) + 2 * shape.dim_y * shape.head_dim * shape.heads
                  + 2 * shape.head_dim * shape.heads * max(shape.out, 1))


def lora_maps_elements(shape: GroupShape) -> int:
    """At most the elements of one group's LoRA maps (slimdiff.runtime.lora, computed while decomposing and held on the
    model's device until the folder is written), at any width: an FFN's Nyström correction is kept x removed channels,
    at most f^2 / 4 (half kept); QK/VO a change of basis per head on each side, at most 2 heads x head_dim^2; a
    factorised modulation's input map rank x d_in, at most min(d_in, d_out) x d_in."""
    if shape.kind in ("ffn", "ffn_single"):
        f = shape.dim_x
        return (f // 2) * (f - f // 2)
    if shape.kind == "adaln":
        return min(shape.dim_x, shape.out) * shape.dim_x
    return 2 * shape.heads * shape.head_dim * shape.head_dim


def settings_from_params(params: dict[str, Any], device: torch.device, dtype: torch.dtype,
                         calls_per_step: int = 1) -> MemorySettings:
    """The memory settings of a params.yaml (after ``slimdiff.pipeline.stages.device_settings``); ``calls_per_step``:
    the sampler's denoiser calls a step (guided gains keep them all for each step they measure)."""
    from slimdiff.device import linalg_device

    capture, score, allocate = params["capture"], params["score"], params["allocate"]
    shards, site_groups = int(capture.get("shards", 1)), int(capture.get("site_groups", 1))
    workers = 1
    if shards * site_groups > 1 and str(capture.get("cluster", "local")) == "local":
        if capture.get("workers") is not None:
            workers = int(capture["workers"])
        else:
            from slimdiff.device import usable_cores

            per = torch.cuda.device_count() if device.type == "cuda" else usable_cores()
            workers = max(1, min(per, shards * site_groups))
    return MemorySettings(
        dtype=dtype, device=device.type, linalg_on_device=linalg_device(device).type == "cuda",
        num_buckets=int(capture["num_buckets"]), shards=shards, site_groups=site_groups, workers=workers,
        gain_calls=int(score["gain_calls"]) * (calls_per_step if score.get("gain_target") == "guided" else 1),
        gain_prompts=int(score["gain_prompts"]),
        gain_method=str(score.get("gain_method", "truncation")),
        latency_points=int(params["latency"]["points"]) if allocate.get("budget_kind") == "latency" else 0,
        max_ffn_points=int(score.get("max_ffn_points", 64)),
        evaluate_prompts=int(params["evaluate"]["n"]), report_samples=int((params.get("report") or {}).get("samples", 8)),
    )


def predict(fp: Footprint, s: MemorySettings) -> dict[str, StageMemory]:
    """Peak host and device memory of every stage (see the module docstring and docs/memory.md)."""
    from slimdiff.statistics.shards import split_sites

    b = s.dtype_bytes
    on_gpu = s.device == "cuda"
    weights = sum(c["params"] for c in fp.components.values()) * b
    denoiser_weights = fp.components[fp.denoiser]["params"] * b
    stored_bytes = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
    # a component stored in another dtype passes through the host in its stored dtype while it is cast
    cast = max((c["params"] * stored_bytes[c["stored"]] for c in fp.components.values()
                if stored_bytes[c["stored"]] != b), default=0)
    activations = ACTIVATION_COPIES * fp.activation_elements * b
    base = {"process": BASE_HOST[s.device]}

    def stage(host: dict[str, int], device: dict[str, int]) -> StageMemory:
        host = {k: int(v) for k, v in {**base, **host}.items() if v}
        device = {k: int(v) for k, v in device.items() if v}
        if on_gpu:
            device = {"CUDA context": BASE_DEVICE, **device}
        return StageMemory(sum(host.values()), sum(device.values()) if on_gpu else 0, host, device)

    def model_stage(extra: dict[str, int], weights_on_device: int = weights) -> StageMemory:
        """Weights (and ``extra``) on the device; on a GPU the host holds the weights while they load."""
        if on_gpu:
            return stage({"weights while loading": weights_on_device, "dtype cast while loading": cast}, {
                "weights": weights_on_device, **extra})
        return stage({"weights": weights_on_device, "dtype cast while loading": cast, **extra}, {})

    # capture: the statistics of each worker's sites, one call's Gram matrix (a float32 copy of the input and the
    # outer product) and the activations
    names, widths = list(fp.sites), [fp.sites[n] for n in fp.sites]
    groups = split_sites(names, widths, s.site_groups) if s.site_groups > 1 else [names]
    worker_stats = max(sum(_site_bytes(fp.sites[n], s.num_buckets, s.bucket_bytes) for n in g) for g in groups)
    widest = max(fp.sites, key=lambda n: fp.sites[n] * max(fp.site_tokens.get(n, 1), 1))
    gram = 4 * fp.sites[widest] * max(fp.site_tokens.get(widest, 1), 1) * fp.call_batch + 4 * max(widths) ** 2
    capture_extra = {"statistics": worker_stats, "Gram matrix of one call": gram, "activations": activations,
                     "checkpoint write": STREAM_CHUNK}
    capture = model_stage(capture_extra)
    stages = {"curate": model_stage({"activations": activations})}
    stages["capture"] = capture
    if s.shards * s.site_groups > 1:  # the merge: every shard's tensor of one site, summed into the file
        largest = max(_site_bytes(w, s.num_buckets, s.bucket_bytes) for w in widths)
        stages["capture (merge)"] = stage({"two copies of the largest site": 2 * largest}, {})
        stages["capture (one machine)"] = StageMemory(capture.host * s.workers + stages["capture (merge)"].host,
                                                      capture.device, {"workers": s.workers, "per worker": capture.host},
                                                      capture.device_terms)
    if s.latency_points:
        unit = max(fp.unit_params, default=0) * b
        stages["latency"] = model_stage({"timed copies of one unit": (s.latency_points + 1) * unit, "activations": activations})
    # score and decompose: one group at a time; its sites are read onto the host, its math runs on the linalg device
    read = max(sum(_site_bytes(fp.sites[n], s.num_buckets, s.bucket_bytes) for n in g.sites) for g in fp.groups)
    read_pooled = max(sum(_site_bytes(fp.sites[n], 1, 8, pooled_only=True) for n in g.sites) for g in fp.groups)
    scoring = max(score_working_set(g, s.num_buckets) for g in fp.groups)
    applying = max(decompose_working_set(g) for g in fp.groups)

    def group_math_stage(extra: dict[str, int], site_bytes: int, working: int) -> StageMemory:
        """A model stage that reads one group's statistics onto the host and decomposes it on the linalg device."""
        if s.linalg_on_device:
            memory = model_stage({**extra, "decomposition working set": working})
        else:
            memory = model_stage(extra)
            memory.host_terms["decomposition working set"] = working
            memory.host += working
        memory.host_terms["one group's statistics (read)"] = site_bytes
        memory.host += site_bytes
        return memory

    calls = s.gain_calls * fp.call_input_elements * b * max(1, s.gain_prompts // max(fp.call_batch, 1))
    gains_extra = {"recorded calls": calls, "activations": 2 * activations}
    if s.gain_method == "truncation":  # each group decomposed whole (nothing recorded yet, as in the score stage)
        stages["gains"] = group_math_stage(
            {**gains_extra, "copy of the module holding one group": fp.group_module_params * b}, read_pooled, scoring)
    else:
        stages["gains"] = model_stage(gains_extra)
    for name, site_bytes, working in (("score", read, scoring), ("decompose", read_pooled, applying)):
        memory = group_math_stage({}, site_bytes, working)
        if name == "decompose":
            maps = b * sum(lora_maps_elements(g) for g in fp.groups)  # every group's, until the folder is written
            if on_gpu:
                memory.device_terms["LoRA maps"] = maps
                memory.device += maps
                memory.host_terms["one weight shard while saving"] = SAVE_SHARD_BYTES
                memory.host += SAVE_SHARD_BYTES
            else:
                memory.host_terms["LoRA maps"] = maps
                memory.host += maps
        stages[name] = memory
    stages["allocate"] = stage({}, {})
    images = 2 * fp.image_elements * 4
    decode = 2 * fp.decode_elements * b
    for name, count in (("evaluate", s.evaluate_prompts), ("report", s.report_samples)):
        extra = {"compressed denoiser": denoiser_weights, "activations": activations, "VAE decoding": decode}
        memory = model_stage(extra, weights)
        memory.host_terms["images (original and compressed, float32)"] = images * count
        memory.host += images * count
        stages[name] = memory
    return stages


def job_peak(stages: dict[str, StageMemory]) -> tuple[str, StageMemory]:
    """The stage with the largest host peak (the device peak is reported per stage)."""
    name = max(stages, key=lambda k: stages[k].host)
    return name, stages[name]


def fits(stages: dict[str, StageMemory], host_available: int, device_available: int | None) -> list[str]:
    """The stages that would not fit: one description each (empty when every stage fits)."""
    problems = []
    for name, memory in stages.items():
        if memory.host > host_available:
            problems.append((memory.host / host_available,
                             f"stage {name} needs {memory.host / GIB:.1f} GiB host RAM, {host_available / GIB:.1f} GiB available"))
        if device_available is not None and memory.device > device_available:
            problems.append((memory.device / device_available,
                             f"stage {name} needs {memory.device / GIB:.1f} GiB GPU memory, {device_available / GIB:.1f} GiB free"))
    return [text for _, text in sorted(problems, key=lambda p: -p[0])]


def table(stages: dict[str, StageMemory]) -> str:
    """A printable table: one line per stage, its peaks and its largest terms."""
    lines = []
    for name, memory in stages.items():
        top = sorted(memory.host_terms.items(), key=lambda kv: -kv[1])[:3]
        device = f", GPU {memory.device / GIB:.2f} GiB" if memory.device else ""
        lines.append(f"  {name:<22} host {memory.host / GIB:7.2f} GiB{device}  ("
                     + ", ".join(f"{k} {v / GIB:.2f}" for k, v in top) + ")")
    return "\n".join(lines)


def available_memory(device: torch.device) -> tuple[int, int | None]:
    """(host bytes available now, free bytes on the GPU or None): ``SLIMDIFF_HOST_MEMORY`` / ``SLIMDIFF_DEVICE_MEMORY``
    (bytes, or with a GiB/GB suffix) override what the machine reports, e.g. to keep headroom on a shared host."""
    import os

    def parse(name: str) -> int | None:
        text = os.environ.get(name, "").strip()
        if not text:
            return None
        units = {"gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6}
        for suffix, factor in units.items():
            if text.lower().endswith(suffix):
                try:
                    return int(float(text[: -len(suffix)]) * factor)
                except ValueError:
                    break
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name} must be a size in bytes or with GiB/GB/MiB/MB, got {text!r}") from None

    host = parse("SLIMDIFF_HOST_MEMORY")
    if host is None:
        host = _meminfo_available()
    device_free = parse("SLIMDIFF_DEVICE_MEMORY")
    if device_free is None and device.type == "cuda":
        device_free = int(torch.cuda.mem_get_info(device)[0])
    return host, device_free


def peak_host_rss() -> int:
    """This process's own peak resident set size in bytes (Linux ``VmHWM``). Not ``ru_maxrss``: Linux carries it over
    fork and exec, so a stage started by a process that once held more would report that process's peak. Off Linux,
    ``ru_maxrss`` is the only figure (and may include such a parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux

    return int(psutil.virtual_memory().available)


def suggestions(fp: Footprint, s: MemorySettings, host_available: int, device_available: int | None) -> list[str]:
    """Settings that make every stage fit (each alone, then together), as params.yaml changes."""
    from dataclasses import replace

    candidates = []
    for groups in (2, 4, 8, 16, 32):
        if groups > s.site_groups and groups <= len(fp.sites):
            candidates.append((f"capture.site_groups: {groups} (capture.workers: 1)", replace(s, site_groups=groups, workers=1)))
    if s.num_buckets > 1:
        candidates.append(("capture.num_buckets: 1", replace(s, num_buckets=1)))
    if s.dtype == torch.float32:
        candidates.append(("model.dtype: bfloat16", replace(s, dtype=torch.bfloat16)))
    found: list[str] = []
    for label, settings in candidates:
        grouping = label.startswith("capture.site_groups")
        if grouping and any(f.startswith("capture.site_groups") for f in found):
            continue  # the fewest site groups that fit
        if not fits(predict(fp, settings), host_available, device_available):
            found.append(label)
    if found:
        return found[:3]
    combined = replace(s, site_groups=min(32, len(fp.sites)), workers=1, num_buckets=1, dtype=torch.bfloat16
                       if s.dtype == torch.float32 else s.dtype)
    if not fits(predict(fp, combined), host_available, device_available):
        return [f"capture.site_groups: {combined.site_groups}, capture.workers: 1, capture.num_buckets: 1, model.dtype: bfloat16"]
    return []
