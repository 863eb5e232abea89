"""Spectral influence scores (method.md §4): predicted error of every module at every candidate width,
per timestep bucket, and the propagation gain that turns it into error of the denoiser's output.

SIS_m(r) = g_m * sum_b w_b E_{m,b}(r). The error curves come from the capture (no forward passes);
the gains come from a few forward passes with noise of known energy injected at one module's output
and are stored with the capture, so a new budget needs neither.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from slimdiff.capture import Capture, SamplerSettings, denoiser_of, group_input_sites
from slimdiff.decompose import DEFAULT_REG, FFNDecomposition, QKDecomposition, VODecomposition
from slimdiff.groups import ModuleGroup, compressible_groups
from slimdiff.slim import SlimAttnProcessor, decompose_group, original_attention_scale
from slimdiff.utils import write_json

SCORES_FORMAT = "slimdiff-scores/1"


@dataclass(frozen=True)
class Granularity:
    """Width steps: FFN channels in multiples of ``ffn_step``; QK/VO per-head rank in steps of ``rank_step``."""

    ffn_step: int = 8
    rank_step: int = 1

    def __post_init__(self) -> None:
        for name in ("ffn_step", "rank_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"granularity {name} must be a whole number >= 1, got {value!r}")

    def step(self, kind: str) -> int:
        return self.ffn_step if kind == "ffn" else self.rank_step


def candidate_widths(full_width: int, step: int) -> list[int]:
    """Widths on the grid (multiples of ``step``) plus the full width, ascending."""
    widths = sorted({w for w in range(step, full_width + 1, step)} | {full_width})
    return widths


@dataclass
class ModuleScore:
    """One module's allocation inputs: its grid, error per bucket at each grid width, and gain."""

    name: str
    kind: str
    block: str
    heads: int
    full_width: int
    unit_params: int
    widths: list[int]
    errors: list[list[float] | None]  # [bucket][width index]; None where a bucket saw no tokens
    gain: float = 1.0

    def error(self, bucket_weights: Sequence[float] | None = None) -> Tensor:
        """Bucket-weighted predicted error at each grid width (weights renormalised over seen buckets)."""
        seen = [b for b, e in enumerate(self.errors) if e is not None]
        weights = [1.0] * len(self.errors) if bucket_weights is None else list(bucket_weights)
        if len(weights) != len(self.errors):
            raise ValueError(f"{len(weights)} bucket weights for {len(self.errors)} buckets")
        total = sum(weights[b] for b in seen)
        if total <= 0:
            raise ValueError("bucket weights put no weight on any bucket that saw tokens")
        curve = torch.zeros(len(self.widths), dtype=torch.float64)
        for b in seen:
            curve += weights[b] / total * torch.tensor(self.errors[b], dtype=torch.float64)
        return curve

    def sis(self, bucket_weights: Sequence[float] | None = None) -> Tensor:
        """Spectral influence score at each grid width: gain times the weighted predicted error."""
        return self.gain * self.error(bucket_weights)


@dataclass
class InfluenceScores:
    """Everything an allocator needs; JSON-serialisable so re-allocation reads no model."""

    modules: list[ModuleScore]
    granularity: Granularity = field(default_factory=Granularity)
    bucket_edges: list[float] = field(default_factory=list)
    block_influence: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def compressible_params(self) -> int:
        return sum(m.unit_params * m.full_width for m in self.modules)

    def save(self, path: str | Path) -> Path:
        data = {
            "format": SCORES_FORMAT,
            "granularity": asdict(self.granularity),
            "bucket_edges": self.bucket_edges,
            "block_influence": self.block_influence,
            "metadata": self.metadata,
            "modules": [asdict(m) for m in self.modules],
        }
        return write_json(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "InfluenceScores":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"influence scores not found: {path}")
        data = json.loads(path.read_text())
        if data.get("format") != SCORES_FORMAT:
            raise ValueError(f"{path}: unknown scores format {data.get('format')!r}, expected {SCORES_FORMAT!r}")
        return cls(
            [ModuleScore(**m) for m in data["modules"]], Granularity(**data["granularity"]),
            data["bucket_edges"], data["block_influence"], data["metadata"],
        )


