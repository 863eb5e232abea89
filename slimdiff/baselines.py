"""Baselines through the same code path and the same parameter accounting as SlimDiff (issue 6, part 2).

Every method compresses an *uncompressed* denoiser in place to remove a ``Budget`` of its compressible
parameters, counted as ``ModuleGroup.unit_params * width`` summed over the compressible groups of ``BASELINE_KINDS``
(every kind but ``adaln``: adaLN modulations stay whole under every baseline, and the budget is a share of what the
baselines may cut): the weights of to_q, to_k, to_v (+ biases), to_out.0 (no bias), the FFN up projection (+ bias)
and down projection (no bias); in SD3 / Flux joint attention also add_q_proj, add_k_proj, add_v_proj and to_add_out,
in Flux single blocks attn.to_v, proj_mlp and the fused proj_out (``slimdiff.cost.group_params``: each of the two
groups counts its input columns; a factorised proj_out is split in proportion to them). All read the same
``Capture`` (taken with ``extra_sites=baseline_sites(denoiser)``).

Each baseline follows its official code by default (issue 23); the variant this module used before is kept behind
a named option. Notation: a linear y = W x with W (d_out x d_in) as torch stores it; statistics pooled over every
captured token (all timesteps, both guidance branches).

Per-matrix, factorised (``FactorizedLinear`` = Linear(d_in, r, no bias) then Linear(r, d_out, bias);
a matrix stays dense when r (d_in + d_out) >= d_in d_out, and both factors count). The singular values are split
as sqrt(S) into both factors, as SVD-LLM and ASVD do.
- ``svd``: plain truncated SVD of W.
- ``svd_llm`` (SVD-LLM, Wang et al. 2024, arXiv 2403.07378; AIoT-MLSys-Lab/SVD-LLM ``SVDLLM.py``: ``profle_svdllm``
  and ``whitening``): G = sum of x x^T over the calibration tokens; S = cholesky(G), and *only if that fails*
  S = cholesky(G + (1e-6 - lambda_min(G)) I); W S = U Sigma V^T, W' = (U_k Sigma_k^1/2)(Sigma_k^1/2 V_k^T S^-1).
  Truncated error on the calibration data = the tail of Sigma^2. Option ``shift="always"`` (before issue 23):
  S from C + reg (trace(C)/d) I with C = E[x x^T] and ``reg`` (default ``slimdiff.decomposition.closed_form.DEFAULT_REG``) on every
  matrix. Where the shifted Cholesky fails too (round-off on a huge Gram; the official code would stop), the
  eigendecomposition fallback of ``slimdiff.decomposition.closed_form.whitening``; the settings record each matrix's factor.
- ``asvd`` (ASVD, Yuan et al. 2023, arXiv 2312.05821; hahnyuan/ASVD4LLM ``act_aware_utils.calib_input_distribution``
  and ``modules/svd_linear.SVDLinear.from_linear``): s_j = m_j^alpha + 1e-6 with m_j the calibration mean of |x_j|
  (scaling method ``abs_mean``) and alpha = 0.5; W diag(s) = U Sigma V^T, W' = (U_k Sigma_k^1/2)(Sigma_k^1/2 V_k^T
  diag(s)^-1). m_j is the capture's sum of |x_j| over its tokens (``SiteStats.sum_abs``); the exact SVD where the
  official code calls ``torch.svd_lowrank``. Option ``statistic="rms"`` (before issue 23): m_j = rms(x_j) =
  sqrt(E[x_j^2]) and the floor s_j >= (1e-6 max_j rms(x_j))^alpha instead of "+ 1e-6".
All three keep one rank ratio r / min(d_in, d_out) for every matrix (option ``ratio_of="params"``: one
kept-weight fraction per matrix instead, r = ratio d_in d_out / (d_in + d_out), SVD-LLM's official rank rule; the
official ASVD searches per-layer ranks by perplexity sensitivity, which has no counterpart here), found by
bisection, then single rank steps on the matrices furthest above it until the budget is met (overshoot < one step).
The matrices (``matrices``) are every linear of every compressible group, whatever its kind, each factorised with the
statistics of its own input: a joint attention's image projections (to_q, to_k, to_v) with the image input, its text
projections (add_*_proj) with the text input, to_out.0 and to_add_out with their own inputs; a Flux single block's
attn.to_v with the attention input, proj_mlp with its own, and the fused proj_out as one matrix with its whole input
[attention output; MLP activation] (the site ``<block>.proj_out``, which ``baseline_sites`` adds: SlimDiff's capture
holds only its MLP columns). QK left intact by the adapter (q/k RMSNorm, rotary embedding: SD3.5, Flux) is not cut.

Structured, narrower dense networks (built with ``slimdiff.runtime.resize.resize_group``, like SlimDiff). The official codes
prune LLaMA attention by whole heads scored on o_proj's input; here each head keeps its count and narrows (the
structure SlimDiff produces): VO is scored on to_out.0's input channels like o_proj, QK (which the LLM codes never
score apart from the head) by the logit term q_i k_i, and every head keeps its best-scored units.
- ``wanda_sp`` (Wanda-sp, the structured Wanda baseline of FLAP, An et al. 2024, arXiv 2312.11983;
  CASIA-IVA-Lab/FLAP ``lib/prune.py``: ``prune_wanda_sp``, ``lib/layerwrapper.py``: ``WrappedGPT``): channel j of the
  input of the output layer W_out (to_out.0 for VO, the FFN down projection for the FFN) scores
  mean_i |W_out[i, j]| * ||x_j|| (the mean over output rows, official ``W_metric.mean(axis=0)``; ||x_j|| as the rms,
  a per-module constant factor away from the official per-sample norm). QK (ours): rms(q_i) rms(k_i). The same
  kept fraction in every module (the ``uniform`` allocator's widths; uniform per layer officially), the highest scores kept
  (ties by index; the official ``>=`` threshold keeps tied extras), no reconstruction. Option ``column_norm="l2"``
  (before issue 23): ||W_out[:, j]||_2 instead of the mean of |W_out[:, j]|.
- ``flap`` (FLAP, An et al. 2024, arXiv 2312.11983; CASIA-IVA-Lab/FLAP ``prune_flap`` with the defaults ``WIFV`` and
  ``AL-AM``): fluctuation metric Var(x_j) ||W_out[:, j]||_2^2 of the output layer's input channel j, *squared for
  attention* (official ``metrics[...](...) ** 2`` for o_proj; here both attention groups: VO, and QK with the logit
  term's fluctuation E[q_i^2] Var(k_i), ours); Var over the calibration tokens (the official running estimate in
  ``BiasGPT`` approximates it and leaves out its first sample's spread). Standardised per module (z = (m - mean) /
  std, Bessel-corrected std as ``torch.std``), one global ranking: a width step (one unit per head for QK/VO,
  ``ffn_step`` channels for the FFN) scores the mean z of what it removes (official: a head scores the mean z of its
  channels) and steps go in increasing score until the budget is met. Bias compensation (official ``compress``):
  b' = b + W_out[:, removed] E[x_removed] on to_out.0 and the FFN down projection (DiT output linears: below). Option
  ``attention_metric="plain"`` (before issue 23): attention metrics not squared.

DiT groups (SD3, Flux; ``_output_sides``, ``_row_linears``), in SlimDiff's structure (``resize_group``):
- Units and the linears they cut. ``vo_joint``: rows h*w+i of to_v and add_v_proj (both streams share a head's
  width) and the same columns of to_out.0 and to_add_out (only to_out.0 in a ``context_pre_only`` block).
  ``qk_joint``: rows of to_q, add_q_proj, to_k, add_k_proj. ``vo_single``: rows of attn.to_v and the attention columns
  [0, a) of the fused proj_out; ``ffn_single``: rows of proj_mlp and the MLP columns [a, a + m) of proj_out (each
  keeps the other group's columns). ``ffn`` (ff, ff_context): as on UNets.
- Output side of a joint VO: the output linears s (to_out.0 for the image tokens, to_add_out for the text tokens)
  taken as one layer over all n = sum_s n_s tokens, each weight reading its own stream's tokens; p_s = n_s / n from
  the token counts of the output linears' input sites, rms_s / Var_s / E_s over stream s's tokens.
  Wanda-sp: m_s[i, j] = |W_s[i, j]| sqrt(p_s) rms_s(x_j) (the official |W| ||x|| / sqrt(n)); score_j = the mean of
  m over all stacked rows i of every s (``column_norm="l2"``: their L2 norm).
  FLAP: score_j = (sum_s p_s Var_s(x_j) ||W_s[:, j]||_2^2)^2, the fluctuation energy per token of the stacked output,
  squared as attention (``attention_metric="plain"``: not squared); compensation on each output linear with its own
  stream's mean, b_s' = b_s + W_s[:, removed] E_s[x_removed].
  With one output linear (p = 1) all of this is the single-layer formula above.
- Flux single blocks: W_out = the group's columns of proj_out, x = those columns of proj_out's input (site
  ``<block>.proj_out``, the MLP columns sliced at the uncompressed offset a): vo_single scored as VO (FLAP squared),
  ffn_single as an FFN (not squared). FLAP adds both groups' terms to proj_out's one bias,
  b' = b + W[:, removed attention columns] E[x_removed] + W[:, a + removed MLP columns] E[x_removed].
- ``qk_joint`` (SD3 without q/k norm; ours): the QK terms above with q and k moments over the tokens of both streams:
  E[q_i^2] = sum_s p_s E_s[q_i^2] with q = to_q x (image) or add_q_proj c (text), p_s = the streams' token shares at
  the q inputs (to_q, add_q_proj sites); E[k_i], E[k_i^2] likewise; Var(k_i) = E[k_i^2] - E[k_i]^2 over both streams.
  Wanda-sp: rms(q_i) rms(k_i); FLAP: (E[q_i^2] Var(k_i))^2.
Every group is scored on the uncompressed model before any is cut (a Flux single block's groups share proj_out).

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

from slimdiff.planning.allocation import DEFAULT_MIN_KEEP, DEFAULT_TEMPERATURE, Budget, BudgetError, allocate, allowed_widths, check_budget
from slimdiff.statistics.sums import Capture
from slimdiff.arch.flux import single_block_columns
from slimdiff.arch.sites import group_input_sites, parse_site, sites_for
from slimdiff.decomposition.closed_form import DEFAULT_REG, Whitening, regularize, whitening
from slimdiff.cost import count_params
from slimdiff.arch import GROUP_KINDS, ModuleGroup, compressible_groups
from slimdiff.scoring.influence import Granularity, InfluenceScores, ModuleScore, candidate_widths
from slimdiff.decomposition.apply import decompose
from slimdiff.runtime.resize import resize_group

FACTORIZATIONS = ("svd", "svd_llm", "asvd")
DEFAULT_ASVD_ALPHA = 0.5
SVD_LLM_SHIFTS = ("on_failure", "always")  # official first; "always": before issue 23
SVD_LLM_EPS = 1e-6  # SVD-LLM's shift above -lambda_min when Cholesky fails (absolute, on the token-summed Gram)


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


def check_svd_llm_shift(shift: str, reg: float | None) -> float | None:
    """The regularisation ``shift`` uses: ``reg`` (default ``DEFAULT_REG``) for "always", none for "on_failure"."""
    if shift not in SVD_LLM_SHIFTS:
        raise ValueError(f"unknown svd_llm shift {shift!r}; choose one of {', '.join(SVD_LLM_SHIFTS)}")
    if shift == "on_failure":
        if reg is not None:
            raise ValueError(f"svd_llm reg={reg} applies only with shift='always'; the official shift='on_failure' "
                             "adds (1e-6 - lambda_min) I only where Cholesky fails")
        return None
    return DEFAULT_REG if reg is None else reg


def svd_llm_whitening(gram: Tensor, shift: str = "on_failure", reg: float | None = None) -> tuple[Whitening, str]:
    """SVD-LLM's whitening factor S (S S^T = ``gram``) and how it was obtained, for the record.

    ``shift="on_failure"`` (official ``profle_svdllm``): S = cholesky(G); only if that fails, S = cholesky(G + (1e-6 -
    lambda_min(G)) I). The shift is absolute: pass the token-summed Gram (what the official profile accumulates) for
    the official scale. If the shifted Cholesky fails too, ``slimdiff.decomposition.closed_form.whitening``'s eigendecomposition.
    ``shift="always"`` (before issue 23): ``whitening(regularize(gram, reg))`` on every matrix.
    """
    reg = check_svd_llm_shift(shift, reg)
    gram = gram.to(torch.float64)
    if shift == "always":
        white = whitening(regularize(gram, reg))
        return white, f"{white.description} of C + {reg:g} trace(C)/d I"
    d = gram.shape[-1]
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    how = "cholesky"
    if int(info) != 0 or not bool(torch.isfinite(factor).all()):
        lowest = float(torch.linalg.eigvalsh(gram)[0])
        factor, info = torch.linalg.cholesky_ex(gram + (SVD_LLM_EPS - lowest) * eye)
        how = f"cholesky of G + (1e-6 - lambda_min) I, lambda_min = {lowest:.3g}"
        if int(info) != 0 or not bool(torch.isfinite(factor).all()):
            white = whitening(gram)
            return white, f"{white.description} (Cholesky failed after the shift too)"
    inv_t = torch.linalg.solve_triangular(factor.T, eye, upper=True)
    return Whitening(factor, inv_t, "cholesky"), how


def _truncated(linear: nn.Linear, rank: int, scale: Tensor | None = None,
               inverse: Tensor | None = None) -> FactorizedLinear:
    """Rank-``rank`` factors of W from the SVD of W T = U S V^T: (U_k S_k^1/2)(S_k^1/2 V_k^T T^-1), the bias on the
    second factor. T: none (plain SVD), a vector ``scale`` (diagonal T), or a matrix ``scale`` with its ``inverse``."""
    d_out, d_in = linear.weight.shape
    weight = linear.weight.detach().to(torch.float64)
    if scale is None:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        first = vh[:rank]
    elif scale.ndim == 1:
        u, s, vh = torch.linalg.svd(weight * scale[None, :], full_matrices=False)
        first = vh[:rank] / scale[None, :]
    else:
        u, s, vh = torch.linalg.svd(weight @ scale, full_matrices=False)
        first = vh[:rank] @ inverse
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


def factorize(linear: nn.Linear, rank: int, method: str = "svd", cov: Tensor | None = None,
              alpha: float = DEFAULT_ASVD_ALPHA, reg: float | None = None,
              shift: str = "on_failure", magnitude: Tensor | None = None) -> FactorizedLinear:
    """Rank-``rank`` factorisation of ``linear`` by ``method`` (``cov``: second moment or Gram of its input).

    svd: W = U S V^T. svd_llm: W S_x = U S V^T with S_x from ``svd_llm_whitening(cov, shift, reg)``,
    W' = U S V^T S_x^-1. asvd: W diag(s) = U S V^T with s = ``asvd_scale(magnitude, alpha)`` (the official formula,
    ``magnitude`` the mean |x| per input channel) or, without ``magnitude``, the rms variant from ``cov``;
    W' = U S V^T diag(s)^-1. The singular values are split evenly between the factors; the bias stays on the second.
    """
    if method not in FACTORIZATIONS:
        raise ValueError(f"unknown factorisation {method!r}; choose one of {', '.join(FACTORIZATIONS)}")
    d_out, d_in = linear.weight.shape
    if not 1 <= rank <= min(d_in, d_out):
        raise ValueError(f"rank must be in 1..{min(d_in, d_out)}, got {rank}")
    if method != "svd" and cov is None and not (method == "asvd" and magnitude is not None):
        raise ValueError(f"factorisation {method!r} needs the input second moment (cov)")
    device = linear.weight.device
    if method == "svd":
        return _truncated(linear, rank)
    if method == "svd_llm":
        white, _ = svd_llm_whitening(cov.to(device), shift, reg)
        return _truncated(linear, rank, white.factor, white.inv_t.T)  # S, S^-1
    if magnitude is not None:
        return _truncated(linear, rank, asvd_scale(magnitude.to(device, torch.float64), alpha))
    return _truncated(linear, rank, asvd_rms_scale(cov.to(device), alpha))


def asvd_scale(magnitude: Tensor, alpha: float = DEFAULT_ASVD_ALPHA) -> Tensor:
    """ASVD's official input scaling s_j = m_j^alpha + 1e-6, m_j the mean |x_j| (``abs_mean``)."""
    return magnitude.to(torch.float64) ** alpha + 1e-6


