"""One call that runs the whole method on a pipeline: capture -> gains -> scores -> plan -> decompose.

Each step also has its own entry point (``slimdiff.capture``, ``slimdiff.scoring.gains.measure_gains``,
``slimdiff.scoring.influence.score``, ``slimdiff.allocate``, ``slimdiff.decompose``); the DVC stages call
those one at a time so each result is a versioned file.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch

from slimdiff.planning.allocation import ALLOCATORS, BUDGET_KINDS, TIED_BUDGETS, DEFAULT_MIN_KEEP, DEFAULT_TEMPERATURE, Budget, BudgetError, WidthPlan, allocate, check_budget
from slimdiff.statistics.recording import DEFAULT_TIMESTEP_GRID, capture
from slimdiff.statistics.sums import Capture
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.decomposition.closed_form import DEFAULT_REG
from slimdiff.device import DTYPE_CHOICES, DeviceError, resolve_dtype
from slimdiff.decomposition.factorisations import store_for
from slimdiff.arch import compressible_groups
from slimdiff.scoring.gains import DEFAULT_REFERENCE_KEEP, GAIN_METHODS, GAIN_TARGETS, Gains, TruncationReference, measure_gains
from slimdiff.scoring.influence import Granularity, InfluenceScores, ffn_recorder, score, skeleton_scores
from slimdiff.planning.latency import LatencyTable, measure_pipeline_latency
from slimdiff.decomposition.apply import GroupResult, decompose

CONFIG_VERSION = 1


@dataclass(frozen=True)
class SlimDiffConfig:
    """Every setting of a compression, versioned; round-trips through JSON and is saved beside the weights."""

    budget: float = 0.4
    # params: remove this fraction (or count) of parameters; macs: keep this fraction of MACs; latency: keep this
    # fraction of the denoiser's latency measured on the job's device
    budget_kind: str = "params"
    tie_qk_vo: bool | None = None  # None: tied for a latency budget, untied otherwise
    latency_points: int = 16  # widths timed per unit for a latency budget
    latency_repeats: int = 5
    allocator: str = "slimdiff"
    min_keep: float = DEFAULT_MIN_KEEP
    ffn_step: int = 8
    rank_step: int = 1
    reg: float = DEFAULT_REG
    num_buckets: int = 4
    bucket_weights: tuple[float, ...] | None = None
    temperature: float = DEFAULT_TEMPERATURE
    gain_prompts: int = 4
    gain_calls: int = 4
    # truncation: each group cut to gain_keep of its width, the measured output change over the predicted error;
    # noise: isotropic noise of known energy at its output (rel_noise x its RMS). docs/method.md §4
    gain_method: str = "truncation"
    gain_keep: float = DEFAULT_REFERENCE_KEEP
    # call: a truncation gain measures the change of each denoiser call's output; guided: of the classifier-free-guided
    # prediction the sampler steps with (u + s (c - u)), where an error along the guidance direction is amplified s times
    gain_target: str = "call"
    rel_noise: float = 0.05
    max_ffn_points: int = 64
    batch_size: int = 8
    timestep_grid: int = DEFAULT_TIMESTEP_GRID  # adaLN inputs recorded at this many timesteps over the whole range
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.budget_kind not in BUDGET_KINDS:
            raise ValueError(f"unknown budget kind {self.budget_kind!r}; valid: {', '.join(BUDGET_KINDS)}")
        if self.budget_kind == "params":
            Budget.parse(self.budget)
        elif not 0 < self.budget < 1:
            what = "compressible MACs" if self.budget_kind == "macs" else "the denoiser's measured latency"
            raise BudgetError(f"a {self.budget_kind} budget is the fraction of {what} to keep, 0 < F < 1; got {self.budget}")
        if self.budget_kind in TIED_BUDGETS and self.tie_qk_vo is False:
            raise BudgetError(TIED_BUDGETS[self.budget_kind])
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"unknown allocator {self.allocator!r}; choose one of {', '.join(ALLOCATORS)}")
        if self.gain_method not in GAIN_METHODS:
            raise ValueError(f"unknown gain method {self.gain_method!r}; choose one of {', '.join(GAIN_METHODS)}")
        if self.gain_target not in GAIN_TARGETS:
            raise ValueError(f"unknown gain target {self.gain_target!r}; choose one of {', '.join(GAIN_TARGETS)}")
        if self.gain_target == "guided" and self.gain_method != "truncation":
            raise ValueError(f"gain target guided measures truncation gains on the guided prediction; it needs gain "
                             f"method truncation, got {self.gain_method!r}")
        if not (isinstance(self.gain_keep, (int, float)) and 0 < self.gain_keep < 1):
            raise ValueError(f"gain_keep is the fraction of each group's width kept to measure its truncation gain, "
                             f"0 < gain_keep < 1; got {self.gain_keep!r}")
        if not 0 <= self.min_keep < 1:
            raise ValueError(f"min_keep must be in [0, 1), got {self.min_keep}")
        Granularity(self.ffn_step, self.rank_step)
        if self.reg < 0:
            raise ValueError(f"reg must be >= 0, got {self.reg}")
        if self.num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {self.num_buckets}")
        if self.bucket_weights is not None:
            if len(self.bucket_weights) != self.num_buckets:
                raise ValueError(f"{len(self.bucket_weights)} bucket_weights for num_buckets={self.num_buckets}")
            bad = [w for w in self.bucket_weights if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)]
            if bad or not sum(self.bucket_weights) > 0:
                raise ValueError(f"bucket_weights must be finite numbers >= 0 with a positive sum, got {list(self.bucket_weights)}")
        if self.timestep_grid < 0:
            raise ValueError(f"timestep_grid must be >= 0 timesteps, got {self.timestep_grid}")
        for name in ("gain_prompts", "gain_calls", "batch_size", "max_ffn_points", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.latency_points < 2:
            raise ValueError(f"latency_points must be >= 2, got {self.latency_points}")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"unknown SlimDiffConfig version {self.version}; this slimdiff reads version {CONFIG_VERSION}")

    @property
    def granularity(self) -> Granularity:
        return Granularity(self.ffn_step, self.rank_step)

    def gain_reference(self, capture: Capture) -> TruncationReference | None:
        """What truncation gains truncate with (this model's ``capture``), or None for noise gains."""
        if self.gain_method != "truncation":
            return None
        return TruncationReference(capture, self.reg, self.gain_keep, guided=self.gain_target == "guided")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["bucket_weights"] = list(self.bucket_weights) if self.bucket_weights is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SlimDiffConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown SlimDiffConfig keys {unknown}; valid keys: {sorted(names)}")
        data = dict(data)
        if data.get("bucket_weights") is not None:
            data["bucket_weights"] = tuple(data["bucket_weights"])
        return cls(**data)


@dataclass
class CompressionResult:
    """Everything a compression produced besides the compressed pipeline itself."""

    config: SlimDiffConfig
    capture: Capture
    scores: InfluenceScores | None
    plan: WidthPlan
    groups: list[GroupResult] = field(default_factory=list)
    gains: Gains | None = None
    latency_table: LatencyTable | None = None

    @property
    def lora_maps(self) -> dict[str, Any]:
        """The maps of every compressed linear (original name -> ``LinearMap``), for ``slimdiff.runtime.folder.save``."""
        from slimdiff.runtime.lora import merge_maps

        return merge_maps(m for group in self.groups for m in group.maps)

    def info(self, model_id: str = "") -> dict[str, Any]:
        """Provenance stored in the saved model's slimdiff config."""
        meta = self.capture.metadata
        return {
            "base_model": {"id": model_id or meta.get("model_id", ""), "hash": meta.get("model_hash")},
            "config": self.config.to_dict(),
            "capture": {k: meta.get(k) for k in ("prompts_digest", "num_prompts", "scheduler", "num_inference_steps",
                                                 "guidance_scale", "height", "width", "seed", "bucket_edges", "dtype",
                                                 "device_type", "call")},
            "plan": {"allocator": self.plan.allocator, "removed": self.plan.removed, "target_removed": self.plan.target_removed,
                     "compressible_before": self.plan.params_before, "compressible_after": self.plan.params_after,
                     "predicted_error": self.plan.predicted_error, "budget_kind": self.plan.budget_kind,
                     "latency": self.plan.latency},
        }


def compress_pipeline(pipe, prompts: Sequence[str], config: SlimDiffConfig = SlimDiffConfig(),
                      sampler: SamplerSettings = SamplerSettings(), model_id: str = "", progress: bool = True) -> CompressionResult:
    """Compress ``pipe``'s denoiser in place with the full SlimDiff method; returns the artifacts."""
    _, denoiser = denoiser_of(pipe)
    groups = compressible_groups(denoiser)
    table = None
    if config.budget_kind == "latency":  # timed on this pipeline's device, at its first call's batch and resolution
        table = measure_pipeline_latency(pipe, list(prompts)[:1], sampler, config.granularity, config.latency_points,
                                         config.latency_repeats, progress=progress)
    if config.budget_kind != "macs":  # a MACs budget needs the capture's token counts; its range is checked after it
        check_budget(skeleton_scores(groups, config.granularity), Budget.parse(config.budget), config.min_keep,  # before any work
                     config.budget_kind, table)
    stats = capture(pipe, prompts, sampler, num_buckets=config.num_buckets, batch_size=config.batch_size,
                    groups=groups, model_id=model_id, progress=progress, timestep_grid_points=config.timestep_grid)
    with tempfile.TemporaryDirectory(prefix="slimdiff-factorisations-") as folder:  # one factorisation per group
        store = store_for(folder, stats, config.reg, denoiser)
        gains = measure_gains(pipe, list(prompts)[: config.gain_prompts], sampler, config.gain_calls, config.rel_noise,
                              seed=sampler.seed, progress=progress, reference=config.gain_reference(stats),
                              record=ffn_recorder(store, config.granularity))  # truncation gains decompose the FFNs first
        scores = score(denoiser, stats, gains, config.granularity, config.reg, config.max_ffn_points, progress=progress,
                       store=store)
        plan = allocate(scores, Budget.parse(config.budget), config.allocator, config.min_keep, config.bucket_weights,
                        config.temperature, config.budget_kind, config.tie_qk_vo, table)
        results = decompose(denoiser, stats, plan.widths, config.reg, progress=progress, store=store)
    return CompressionResult(config, stats, scores, plan, results, gains, table)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line), a JSON list, or JSON lines (strings or objects with a
    ``prompt``, ``text`` or ``caption`` field). Fails naming the file on missing, unreadable or empty input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"prompt file {path} is unreadable: {error}") from None
    prompts: list[str] = []
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"prompt file {path} is not valid JSON: {error}") from None
        if not isinstance(items, list):
            raise ValueError(f"prompt file {path} must hold a JSON list of prompts")
        prompts = [_prompt_of(item, path) for item in items]
    elif path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    prompts.append(_prompt_of(json.loads(line), path))
                except json.JSONDecodeError as error:
                    raise ValueError(f"prompt file {path} line {number} is not valid JSON: {error}") from None
    else:
        prompts = [line.strip() for line in text.splitlines()]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


