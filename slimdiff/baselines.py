"""Baselines through the same code path and the same parameter accounting as SlimDiff (issue 6, part 2).

Every method compresses an *uncompressed* denoiser in place to remove a ``Budget`` of its compressible
parameters, counted as ``ModuleGroup.unit_params * width`` summed over compressible groups: the
weights of to_q, to_k, to_v (+ biases), to_out.0 (no bias), the FFN up projection (+ bias) and down
projection (no bias). All read the same ``Capture`` (taken with ``extra_sites=baseline_sites(denoiser)``).

Per-matrix, factorised (``FactorizedLinear`` = Linear(d_in, r, no bias) then Linear(r, d_out, bias);
a matrix stays dense when r (d_in + d_out) >= d_in d_out, and both factors count):
- ``svd``: plain truncated SVD of W.
- ``svd_llm``: SVD of W S with S the Cholesky factor of the input second moment (SVD-LLM's
  truncation-aware whitening); truncated error = tail of the singular values.
- ``asvd``: SVD of W diag(s), s_j = rms(x_j)^alpha with alpha = 0.5 (ASVD uses mean |x_j|; we use the
  root of the captured second moment's diagonal, the statistic the capture holds).
All three keep one rank ratio r / min(d_in, d_out) for every matrix (option ``ratio_of="params"``: one
kept-weight fraction per matrix instead), found by bisection, then single rank steps on the matrices
furthest above it until the budget is met (overshoot < one step).

Structured, narrower dense networks (built with ``slimdiff.slim.resize_group``, like SlimDiff):
- ``wanda_sp``: activation-magnitude pruning, the same kept fraction in every module (the ``uniform``
  allocator's widths), no reconstruction.
- ``flap``: fluctuation scores, per-module standardisation and one global ranking (adaptive widths),
  bias compensation of to_out / FFN down projection with the mean of the removed channels.

SlimDiff: ``slimdiff`` (greedy spectral-influence allocation), ``slimdiff_uniform``, ``slimdiff_modegpt``.
"""

from __future__ import annotations

import heapq
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from slimdiff.allocate import DEFAULT_MIN_KEEP, DEFAULT_TEMPERATURE, Budget, BudgetError, allocate, allowed_widths, check_budget
from slimdiff.capture import Capture, group_input_sites
from slimdiff.decompose import DEFAULT_REG, regularize, whitening
from slimdiff.evaluate import count_params
from slimdiff.groups import GROUP_KINDS, ModuleGroup, compressible_groups
from slimdiff.influence import Granularity, InfluenceScores, ModuleScore, candidate_widths
from slimdiff.slim import decompose, resize_group

FACTORIZATIONS = ("svd", "svd_llm", "asvd")
DEFAULT_ASVD_ALPHA = 0.5


# ---- factorised linears ------------------------------------------------------------------------

class FactorizedLinear(nn.Sequential):
    """``Linear(d_in, r, bias=False)`` then ``Linear(r, d_out, bias=original)``: a drop-in for a linear.

    Exposes ``in_features``, ``out_features``, ``rank`` and ``bias`` so code that reads a linear's
    shape (group discovery, capture hooks, attention processors) works unchanged.
    """

    def __init__(self, first: nn.Linear, second: nn.Linear):
        if first.bias is not None or first.out_features != second.in_features:
            raise ValueError("FactorizedLinear needs Linear(d_in, r, bias=False) then Linear(r, d_out)")
        super().__init__(first, second)

    @property
    def in_features(self) -> int:
        return self[0].in_features

    @property
    def out_features(self) -> int:
        return self[1].out_features

    @property
    def rank(self) -> int:
        return self[0].out_features

    @property
    def bias(self) -> Tensor | None:
        return self[1].bias


def factorized_params(d_in: int, d_out: int, rank: int) -> int:
    """Weights a d_in -> d_out matrix holds at ``rank``: both factors, or d_in d_out when that is not smaller."""
    return min(rank * (d_in + d_out), d_in * d_out)


def saves(d_in: int, d_out: int, rank: int) -> bool:
    """True when factorising at ``rank`` holds fewer weights than the dense matrix."""
    return rank * (d_in + d_out) < d_in * d_out


