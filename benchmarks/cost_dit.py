"""Cost at real widths: Flux-dev and SD3.5-Large blocks (issue 12, item 8) and the adaLN modulation spectrum (item 5).

Random seeded weights at the real configurations, reduced depth (no download), float32 on the CPU. Measures, per block
kind: the groups the adapter finds (compressed or left intact, and why) and their share of the block's weights by
category (attention QK / VO, MLP, adaLN); the covariance memory (``statistics_bytes`` over the block's sites, exact for
the full-depth model built on the meta device); the capture overhead (one denoiser call with and without the recorder's
hooks, interleaved, median); the decomposition time of every compressible group kind (``decompose_group``), extrapolated
to the whole model. Then the eigenvalue spectrum of the modulation input silu(temb) over 28 flow-matching timesteps x N
random pooled-text vectors (Flux: guidance 3.5; SD3.5: both CFG branches) and over every timestep of the tiny PixArt,
its effective rank, and the predicted error and parameter saving of the factorised modulation at a few ranks.

Measuring writes benchmarks/results/cost_dit.json (with the command, the machine and the code version); rendering
writes docs/img/adaln_spectrum.png and the section "SD3.5-Large and Flux at real widths (issue 12)" of
docs/benchmarks-cost.md (only that section; the rest of the page is left as it is) from it alone.

    .venv/bin/python benchmarks/cost_dit.py [--flux-depth 1 1] [--sd35-depth 2] [--px 512] [--calls 3] [--buckets 4]
    .venv/bin/python benchmarks/cost_dit.py --quick --out /tmp/cost_dit.json   # tiny widths, seconds
    .venv/bin/python benchmarks/cost_dit.py --render-only                     # re-render from the results file
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import pages  # noqa: E402
from slimdiff.arch import adapter_for  # noqa: E402
from slimdiff.device import apply_threads  # noqa: E402
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture, SiteStats, statistics_bytes
from slimdiff.arch.sites import parse_site, site_width, sites_for
from slimdiff.arch import ModuleGroup, find_groups
from slimdiff.decomposition.groups import decompose_group

SECTION = "## SD3.5-Large and Flux at real widths (issue 12)"
RESULTS = ROOT / "benchmarks" / "results" / "cost_dit.json"
DOC = ROOT / "docs" / "benchmarks-cost.md"
PLOT = ROOT / "docs" / "img" / "adaln_spectrum.png"
CATEGORIES = ("qk", "vo", "mlp", "adaln", "other")

# FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev, transformer/config.json)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# FLUX.1-dev's scheduler config (dynamic shifting; mu from the image sequence length)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
# Stable Diffusion 3.5 Large's transformer config (stabilityai/stable-diffusion-3.5-large, transformer/config.json)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
SD35_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
SD3_TEXT_TOKENS = 333  # 77 CLIP tokens + 256 T5 tokens, joined


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    from importlib.metadata import version

    return {"cpu": model, "arch": platform.machine(), "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "diffusers": version("diffusers"), "ram_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                                            * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


# ----------------------------------------------------------------------------------------------------------------------
# Families: how to build each denoiser, call it at a token count, and feed its conditioning path.


@dataclass
class Family:
    key: str
    title: str
    build: Callable[[], nn.Module]  # the reduced-depth model, seeded
    full_depth: dict  # config overrides that give the real depth
    call: Callable[[nn.Module, int, int, float, int], dict]  # (model, image tokens, text tokens, t in [0, 1], seed)
    condition: Callable[[nn.Module, float, torch.Tensor], dict]  # (model, t in [0, 1], pooled batch) -> minimal call
    timesteps: Callable[[int], list[float]]  # scheduler timesteps in [0, 1000] of a sampling run at an image seq len
    spectrum_note: str
    cfg_uncond: bool = False
    extra: dict = field(default_factory=dict)


def _flux_ids(side: int) -> torch.Tensor:
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    return ids.reshape(-1, 3)


def flux_call(model, image_tokens: int, text_tokens: int, t: float, seed: int) -> dict:
    """What FluxPipeline passes: packed latent tokens, T5 tokens, pooled CLIP, t / 1000 (here t in [0, 1]), RoPE ids."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    side = int(round(image_tokens ** 0.5))
    args = dict(hidden_states=torch.randn(1, side * side, c.in_channels, generator=g),
                encoder_hidden_states=torch.randn(1, text_tokens, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g), timestep=torch.tensor([t]),
                img_ids=_flux_ids(side), txt_ids=torch.zeros(text_tokens, 3))
    if c.guidance_embeds:
        args["guidance"] = torch.tensor([3.5])
    return args


def flux_condition(model, t: float, pooled: torch.Tensor) -> dict:
    """The smallest Flux call (4 image tokens, 1 text token) carrying a batch of conditions: the modulation input
    depends only on the timestep, the pooled text and the guidance."""
    c = model.config
    batch = pooled.shape[0]
    args = dict(hidden_states=torch.zeros(batch, 4, c.in_channels), encoder_hidden_states=torch.zeros(batch, 1, c.joint_attention_dim),
                pooled_projections=pooled, timestep=torch.full((batch,), t), img_ids=_flux_ids(2), txt_ids=torch.zeros(1, 3))
    if c.guidance_embeds:
        args["guidance"] = torch.full((batch,), 3.5)
    return args


def flux_timesteps(steps: int, image_seq_len: int) -> list[float]:
    """FluxPipeline's schedule: sigmas linspace(1, 1/steps), dynamic shift mu from the image sequence length."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    # diffusers.pipelines.flux.pipeline_flux.calculate_shift (not imported: the pipelines package costs seconds)
    c = FLUX_SCHEDULER
    slope = (c["max_shift"] - c["base_shift"]) / (c["max_image_seq_len"] - c["base_image_seq_len"])
    mu = c["base_shift"] + slope * (image_seq_len - c["base_image_seq_len"])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return [float(t) for t in scheduler.timesteps]


def sd3_call(model, image_tokens: int, text_tokens: int, t: float, seed: int) -> dict:
    """What StableDiffusion3Pipeline passes (one branch): spatial latents, CLIP+T5 tokens, pooled CLIP-L+G, t in [0, 1000]."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    side = int(round(image_tokens ** 0.5)) * c.patch_size
    return dict(hidden_states=torch.randn(1, c.in_channels, side, side, generator=g),
                encoder_hidden_states=torch.randn(1, text_tokens, c.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, c.pooled_projection_dim, generator=g), timestep=torch.tensor([1000.0 * t]))


def sd3_condition(model, t: float, pooled: torch.Tensor) -> dict:
    c = model.config
    batch = pooled.shape[0]
    return dict(hidden_states=torch.zeros(batch, c.in_channels, c.patch_size, c.patch_size),
                encoder_hidden_states=torch.zeros(batch, 1, c.joint_attention_dim), pooled_projections=pooled,
                timestep=torch.full((batch,), 1000.0 * t))