def asvd_rms_scale(cov: Tensor, alpha: float = DEFAULT_ASVD_ALPHA) -> Tensor:
    """The scaling before issue 23 (``statistic="rms"``): s_j = rms(x_j)^alpha from a second moment, floored at
    (1e-6 max_j rms(x_j))^alpha so that it stays invertible."""
    rms = torch.diagonal(cov.to(torch.float64)).clamp_min(0).sqrt()
    floor = rms.max().clamp_min(1e-30) * 1e-6
    return rms.clamp_min(floor) ** alpha


def mean_abs(capture: Capture, site: str) -> Tensor:
    """E[|x_j|] of a site's input over every token of the capture (``SiteStats.sum_abs``)."""
    if site not in capture.sites:
        raise KeyError(f"the capture holds no statistics for {site}; capture with "
                       f"extra_sites=slimdiff.baselines.baseline_sites(denoiser)")
    stats = capture.sites[site]
    if stats.sum_abs is None:
        raise ValueError(f"the capture holds no sum of |x| for {site} (it predates them): ASVD's official statistic "
                         "needs a capture taken with this slimdiff; re-run the capture, or use statistic='rms'")
    return stats.sum_abs.to(torch.float64) / int(stats.count.sum())


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


# what the baselines compress: every group kind but the adaLN modulation (PixArt, DiT, SD3, Flux), which stays whole
# under every baseline
BASELINE_KINDS = tuple(kind for kind in GROUP_KINDS if kind != "adaln")
FFN_KINDS = ("ffn", "ffn_single")