def factorize(linear: nn.Linear, rank: int, method: str = "svd", cov: Tensor | None = None,
              alpha: float = DEFAULT_ASVD_ALPHA, reg: float = DEFAULT_REG) -> FactorizedLinear:
    """Rank-``rank`` factorisation of ``linear`` by ``method`` (``cov``: second moment of its input).

    svd: W = U S V^T. svd_llm: W S_x = U S V^T with S_x S_x^T = reg(cov), W' = U S V^T S_x^-1.
    asvd: W diag(s) = U S V^T with s = diag(cov)^(alpha/2), W' = U S V^T diag(s)^-1.
    The singular values are split evenly between the factors; the bias stays on the second.
    """
    if method not in FACTORIZATIONS:
        raise ValueError(f"unknown factorisation {method!r}; choose one of {', '.join(FACTORIZATIONS)}")
    d_out, d_in = linear.weight.shape
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(f"rank must be in 1..{min(d_in, d_out)}, got {rank}")
    if method != "svd" and cov is None:
        raise ValueError(f"factorisation {method!r} needs the input second moment (cov)")
    weight = linear.weight.detach().to(torch.float64)
    if method == "svd":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        first = vh[:rank]
    elif method == "svd_llm":
        white = whitening(regularize(cov.to(weight.device), reg))
        u, s, vh = torch.linalg.svd(weight @ white.factor, full_matrices=False)
        first = vh[:rank] @ white.inv_t.T  # V^T S^-1
    else:
        scale = asvd_scale(cov.to(weight.device), alpha)
        u, s, vh = torch.linalg.svd(weight * scale[None, :], full_matrices=False)
        first = vh[:rank] / scale[None, :]
    root = s[:rank].sqrt()
    kwargs = dict(device=linear.weight.device, dtype=linear.weight.dtype)
    down = nn.Linear(d_in, rank, bias=False, **kwargs)
    up = nn.Linear(rank, d_out, bias=linear.bias is not None, **kwargs)
    with torch.no_grad():
        down.weight.copy_(root[:, None] * first)
        up.weight.copy_(u[:, :rank] * root[None, :])
        if linear.bias is not None:
            up.bias.copy_(linear.bias.detach())
    return FactorizedLinear(down, up)


def asvd_scale(cov: Tensor, alpha: float = DEFAULT_ASVD_ALPHA) -> Tensor:
    """ASVD's input scaling s_j = rms(x_j)^alpha from a second moment (floored so it stays invertible)."""
    rms = torch.diagonal(cov.to(torch.float64)).clamp_min(0).sqrt()
    floor = rms.max().clamp_min(1e-30) * 1e-6
    return rms.clamp_min(floor) ** alpha


# ---- which matrices, which statistics ------------------------------------------------------------

@dataclass(frozen=True)
class Matrix:
    """One compressible linear: its module path, the capture site of its input, and its shape."""

    path: str
    site: str
    group: str
    d_in: int
    d_out: int

    @property
    def full_rank(self) -> int:
        return min(self.d_in, self.d_out)

    @property
    def breakeven_rank(self) -> int:
        """The largest rank whose factorisation saves weights (0 if none does)."""
        return (self.d_in * self.d_out - 1) // (self.d_in + self.d_out)

    def removed_at(self, rank: int) -> int:
        return self.d_in * self.d_out - factorized_params(self.d_in, self.d_out, rank)


# what the baselines compress; an adaLN modulation (PixArt, DiT) stays whole under every baseline
BASELINE_KINDS = ("qk_self", "vo_self", "qk_cross", "vo_cross", "ffn")


def baseline_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """The compressible groups a baseline cuts: those of ``BASELINE_KINDS``."""
    return [g for g in compressible_groups(denoiser) if g.kind in BASELINE_KINDS]


def _group_linears(group: ModuleGroup) -> list[tuple[str, str]]:
    """(linear path, input site) of a group's two linears."""
    x_site, y_site = group_input_sites(group)
    p = group.path
    if group.kind.startswith("qk"):
        return [(f"{p}.to_q", x_site), (f"{p}.to_k", y_site)]
    if group.kind.startswith("vo"):
        return [(f"{p}.to_v", y_site), (f"{p}.to_out.0", f"{p}.to_out.0")]
    return [(f"{p}.net.0.proj", f"{p}.net.0.proj"), (f"{p}.net.2", f"{p}.net.2")]


