"""Timestep activation capture (method.md §2).

Forward pre-hooks on the denoiser's linear layers accumulate float64 uncentered second moments of
their inputs, per timestep bucket, over every denoiser call (every timestep, both classifier-free
guidance branches). Memory holds sums, never activations. Sums are additive, so captures of disjoint
prompt shards merge exactly (``merge_captures``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from slimdiff.groups import ModuleGroup, compressible_groups
from slimdiff.utils import atomic_path

CAPTURE_FORMAT = "slimdiff-capture/1"


@dataclass
class SiteStats:
    """Sums for one hooked input: per bucket, sum of x x^T, sum of x, and token count."""

    sum_outer: Tensor  # (buckets, d, d) float64
    sum: Tensor  # (buckets, d) float64
    count: Tensor  # (buckets,) int64

    @classmethod
    def zeros(cls, buckets: int, dim: int) -> "SiteStats":
        return cls(
            torch.zeros(buckets, dim, dim, dtype=torch.float64),
            torch.zeros(buckets, dim, dtype=torch.float64),
            torch.zeros(buckets, dtype=torch.int64),
        )

    @property
    def dim(self) -> int:
        return self.sum.shape[1]


def group_input_sites(group: ModuleGroup) -> tuple[str, str]:
    """(x_site, y_site): the hooked inputs whose statistics a group's decomposition needs.

    QK needs the query input (x) and key input (y); VO the value input (y, also as x); FFN the
    hidden activation entering the down projection (both entries).
    """
    if group.kind == "ffn":
        site = f"{group.path}.net.2"
        return site, site
    q_site = f"{group.path}.to_q"
    kv_site = f"{group.path}.to_k" if group.kind.endswith("cross") else q_site
    if group.kind.startswith("qk"):
        return q_site, kv_site
    return kv_site, kv_site


def sites_for(groups: Sequence[ModuleGroup]) -> list[str]:
    """Unique hooked input sites for ``groups``, in order."""
    sites: dict[str, None] = {}
    for group in groups:
        for site in group_input_sites(group):
            sites[site] = None
    return list(sites)


def bucket_edges(num_buckets: int, num_train_timesteps: int) -> list[float]:
    """Equal-width timestep buckets over [0, num_train_timesteps]."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return [num_train_timesteps * i / num_buckets for i in range(num_buckets + 1)]


@dataclass
class Capture:
    """Accumulated second moments of a denoiser's compressible inputs, with provenance metadata."""

    sites: dict[str, SiteStats]
    metadata: dict = field(default_factory=dict)
    gains: dict[str, float] = field(default_factory=dict)

    @property
    def num_buckets(self) -> int:
        return next(iter(self.sites.values())).count.shape[0]

    def second_moment(self, site: str, buckets: Sequence[int] | None = None, augment: bool = False) -> Tensor:
        """E[x x^T] over the chosen buckets (all by default); with ``augment`` the moment of [x, 1]."""
        if site not in self.sites:
            raise KeyError(f"capture has no statistics for {site!r}")
        stats = self.sites[site]
        index = list(range(self.num_buckets)) if buckets is None else list(buckets)
        count = int(stats.count[index].sum())
        if count == 0:
            raise ValueError(f"capture holds no tokens for {site!r} in buckets {index}")
        outer = stats.sum_outer[index].sum(0) / count
        if not augment:
            return outer
        mean = stats.sum[index].sum(0) / count
        dim = stats.dim
        aug = torch.empty(dim + 1, dim + 1, dtype=torch.float64)
        aug[:dim, :dim] = outer
        aug[:dim, dim] = mean
        aug[dim, :dim] = mean
        aug[dim, dim] = 1.0
        return aug

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file (tensors + JSON metadata), atomically."""
        from safetensors.torch import save_file

        tensors: dict[str, Tensor] = {}
        for site, stats in self.sites.items():
            tensors[f"{site}|sum_outer"] = stats.sum_outer.contiguous()
            tensors[f"{site}|sum"] = stats.sum.contiguous()
            tensors[f"{site}|count"] = stats.count.contiguous()
        header = {"format": CAPTURE_FORMAT, "metadata": self.metadata, "gains": self.gains}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"slimdiff": json.dumps(header, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Capture":
        """Read a capture written by ``save``; fails with the file name on a wrong format."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"capture file not found: {path}")
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("slimdiff")
            if raw is None:
                raise ValueError(f"{path} is not a slimdiff capture (no 'slimdiff' metadata)")
            header = json.loads(raw)
            if header.get("format") != CAPTURE_FORMAT:
                raise ValueError(f"{path}: unknown capture format {header.get('format')!r}, expected {CAPTURE_FORMAT!r}")
            parts: dict[str, dict[str, Tensor]] = {}
            for key in handle.keys():
                site, part = key.rsplit("|", 1)
                parts.setdefault(site, {})[part] = handle.get_tensor(key)
        sites = {site: SiteStats(p["sum_outer"], p["sum"], p["count"]) for site, p in parts.items()}
        return cls(sites, header.get("metadata", {}), {k: float(v) for k, v in header.get("gains", {}).items()})