def baseline_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """The compressible groups a baseline cuts: those of ``BASELINE_KINDS``."""
    return [g for g in compressible_groups(denoiser) if g.kind in BASELINE_KINDS]


def _unsupported(group: ModuleGroup) -> ValueError:
    return ValueError(f"baselines cannot cut {group.kind!r} groups ({group.name}); "
                      f"they cut {', '.join(BASELINE_KINDS)}")


def _group_linears(group: ModuleGroup) -> list[tuple[str, str]]:
    """(linear path, input site) of every linear of a group.

    Joint attention: each stream's query, key and value projections read that stream's input (``group.sites``, image
    then text), each output projection its own input. Flux single block: ``attn.to_v`` reads the attention input,
    ``proj_mlp`` its own, and the fused ``proj_out`` (listed by both groups of the block) its whole input."""
    p, kind = group.path, group.kind
    if kind in ("qk_self", "qk_cross", "vo_self", "vo_cross"):
        x_site, y_site = group_input_sites(group)
        if kind.startswith("qk"):
            return [(f"{p}.to_q", x_site), (f"{p}.to_k", y_site)]
        return [(f"{p}.to_v", y_site), (f"{p}.to_out.0", f"{p}.to_out.0")]
    if kind == "ffn":
        return [(f"{p}.net.0.proj", f"{p}.net.0.proj"), (f"{p}.net.2", f"{p}.net.2")]
    if kind == "qk_joint":
        return [(f"{p}.{name}", site) for names in (group.query, group.key)
                for name, site in zip(names, group.sites, strict=True)]
    if kind == "vo_joint":
        return ([(f"{p}.{name}", site) for name, site in zip(group.value, group.sites, strict=True)]
                + [(f"{p}.{name}", f"{p}.{name}") for name in group.out])
    if kind == "vo_single":
        return [(f"{p}.{group.value[0]}", group.sites[0]), (f"{p}.{group.out[0]}", f"{p}.{group.out[0]}")]
    if kind == "ffn_single":
        return [(f"{p}.{group.up}", f"{p}.{group.up}"), (f"{p}.{group.out[0]}", f"{p}.{group.out[0]}")]
    raise _unsupported(group)