def sd3_timesteps(steps: int, image_seq_len: int) -> list[float]:
    """StableDiffusion3Pipeline's schedule for SD3.5-Large: FlowMatchEulerDiscreteScheduler(shift=3.0), no dynamic shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER)
    scheduler.set_timesteps(steps)
    return [float(t) for t in scheduler.timesteps]


def families(quick: bool, flux_depth: tuple[int, int], sd35_depth: int) -> list[Family]:
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from tests.helpers import tiny_flux_transformer, tiny_sd3_transformer

    def seeded(builder):
        def build():
            torch.manual_seed(0)
            return builder().eval()
        return build

    if quick:
        flux_build = seeded(lambda: tiny_flux_transformer(0, guidance_embeds=True))
        sd3_build = seeded(lambda: tiny_sd3_transformer(0, qk_norm="rms_norm"))
    else:
        flux_build = seeded(lambda: FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": flux_depth[0],
                                                              "num_single_layers": flux_depth[1]}))
        sd3_build = seeded(lambda: SD3Transformer2DModel(**{**SD35_LARGE, "num_layers": sd35_depth}))
    prefix = "tiny " if quick else ""
    return [
        Family("flux-dev", f"{prefix}Flux-dev", flux_build, {"num_layers": 19, "num_single_layers": 38}, flux_call,
               flux_condition, flux_timesteps, "timestep + guidance 3.5 + random pooled CLIP-L vector"),
        Family("sd3.5-large", f"{prefix}SD3.5-Large", sd3_build, {"num_layers": 38}, sd3_call, sd3_condition,
               sd3_timesteps, "timestep + random pooled CLIP-L+G vector; both CFG branches (one fixed 'empty prompt' "
                              "vector for the unconditional half)", cfg_uncond=True),
    ]


def full_depth_model(model: nn.Module, overrides: dict) -> nn.Module:
    """The same class and config at the real depth, on the meta device (shapes only, no memory)."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        return type(model)(**{**config, **overrides})


# ----------------------------------------------------------------------------------------------------------------------
# Block kinds, categories, sites


def block_kind(block: nn.Module) -> str:
    name = type(block).__name__
    if name == "FluxTransformerBlock":
        return "double"
    if name == "FluxSingleTransformerBlock":
        return "single"
    if name == "JointTransformerBlock":
        return "joint (last, context_pre_only)" if block.context_pre_only else "joint"
    return name


def block_paths(model: nn.Module, groups: list[ModuleGroup]) -> dict[str, str]:
    """Block path -> kind, for every block that holds a group (``norm_out`` is model-level, not a block)."""
    return {g.block: block_kind(model.get_submodule(g.block)) for g in groups if g.block != "norm_out"}


def owned(model: nn.Module, group: ModuleGroup) -> list[tuple[str, slice | None, bool]]:
    """(linear path, its input columns the group owns or None, whether its bias counts with the group)."""
    p = group.path
    if group.kind == "adaln":
        return [(p, None, True)]
    if group.kind == "qk_joint":
        return [(f"{p}.{n}", None, True) for n in group.query + group.key]
    if group.kind == "vo_joint":
        return [(f"{p}.{n}", None, True) for n in group.value + group.out]
    if group.kind.startswith("qk"):
        return [(f"{p}.to_q", None, True), (f"{p}.to_k", None, True)]
    if group.kind in ("vo_self", "vo_cross"):
        return [(f"{p}.to_v", None, True), (f"{p}.to_out.0", None, True)]
    if group.kind == "ffn":
        return [(f"{p}.net.0.proj", None, True), (f"{p}.net.2", None, True)]
    from slimdiff.arch.flux import single_block_columns

    attention, mlp = single_block_columns(model.get_submodule(p))
    if group.kind == "vo_single":  # the fused proj_out's bias belongs to neither part: "other"
        return [(f"{p}.attn.to_v", None, True), (f"{p}.proj_out", slice(0, attention), False)]
    if group.kind == "ffn_single":
        return [(f"{p}.{group.up}", None, True), (f"{p}.proj_out", slice(attention, attention + mlp), False)]
    raise ValueError(group.kind)


def category(kind: str) -> str:
    if kind.startswith("qk"):
        return "qk"
    if kind.startswith("vo"):
        return "vo"
    if kind.startswith("ffn"):
        return "mlp"
    return kind


def group_params(model: nn.Module, group: ModuleGroup) -> int:
    total = 0
    for path, columns, with_bias in owned(model, group):
        linear = model.get_submodule(path)
        cols = linear.in_features if columns is None else columns.stop - columns.start
        total += linear.out_features * cols
        if with_bias and linear.bias is not None:
            total += linear.bias.numel()
    return total