def skeleton_scores(groups: Sequence[ModuleGroup], granularity: Granularity = Granularity()) -> InfluenceScores:
    """Scores with grids but no errors: enough to check a budget before any forward pass."""
    modules = [ModuleScore(g.name, g.kind, g.block, g.heads, g.width, g.unit_params,
                           candidate_widths(g.width, granularity.step(g.kind)), [], 1.0) for g in groups]
    return InfluenceScores(modules, granularity)


def _diag_tail(pair_energy: Tensor) -> Tensor:
    """R[k] = sum_{i>=k, j>=k} M[i, j] for a (heads, d, d) array summed over heads; R has d+1 entries."""
    m = pair_energy.sum(0)
    suffix = torch.flip(torch.cumsum(torch.cumsum(torch.flip(m, [0, 1]), 0), 1), [0, 1])
    return torch.cat([torch.diagonal(suffix), m.new_zeros(1)])


def qk_error_under(decomposition: QKDecomposition, cov_x: Tensor, cov_y: Tensor) -> Tensor:
    """Whitened logit error of the pooled QK truncation at every rank 0..d, measured under other covariances."""
    gram_q = decomposition.q_factors.transpose(1, 2) @ cov_x @ decomposition.q_factors
    gram_k = decomposition.k_factors.transpose(1, 2) @ cov_y @ decomposition.k_factors
    return _diag_tail(gram_q * gram_k).clamp_min(0)


def vo_error_under(decomposition: VODecomposition, cov_y: Tensor) -> Tensor:
    """Output error of the pooled VO truncation at every rank 0..d, measured under another covariance."""
    gram_v = decomposition.v_factors.transpose(1, 2) @ cov_y @ decomposition.v_factors
    gram_o = decomposition.o_factors @ decomposition.o_factors.transpose(1, 2)
    return _diag_tail(gram_v * gram_o).clamp_min(0)


def ffn_error_under(decomposition: FFNDecomposition, width: int, cov: Tensor) -> float:
    """Output error of the pooled Nyström selection at ``width``, measured under another covariance."""
    keep, w_new = decomposition.weights(width)
    w = decomposition.w_down
    total = torch.einsum("ic,ij,jc->", w, cov, w)
    cross = torch.einsum("ic,ik,kc->", w, cov[:, keep], w_new)
    kept = torch.einsum("kc,kl,lc->", w_new, cov[keep][:, keep], w_new)
    return float((total - 2 * cross + kept).clamp_min(0))


def _interpolate(widths: list[int], known: dict[int, float]) -> list[float]:
    xs = sorted(known)
    out = []
    for w in widths:
        if w in known:
            out.append(known[w])
            continue
        hi = next(x for x in xs if x > w)
        lo = max(x for x in xs if x < w)
        t = (w - lo) / (hi - lo)
        out.append((1 - t) * known[lo] + t * known[hi])
    return out


def module_score(denoiser: nn.Module, group: ModuleGroup, capture: Capture, granularity: Granularity,
                 reg: float = DEFAULT_REG, max_ffn_points: int = 64) -> ModuleScore:
    """Per-bucket predicted error of ``group`` at every grid width, from the capture alone.

    FFN curves are exact at up to ``max_ffn_points`` grid widths (always including the ends) and
    linearly interpolated in between; QK/VO curves are exact everywhere.
    """
    widths = candidate_widths(group.width, granularity.step(group.kind))
    decomposition = decompose_group(denoiser, group, capture, reg)
    x_site, y_site = group_input_sites(group)
    module = denoiser.get_submodule(group.path)
    errors: list[list[float] | None] = []
    if group.kind == "ffn":
        if len(widths) > max_ffn_points:
            index = torch.linspace(0, len(widths) - 1, max_ffn_points).round().long().unique().tolist()
            exact = [widths[i] for i in index]
        else:
            exact = widths
    for bucket in range(capture.num_buckets):
        if int(capture.sites[x_site].count[bucket]) == 0 or int(capture.sites[y_site].count[bucket]) == 0:
            errors.append(None)
            continue
        if group.kind == "ffn":
            cov = capture.second_moment(x_site, [bucket])
            known = {w: ffn_error_under(decomposition, w, cov) for w in exact}
            errors.append(_interpolate(widths, known))
        elif group.kind.startswith("qk"):
            cov_x = capture.second_moment(x_site, [bucket], augment=module.to_q.bias is not None)
            cov_y = capture.second_moment(y_site, [bucket], augment=module.to_k.bias is not None)
            curve = qk_error_under(decomposition, cov_x, cov_y)
            errors.append([float(curve[w]) for w in widths])
        else:
            cov_y = capture.second_moment(y_site, [bucket], augment=module.to_v.bias is not None)
            curve = vo_error_under(decomposition, cov_y)
            errors.append([float(curve[w]) for w in widths])
    gain = capture.gains.get(group.name, 1.0)
    return ModuleScore(group.name, group.kind, group.block, group.heads, group.width, group.unit_params, widths, errors, gain)