def matrices(denoiser: nn.Module) -> list[Matrix]:
    """Every compressible linear of ``denoiser``, in group order, each once (``group``: the first group that has it; a
    Flux single block's fused ``proj_out`` belongs to its attention and MLP groups and is listed under the first)."""
    out, seen = [], set()
    for group in baseline_groups(denoiser):
        for path, site in _group_linears(group):
            if path in seen:
                continue
            seen.add(path)
            linear = denoiser.get_submodule(path)
            out.append(Matrix(path, site, group.name, linear.in_features, linear.out_features))
    return out


def baseline_sites(denoiser: nn.Module) -> list[str]:
    """Linear inputs the baselines need beyond SlimDiff's own sites: the output projections (``to_out.0``,
    ``to_add_out``), the FFN up projections (``ff.net.0.proj``, ``proj_mlp``) and the whole input of a Flux single
    block's fused ``proj_out`` (SlimDiff's capture holds its MLP columns only).

    Pass to ``slimdiff.capture(..., extra_sites=baseline_sites(denoiser))``.
    """
    own = set(sites_for(baseline_groups(denoiser)))
    return list(dict.fromkeys(m.site for m in matrices(denoiser) if m.site not in own))


def _second_moment(capture: Capture, site: str, augment: bool = False) -> Tensor:
    if site not in capture.sites:
        raise KeyError(f"capture has no statistics for {site!r}; capture with "
                       f"extra_sites=slimdiff.baselines.baseline_sites(denoiser)")
    return capture.second_moment(site, augment=augment)


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