def params_of(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def block_summary(model: nn.Module, block: str, groups: list[ModuleGroup]) -> dict:
    """Groups of one block and the block's weights by category (shares sum to 1; "other": norms, the fused proj_out's
    bias); ``reachable``: the share held by compressible groups."""
    total = params_of(model.get_submodule(block))
    by_category = dict.fromkeys(CATEGORIES, 0)
    rows, reachable, reachable_adaln = [], 0, 0
    for g in groups:
        n = group_params(model, g)
        by_category[category(g.kind)] += n
        if g.compressible:
            reachable += n
            reachable_adaln += n if g.kind == "adaln" else 0
        rows.append({"name": g.name[len(block) + 1:], "kind": g.kind, "compressible": g.compressible,
                     "note": g.note, "params": n, "share": n / total})
    by_category["other"] = total - sum(by_category[c] for c in CATEGORIES if c != "other")
    shares = {c: by_category[c] / total for c in CATEGORIES}
    return {"params": total, "groups": rows, "params_by_category": by_category, "shares": shares,
            "attention_mlp_share": shares["qk"] + shares["vo"] + shares["mlp"],
            "attention_mlp_adaln_share": shares["qk"] + shares["vo"] + shares["mlp"] + shares["adaln"],
            "reachable_share": reachable / total, "reachable_share_without_adaln": (reachable - reachable_adaln) / total}


def shared_modulation_site(groups: list[ModuleGroup]) -> str | None:
    sites = {g.sites[0] for g in groups if g.kind == "adaln" and g.compressible}
    return next(iter(sites)) if len(sites) == 1 else None


def memory_summary(model: nn.Module, groups: list[ModuleGroup], buckets: int) -> dict:
    """Covariance memory of every site, per block (the shared modulation site once, apart) and for the model."""
    compressible = [g for g in groups if g.compressible]
    shared = shared_modulation_site(compressible)
    per_block: dict[str, list[str]] = {}
    for g in compressible:
        per_block.setdefault(g.block, [])
        for site in sites_for([g]):
            if site != shared and site not in per_block[g.block]:
                per_block[g.block].append(site)
    all_sites = sites_for(compressible)
    return {
        "buckets": buckets,
        "shared_site": None if shared is None else {"site": shared, "width": site_width(model, shared),
                                                    "bytes": statistics_bytes([site_width(model, shared)], buckets),
                                                    "readers": sum(1 for g in compressible if g.kind == "adaln")},
        "per_block": {b: {"sites": [{"site": s, "width": site_width(model, s)} for s in sites],
                          "bytes": statistics_bytes([site_width(model, s) for s in sites], buckets),
                          "bytes_one_bucket": statistics_bytes([site_width(model, s) for s in sites], 1)}
                      for b, sites in per_block.items()},
        "model_bytes": statistics_bytes([site_width(model, s) for s in all_sites], buckets),
        "model_bytes_one_bucket": statistics_bytes([site_width(model, s) for s in all_sites], 1),
        "model_sites": len(all_sites),
    }


def model_summary(model: nn.Module, groups: list[ModuleGroup]) -> dict:
    """Whole-model weights by category (outside the blocks: embedders, final projection -> "other")."""
    total = params_of(model)
    by_category = dict.fromkeys(CATEGORIES, 0)
    reachable = reachable_adaln = 0
    for g in groups:
        n = group_params(model, g)
        by_category[category(g.kind)] += n
        if g.compressible:
            reachable += n
            reachable_adaln += n if g.kind == "adaln" else 0
    by_category["other"] = total - sum(by_category[c] for c in CATEGORIES if c != "other")
    blocks = block_paths(model, groups)
    kinds: dict[str, int] = {}
    for kind in blocks.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    shares = {c: by_category[c] / total for c in CATEGORIES}
    return {"params": total, "blocks": kinds, "params_by_category": by_category, "shares": shares,
            "attention_mlp_share": shares["qk"] + shares["vo"] + shares["mlp"],
            "attention_mlp_adaln_share": shares["qk"] + shares["vo"] + shares["mlp"] + shares["adaln"],
            "reachable_share": reachable / total, "reachable_share_without_adaln": (reachable - reachable_adaln) / total}


# ----------------------------------------------------------------------------------------------------------------------
# Capture overhead


def aliased_stats(model: nn.Module, sites: list[str], buckets: int) -> dict[str, SiteStats]:
    """Recorder statistics whose per-bucket sums alias one float32 buffer per width: the hooks do exactly the work of a
    real ``buckets``-bucket capture (one Gram matrix, the float64 pooled add, one float32 bucket add per call), without
    its per-bucket memory (4 buckets of Flux's three 12288-wide sites alone: 7 GiB). The per-bucket sums are then
    meaningless and dropped; the pooled sums are exact."""
    stats, shared = {}, {}
    for site in sites:
        d = site_width(model, site)
        if d not in shared:  # one float32 buffer per width, shared by every bucket of every site that wide
            shared[d] = (torch.zeros(d, d), torch.zeros(d))
        stats[site] = SiteStats(torch.zeros(d, d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                                torch.zeros(buckets, dtype=torch.int64),
                                shared[d][0].expand(buckets, d, d) if buckets > 1 else None,
                                shared[d][1].expand(buckets, d) if buckets > 1 else None)
    return stats


def measure_overhead(model: nn.Module, family: Family, groups: list[ModuleGroup], image_tokens: int, text_tokens: int,
                     calls: int, buckets: int) -> tuple[dict, Capture]:
    """Plain and hooked calls interleaved (alternating which goes first), median of each; returns the capture too."""
    sites = sites_for([g for g in groups if g.compressible])
    scale = adapter_for(model).TIMESTEP_SCALE
    recorder = ActivationRecorder(model, sites, buckets, 1000, stats=aliased_stats(model, sites, buckets), timestep_scale=scale)
    ts = torch.linspace(0.9, 0.1, calls).tolist()
    plain, hooked = [], []
    with torch.inference_mode():
        warm = family.call(model, image_tokens, text_tokens, 0.5, 99)
        model(**warm)  # warm-up, plain
        with recorder:
            model(**warm)  # warm-up, hooked (its statistics count too)
        for i, t in enumerate(ts):
            inputs = family.call(model, image_tokens, text_tokens, t, i)
            for with_hooks in ((False, True) if i % 2 == 0 else (True, False)):
                if with_hooks:
                    with recorder:
                        hooked.append(timed(lambda: model(**inputs)))
                else:
                    plain.append(timed(lambda: model(**inputs)))
            print(f"  call {i}: plain {plain[-1]:.2f} s, hooked {hooked[-1]:.2f} s", flush=True)
    for stats in recorder.stats.values():  # aliased: drop; decompositions read the pooled sums
        stats.bucket_sum_outer = stats.bucket_sum = None
    capture = Capture(recorder.stats, {"denoiser_calls": recorder.calls})
    result = {"image_tokens": image_tokens, "text_tokens": text_tokens, "batch": 1, "calls": calls,
              "plain_s": plain, "hooked_s": hooked, "plain_median_s": statistics.median(plain),
              "hooked_median_s": statistics.median(hooked),
              "ratio": statistics.median(hooked) / statistics.median(plain),
              "ratio_median_of_pairs": statistics.median(h / p for h, p in zip(hooked, plain)),
              "sites": len(sites), "capture_calls": recorder.calls}
    return result, capture


# ----------------------------------------------------------------------------------------------------------------------
# Decomposition timing


def signature(group: ModuleGroup) -> tuple:
    """Groups with equal signatures cost the same decomposition (same shapes, same math)."""
    if group.kind in ("ffn", "ffn_single"):
        return ("nystrom", group.width, group.out_features)
    if group.kind == "adaln":
        return ("lowrank", group.in_features, group.out_features)
    return (group.kind, group.heads, group.width, group.in_features, group.out_features, group.stream_in, group.stream_out,
            group.bias_in)


COST_MODEL = {"lowrank": "min(in, out)^2 x max(in, out) (SVD of the whitened d_in x d_out weight)",
              "nystrom": "width^3 (eigendecomposition of the hidden covariance)"}


def cost_units(group: ModuleGroup) -> float:
    """What a decomposition's time scales with: the SVD of an adaLN weight, the eigendecomposition of an FFN's hidden
    covariance."""
    if group.kind == "adaln":
        small, large = sorted((group.in_features, group.out_features))
        return float(small) ** 2 * large
    if group.kind in ("ffn", "ffn_single"):
        return float(group.width) ** 3
    raise ValueError(group.kind)


def skeleton(model: nn.Module, paths: list[str]) -> nn.Module:
    """A module holding only ``paths`` of ``model``, at the same paths (the rest can be freed)."""
    root = nn.Module()
    for path in paths:
        node = root
        parts = path.split(".")
        for part in parts[:-1]:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]
        node.add_module(parts[-1], model.get_submodule(path))
    return root


def time_group(model: nn.Module, group: ModuleGroup, capture: Capture):
    start = time.perf_counter()
    result = decompose_group(model, group, capture)
    return time.perf_counter() - start, result


# ----------------------------------------------------------------------------------------------------------------------
# adaLN spectrum


class _Stop(Exception):
    """Raised by a hook once the modulation input was recorded: the rest of the forward is not needed."""


def effective_rank(eigenvalues: torch.Tensor) -> dict:
    """Descending eigenvalues -> #above 1e-6 of the largest, and the ranks holding 99 % / 99.9 % of the energy."""
    ev = eigenvalues.clamp_min(0)
    cumulative = torch.cumsum(ev, 0) / ev.sum()
    return {"above_1e-6": int((ev > 1e-6 * ev[0]).sum()),
            "energy_99": int((cumulative < 0.99).sum()) + 1, "energy_999": int((cumulative < 0.999).sum()) + 1,
            "dim": int(ev.shape[0])}


def record_conditions(model: nn.Module, site: str, calls: list[dict], timestep_scale: float, buckets: int,
                      num_train_timesteps: int = 1000) -> tuple[Capture, torch.Tensor]:
    """Run each (minimal) call up to the modulation site: the recorder's capture of that site and the raw rows."""
    rows = []
    module = model.get_submodule(parse_site(site)[0])

    def stop(_module, args):
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64).clone())
        raise _Stop

    recorder = ActivationRecorder(model, [site], buckets, num_train_timesteps, timestep_scale=timestep_scale)
    with recorder, torch.inference_mode():
        handle = module.register_forward_pre_hook(stop)  # after the recorder's own hook on that module
        try:
            for call in calls:
                try:
                    model(**call)
                except _Stop:
                    pass
        finally:
            handle.remove()
    return Capture(recorder.stats, {"denoiser_calls": recorder.calls}), torch.cat(rows)