def matrices(denoiser: nn.Module) -> list[Matrix]:
    """Every compressible linear of ``denoiser``, in group order."""
    out = []
    for group in baseline_groups(denoiser):
        for path, site in _group_linears(group):
            linear = denoiser.get_submodule(path)
            out.append(Matrix(path, site, group.name, linear.in_features, linear.out_features))
    return out


def baseline_sites(denoiser: nn.Module) -> list[str]:
    """Linear inputs the baselines need beyond SlimDiff's own sites: ``to_out.0`` and ``ff.net.0.proj``.

    Pass to ``slimdiff.capture(..., extra_sites=baseline_sites(denoiser))``.
    """
    own = {site for g in baseline_groups(denoiser) for site in group_input_sites(g)}
    return [m.site for m in matrices(denoiser) if m.site not in own]


def _second_moment(capture: Capture, site: str, augment: bool = False) -> Tensor:
    if site not in capture.sites:
        raise KeyError(f"capture has no statistics for {site!r}; capture with "
                       f"extra_sites=slimdiff.baselines.baseline_sites(denoiser)")
    return capture.second_moment(site, augment=augment)


def _moments(capture: Capture, site: str) -> tuple[Tensor, Tensor]:
    """(E[x x^T], E[x]) of a site's input."""
    aug = _second_moment(capture, site, augment=True)
    return aug[:-1, :-1], aug[:-1, -1]


def _output_moments(linear: nn.Module, capture: Capture, site: str) -> tuple[Tensor, Tensor]:
    """Per-output (E[y_i^2], E[y_i]) of a linear y = W x + b from its input's captured moments."""
    aug = _second_moment(capture, site, augment=True)
    weight = linear.weight.detach().cpu().to(torch.float64)
    bias = linear.bias.detach().cpu().to(torch.float64) if linear.bias is not None else weight.new_zeros(weight.shape[0])
    w_aug = torch.cat([weight, bias[:, None]], dim=1)
    second = torch.einsum("oi,ij,oj->o", w_aug, aug, w_aug)
    return second.clamp_min(0), w_aug @ aug[:, -1]


# ---- per-matrix factorised baselines ----------------------------------------------------------

RATIO_KINDS = ("rank", "params")


def uniform_ranks(mats: list[Matrix], target: int, ratio_of: str = "rank",
                  compressible: int | None = None) -> tuple[dict[str, int], float]:
    """Ranks with one ratio for every matrix that remove at least ``target`` weights.

    ``ratio_of="rank"``: r = ratio x min(d_in, d_out) (a matrix stays dense while that does not save);
    ``"params"``: r = ratio x d_in d_out / (d_in + d_out), every matrix keeps the same fraction of its
    weights (SVD-LLM's per-matrix compression ratio). Bisection on the ratio, r = max(1, floor(.)),
    then single steps on the matrices with the highest kept ratio, so the overshoot is below one step
    (d_in + d_out weights). A rank at or above a matrix's break-even rank means "stays dense".
    Raises ``BudgetError`` when even rank 1 everywhere cannot remove ``target`` (out of
    ``compressible`` parameters, for the message).
    """
    if ratio_of not in RATIO_KINDS:
        raise ValueError(f"unknown ratio_of {ratio_of!r}; choose one of {', '.join(RATIO_KINDS)}")
    reference = {m.path: m.full_rank if ratio_of == "rank" else m.d_in * m.d_out / (m.d_in + m.d_out) for m in mats}

    def ranks_at(ratio: float) -> dict[str, int]:
        return {m.path: max(1, math.floor(ratio * reference[m.path] + 1e-9)) for m in mats}

    def removed(ranks: dict[str, int]) -> int:
        return sum(m.removed_at(ranks[m.path]) for m in mats)

    most = removed(ranks_at(0.0))
    total = compressible or sum(m.d_in * m.d_out for m in mats)
    if target < 1 or target > most:
        raise BudgetError(f"budget asks to remove {target:,} of {total:,} compressible parameters; per-matrix "
                          f"factorisation at rank 1 removes at most {most:,}: valid budgets are fractions in "
                          f"(0, {most / total:.4f}] or whole numbers in [1, {most:,}]")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if removed(ranks_at(mid)) >= target:
            lo = mid
        else:
            hi = mid
    ranks = ranks_at(hi)
    current = removed(ranks)
    order = {m.path: i for i, m in enumerate(mats)}
    while current < target:
        # a dense matrix (rank above break-even) steps straight to its break-even rank
        candidates = [m for m in mats if m.breakeven_rank >= 1 and min(ranks[m.path], m.breakeven_rank + 1) > 1]
        m = max(candidates, key=lambda m: (ranks[m.path] / reference[m.path], -order[m.path]))
        new_rank = min(ranks[m.path] - 1, m.breakeven_rank)
        current += m.removed_at(new_rank) - m.removed_at(ranks[m.path])
        ranks[m.path] = new_rank
    return ranks, hi


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    if isinstance(parent, nn.Sequential | nn.ModuleList) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def _factorized_baseline(method: str) -> Callable:
    def run(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
            *, alpha: float = DEFAULT_ASVD_ALPHA, reg: float = DEFAULT_REG, ratio_of: str = "rank") -> dict[str, Any]:
        mats = matrices(denoiser)
        compressible = count_params(denoiser, BASELINE_KINDS)["compressible"]
        ranks, ratio = uniform_ranks(mats, budget.params(compressible), ratio_of, compressible)
        factorised = {}
        for m in mats:
            rank = ranks[m.path]
            if not saves(m.d_in, m.d_out, rank):
                continue
            cov = None if method == "svd" else _second_moment(capture, m.site)
            _replace(denoiser, m.path, factorize(denoiser.get_submodule(m.path), rank, method, cov, alpha, reg))
            factorised[m.path] = rank
        settings: dict[str, Any] = {"ratio": ratio, "ratio_of": ratio_of, "ranks": factorised,
                                    "dense": [m.path for m in mats if m.path not in factorised]}
        if method == "svd_llm":
            settings["reg"] = reg
        if method == "asvd":
            settings.update(alpha=alpha, activation_magnitude="sqrt(diag E[x x^T])")
        return settings

    run.__name__ = method
    run.__doc__ = f"Per-matrix {method} at one rank ratio for every matrix (factorised, both factors counted)."
    return run