# Metadata keys that must agree between shards (everything that defines the sampling distribution).
_SHARD_INVARIANT_KEYS = (
    "model_id", "model_hash", "denoiser_class", "scheduler", "num_inference_steps", "guidance_scale",
    "height", "width", "seed", "bucket_edges",
)


def merge_captures(captures: Sequence[Capture]) -> Capture:
    """Sum captures of disjoint prompt shards into the capture of all their prompts."""
    if not captures:
        raise ValueError("merge_captures needs at least one capture")
    first = captures[0]
    for other in captures[1:]:
        if set(other.sites) != set(first.sites):
            raise ValueError("captures hold different sites; they come from different models or groups")
        for key in _SHARD_INVARIANT_KEYS:
            if first.metadata.get(key) != other.metadata.get(key):
                raise ValueError(f"captures disagree on {key!r}: {first.metadata.get(key)!r} vs {other.metadata.get(key)!r}")
    sites = {}
    for site, stats in first.sites.items():
        sites[site] = SiteStats(
            sum(c.sites[site].sum_outer for c in captures),
            sum(c.sites[site].sum for c in captures),
            sum(c.sites[site].count for c in captures),
        )
    metadata = dict(first.metadata)
    metadata["denoiser_calls"] = sum(c.metadata.get("denoiser_calls", 0) for c in captures)
    prompt_hashes = sorted(h for c in captures for h in c.metadata.get("prompt_hashes", []))
    metadata["prompt_hashes"] = prompt_hashes
    metadata["num_prompts"] = len(prompt_hashes)
    metadata["prompts_digest"] = prompts_digest_from_hashes(prompt_hashes)
    return Capture(sites, metadata)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def prompts_digest_from_hashes(hashes: Sequence[str]) -> str:
    """Order-independent digest of a prompt multiset (so shards merge to the same digest)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def prompts_digest(prompts: Sequence[str]) -> str:
    return prompts_digest_from_hashes([prompt_hash(p) for p in prompts])


def model_content_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ActivationRecorder:
    """Stateful hooks on a denoiser that accumulate input second moments per timestep bucket.

    Use as a context manager: hooks are registered on enter and removed on exit, also on error.
    """

    def __init__(self, denoiser: nn.Module, sites: Sequence[str], num_buckets: int = 4, num_train_timesteps: int = 1000):
        self.denoiser = denoiser
        self.site_names = list(sites)
        self.edges = bucket_edges(num_buckets, num_train_timesteps)
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        modules = dict(denoiser.named_modules())
        missing = [s for s in self.site_names if s not in modules]
        if missing:
            raise KeyError(f"denoiser has no module(s) {missing[:3]} to hook")
        self._modules = {s: modules[s] for s in self.site_names}
        self.stats = {s: SiteStats.zeros(num_buckets, self._modules[s].in_features) for s in self.site_names}
        self._bucket_ids: Tensor | None = None
        self._handles: list = []
        self._signature = inspect.signature(denoiser.forward)
        self.calls = 0

    def bucket_of(self, timesteps: Tensor) -> Tensor:
        t = timesteps.detach().to(torch.float64).cpu()
        ids = torch.floor(t * self.num_buckets / self.num_train_timesteps).to(torch.int64)
        return ids.clamp(0, self.num_buckets - 1)

    def _on_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        if "timestep" not in bound:
            raise ValueError(f"{type(module).__name__}.forward was called without a timestep; cannot bucket statistics")
        sample = next(iter(bound.values()))
        batch = sample.shape[0]
        timestep = bound["timestep"]
        timestep = torch.as_tensor(timestep).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        self._bucket_ids = self.bucket_of(timestep)
        self.calls += 1

    def _on_linear(self, site: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if self._bucket_ids is None:
                raise RuntimeError(f"{site} ran outside a denoiser call; cannot assign a timestep bucket")
            ids = self._bucket_ids
            stats = self.stats[site]
            if x.shape[0] == ids.shape[0]:
                groups = [(int(b), ids.to(x.device) == b) for b in torch.unique(ids)]
            elif bool((ids == ids[0]).all()):
                groups = [(int(ids[0]), None)]
            else:
                raise RuntimeError(f"{site}: input batch {x.shape[0]} does not match the denoiser batch {ids.shape[0]}")
            for bucket, rows in groups:
                chunk = x if rows is None else x[rows]
                flat = chunk.reshape(-1, chunk.shape[-1]).to(torch.float64).cpu()
                stats.sum_outer[bucket].addmm_(flat.T, flat)
                stats.sum[bucket].add_(flat.sum(0))
                stats.count[bucket] += flat.shape[0]

        return hook

    def __enter__(self) -> "ActivationRecorder":
        try:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._on_denoiser, with_kwargs=True))
            for site, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._on_linear(site)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._bucket_ids = None


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """("unet", module) or ("transformer", module) of a diffusers pipeline."""
    for key in ("unet", "transformer"):
        module = getattr(pipe, key, None)
        if isinstance(module, nn.Module):
            return key, module
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' component to compress")


def prompt_generator(prompt: str, seed: int) -> torch.Generator:
    """A generator seeded from (seed, prompt): each prompt gets the same noise in any batch or shard."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:8], "little") % (2**63)
    return torch.Generator().manual_seed(value)