def _factorize_matrices(denoiser: nn.Module, budget: Budget, ratio_of: str,
                        factor_of: Callable[[Matrix, nn.Linear, int], nn.Module]) -> dict[str, Any]:
    """Replace every matrix that saves at its rank (one ratio for all: ``uniform_ranks``) by ``factor_of``'s factors."""
    mats = matrices(denoiser)
    compressible = count_params(denoiser, BASELINE_KINDS)["compressible"]
    ranks, ratio = uniform_ranks(mats, budget.params(compressible), ratio_of, compressible)
    factorised = {}
    for m in mats:
        rank = ranks[m.path]
        if not saves(m.d_in, m.d_out, rank):
            continue
        _replace(denoiser, m.path, factor_of(m, denoiser.get_submodule(m.path), rank))
        factorised[m.path] = rank
    return {"ratio": ratio, "ratio_of": ratio_of, "ranks": factorised,
            "dense": [m.path for m in mats if m.path not in factorised]}


def svd(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
        *, ratio_of: str = "rank") -> dict[str, Any]:
    """Per-matrix truncated SVD of W at one rank ratio for every matrix (factorised, both factors counted)."""
    return _factorize_matrices(denoiser, budget, ratio_of, lambda m, linear, rank: factorize(linear, rank, "svd"))


def _gram(capture: Capture, site: str) -> Tensor:
    """sum of x x^T over every captured token of a site's input (float64): SVD-LLM's profile."""
    if site not in capture.sites:
        _second_moment(capture, site)  # raises naming baseline_sites
    stats = capture.sites[site]
    return stats.outer_in(range(stats.num_buckets))[0]


def svd_llm(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
            *, shift: str = "on_failure", reg: float | None = None, ratio_of: str = "rank") -> dict[str, Any]:
    """SVD-LLM per matrix (module docstring): whitening by the Cholesky factor of the input's Gram, shifted only where
    Cholesky fails (``shift="always"``: C + reg trace(C)/d I on every matrix, as before issue 23)."""
    reg = check_svd_llm_shift(shift, reg)
    methods: dict[str, str] = {}

    def factor_of(m: Matrix, linear: nn.Linear, rank: int) -> nn.Module:
        gram = _gram(capture, m.site) if shift == "on_failure" else _second_moment(capture, m.site)
        white, methods[m.path] = svd_llm_whitening(gram.to(linear.weight.device), shift, reg)
        return _truncated(linear, rank, white.factor, white.inv_t.T)

    settings = _factorize_matrices(denoiser, budget, ratio_of, factor_of)
    settings.update(shift=shift, reg=reg, whitening=methods)
    return settings


ASVD_STATISTICS = ("abs_mean", "rms")


def asvd(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
         *, alpha: float = DEFAULT_ASVD_ALPHA, ratio_of: str = "rank", statistic: str = "abs_mean") -> dict[str, Any]:
    """ASVD per matrix (module docstring): SVD of W diag(s), s_j = mean|x_j|^alpha + 1e-6 (``statistic="rms"``: the
    variant before issue 23, rms(x_j)^alpha floored), undone on the first factor."""
    if statistic not in ASVD_STATISTICS:
        raise ValueError(f"asvd statistic must be one of {', '.join(ASVD_STATISTICS)}, got {statistic!r}")
    if statistic == "abs_mean":
        factor_of = lambda m, linear, rank: factorize(linear, rank, "asvd", alpha=alpha,  # noqa: E731
                                                       magnitude=mean_abs(capture, m.site))
    else:
        factor_of = lambda m, linear, rank: factorize(linear, rank, "asvd", _second_moment(capture, m.site), alpha)  # noqa: E731
    settings = _factorize_matrices(denoiser, budget, ratio_of, factor_of)
    settings.update(alpha=alpha, statistic=statistic,
                    activation_magnitude="E|x|" if statistic == "abs_mean" else "sqrt(diag E[x x^T])")
    return settings


# ---- structured pruning baselines (narrower dense, like SlimDiff) ----------------------------------


def _unit_scores(groups: list[ModuleGroup], granularity: Granularity) -> InfluenceScores:
    """Grids with zero errors: enough for budget checks and the ``uniform`` allocator's widths."""
    modules = []
    for g in groups:
        widths = candidate_widths(g.width, granularity.step(g.kind))
        modules.append(ModuleScore(g.name, g.kind, g.block, g.heads, g.width, g.unit_params, widths, [[0.0] * len(widths)]))
    return InfluenceScores(modules, granularity)


WANDA_COLUMN_NORMS = ("mean_abs", "l2")  # official first; "l2": before issue 23
FLAP_ATTENTION_METRICS = ("squared", "plain")  # official first; "plain": before issue 23


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(choices)}")


@dataclass(frozen=True)
class OutputSide:
    """A linear that reads a group's units, named relative to the group's path (``to_out.0``, ``to_add_out``, an FFN's
    ``net.2``, a Flux single block's fused ``proj_out``): where the group's columns start in its input now (``start``;
    the MLP columns of ``proj_out`` move when the attention columns narrow), and the capture ``site`` of its input in
    the uncompressed model with the column where they start there (``site_start``)."""

    linear: str
    start: int
    site: str
    site_start: int