# ---- structured pruning baselines (narrower dense, like SlimDiff) ----------------------------------

def _unit_scores(groups: list[ModuleGroup], granularity: Granularity) -> InfluenceScores:
    """Grids with zero errors: enough for budget checks and the ``uniform`` allocator's widths."""
    modules = []
    for g in groups:
        widths = candidate_widths(g.width, granularity.step(g.kind))
        modules.append(ModuleScore(g.name, g.kind, g.block, g.heads, g.width, g.unit_params, widths, [[0.0] * len(widths)]))
    return InfluenceScores(modules, granularity)


def _channel_scores(denoiser: nn.Module, group: ModuleGroup, capture: Capture, metric: str) -> Tensor:
    """Importance of every prunable unit: (heads, head width) for QK/VO, (channels,) for the FFN.

    wanda: FFN ||W_down[:, j]|| rms(h_j); VO ||W_out[:, i]|| rms(o_i) (o = to_out's input); QK rms(q_i) rms(k_i).
    flap (fluctuation): FFN Var(h_j) ||W_down[:, j]||^2; VO Var(o_i) ||W_out[:, i]||^2;
    QK E[q_i^2] Var(k_i) (the variance of the dimension's logit term across keys: softmax ignores the rest).
    """
    module = denoiser.get_submodule(group.path)
    if group.kind == "ffn" or group.kind.startswith("vo"):
        out = module.net[2] if group.kind == "ffn" else module.to_out[0]
        site = f"{group.path}.net.2" if group.kind == "ffn" else f"{group.path}.to_out.0"
        second, mean = _moments(capture, site)
        column_energy = out.weight.detach().cpu().to(torch.float64).pow(2).sum(0)
        energy = torch.diagonal(second).clamp_min(0)
        if metric == "wanda":
            score = column_energy.sqrt() * energy.sqrt()
        else:
            score = column_energy * (energy - mean**2).clamp_min(0)
        return score if group.kind == "ffn" else score.reshape(group.heads, group.width)
    x_site, y_site = group_input_sites(group)
    q_second, _ = _output_moments(module.to_q, capture, x_site)
    k_second, k_mean = _output_moments(module.to_k, capture, y_site)
    if metric == "wanda":
        score = (q_second * k_second).sqrt()
    else:
        score = q_second * (k_second - k_mean**2).clamp_min(0)
    return score.reshape(group.heads, group.width)


def _kept(score: Tensor, width: int) -> Tensor:
    """Indices of the ``width`` highest scores (per head for 2-D scores), ascending; ties by index."""
    order = torch.argsort(-score, dim=-1, stable=True)[..., :width]
    return torch.sort(order, dim=-1).values