def spectrum_of(rows: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending) of the uncentred second moment E[x x^T], the matrix the whitening reads."""
    moment = rows.T @ rows / rows.shape[0]
    return torch.linalg.eigvalsh((moment + moment.T) / 2).flip(0)


def adaln_ranks(dim_in: int, dim_out: int, quick: bool) -> list[int]:
    breakeven = (dim_in * dim_out - 1) // (dim_in + dim_out)  # the largest rank that still saves parameters
    grid = [2, 4, 8, 16] if quick else [16, 32, 64, 128, 256, 512, 1024]
    return [r for r in grid if r < min(dim_in, breakeven)] + [breakeven]


def family_spectrum(model: nn.Module, family: Family, groups: list[ModuleGroup], n_pooled: int, steps: int,
                    spectrum_px: int, buckets: int, quick: bool) -> tuple[dict, Capture, torch.Tensor]:
    site = shared_modulation_site([g for g in groups if g.compressible])
    c = model.config
    image_seq_len = (spectrum_px // 16) ** 2  # VAE /8, then 2x2 patches (Flux packs them, SD3 patchifies)
    timesteps = family.timesteps(steps, image_seq_len)
    g = torch.Generator().manual_seed(1234)
    pooled = torch.randn(n_pooled, c.pooled_projection_dim, generator=g)
    uncond = torch.randn(1, c.pooled_projection_dim, generator=g)
    batch = torch.cat([uncond.expand(n_pooled, -1), pooled]) if family.cfg_uncond else pooled
    scale = adapter_for(model).TIMESTEP_SCALE
    calls = [family.condition(model, t / 1000.0, batch) for t in timesteps]
    start = time.perf_counter()
    capture, rows = record_conditions(model, site, calls, scale, buckets)
    seconds = time.perf_counter() - start
    # the recorder's pooled second moment is the raw rows' one: the site is what the spectrum claims
    check = float((capture.second_moment(site) - rows.T @ rows / rows.shape[0]).abs().max()
                  / (rows.T @ rows / rows.shape[0]).abs().max())
    eigen = spectrum_of(rows)
    by_count = {}
    per_step = 2 * n_pooled if family.cfg_uncond else n_pooled
    for n in sorted({1, 4, 16, 64, n_pooled}):
        if n > n_pooled:
            continue
        take = torch.cat([torch.arange(s * per_step, s * per_step + per_step)[
            torch.cat([torch.arange(n), n_pooled + torch.arange(n)]) if family.cfg_uncond else torch.arange(n)]
            for s in range(len(timesteps))])
        by_count[str(n)] = {"samples": int(take.numel()), **effective_rank(spectrum_of(rows[take]))}
    result = {"site": site, "dim": int(rows.shape[1]), "samples": int(rows.shape[0]), "timesteps": timesteps,
              "n_pooled": n_pooled, "steps": steps, "image_seq_len_for_shift": image_seq_len,
              "conditions": family.spectrum_note, "seconds": seconds, "recorder_vs_rows_max_rel_diff": check,
              "effective_rank": effective_rank(eigen), "by_pooled_count": by_count,
              "eigenvalues_normalised": [float(f"{v:.4g}") for v in (eigen.clamp_min(0) / eigen[0]).tolist()]}
    return result, capture, eigen


# ----------------------------------------------------------------------------------------------------------------------


def run_family(family: Family, args, nystrom_reference: dict) -> dict:
    print(f"== {family.title}", flush=True)
    out: dict = {"title": family.title}
    build = time.perf_counter()
    model = family.build()
    out["build_s"] = time.perf_counter() - build
    out["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(model.config).items() if not k.startswith("_")}
    groups = find_groups(model)
    blocks = block_paths(model, groups)
    out["params_built"] = params_of(model)
    out["blocks_built"] = {kind: sum(1 for k in blocks.values() if k == kind) for kind in dict.fromkeys(blocks.values())}

    # the full-depth model on the meta device: exact shares, sites and memory, no weights
    full = full_depth_model(model, family.full_depth)
    full_groups = find_groups(full)
    out["full_model"] = model_summary(full, full_groups)
    out["full_model"]["depth"] = family.full_depth
    full_memory = memory_summary(full, full_groups, args.buckets)
    out["full_model"]["covariance_bytes"] = full_memory["model_bytes"]
    out["full_model"]["covariance_bytes_one_bucket"] = full_memory["model_bytes_one_bucket"]
    out["full_model"]["covariance_sites"] = full_memory["model_sites"]
    memory = memory_summary(model, groups, args.buckets)
    out["shared_modulation_site"] = memory["shared_site"]
    representative = {}
    for path, kind in blocks.items():
        representative.setdefault(kind, path)
    kinds = {}
    for kind, path in representative.items():
        summary = block_summary(model, path, [g for g in groups if g.block == path])
        summary["block"] = path
        summary["count_full"] = out["full_model"]["blocks"].get(kind, 0)
        summary["covariance"] = memory["per_block"].get(path, {"sites": [], "bytes": 0, "bytes_one_bucket": 0})
        kinds[kind] = summary
    out["block_kinds"] = kinds
    model_level = [g for g in groups if g.block == "norm_out"]
    out["model_level_groups"] = [{"name": g.name, "kind": g.kind, "compressible": g.compressible, "note": g.note,
                                  "params": group_params(model, g)} for g in model_level]
    for kind, s in kinds.items():
        print(f"  {kind}: {s['params'] / 1e6:.1f} M params, shares "
              + ", ".join(f"{c} {s['shares'][c]:.1%}" for c in CATEGORIES)
              + f"; reachable {s['reachable_share']:.1%}; covariances {s['covariance']['bytes'] / 2**30:.2f} GiB", flush=True)
    print(f"  full model: {out['full_model']['params'] / 1e9:.2f} B params, covariances "
          f"{out['full_model']['covariance_bytes'] / 2**30:.1f} GiB ({args.buckets} buckets)", flush=True)
    del full

    # capture overhead (one call: image + text tokens, batch 1) and a capture for the decompositions
    image_tokens = 64 if args.quick else (args.px // 16) ** 2
    text_tokens = 16 if args.quick else (512 if family.key == "flux-dev" else SD3_TEXT_TOKENS)
    overhead, capture = measure_overhead(model, family, groups, image_tokens, text_tokens, args.calls, args.buckets)
    out["capture_overhead"] = overhead
    out["peak_rss_after_capture_gib"] = peak_rss_gib()
    print(f"  overhead: plain {overhead['plain_median_s']:.2f} s, hooked {overhead['hooked_median_s']:.2f} s, "
          f"x{overhead['ratio']:.2f}; peak RSS {out['peak_rss_after_capture_gib']:.1f} GiB", flush=True)

    # adaLN spectrum on the conditioning path (its own capture of the shared site)
    spectrum, spectrum_capture, _ = family_spectrum(model, family, groups, args.n_pooled, args.steps, args.spectrum_px,
                                                    args.buckets, args.quick)
    out["adaln_spectrum"] = spectrum
    er = spectrum["effective_rank"]
    print(f"  adaLN spectrum: dim {spectrum['dim']}, {spectrum['samples']} samples: {er['above_1e-6']} above 1e-6, "
          f"99 % at {er['energy_99']}, 99.9 % at {er['energy_999']}", flush=True)

    # decomposition: one group per shape is timed (twins, e.g. norm1 / norm1_context, reuse it). With --time largest,
    # the largest adaLN shape of the family (its errors at ranks) and the widest FFN Nystrom of the run are timed, the
    # smaller shapes of the same math scaled by its cost model; with --time all, every shape is timed.
    timings: dict[str, dict] = {}
    measured: dict[tuple, tuple[float, str]] = {}
    compressible = [g for g in groups if g.compressible]
    factorised = {}
    lowrank = sorted([g for g in compressible if g.kind == "adaln"], key=lambda g: -cost_units(g))
    lowrank_reference: dict = {}
    for g in lowrank:
        if signature(g) in measured or (args.time == "largest" and lowrank_reference):
            continue
        seconds, dec = time_group(model, g, spectrum_capture)
        measured[signature(g)] = (seconds, g.name)
        lowrank_reference.setdefault("group", g.name)
        lowrank_reference.setdefault("units", cost_units(g))
        lowrank_reference.setdefault("seconds", seconds)
        tail = dec.tail
        ranks = adaln_ranks(g.in_features, g.out_features, args.quick)
        factorised[g.name] = {"in": g.in_features, "out": g.out_features, "block": g.block,
                              "block_kind": blocks.get(g.block, "model-level"), "ranks": ranks,
                              "relative_error": [float(tail[r] / tail[0]) for r in ranks],
                              "params_full": g.in_features * g.out_features,
                              "params_saved": [g.in_features * g.out_features - r * (g.in_features + g.out_features)
                                               for r in ranks], "method": dec.method_at(1),
                              "same_shape": [o.name for o in compressible if o.name != g.name and signature(o) == signature(g)]}
        print(f"  decompose {g.name}: {seconds:.1f} s; relative error "
              + ", ".join(f"r{r} {e:.2e}" for r, e in zip(ranks, factorised[g.name]["relative_error"])), flush=True)
        del dec
    del spectrum_capture
    for g in compressible:  # attention groups: every shape (whitening + per-head SVDs; seconds to a minute)
        if g.kind == "adaln" or signature(g)[0] == "nystrom" or signature(g) in measured:
            continue
        seconds, dec = time_group(model, g, capture)
        del dec
        measured[signature(g)] = (seconds, g.name)
        print(f"  decompose {g.name}: {seconds:.1f} s", flush=True)
    # Nystrom last, with the model freed but the block it reads
    nystrom = sorted([g for g in compressible if signature(g)[0] == "nystrom"], key=lambda g: -cost_units(g))
    to_time = []
    for g in nystrom:
        if any(signature(t) == signature(g) for t in to_time):
            continue
        if args.time == "all" or not (to_time or nystrom_reference):
            to_time.append(g)
    keep_sites = {s for g in to_time for s in sites_for([g])}
    for site in list(capture.sites):
        if site not in keep_sites:
            del capture.sites[site]
    holder = skeleton(model, sorted({g.path for g in to_time}))
    del model
    gc.collect()
    for g in to_time:
        seconds, dec = time_group(holder, g, capture)
        del dec
        measured[signature(g)] = (seconds, g.name)
        if not nystrom_reference:
            nystrom_reference.update(group=f"{family.title} {g.name}", units=cost_units(g), seconds=seconds)
        print(f"  decompose {g.name} (Nystrom, width {g.width}): {seconds:.1f} s; peak RSS {peak_rss_gib():.1f} GiB", flush=True)
    del holder, capture
    gc.collect()

    def time_of(g: ModuleGroup) -> dict:
        sig = signature(g)
        if sig in measured:
            seconds, source = measured[sig]
            return {"kind": g.kind, "seconds": seconds, "how": "measured" if source == g.name else f"same shape as {source}"}
        reference = lowrank_reference if sig[0] == "lowrank" else nystrom_reference if sig[0] == "nystrom" else None
        if reference:
            return {"kind": g.kind, "seconds": reference["seconds"] * cost_units(g) / reference["units"],
                    "how": f"scaled from {reference['group']} by the {'adaLN' if sig[0] == 'lowrank' else 'FFN'} cost model"}
        raise RuntimeError(f"no timing for {g.name}")

    for g in compressible:
        timings.setdefault(g.name, time_of(g))
    out["decompose"] = timings
    for kind, s in kinds.items():
        s["decompose_s"] = sum(timings[g.name]["seconds"] for g in compressible if g.block == s["block"])
        s["decompose_by_kind_s"] = {}
        for g in compressible:
            if g.block == s["block"]:
                s["decompose_by_kind_s"][g.kind] = s["decompose_by_kind_s"].get(g.kind, 0.0) + timings[g.name]["seconds"]
    # the whole model: every compressible group of the full-depth model at the time of its signature
    by_sig = {signature(g): time_of(g)["seconds"] for g in compressible}
    total, by_kind = 0.0, {}
    for g in full_groups:
        if g.compressible:
            seconds = by_sig[signature(g)]
            total += seconds
            by_kind[g.kind] = by_kind.get(g.kind, 0.0) + seconds
    out["full_model"]["decompose_s"] = total
    out["full_model"]["decompose_by_kind_s"] = by_kind

    # the factorised modulation, per block kind and for the whole model
    saved_per_kind = {}
    for kind, s in kinds.items():
        mods = [g for g in compressible if g.kind == "adaln" and g.block == s["block"]]
        if not mods:
            continue
        common = sorted(set.intersection(*[set(adaln_ranks(g.in_features, g.out_features, args.quick)) for g in mods]))
        saved = [sum(g.in_features * g.out_features - r * (g.in_features + g.out_features) for g in mods) for r in common]
        saved_per_kind[kind] = {"ranks": common, "modulations": len(mods), "params_saved": saved,
                                "share_of_block": [n / s["params"] for n in saved]}
    out["adaln_factorised"] = {"groups": factorised, "per_block_kind": saved_per_kind}
    full_saved = {}
    ranks_all = sorted({r for f in factorised.values() for r in f["ranks"]})
    for r in ranks_all:
        saved = sum(max(0, g.in_features * g.out_features - r * (g.in_features + g.out_features))
                    for g in full_groups if g.kind == "adaln" and g.compressible)
        full_saved[str(r)] = {"params_saved": saved, "share_of_model": saved / out["full_model"]["params"]}
    out["adaln_factorised"]["full_model"] = full_saved
    out["peak_rss_gib"] = peak_rss_gib()
    print(f"  decomposition: full model {total:.0f} s; peak RSS {out['peak_rss_gib']:.1f} GiB", flush=True)
    return out


def pixart_spectrum(args) -> dict:
    """The tiny PixArt's shared modulation (adaln_single.linear) over every training timestep."""
    from tests.helpers import TINY_DENOISERS

    tiny = TINY_DENOISERS["pixart"]
    model = tiny.build(0)
    groups = find_groups(model)
    group = next(g for g in groups if g.kind == "adaln")
    site = group.sites[0]
    calls = []
    for start in range(0, 1000, 100):
        call = tiny.inputs(model, 100, 0, start)
        call["timestep"] = torch.arange(start, start + 100)
        calls.append(call)
    capture, rows = record_conditions(model, site, calls, adapter_for(model).TIMESTEP_SCALE, args.buckets)
    eigen = spectrum_of(rows)
    dec = decompose_group(model, group, capture)
    ranks = [r for r in (1, 2, 4, 8, 12, 16) if r < group.full_rank]
    tail = dec.tail
    return {"title": "tiny PixArt (tiny_pixart)", "site": site, "dim": int(rows.shape[1]), "samples": int(rows.shape[0]),
            "conditions": "every timestep 0..999 (the modulation reads the timestep embedding only)",
            "effective_rank": effective_rank(eigen),
            "eigenvalues_normalised": [float(f"{v:.4g}") for v in (eigen.clamp_min(0) / eigen[0]).tolist()],
            "factorised": {"group": group.name, "in": group.in_features, "out": group.out_features, "ranks": ranks,
                           "relative_error": [float(tail[r] / tail[0]) for r in ranks],
                           "params_saved": [group.in_features * group.out_features - r * (group.in_features + group.out_features)
                                            for r in ranks]}}


