"""Recording hooks: the inputs of a denoiser's linears accumulated per timestep bucket, and its conditioning inputs
over a timestep grid (method.md §2, §7).
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup, compressible_groups
from slimdiff.arch.sites import parse_site, site_width
from slimdiff.calls import DenoiserCall, call_spec, detach_clone
from slimdiff.statistics.kernels import gram, gram_dtype
from slimdiff.statistics.sums import SiteStats, bucket_edges


class ActivationRecorder:
    """Stateful hooks on a denoiser that accumulate input second moments per timestep bucket.

    Statistics live on each hooked module's device. Use as a context manager: hooks are registered
    on enter and removed on exit, also on error.
    """

    def __init__(self, denoiser: nn.Module, sites: Sequence[str], num_buckets: int = 4, num_train_timesteps: int = 1000,
                 stats: dict[str, SiteStats] | None = None, timestep_scale: float = 1.0,
                 conditioning_sites: Sequence[str] = ()):
        self.denoiser = denoiser
        # sites whose input depends on the timestep and pooled conditions alone (adaLN modulations): recorded over a
        # timestep grid (``record_grid``), not from the sampler's calls (method.md §7)
        self.conditioning_sites = set(conditioning_sites) & set(sites)
        self._grid = False
        self._grid_seen: set[str] = set()
        self.last_call: DenoiserCall | None = None  # the denoiser call the grid replays (``keep_call``)
        self.keep_call = False
        self.site_names = list(sites)
        self.edges = bucket_edges(num_buckets, num_train_timesteps)
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        # the denoiser's timestep argument times this is the scheduler's timestep (Flux is called with t / 1000)
        self.timestep_scale = float(timestep_scale)
        modules = dict(denoiser.named_modules())
        parsed = {s: parse_site(s) for s in self.site_names}
        missing = [s for s, (path, _) in parsed.items() if path not in modules]
        if missing:
            raise KeyError(f"denoiser has no module(s) {missing[:3]} to hook")
        self._modules = {s: modules[parsed[s][0]] for s in self.site_names}
        self._columns = {s: parsed[s][1] for s in self.site_names}
        for site, columns in self._columns.items():
            if columns is not None and columns.stop > self._modules[site].in_features:
                raise ValueError(f"site {site!r}: {parsed[site][0]} has only {self._modules[site].in_features} input columns")
        if stats is None:
            stats = {}
            for site, module in self._modules.items():
                weight = module.weight
                stats[site] = SiteStats.zeros(num_buckets, site_width(denoiser, site), weight.device, gram_dtype(weight.dtype))
        elif set(stats) != set(self.site_names):
            raise ValueError("statistics to continue hold other sites than the ones to hook")
        self.stats = stats
        # tokens per sample each site saw (-1: several resolutions): what a MACs budget counts
        self.site_tokens: dict[str, int] = {}
        self._bucket_ids: Tensor | None = None
        self._handles: list = []
        self._signature = inspect.signature(denoiser.forward)
        self.calls = 0
        self.call: dict | None = None  # the spec of the first denoiser call (slimdiff.calls.call_spec): its shapes

    def bucket_of(self, timesteps: Tensor) -> Tensor:
        """Bucket index of each timestep (on the CPU: one small copy per denoiser call)."""
        t = timesteps.detach().to("cpu", torch.float64) * self.timestep_scale
        ids = torch.floor(t * self.num_buckets / self.num_train_timesteps).to(torch.int64)
        return ids.clamp(0, self.num_buckets - 1)

    def _on_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        if "timestep" not in bound:
            raise ValueError(f"{type(module).__name__}.forward was called without a timestep; cannot bucket statistics")
        sample = next(iter(bound.values()))
        batch = sample.shape[0]
        timestep = torch.as_tensor(bound["timestep"], device="cpu").reshape(-1)  # bucket ids live on the CPU
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        self._bucket_ids = self.bucket_of(timestep)
        if self._grid:
            return
        if self.keep_call:
            self.last_call = (detach_clone(args), detach_clone(kwargs))
            self.keep_call = False
        if self.call is None:
            self.call = call_spec(bound)
        self.calls += 1

    def _on_linear(self, site: str):
        columns = self._columns[site]

        conditioning = site in self.conditioning_sites

        def hook(module: nn.Module, args: tuple) -> None:
            if conditioning != self._grid:
                return  # conditioning sites come from the grid, every other site from the sampler's calls
            x = args[0].detach()
            if columns is not None:
                x = x[..., columns]
            if self._bucket_ids is None:
                raise RuntimeError(f"{site} ran outside a denoiser call; cannot assign a timestep bucket")
            ids = self._bucket_ids
            stats = self.stats[site]
            tokens = x.shape[-2] if x.dim() >= 3 else 1
            if self.site_tokens.setdefault(site, tokens) != tokens:
                self.site_tokens[site] = -1
            if bool((ids == ids[0]).all()):
                groups = [(int(ids[0]), None)]
            elif x.shape[0] == ids.shape[0]:
                groups = [(int(b), torch.nonzero(ids == b).flatten().to(x.device)) for b in torch.unique(ids)]
            else:
                raise RuntimeError(f"{site}: input batch {x.shape[0]} does not match the denoiser batch {ids.shape[0]}")
            for bucket, rows in groups:
                chunk = x if rows is None else x.index_select(0, rows)
                flat = chunk.reshape(-1, chunk.shape[-1])
                outer, first = gram(flat)
                stats.add(bucket, outer, first, flat.shape[0], flat.abs().sum(0, dtype=torch.float64))
            if self._grid:
                self._grid_seen.add(site)
                if self._grid_seen >= self.conditioning_sites:
                    raise _GridStop  # the rest of the call reads no conditioning site

        return hook

    def record_grid(self, timesteps: Sequence[float]) -> int:
        """Replay the kept denoiser call (``last_call``) at each scheduler timestep of ``timesteps``, each replay
        stopping once every conditioning site has been recorded: those sites' statistics over the whole timestep range
        with this call's pooled conditions (text, guidance, class), whatever the sampler visits. Returns the replays."""
        if not self.conditioning_sites or self.last_call is None:
            return 0
        args, kwargs = self.last_call
        signature = self._signature.bind_partial(*args, **kwargs)
        original = signature.arguments["timestep"]
        self._grid = True
        try:
            for t in timesteps:
                value = float(t) / self.timestep_scale
                signature.arguments["timestep"] = (torch.full_like(original, value) if torch.is_tensor(original)
                                                   else type(original)(value))
                self._grid_seen = set()
                try:
                    self.denoiser(*signature.args, **signature.kwargs)
                except _GridStop:
                    pass
        finally:
            self._grid = False
            self._bucket_ids = None
        return len(timesteps)

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