def _output_sides(denoiser: nn.Module, group: ModuleGroup) -> list[OutputSide]:
    """The linears reading a VO or FFN group's units: one, or one per stream of a joint attention that has an output."""
    p, kind = group.path, group.kind
    if kind == "ffn":
        return [OutputSide("net.2", 0, f"{p}.net.2", 0)]
    if kind in ("vo_self", "vo_cross"):
        return [OutputSide("to_out.0", 0, f"{p}.to_out.0", 0)]
    if kind == "vo_joint":
        return [OutputSide(name, 0, f"{p}.{name}", 0) for name in group.out]
    if kind == "vo_single":  # the attention columns of proj_out come first
        return [OutputSide(group.out[0], 0, f"{p}.{group.out[0]}", 0)]
    if kind == "ffn_single":
        attention, _ = single_block_columns(denoiser.get_submodule(p))
        _, columns = parse_site(group.sites[0])  # the MLP columns of the uncompressed proj_out's input
        if columns is None:
            raise ValueError(f"{group.name}: site {group.sites[0]!r} names no column range of {group.out[0]}")
        return [OutputSide(group.out[0], attention, f"{p}.{group.out[0]}", columns.start)]
    if kind.startswith("qk"):
        raise ValueError(f"{group.name}: a {kind} group has no output layer (QK is scored on its logit term)")
    raise _unsupported(group)


def _units(group: ModuleGroup) -> int:
    """Prunable units of a group: heads x per-head width, or FFN channels."""
    return group.heads * group.width


def _side_weight(denoiser: nn.Module, group: ModuleGroup, side: OutputSide) -> Tensor:
    """The columns of ``side``'s weight that read ``group``'s units: (d_out, units), float64 on the CPU."""
    weight = denoiser.get_submodule(f"{group.path}.{side.linear}").weight.detach().cpu().to(torch.float64)
    return weight[:, side.start: side.start + _units(group)]


def _tokens(capture: Capture, site: str) -> int:
    """Tokens a site's statistics were summed over."""
    if site not in capture.sites:
        _second_moment(capture, site)  # raises naming baseline_sites
    return int(capture.sites[site].count.sum())


def _channel_moments(capture: Capture, site: str) -> tuple[Tensor, Tensor]:
    """(E[x_j^2], E[x_j]) of every input channel of a site over every captured token (float64, CPU)."""
    tokens = _tokens(capture, site)
    if tokens == 0:
        raise ValueError(f"capture holds no tokens for {site!r}")
    stats = capture.sites[site]
    second = torch.diagonal(stats.sum_outer).cpu().to(torch.float64) / tokens
    return second, stats.sum.cpu().to(torch.float64) / tokens


def _side_moments(capture: Capture, group: ModuleGroup, side: OutputSide) -> tuple[Tensor, Tensor]:
    """(E[x_j^2], E[x_j]) of ``group``'s units at ``side``'s input."""
    second, mean = _channel_moments(capture, side.site)
    columns = slice(side.site_start, side.site_start + _units(group))
    if columns.stop > second.shape[0]:
        raise ValueError(f"{group.name}: columns {columns.start}:{columns.stop} outside site {side.site!r} "
                         f"({second.shape[0]} wide)")
    return second[columns], mean[columns]


def _token_shares(capture: Capture, sites: list[str]) -> list[float]:
    """Each site's share of the tokens of all ``sites`` (the streams of a joint attention): n_s / sum_s n_s."""
    tokens = [_tokens(capture, site) for site in sites]
    total = sum(tokens)
    if total == 0:
        raise ValueError(f"capture holds no tokens for {sites}")
    return [t / total for t in tokens]


def _pooled_output_moments(capture: Capture, linears: list[tuple[nn.Module, str]]) -> tuple[Tensor, Tensor]:
    """Per-output (E[y_i^2], E[y_i]) of linears y = W x + b that fill one dimension from several streams (each with its
    input site), over the tokens of all of them: each stream's moments weighted by its share of the tokens."""
    shares = _token_shares(capture, [site for _, site in linears])
    second = mean = 0.0
    for (linear, site), share in zip(linears, shares):
        stream_second, stream_mean = _output_moments(linear, capture, site)
        second, mean = second + share * stream_second, mean + share * stream_mean
    return second, mean


def _qk_moments(denoiser: nn.Module, group: ModuleGroup, capture: Capture) -> tuple[Tensor, Tensor, Tensor]:
    """(E[q_i^2], E[k_i^2], E[k_i]) of every query/key dimension over every query/key token, from the inputs' captured
    moments; a joint attention pools the image and text tokens (``_pooled_output_moments``)."""
    module = denoiser.get_submodule(group.path)
    if group.kind == "qk_joint":
        queries = [(module.get_submodule(n), site) for n, site in zip(group.query, group.sites, strict=True)]
        keys = [(module.get_submodule(n), site) for n, site in zip(group.key, group.sites, strict=True)]
    elif group.kind in ("qk_self", "qk_cross"):
        x_site, y_site = group_input_sites(group)
        queries, keys = [(module.to_q, x_site)], [(module.to_k, y_site)]
    else:
        raise ValueError(f"{group.name}: a {group.kind} group has no query/key projections")
    q_second, _ = _pooled_output_moments(capture, queries)
    k_second, k_mean = _pooled_output_moments(capture, keys)
    return q_second, k_second, k_mean