def score(denoiser: nn.Module, capture: Capture, granularity: Granularity = Granularity(), reg: float = DEFAULT_REG,
          max_ffn_points: int = 64, require_gains: bool = True, progress: bool = False) -> InfluenceScores:
    """Influence scores for every compressible group of ``denoiser`` (the uncompressed model of the capture).

    Without measured gains in the capture this fails, unless ``require_gains=False`` asks for unit
    gains (an ablation; recorded as ``gains_measured: false`` in the scores).
    """
    from tqdm.auto import tqdm

    groups = compressible_groups(denoiser)
    if not capture.gains and require_gains:
        raise ValueError("capture has no propagation gains; run slimdiff.influence.measure_gains first "
                         "(or pass require_gains=False for unit gains)")
    missing = [g.name for g in groups if g.name not in capture.gains]
    if capture.gains and missing:
        raise ValueError(f"capture has propagation gains but none for {missing[:3]}; re-measure gains")
    modules = [module_score(denoiser, g, capture, granularity, reg, max_ffn_points)
               for g in tqdm(groups, desc="score", unit="module", disable=not progress)]
    metadata = {
        "reg": reg,
        "max_ffn_points": max_ffn_points,
        "gains_measured": bool(capture.gains),
        "model_hash": capture.metadata.get("model_hash"),
        "prompts_digest": capture.metadata.get("prompts_digest"),
    }
    return InfluenceScores(modules, granularity, list(capture.metadata.get("bucket_edges", [])),
                           dict(capture.metadata.get("block_influence", {})), metadata)


# ---- propagation gains -------------------------------------------------------------------------

DenoiserCall = tuple[tuple, dict]


def record_denoiser_calls(pipe, prompts: Sequence[str], sampler: SamplerSettings, num_calls: int = 4) -> list[DenoiserCall]:
    """Inputs of ``num_calls`` denoiser calls spread over the sampling schedule of ``prompts``."""
    _, denoiser = denoiser_of(pipe)
    calls: list[DenoiserCall] = []

    def keep(module, args, kwargs):
        calls.append((tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))

    handle = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            pipe(**sampler.pipe_kwargs(pipe, list(prompts)), output_type="latent")
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError("the pipeline never called its denoiser")
    index = torch.linspace(0, len(calls) - 1, min(num_calls, len(calls))).round().long().unique().tolist()
    return [calls[i] for i in index]


def _detach(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _output(denoiser: nn.Module, call: DenoiserCall) -> Tensor:
    args, kwargs = call
    kwargs = {**kwargs, "return_dict": False}
    return denoiser(*args, **kwargs)[0].to(torch.float64)


def _noise_like(x: Tensor, rel_noise: float, generator: torch.Generator) -> tuple[Tensor, float]:
    """Gaussian noise with per-element std rel_noise * rms(x); returns it and its per-token energy."""
    sigma = rel_noise * float(x.detach().to(torch.float64).pow(2).mean().sqrt())
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.dtype) * sigma
    return noise, sigma**2 * x.shape[-1]