# ----------------------------------------------------------------------------------------------------------------------
# Plot and page


def draw(results: dict, path: Path = PLOT) -> list[Path]:
    """The spectrum plot, from the results alone."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, style in (("flux-dev", "-"), ("sd3.5-large", "--")):
        s = results["families"][key]["adaln_spectrum"]
        values = s["eigenvalues_normalised"]
        ax.plot(range(1, len(values) + 1), [max(v, 1e-18) for v in values], style,
                label=f"{results['families'][key]['title']} silu(temb), d={s['dim']}, {s['samples']} conditions")
    p = results["pixart_tiny"]
    ax.plot(range(1, len(p["eigenvalues_normalised"]) + 1), [max(v, 1e-18) for v in p["eigenvalues_normalised"]], ":o",
            markersize=3, label=f"tiny PixArt, d={p['dim']}, all 1000 timesteps")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(1e-12, 2)
    ax.axhline(1e-6, color="grey", linewidth=0.6)
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue / largest")
    ax.set_title("adaLN modulation input: spectrum of E[x x^T] (random weights)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    pages.write_bytes(Path(path), buffer.getvalue())
    return [Path(path)]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n < 100 * 2**30 else f"{n / 2**30:.0f} GiB"


def mparams(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def load(path: Path = RESULTS) -> dict | None:
    return pages.read_results(path) if Path(path).is_file() else None


def render(r: dict, doc: Path = DOC, image: Path = PLOT) -> list[tuple[Path, str, str]]:
    """This benchmark's section of ``doc`` (the plot at ``image``), from the results alone."""
    return [(Path(doc), SECTION, section(r, os.path.relpath(image, Path(doc).parent)))]