def _per_unit(group: ModuleGroup, score: Tensor) -> Tensor:
    return score if group.kind in FFN_KINDS else score.reshape(group.heads, group.width)


def wanda_scores(denoiser: nn.Module, group: ModuleGroup, capture: Capture, column_norm: str = "mean_abs") -> Tensor:
    """Wanda-sp importance of every prunable unit: (heads, head width) for QK/VO, (channels,) for an FFN.

    VO / FFN (official): mean_i |W_out[i, j]| * rms(x_j), x the output layer's input (``_output_sides``);
    ``column_norm="l2"``: ||W_out[:, j]||_2 * rms(x_j). A joint attention stacks its output linears' rows, each weight
    with its own stream's activations: m_s[i, j] = |W_s[i, j]| sqrt(p_s) rms_s(x_j), p_s = n_s / sum_s n_s; the score
    is the mean of m over all stacked rows (``l2``: their L2 norm). QK (ours): rms(q_i) rms(k_i), a joint attention's
    moments over the tokens of both streams.
    """
    _check_choice("wanda_sp column_norm", column_norm, WANDA_COLUMN_NORMS)
    if group.kind.startswith("qk"):
        q_second, k_second, _ = _qk_moments(denoiser, group, capture)
        return _per_unit(group, (q_second * k_second).sqrt())
    sides = _output_sides(denoiser, group)
    shares = _token_shares(capture, [side.site for side in sides])
    metric = []
    for side, share in zip(sides, shares):
        second, _ = _side_moments(capture, group, side)
        norm = math.sqrt(share) * second.clamp_min(0).sqrt()  # share 1 (one stream): exactly rms(x_j)
        metric.append(_side_weight(denoiser, group, side).abs() * norm[None, :])
    stacked = torch.cat(metric, dim=0)
    score = stacked.mean(0) if column_norm == "mean_abs" else stacked.pow(2).sum(0).sqrt()
    return _per_unit(group, score)


def flap_scores(denoiser: nn.Module, group: ModuleGroup, capture: Capture, attention_metric: str = "squared") -> Tensor:
    """FLAP's fluctuation metric of every prunable unit: (heads, head width) for QK/VO, (channels,) for an FFN.

    VO / FFN: Var(x_j) ||W_out[:, j]||_2^2 (``WIFV``); a joint attention sums its output linears' terms weighted by
    their streams' token shares, sum_s p_s Var_s(x_j) ||W_s[:, j]||_2^2 (the fluctuation energy per token of the
    stacked output). QK (ours): E[q_i^2] Var(k_i), the variance of the dimension's logit term across keys (softmax
    ignores the rest; a joint attention's moments over both streams' tokens). Attention metrics (QK, VO) squared
    (official); ``attention_metric="plain"``: not squared.
    """
    _check_choice("flap attention_metric", attention_metric, FLAP_ATTENTION_METRICS)
    if group.kind.startswith("qk"):
        q_second, k_second, k_mean = _qk_moments(denoiser, group, capture)
        score = q_second * (k_second - k_mean**2).clamp_min(0)
    else:
        sides = _output_sides(denoiser, group)
        shares = _token_shares(capture, [side.site for side in sides])
        score = 0.0
        for side, share in zip(sides, shares):
            second, mean = _side_moments(capture, group, side)
            variance = (second - mean**2).clamp_min(0)
            score = score + _side_weight(denoiser, group, side).pow(2).sum(0) * (share * variance)
    if group.kind not in FFN_KINDS and attention_metric == "squared":
        score = score**2
    return _per_unit(group, score)


def _kept(score: Tensor, width: int) -> Tensor:
    """Indices of the ``width`` highest scores (per head for 2-D scores), ascending; ties by index."""
    order = torch.argsort(-score, dim=-1, stable=True)[..., :width]
    return torch.sort(order, dim=-1).values


def _row_linears(group: ModuleGroup) -> tuple[str, ...]:
    """The linears (relative to the group's path) whose output rows are a group's units."""
    kind = group.kind
    if kind in ("qk_self", "qk_cross"):
        return ("to_q", "to_k")
    if kind == "qk_joint":
        return group.query + group.key
    if kind in ("vo_self", "vo_cross"):
        return ("to_v",)
    if kind in ("vo_joint", "vo_single"):
        return group.value
    if kind == "ffn":
        return ("net.0.proj",)
    if kind == "ffn_single":
        return (group.up,)
    raise _unsupported(group)


