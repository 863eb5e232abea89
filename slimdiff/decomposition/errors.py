"""Predicted error of a decomposition under other covariances (method.md §4): per timestep bucket, at any width.

The score stage evaluates every grid width of every group; a truncation gain (``slimdiff.scoring.gains``) one width.
Both read the same numbers from here, so the gain and the score it scales are on one scale.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup
from slimdiff.arch.sites import group_sites
from slimdiff.decomposition.closed_form import FFNDecomposition, QKDecomposition, VODecomposition
from slimdiff.decomposition.groups import Decomposition, group_statistics
from slimdiff.statistics.sums import Capture


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


def ffn_error_under(w_down: Tensor, keep: Tensor, w_new: Tensor, cov: Tensor, total: Tensor | None = None) -> Tensor:
    """Output error of a Nyström selection (``keep``, corrected down projection ``w_new``) under covariance ``cov``.

    ``total`` = tr(W_d^T C W_d) may be passed in when one covariance is evaluated at many widths.
    """
    if total is None:
        total = torch.einsum("ic,ij,jc->", w_down, cov, w_down)
    cross = torch.einsum("ic,ik,kc->", w_down, cov[:, keep], w_new)
    kept = torch.einsum("kc,kl,lc->", w_new, cov[keep][:, keep], w_new)
    return (total - 2 * cross + kept).clamp_min(0)


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


def bucket_errors(denoiser: nn.Module, group: ModuleGroup, capture: Capture, decomposition: Decomposition,
                  widths: Sequence[int], where: torch.device, max_ffn_points: int | None = None) -> list[list[float] | None]:
    """Predicted error of ``decomposition`` at each of ``widths`` under each timestep bucket's covariance of ``capture``
    ([bucket][width index]; None where a bucket saw no tokens). FFN errors are exact at up to ``max_ffn_points`` of
    the widths (always both ends; all with None) and linearly interpolated in between, one Nyström solve per width for
    all buckets; QK/VO/adaLN errors are exact everywhere. Float64 on ``where``."""
    widths = list(widths)
    sites = group_sites(group)
    seen = [b for b in range(capture.num_buckets) if all(int(capture.sites[site].count[b]) > 0 for site in sites)]
    errors: list[list[float] | None] = [None] * capture.num_buckets
    if isinstance(decomposition, FFNDecomposition):
        if max_ffn_points is not None and len(widths) > max_ffn_points:
            index = torch.linspace(0, len(widths) - 1, max_ffn_points, device="cpu").round().long().unique().tolist()
            exact = [widths[i] for i in index]
        else:
            exact = widths
        w_down = decomposition.w_down
        covs = {b: group_statistics(denoiser, group, capture, [b], where)[0] for b in seen}
        totals = {b: torch.einsum("ic,ij,jc->", w_down, cov, w_down) for b, cov in covs.items()}
        known: dict[int, dict[int, float]] = {b: {} for b in seen}
        for width in exact:
            keep, w_new = decomposition.weights(width)
            for b, cov in covs.items():
                known[b][width] = float(ffn_error_under(w_down, keep, w_new, cov, totals[b]))
        for b in seen:
            errors[b] = _interpolate(widths, known[b])
    elif isinstance(decomposition, QKDecomposition):
        for b in seen:
            cov_x, cov_y = group_statistics(denoiser, group, capture, [b], where)
            curve = qk_error_under(decomposition, cov_x, cov_y).cpu()
            errors[b] = [float(curve[w]) for w in widths]
    else:
        for b in seen:
            _, cov_y = group_statistics(denoiser, group, capture, [b], where)
            curve = vo_error_under(decomposition, cov_y).cpu()
            errors[b] = [float(curve[min(w, decomposition.head_dim)]) for w in widths]
    return errors


def mean_bucket_error(errors: Sequence[Sequence[float] | None], index: int = 0) -> float:
    """The equal-weight mean over the buckets that saw tokens of ``errors[b][index]`` (``ModuleScore.error`` without
    bucket weights)."""
    seen = [e[index] for e in errors if e is not None]
    if not seen:
        raise ValueError("no timestep bucket of the capture saw this group's tokens")
    return sum(seen) / len(seen)