def section(r: dict, image: str) -> str:
    m = r["machine"]
    a = r["args"]

    def built(key: str) -> str:
        f = r["families"][key]
        return f"{f['title']} with " + " + ".join(f"{n} {kind}" for kind, n in f["blocks_built"].items()) + " block(s)"

    scaled = [f"{f['title']} `{name}`" for f in r["families"].values() for name, t in f["decompose"].items()
              if t["how"].startswith("scaled")]
    nystrom_timed = [f"{f['title']} `{name}`" for f in r["families"].values() for name, t in f["decompose"].items()
                     if t["kind"] in ("ffn", "ffn_single") and t["how"] == "measured"]
    lines = [
        SECTION,
        "",
        "Flux-dev and SD3.5-Large at their exact widths (random weights, seed 0; no download), reduced depth, float32 on",
        "the CPU. Per block kind: which groups the adapter compresses, the share of the weights the allocator can reach,",
        "the covariance memory, the capture overhead and the decomposition time; then the spectrum of the adaLN",
        "modulation input.",
        "",
        *pages.provenance(r, f"{m['nproc']}-core {m['arch']} {m['cpu']} (KVM), {m['ram_gib']} GiB RAM"),
        f"{m['torch_threads']} torch thread(s); torch {m['torch']}, diffusers {m['diffusers']}. "
        f"Built: {built('flux-dev')} (real: 19 double + 38 single), "
        f"{built('sd3.5-large')} (real: 37 joint + the last, `context_pre_only`). Whole-model figures are exact for the full depth (the model rebuilt on the meta "
        "device: shapes only), except the decomposition time, which adds up the measured time of each group's shape. "
        f"Load average during the run: {r['loadavg_start'][0]:.1f} at the start, {r['loadavg_end'][0]:.1f} at the end "
        f"(the machine is shared). Total run: {r['total_s'] / 60:.1f} min, peak RAM {r['peak_rss_gib']:.1f} GiB.",
        "",
        "### Groups and the share of weights the allocator can reach",
        "",
        "| model | block kind (count) | group | kind | compressed? | share of the block (model-level: params) |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        for kind, s in f["block_kinds"].items():
            for i, g in enumerate(s["groups"]):
                label = f"{kind} ({s['count_full']})" if i == 0 else ""
                status = "yes" if g["compressible"] else f"left intact: {g['note']}"
                lines.append(f"| {f['title'] if i == 0 else ''} | {label} | `{g['name']}` | {g['kind']} | {status} | {g['share']:.1%} |")
        for g in f["model_level_groups"]:
            lines.append(f"| | model-level (1) | `{g['name']}` | {g['kind']} | {'yes' if g['compressible'] else g['note']} | "
                         f"{g['params'] / 1e6:.1f} M |")
    lines += [
        "",
        "| model | block kind | params / block | QK | VO | MLP | adaLN | other | attention + MLP | + adaLN | reachable (compressible groups) | reachable without adaLN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        rows = [(kind, s) for kind, s in f["block_kinds"].items()] + [("whole model", f["full_model"])]
        for kind, s in rows:
            sh = s["shares"]
            lines.append(f"| {f['title']} | {kind} | {mparams(s['params'])} | {sh['qk']:.1%} | {sh['vo']:.1%} | {sh['mlp']:.1%} | "
                         f"{sh['adaln']:.1%} | {sh['other']:.1%} | {s['attention_mlp_share']:.1%} | "
                         f"{s['attention_mlp_adaln_share']:.1%} | **{s['reachable_share']:.1%}** | {s['reachable_share_without_adaln']:.1%} |")
    lines += [
        "",
        "Shares are of all the block's (model's) parameters, biases with their linear; \"other\": the q/k RMSNorm weights,",
        "the fused `proj_out`'s bias (Flux single blocks), and outside the blocks the embedders and the final projection.",
        "QK is left intact in both families (q/k RMSNorm; Flux also applies RoPE), so what the allocator reaches is VO +",
        "MLP + adaLN. The whole-model rows count every block of the real depth.",
        "",
        "### Covariance memory",
        "",
        f"`statistics_bytes` over each block's sites at their real widths, {a['buckets']} timestep buckets (float64 pooled + "
        "float32 per-bucket sums); every modulation linear reads one shared site (silu(temb)), counted once for the model.",
        "",
        "| model | block kind | sites (width) | per block | per block, 1 bucket | count | whole model | whole model, 1 bucket |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        first = True
        for kind, s in f["block_kinds"].items():
            sites = ", ".join(f"`{x['site'].split('.', 2)[-1]}` ({x['width']})" for x in s["covariance"]["sites"])
            whole = f"{gib(f['full_model']['covariance_bytes'])}" if first else ""
            whole1 = f"{gib(f['full_model']['covariance_bytes_one_bucket'])}" if first else ""
            lines.append(f"| {f['title'] if first else ''} | {kind} | {sites} | {gib(s['covariance']['bytes'])} | "
                         f"{gib(s['covariance']['bytes_one_bucket'])} | {s['count_full']} | {whole} | {whole1} |")
            first = False
        sh = f["shared_modulation_site"]
        lines.append(f"| | shared modulation site | `{sh['site']}` ({sh['width']}), read by {sh['readers']} linears here | "
                     f"{gib(sh['bytes'])} | | 1 | | |")
    lines += [
        "",
        "### Capture overhead",
        "",
        "One denoiser call, batch 1, plain and with the recorder's hooks on every compressible site, interleaved (which goes",
        f"first alternates), after one warm-up of each; median of {a['calls']}. The recorder's per-bucket sums alias one "
        "float32 buffer per width for this measurement (the hooks do the same work: one Gram matrix, the pooled float64 add, one "
        "float32 bucket add per call; a batch-1 call lands in one bucket), which keeps the run under 10 GiB. The hooks' cost "
        "is the Gram matrices of the FFN hidden activations (9728 / 12288 wide: ~0.55 d^2 multiply-adds per token and "
        "site, against 0.14-0.34 G per token for a whole block's weights) and the d^2 adds into the sums; under other users' load "
        "the per-pair ratios spread (range in the last column).",
        "",
        "| model (built depth) | image + text tokens | plain call | hooked call | overhead (ratio of medians) | per-pair ratios: median (range) |",
        "|---|---|---|---|---|---|",
    ]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        o = f["capture_overhead"]
        pairs = [h / p for h, p in zip(o["hooked_s"], o["plain_s"])]
        depth = ", ".join(f"{n} {k}" for k, n in f["blocks_built"].items())
        lines.append(f"| {f['title']} ({depth}) | {o['image_tokens']} + {o['text_tokens']} | {o['plain_median_s']:.2f} s | "
                     f"{o['hooked_median_s']:.2f} s | x{o['ratio']:.2f} | x{o['ratio_median_of_pairs']:.2f} "
                     f"(x{min(pairs):.2f}-x{max(pairs):.2f}) |")
    lines += [
        "",
        "### Decomposition time",
        "",
        "`decompose_group` at real widths (float64 on the CPU), from a capture of the calls above (the adaLN groups: from",
        "the spectrum capture below). One group per shape is timed; groups of the same shape reuse it.",
        "",
        "| model | group | kind | time | how |",
        "|---|---|---|---|---|",
    ]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        for i, (name, t) in enumerate(f["decompose"].items()):
            lines.append(f"| {f['title'] if i == 0 else ''} | `{name}` | {t['kind']} | {t['seconds']:.1f} s | {t['how']} |")
    lines += ["", "| model | block kind | per block | whole model (real depth) | by kind, whole model |", "|---|---|---|---|---|"]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        fm = f["full_model"]
        by_kind = ", ".join(f"{k} {v / 60:.0f} min" for k, v in sorted(fm["decompose_by_kind_s"].items(), key=lambda kv: -kv[1]))
        for i, (kind, s) in enumerate(f["block_kinds"].items()):
            whole = f"{fm['decompose_s'] / 3600:.1f} h ({fm['decompose_s']:.0f} s)" if i == 0 else ""
            lines.append(f"| {f['title'] if i == 0 else ''} | {kind} | {s['decompose_s']:.0f} s | {whole} | {by_kind if i == 0 else ''} |")
    ranks_rows = []
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        s = f["adaln_spectrum"]
        er = s["effective_rank"]
        counts = "; ".join(f"N={n}: {v['energy_99']} / {v['energy_999']} / {v['above_1e-6']}"
                           for n, v in s["by_pooled_count"].items())
        ranks_rows.append(f"| {f['title']} | {s['dim']} | {s['samples']} ({s['steps']} timesteps x {s['n_pooled']} pooled"
                          f"{' x 2 CFG branches' if key == 'sd3.5-large' else ''}) | {er['energy_99']} | {er['energy_999']} | "
                          f"{er['above_1e-6']} | {counts} |")
    p = r["pixart_tiny"]
    pe = p["effective_rank"]
    ranks_rows.append(f"| {p['title']} | {p['dim']} | {p['samples']} (every timestep) | {pe['energy_99']} | {pe['energy_999']} | "
                      f"{pe['above_1e-6']} | |")
    lines += [
        "",
        "### adaLN modulation: spectrum of the input and the factorisation",
        "",
        f"The modulation input silu(temb) recorded by the recorder at the shared site over {a['steps']} flow-matching "
        "timesteps of each pipeline's scheduler (Flux-dev: dynamic shift for a "
        f"{a['spectrum_px']} px image; SD3.5-Large: shift 3.0) x N random pooled-text vectors (N(0, 1) entries, seeded); "
        "Flux with guidance 3.5, SD3.5 with both classifier-free-guidance branches (one fixed vector stands for the "
        "empty prompt's pooled embedding). The forward is stopped once the site has been recorded (the input depends "
        "only on the conditioning). Eigenvalues of the uncentred second moment E[x x^T] (the matrix the whitening "
        "reads), normalised by the largest:",
        "",
        f"![adaLN spectrum]({image})",
        "",
        "| model | dim | conditions | rank at 99 % energy | rank at 99.9 % | eigenvalues > 1e-6 x largest | by N pooled vectors (99 % / 99.9 % / > 1e-6) |",
        "|---|---|---|---|---|---|---|",
        *ranks_rows,
        "",
        "Predicted relative error of the factorised modulation (tail energy / total, from `decompose_group` on each adaLN",
        "group: the error in the units of the modulation output over these conditions) and parameters saved:",
        "",
        "| model | modulation (in -> out) | rank: relative error |",
        "|---|---|---|",
    ]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        for name, g in f["adaln_factorised"]["groups"].items():
            errs = ", ".join(f"{rk}: {e:.1e}" for rk, e in zip(g["ranks"], g["relative_error"]))
            twins = f" (same shape: {', '.join(f'`{t}`' for t in g['same_shape'])})" if g["same_shape"] else ""
            lines.append(f"| {f['title']} | `{name}` ({g['in']} -> {g['out']}){twins} | {errs} |")
    pf = p["factorised"]
    lines.append(f"| {p['title']} | `{pf['group']}` ({pf['in']} -> {pf['out']}) | "
                 + ", ".join(f"{rk}: {e:.1e}" for rk, e in zip(pf["ranks"], pf["relative_error"])) + " |")
    lines += ["", "| model | block kind | modulations | rank: parameters saved per block (share of the block) | whole model at rank 64 / 256 |",
              "|---|---|---|---|---|"]
    for key in ("flux-dev", "sd3.5-large"):
        f = r["families"][key]
        fm = f["adaln_factorised"]["full_model"]
        whole = " / ".join(f"{mparams(fm[str(rk)]['params_saved'])} ({fm[str(rk)]['share_of_model']:.1%})" for rk in (64, 256)
                           if str(rk) in fm)
        for i, (kind, s) in enumerate(f["adaln_factorised"]["per_block_kind"].items()):
            saved = ", ".join(f"{rk}: {mparams(n)} ({sh:.0%})" for rk, n, sh in zip(s["ranks"], s["params_saved"], s["share_of_block"]))
            lines.append(f"| {f['title'] if i == 0 else ''} | {kind} | {s['modulations']} | {saved} | {whole if i == 0 else ''} |")
    lines += [
        "",
        "The last rank of each row is the largest rank below in x out / (in + out), above which a factorisation holds more",
        "parameters than the linear. Saved parameters exclude the biases (they stay).",
        "",
        "### Caveats",
        "",
        "- **Random weights.** Cost (shapes, memory, time) is what this page measures. The spectrum is of random-weight",
        "  embedders fed random pooled vectors: the pooled-text part of silu(temb) is then an isotropic random direction per",
        "  condition, so the effective rank here grows with the number of distinct pooled vectors (the N columns) and says",
        "  how many conditions a calibration set needs to pin the subspace down, not what the trained model's rank is. Real",
        "  CLIP pooled outputs and trained embedders are far more correlated. N=1 isolates the timestep (+ guidance) path:",
        "  28 timesteps span at most 28 directions. The tiny PixArt's modulation reads the timestep alone.",
        "- **CPU, one thread, shared machine.** Times are of this 2-core CPU under other users' load (load average above);",
        "  float64 eigendecompositions dominate, and on a GPU with fast float64 (`linalg_device`) they run far faster",
        "  ([benchmarks-gpu.md](benchmarks-gpu.md) for SD 1.5).",
        "- **Reduced depth.** Per-block figures are of the built blocks; whole-model figures count every block at the real",
        "  depth. The capture overhead ratio is of the reduced-depth model (embedders included, a few % of a call).",
        "- **Decomposition time.** One group per shape is timed and stands for the groups of its shape. "
        + (f"Not timed but scaled from the timed group of the same math by its cost model: {', '.join(scaled)} "
           f"(adaLN: {COST_MODEL['lowrank']}; FFN: {COST_MODEL['nystrom']}); `--time all` times them. " if scaled else "")
        + f"Nyström (FFN) decompositions timed: {', '.join(nystrom_timed)}. The capture for the timings "
        "holds a handful of calls (rank-deficient covariances, regularised as always: the cost does not depend on the values).",
        "",
    ]
    return "\n".join(lines)


def update_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (``benchmarks.pages.update_section`` under ``SECTION``)."""
    pages.update_section(Path(path), SECTION, text)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths (the tiny builders): seconds, for tests")
    parser.add_argument("--flux-depth", type=int, nargs=2, default=(1, 1), metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--sd35-depth", type=int, default=2, help="SD3.5-Large blocks built (the last is context_pre_only)")
    parser.add_argument("--px", type=int, default=512, help="image side for the overhead calls (512 px: 1024 image tokens)")
    parser.add_argument("--calls", type=int, default=3, help="plain/hooked pairs for the overhead (median)")
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--steps", type=int, default=28, help="sampling steps of the spectrum's schedule")
    parser.add_argument("--n-pooled", type=int, default=256, help="random pooled-text vectors of the spectrum (>= 16)")
    parser.add_argument("--spectrum-px", type=int, default=1024, help="image side that sets Flux's dynamic shift")
    parser.add_argument("--time", choices=("largest", "all"), default=None,
                        help="decompositions timed: the largest adaLN shape per family and the widest FFN Nystrom, the rest "
                             "scaled by cost model (largest: default), or every shape (all: default with --quick)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/cost_dit.json; quick: none)")
    parser.add_argument("--plot", type=Path, default=None, help="spectrum plot (default docs/img/adaln_spectrum.png; quick: none)")
    parser.add_argument("--doc", type=Path, default=None, help="page whose section to write (default docs/benchmarks-cost.md; quick: none)")
    parser.add_argument("--render-only", "--render", dest="render", action="store_true",
                        help="only re-render the page section and the plot from --out")
    args = parser.parse_args(argv)
    if args.render:
        results = load(args.out or RESULTS)
        if results is None:
            raise SystemExit(f"{args.out or RESULTS}: no results file; run the benchmark first")
        image, doc = args.plot or PLOT, args.doc or DOC
        draw(results, image)
        pages.write_sections(render(results, doc, image))
        return results
    if args.n_pooled < 16:
        parser.error("--n-pooled must be >= 16")
    if args.time is None:
        args.time = "all" if args.quick else "largest"
    if not args.quick:
        args.out = args.out or RESULTS
        args.plot = args.plot or PLOT
        args.doc = args.doc or DOC
    apply_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    results: dict = {**pages.run_record(__file__, argv), "machine": machine(), "loadavg_start": list(os.getloadavg()),
                     "args": {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
                              for k, v in vars(args).items() if k != "render"},
                     "families": {}}
    nystrom_reference: dict = {}
    for family in families(args.quick, tuple(args.flux_depth), args.sd35_depth):
        results["families"][family.key] = run_family(family, args, nystrom_reference)
        gc.collect()
        if args.out:  # partial results survive a failure in a later family
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".partial.json").write_text(json.dumps(results, indent=1) + "\n")
    results["pixart_tiny"] = pixart_spectrum(args)
    results["loadavg_end"] = list(os.getloadavg())
    results["total_s"] = time.perf_counter() - start
    results["peak_rss_gib"] = peak_rss_gib()
    if args.out:
        pages.write_results(args.out, results, indent=1)
        args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    if args.plot:
        draw(results, args.plot)
    if args.doc:
        pages.write_sections(render(results, args.doc, args.plot or PLOT))
    print(f"done in {results['total_s']:.0f} s; peak RSS {results['peak_rss_gib']:.1f} GiB", flush=True)
    return results


if __name__ == "__main__":
    main()