def _prune_group(denoiser: nn.Module, group: ModuleGroup, keep: Tensor, capture: Capture | None = None) -> bool:
    """Keep units ``keep`` of ``group`` (no reconstruction): the rows of its projections (every stream's; both halves of
    a gated FFN) and the columns of the linears reading them (every stream's output projection; a fused ``proj_out``
    keeps the other group's columns). With ``capture``, add the removed channels' mean contribution to each output
    linear's bias, with the mean of its own input (FLAP); returns whether a bias was compensated."""
    module = denoiser.get_submodule(group.path)
    width = keep.shape[-1]
    if keep.ndim == 2:
        flat = (keep + torch.arange(group.heads)[:, None] * group.width).reshape(-1)
    else:
        flat = keep
    rows = torch.cat([flat, flat + group.width]) if group.gated else flat
    row_linears = {name: module.get_submodule(name) for name in _row_linears(group)}
    sides = [] if group.kind.startswith("qk") else _output_sides(denoiser, group)
    removed = torch.ones(_units(group), dtype=torch.bool)
    removed[flat] = False
    columns, biases, compensated = {}, {}, False
    for side in sides:
        old = module.get_submodule(side.linear)
        kept = torch.cat([torch.arange(side.start), side.start + flat,
                          torch.arange(side.start + _units(group), old.in_features)]).to(old.weight.device)
        columns[side.linear] = old.weight.detach()[:, kept].clone()
        bias = None if old.bias is None else old.bias.detach().clone()
        if capture is not None and bias is not None:
            _, mean = _side_moments(capture, group, side)
            shift = (_side_weight(denoiser, group, side)[:, removed] @ mean[removed]).to(bias.device)
            bias = (bias.to(torch.float64) + shift).to(bias.dtype)
            compensated = True
        biases[side.linear] = bias
    resize_group(denoiser, group, width)
    with torch.no_grad():
        for name, old in row_linears.items():
            new = module.get_submodule(name)
            new.weight.copy_(old.weight[rows.to(old.weight.device)])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows.to(old.bias.device)])
        for side in sides:
            new = module.get_submodule(side.linear)
            new.weight.copy_(columns[side.linear])
            if biases[side.linear] is not None:
                new.bias.copy_(biases[side.linear])
    return compensated


def _granularity(scores: InfluenceScores | None) -> Granularity:
    return scores.granularity if scores is not None else Granularity()


def wanda_sp(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
             *, min_keep: float = DEFAULT_MIN_KEEP, column_norm: str = "mean_abs") -> dict[str, Any]:
    """Wanda-sp: keep the units of highest ``wanda_scores`` (mean |W| x activation rms; ``column_norm="l2"``: the
    column's L2 norm instead), the same kept fraction in every module, no reconstruction."""
    _check_choice("wanda_sp column_norm", column_norm, WANDA_COLUMN_NORMS)
    groups = baseline_groups(denoiser)
    plan = allocate(_unit_scores(groups, _granularity(scores)), budget, "uniform", min_keep)
    widths = plan.widths
    # every group scored on the uncompressed model before any is cut (a Flux single block's groups share proj_out)
    keeps = {g.name: _kept(wanda_scores(denoiser, g, capture, column_norm), widths[g.name])
             for g in groups if widths[g.name] < g.width}
    for group in groups:
        if group.name in keeps:
            _prune_group(denoiser, group, keeps[group.name])
    return {"widths": widths, "min_keep": min_keep, "column_norm": column_norm, "reconstruction": None}


def _standardized(score: Tensor) -> Tensor:
    std = score.std()
    # all scores equal: every unit ranks alike, and (score - mean) is already all zeros
    return (score - score.mean()) / (std if std > 0 else 1.0)


def flap(denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None, budget: Budget,
         *, min_keep: float = DEFAULT_MIN_KEEP, attention_metric: str = "squared") -> dict[str, Any]:
    """FLAP: fluctuation scores (``flap_scores``, attention squared; ``attention_metric="plain"``: not squared)
    standardised per module, one global ranking of width steps, bias compensation.

    A width step removes the lowest-scored remaining unit(s) of every head (QK/VO) or ``ffn_step``
    channels (FFN); its score is the mean standardised score of what it removes. Steps are taken in
    increasing score over all modules until the budget is met (respecting ``min_keep``).
    """
    _check_choice("flap attention_metric", attention_metric, FLAP_ATTENTION_METRICS)
    granularity = _granularity(scores)
    groups = baseline_groups(denoiser)
    skeleton = _unit_scores(groups, granularity)
    target = check_budget(skeleton, budget, min_keep)
    allowed = {m.name: allowed_widths(m, min_keep) for m in skeleton.modules}
    raw = {g.name: flap_scores(denoiser, g, capture, attention_metric) for g in groups}
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
    return {"widths": widths, "min_keep": min_keep, "attention_metric": attention_metric,
            "standardisation": "per module", "bias_compensated": compensated}


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
    "svd": svd,
    "svd_llm": svd_llm,
    "asvd": asvd,
    "wanda_sp": wanda_sp,
    "flap": flap,
}


def compress_with(method: str, denoiser: nn.Module, capture: Capture, scores: InfluenceScores | None = None,
                  budget: Budget | float = 0.3, **options) -> dict[str, Any]:
    """Compress an uncompressed ``denoiser`` in place with ``method``; report what was removed.

    ``capture`` is the uncompressed model's capture (with ``baseline_sites`` for per-matrix and
    pruning baselines); ``scores`` its influence scores (needed by the ``slimdiff*`` methods).
    Parameters are counted after the fact by ``slimdiff.cost.count_params``.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(BASELINES)}")
    valid = [p.name for p in inspect.signature(BASELINES[method]).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {unknown}; its options: {', '.join(valid) or 'none'}")
    if not method.startswith("slimdiff"):
        unsupported = sorted({g.kind for g in compressible_groups(denoiser)} - set(BASELINE_KINDS) - {"adaln"})
        if unsupported:
            raise ValueError(f"baseline {method!r} cannot cut the {', '.join(unsupported)} groups of "
                             f"{type(denoiser).__name__} (it cuts {', '.join(BASELINE_KINDS)}; adaLN modulations stay "
                             "whole): use method 'slimdiff'")
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