def _prune_group(denoiser: nn.Module, group: ModuleGroup, keep: Tensor, capture: Capture | None = None) -> bool:
    """Keep units ``keep`` of ``group`` (no reconstruction). With ``capture``, add the removed channels'
    mean contribution to the output layer's bias (FLAP); returns whether a bias was compensated."""
    module = denoiser.get_submodule(group.path)
    width = keep.shape[-1]
    if keep.ndim == 2:
        flat = (keep + torch.arange(group.heads)[:, None] * group.width).reshape(-1)
    else:
        flat = keep
    compensated = False
    with torch.no_grad():
        if group.kind.startswith("qk"):
            old_q, old_k = module.to_q, module.to_k
            resize_group(denoiser, group, width)
            for old, new in ((old_q, module.to_q), (old_k, module.to_k)):
                new.weight.copy_(old.weight[flat])
                if old.bias is not None:
                    new.bias.copy_(old.bias[flat])
            return False
        if group.kind == "ffn":
            up, down = module.net[0].proj, module.net[2]
            rows = torch.cat([flat, flat + group.width]) if group.gated else flat
            site = f"{group.path}.net.2"
        else:
            up, down = module.to_v, module.to_out[0]
            rows = flat
            site = f"{group.path}.to_out.0"
        bias = None if down.bias is None else down.bias.detach().clone()
        if capture is not None and bias is not None:
            _, mean = _moments(capture, site)
            removed = torch.ones(down.in_features, dtype=torch.bool)
            removed[flat] = False
            weight = down.weight.detach().cpu().to(torch.float64)
            shift = (weight[:, removed] @ mean[removed]).to(bias.device)
            bias = (bias.to(torch.float64) + shift).to(bias.dtype)
            compensated = True
        resize_group(denoiser, group, width)
        new_up, new_down = (module.net[0].proj, module.net[2]) if group.kind == "ffn" else (module.to_v, module.to_out[0])
        new_up.weight.copy_(up.weight[rows])
        if up.bias is not None:
            new_up.bias.copy_(up.bias[rows])
        new_down.weight.copy_(down.weight[:, flat])
        if bias is not None:
            new_down.bias.copy_(bias)
    return compensated


def _granularity(scores: InfluenceScores | None) -> Granularity:
    return scores.granularity if scores is not None else Granularity()


def wanda_sp(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
             *, min_keep: float = DEFAULT_MIN_KEEP) -> dict[str, Any]:
    """Wanda-sp: keep the highest |W| x activation-magnitude units, the same kept fraction in every module."""
    groups = baseline_groups(denoiser)
    plan = allocate(_unit_scores(groups, _granularity(scores)), budget, "uniform", min_keep)
    widths = plan.widths
    for group in groups:
        if widths[group.name] < group.width:
            keep = _kept(_channel_scores(denoiser, group, capture, "wanda"), widths[group.name])
            _prune_group(denoiser, group, keep)
    return {"widths": widths, "min_keep": min_keep, "reconstruction": None}


def _standardized(score: Tensor) -> Tensor:
    std = score.std()
    # all scores equal: every unit ranks alike, and (score - mean) is already all zeros
    return (score - score.mean()) / (std if std > 0 else 1.0)


def flap(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
         *, min_keep: float = DEFAULT_MIN_KEEP) -> dict[str, Any]:
    """FLAP: fluctuation scores standardised per module, one global ranking of width steps, bias compensation.

    A width step removes the lowest-scored remaining unit(s) of every head (QK/VO) or ``ffn_step``
    channels (FFN); its score is the mean standardised score of what it removes. Steps are taken in
    increasing score over all modules until the budget is met (respecting ``min_keep``).
    """
    granularity = _granularity(scores)
    groups = baseline_groups(denoiser)
    skeleton = _unit_scores(groups, granularity)
    target = check_budget(skeleton, budget, min_keep)
    allowed = {m.name: allowed_widths(m, min_keep) for m in skeleton.modules}
    raw = {g.name: _channel_scores(denoiser, g, capture, "flap") for g in groups}
    ascending = {name: torch.sort(_standardized(s), dim=-1).values for name, s in raw.items()}
    by_name = {g.name: g for g in groups}
    position = {name: len(allowed[name]) - 1 for name in allowed}
    heap: list[tuple[float, int, str]] = []

    def push(name: str, order: int) -> None:
        pos = position[name]
        if pos == 0:
            return
        full = by_name[name].width
        current, smaller = allowed[name][pos], allowed[name][pos - 1]
        step_scores = ascending[name][..., full - current: full - smaller]
        heapq.heappush(heap, (float(step_scores.mean()), order, name))

    for order, group in enumerate(groups):
        push(group.name, order)
    removed = 0
    while removed < target:
        _, order, name = heapq.heappop(heap)
        pos = position[name]
        removed += by_name[name].unit_params * (allowed[name][pos] - allowed[name][pos - 1])
        position[name] = pos - 1
        push(name, order)
    widths = {name: allowed[name][position[name]] for name in allowed}
    compensated = []
    for group in groups:
        if widths[group.name] < group.width:
            if _prune_group(denoiser, group, _kept(raw[group.name], widths[group.name]), capture):
                compensated.append(group.name)
    return {"widths": widths, "min_keep": min_keep, "standardisation": "per module", "bias_compensated": compensated}