@dataclass(frozen=True)
class SamplerSettings:
    """The deployment sampler a capture (and an evaluation) runs."""

    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")

    def pipe_kwargs(self, pipe, prompts: Sequence[str]) -> dict:
        kwargs = dict(
            prompt=list(prompts),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[prompt_generator(p, self.seed) for p in prompts],
        )
        if self.height is not None:
            kwargs["height"] = self.height
        if self.width is not None:
            kwargs["width"] = self.width
        return kwargs


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@contextmanager
def _quiet_pipeline(pipe):
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe.set_progress_bar_config(disable=False)


def capture(
    pipe,
    prompts: Sequence[str],
    sampler: SamplerSettings = SamplerSettings(),
    *,
    num_buckets: int = 4,
    batch_size: int = 8,
    groups: Sequence[ModuleGroup] | None = None,
    extra_sites: Sequence[str] = (),
    model_id: str = "",
    progress: bool = True,
) -> Capture:
    """Run ``pipe`` over ``prompts`` with the deployment sampler and return the accumulated statistics.

    ``extra_sites`` names further ``nn.Linear`` modules (by path in the denoiser) whose inputs to
    record, e.g. for per-matrix baselines.
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture needs at least one prompt")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every calibration prompt must be a non-empty string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, denoiser = denoiser_of(pipe)
    groups = list(groups) if groups is not None else compressible_groups(denoiser)
    num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    sites = list(dict.fromkeys([*sites_for(groups), *extra_sites]))
    recorder = ActivationRecorder(denoiser, sites, num_buckets, num_train_timesteps)
    with recorder, _quiet_pipeline(pipe), torch.inference_mode():
        bar = tqdm(total=len(prompts), desc="capture", unit="prompt", disable=not progress)
        for batch in _batches(prompts, batch_size):
            pipe(**sampler.pipe_kwargs(pipe, batch), output_type="latent")
            bar.update(len(batch))
        bar.close()
    hashes = [prompt_hash(p) for p in prompts]
    metadata = {
        "model_id": model_id,
        "model_hash": model_content_hash(denoiser),
        "denoiser_class": type(denoiser).__name__,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": _jsonable(dict(pipe.scheduler.config))},
        "num_inference_steps": sampler.num_inference_steps,
        "guidance_scale": sampler.guidance_scale,
        "height": sampler.height,
        "width": sampler.width,
        "seed": sampler.seed,
        "bucket_edges": recorder.edges,
        "num_prompts": len(prompts),
        "prompt_hashes": sorted(hashes),
        "prompts_digest": prompts_digest_from_hashes(hashes),
        "denoiser_calls": recorder.calls,
    }
    return Capture(recorder.stats, metadata)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