def _prompt_of(item: Any, path: Path) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for key in ("prompt", "text", "caption"):
            if isinstance(item.get(key), str):
                return item[key]
    raise ValueError(f"prompt file {path}: entry {str(item)[:60]!r} is not a string nor has a prompt/text/caption field")


def checkpoint_dtype(model: str | Path) -> str:
    """The floating dtype a local diffusers folder's denoiser (``unet`` or ``transformer``) is stored in, read from its
    safetensors header (no tensor is read): what ``--dtype auto`` / ``model.dtype: auto`` resolve to."""
    from slimdiff.runtime.folder import CompressedModelError, stored_dtype, weight_layout

    path = Path(model)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"dtype auto reads the stored dtype of a local diffusers folder; {model!r} is not one "
                                "(no model_index.json): give the dtype (float32, float16 or bfloat16)")
    for key in ("unet", "transformer"):
        if (path / key).is_dir():
            try:
                return str(stored_dtype(weight_layout(path / key))).removeprefix("torch.")
            except CompressedModelError as error:
                raise ValueError(f"dtype auto: {error}") from None
    raise FileNotFoundError(f"{path} has no unet/ or transformer/ folder to read the stored dtype from")


def resolve_model_dtype(spec: str | torch.dtype, model: str | Path) -> torch.dtype:
    """``slimdiff.device.resolve_dtype``, and ``auto``: the dtype ``model`` (a local diffusers folder) is stored in."""
    if isinstance(spec, str):
        key = spec.strip().lower().removeprefix("torch.")
        if key == "auto":
            return resolve_dtype(checkpoint_dtype(model))
        if key not in DTYPE_CHOICES:
            raise DeviceError(f"unknown dtype {spec!r}; valid: {', '.join(DTYPE_CHOICES)}")
    return resolve_dtype(spec)


def load_pipeline(model: str, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, **kwargs):
    """A diffusers pipeline from a local folder or a hub id, on ``device`` in ``dtype`` (default: as stored, on the CPU;
    ``auto``: the dtype the local folder's denoiser is stored in), with a clear error when it cannot be loaded. Device
    and dtype are checked before any weight is read."""
    from diffusers import DiffusionPipeline

    from slimdiff.device import check_dtype_runs, resolve_device
    from slimdiff.environment import quiet_libraries

    quiet_libraries()
    target = resolve_device(device) if device is not None else None
    torch_dtype = resolve_model_dtype(dtype, model) if dtype is not None else None
    if torch_dtype is not None:
        check_dtype_runs(target or torch.device("cpu"), torch_dtype)
        kwargs["dtype"] = torch_dtype  # diffusers' name (``torch_dtype`` is deprecated)
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise FileNotFoundError(f"model {model!r}: no such folder, and not a hub id of the form 'owner/name'")
    else:
        try:
            pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised with the cause named
            raise OSError(f"could not load model {model!r} from the hub ({type(error).__name__}: {str(error).splitlines()[0]}); "
                          "offline machines need a local diffusers folder") from error
    return pipe.to(target) if target is not None else pipe