# ---- SlimDiff and its allocator ablations ---------------------------------------------------------

def _slimdiff_with(allocator: str) -> Callable:
    def run(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
            *, min_keep: float = DEFAULT_MIN_KEEP, reg: float = DEFAULT_REG,
            temperature: float = DEFAULT_TEMPERATURE) -> dict[str, Any]:
        if scores is None:
            raise ValueError(f"method {allocator!r} needs influence scores of the uncompressed denoiser (slimdiff.score)")
        plan = allocate(scores, budget, allocator, min_keep, temperature=temperature)
        decompose(denoiser, capture, plan.widths, reg)
        return {"allocator": allocator, "widths": plan.widths, "min_keep": min_keep, "reg": reg,
                "temperature": temperature if allocator == "modegpt" else None, "predicted_error": plan.predicted_error}

    run.__name__ = f"slimdiff_{allocator}"
    run.__doc__ = f"SlimDiff group decompositions with the {allocator!r} allocator."
    return run


BASELINES: dict[str, Callable[..., dict[str, Any]]] = {
    "slimdiff": _slimdiff_with("slimdiff"),
    "slimdiff_uniform": _slimdiff_with("uniform"),
    "slimdiff_modegpt": _slimdiff_with("modegpt"),
    "svd": _factorized_baseline("svd"),
    "svd_llm": _factorized_baseline("svd_llm"),
    "asvd": _factorized_baseline("asvd"),
    "wanda_sp": wanda_sp,
    "flap": flap,
}




def compress_with(method: str, denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None = None,
                  budget: Budget | float = 0.3, **options) -> dict[str, Any]:
    """Compress an uncompressed ``denoiser`` in place with ``method``; report what was removed.

    ``capture`` is the uncompressed model's capture (with ``baseline_sites`` for per-matrix and
    pruning baselines); ``scores`` its influence scores (needed by the ``slimdiff*`` methods).
    Parameters are counted after the fact by ``slimdiff.evaluate.count_params``.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(BASELINES)}")
    valid = [p.name for p in inspect.signature(BASELINES[method]).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options: {', '.join(valid) or 'none'}")
    if not method.startswith("slimdiff"):
        other = sorted({g.kind for g in compressible_groups(denoiser)} - set(BASELINE_KINDS) - {"adaln"})
        if other:
            raise ValueError(f"baseline {method!r} compresses the groups of BasicTransformerBlock models ({', '.join(BASELINE_KINDS)}); "
                             f"{type(denoiser).__name__} also has {', '.join(other)} groups: use method 'slimdiff'")
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    # the budget is a share of what the method may cut: a baseline leaves adaLN modulations whole
    kinds = GROUP_KINDS if method.startswith("slimdiff") else BASELINE_KINDS
    before = count_params(denoiser, kinds)
    target = budget.params(before["compressible"])
    settings = BASELINES[method](denoiser, capture, scores, budget, **options)
    after = count_params(denoiser, kinds)
    removed = before["compressible"] - after["compressible"]
    return {
        "method": method,
        "budget": budget.value,
        "target_removed": target,
        "removed": removed,
        "removed_fraction": removed / before["compressible"],
        "compressible_before": before["compressible"],
        "compressible_after": after["compressible"],
        "total_before": before["total"],
        "total_after": after["total"],
        "settings": settings,
    }