class _GridStop(Exception):
    """Ends a grid replay of a denoiser call once its conditioning sites are recorded."""


def timestep_grid(num_train_timesteps: int, points: int) -> list[float]:
    """``points`` scheduler timesteps spread evenly over [0, num_train_timesteps): the middle of equal intervals, so
    that every timestep bucket receives the same share."""
    if points < 0:
        raise ValueError(f"timestep grid must be >= 0 points, got {points}")
    return [(i + 0.5) * num_train_timesteps / points for i in range(points)]


def conditioning_sites(groups: Sequence[ModuleGroup]) -> list[str]:
    """Sites whose input depends only on the timestep and pooled conditions: the adaLN modulations' inputs."""
    return list(dict.fromkeys(site for g in groups if g.kind == "adaln" for site in g.sites))


def hooked_conditioning_sites(denoiser: nn.Module, sites: Sequence[str]) -> list[str]:
    """The conditioning sites among ``sites`` (what a capture of those sites records over the timestep grid)."""
    return [site for site in conditioning_sites(compressible_groups(denoiser)) if site in set(sites)]


def grid_points_for(denoiser: nn.Module, sites: Sequence[str], points: int) -> int:
    """The timestep grid a capture of ``sites`` uses: ``points``, or 0 when none of them is a conditioning site."""
    return points if hooked_conditioning_sites(denoiser, sites) else 0