def propagation_gains(denoiser: nn.Module, calls: Sequence[DenoiserCall], groups: Sequence[ModuleGroup] | None = None,
                      rel_noise: float = 0.05, seed: int = 0, progress: bool = False) -> tuple[dict[str, float], dict[str, float]]:
    """Gradient-free propagation gains and block influence.

    For each module, noise of known energy per token (per query-key pair and head for QK logits)
    is added at its output; the gain is the energy of the change in the denoiser output per sample
    divided by that injected energy, summed over ``calls``. Block influence (for the MoDeGPT
    allocator) is mean(1 - cos(x_in, x_out)) of each transformer block on the clean passes.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from tqdm.auto import tqdm

    if not 0 < rel_noise < 1:
        raise ValueError(f"rel_noise must be in (0, 1), got {rel_noise}")
    groups = list(groups) if groups is not None else compressible_groups(denoiser)
    influence_sum: dict[str, float] = {}
    influence_count: dict[str, int] = {}

    def block_hook(name):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            influence_sum[name] = influence_sum.get(name, 0.0) + float((1 - cos).sum())
            influence_count[name] = influence_count.get(name, 0) + cos.numel()
        return hook

    handles = [m.register_forward_hook(block_hook(n), with_kwargs=True)
               for n, m in denoiser.named_modules() if isinstance(m, BasicTransformerBlock)]
    try:
        with torch.no_grad():
            clean = [_output(denoiser, call) for call in calls]
    finally:
        for h in handles:
            h.remove()

    gains: dict[str, float] = {}
    with torch.no_grad():
        for index, group in enumerate(tqdm(groups, desc="gains", unit="module", disable=not progress)):
            generator = torch.Generator().manual_seed(seed * 100003 + index)
            injected = 0.0
            change = 0.0
            for call, reference in zip(calls, clean):
                energy: list[float] = []
                with _perturbed(denoiser, group, rel_noise, generator, energy):
                    out = _output(denoiser, call)
                batch = out.shape[0]
                change += float((out - reference).pow(2).sum()) / batch
                injected += sum(energy) / max(len(energy), 1)
            gains[group.name] = change / injected if injected > 0 else 0.0
    block_influence = {n: influence_sum[n] / influence_count[n] for n in influence_sum}
    return gains, block_influence


class _perturbed:
    """Context: add noise at one group's output (FFN/VO: module output; QK: the attention logits)."""

    def __init__(self, denoiser: nn.Module, group: ModuleGroup, rel_noise: float, generator: torch.Generator, energy: list[float]):
        self.module = denoiser.get_submodule(group.path)
        self.group, self.rel_noise, self.generator, self.energy = group, rel_noise, generator, energy
        self.handle = None
        self.saved_processor = None

    def __enter__(self):
        if self.group.kind == "ffn" or self.group.kind.startswith("vo"):
            target = self.module if self.group.kind == "ffn" else self.module.to_out[0]

            def add_noise(module, args, output):
                noise, per_token = _noise_like(output, self.rel_noise, self.generator)
                self.energy.append(per_token)
                return output + noise

            self.handle = target.register_forward_hook(add_noise)
        else:
            attn = self.module
            self.saved_processor = attn.processor
            heads = attn.heads

            def logit_noise(query: Tensor, key: Tensor) -> Tensor:
                # mean square of the logits q.k over all pairs = tr(Q^T Q K^T K) / (Nq Nk), without
                # materialising the (B, H, Nq, Nk) logits in float64
                gram_q = query.double().transpose(-1, -2) @ query.double()
                gram_k = key.double().transpose(-1, -2) @ key.double()
                pairs = query.shape[-2] * key.shape[-2] * query.shape[0] * query.shape[1]
                sigma = self.rel_noise * math.sqrt(float((gram_q * gram_k).sum()) / pairs)
                self.energy.append(heads * sigma**2)
                shape = (*query.shape[:-1], key.shape[-2])
                noise = torch.randn(shape, generator=self.generator, dtype=torch.float32) * sigma
                return noise.to(query.dtype)

            attn.set_processor(SlimAttnProcessor(original_attention_scale(attn), logit_noise=logit_noise))
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
        if self.saved_processor is not None:
            self.module.set_processor(self.saved_processor)


def measure_gains(pipe, prompts: Sequence[str], sampler: SamplerSettings, capture: Capture, num_calls: int = 4,
                  rel_noise: float = 0.05, seed: int = 0, progress: bool = False) -> Capture:
    """Measure propagation gains on a few prompts and timesteps and store them (and block influence) in ``capture``."""
    _, denoiser = denoiser_of(pipe)
    calls = record_denoiser_calls(pipe, prompts, sampler, num_calls)
    gains, block_influence = propagation_gains(denoiser, calls, rel_noise=rel_noise, seed=seed, progress=progress)
    capture.gains = gains
    capture.metadata["block_influence"] = block_influence
    capture.metadata["gains"] = {"prompts": len(prompts), "calls": len(calls), "rel_noise": rel_noise, "seed": seed}
    return capture


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (no ties handling beyond average order)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra = torch.argsort(torch.argsort(torch.tensor(a, dtype=torch.float64))).double()
    rb = torch.argsort(torch.argsort(torch.tensor(b, dtype=torch.float64))).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt(float((ra * ra).sum() * (rb * rb).sum())))
