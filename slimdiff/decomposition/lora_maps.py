"""The maps from an original group's linears to its compressed ones, for moving LoRA deltas across (docs/lora.md).

Pure math on weights in X W layout (float64): the original and the slim weights in, ``Segment``s out. A map is
"exact" when the slim weight is the original one times the map to round-off (then a LoRA delta seen through the map
is what the compressed model would have been built from the LoRA'd weights' coordinates), "least squares" otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from slimdiff.runtime.lora import EXACT, LEAST_SQUARES, Segment

# a change of basis whose relative residual is below this is exact (float64 round-off, weights of any scale)
EXACT_RESIDUAL = 1e-6


def _relative_residual(fitted: Tensor, target: Tensor) -> float:
    scale = float(target.norm())
    return 0.0 if scale == 0 else float((fitted - target).norm()) / scale


def _per_head_fit(original_heads: Tensor, slim_heads: Tensor) -> tuple[Tensor, str]:
    """(X, how) with ``original_heads[h] @ X[h] = slim_heads[h]`` in the least-squares sense for every head; "exact"
    when the fit reproduces the slim weights to round-off."""
    solution = torch.linalg.lstsq(original_heads, slim_heads,
                                  driver="gelsd" if original_heads.device.type == "cpu" else None).solution
    residual = _relative_residual(original_heads @ solution, slim_heads)
    return solution, EXACT if residual <= EXACT_RESIDUAL else LEAST_SQUARES


def output_heads(original: Tensor, slim: Tensor, heads: int, start: int = 0) -> tuple[Segment, str]:
    """The per-head output map ``M_h`` with ``slim_h = original_h M_h`` (least squares per head; exact when the slim
    projection lies in the original's column space, as the whitening-SVD's does): a ``heads`` segment of
    ``matrix[h] = M_h^T`` (slim head width x original head width). ``original`` (n, heads*dh), ``slim`` (n, heads*r)."""
    original, slim = original.to(torch.float64), slim.to(original.device, torch.float64)
    full, narrow = original.shape[1] // heads, slim.shape[1] // heads
    basis, how = _per_head_fit(original.reshape(original.shape[0], heads, full).permute(1, 0, 2),
                               slim.reshape(slim.shape[0], heads, narrow).permute(1, 0, 2))
    return Segment("heads", start, heads * full, heads * narrow, matrix=basis.transpose(1, 2).contiguous()), how


def input_heads(original: Tensor, slim: Tensor, heads: int, start: int = 0) -> tuple[Segment, str]:
    """The per-head input map ``Q_h`` of an output projection with ``slim_h = Q_h original_h`` (rows of the X W
    weights, one block per head): a ``heads`` segment of ``matrix[h] = Q_h``. ``original`` (heads*dh, d_out),
    ``slim`` (heads*r, d_out)."""
    original, slim = original.to(torch.float64), slim.to(original.device, torch.float64)
    full, narrow = original.shape[0] // heads, slim.shape[0] // heads
    solution, how = _per_head_fit(original.reshape(heads, full, -1).transpose(1, 2),  # (heads, d_out, dh)
                                  slim.reshape(heads, narrow, -1).transpose(1, 2))  # (heads, d_out, r)
    return Segment("heads", start, heads * full, heads * narrow, matrix=solution.transpose(1, 2).contiguous()), how


def selection(keep: Tensor, full: int, start: int = 0, correction: Tensor | None = None) -> Segment:
    """Kept coordinates ``keep`` (ascending) of a block of ``full``; ``correction`` (kept x removed) adds the removed
    coordinates' contribution (the Nyström down projection's ``C_SS^-1 C_S,removed``)."""
    keep = keep.to(torch.int64)
    removed = None
    if correction is not None:
        mask = torch.ones(full, dtype=torch.bool, device=keep.device)
        mask[keep] = False
        removed = torch.nonzero(mask).flatten()
    return Segment("select", start, full, int(keep.numel()), matrix=correction, index=keep, removed=removed)


def lowrank_input(first: Tensor, rank: int, cov_input: Tensor | None = None) -> Segment:
    """The map of a factorised linear's inputs onto its second factor: a delta ``D`` of the original (X W) moves to
    ``J D`` on ``up``, ``J = (F^T C F)^-1 F^T C`` with ``F`` the first factor's leading ``rank`` columns (of ``first``,
    d_in x m, all ranks) and ``C`` the regularised input second moment: the least-squares fit of ``x D`` by
    ``x F (J D)`` over the calibration inputs. With the whitening ``F = S^-T U`` this is ``U_k^T S^T``, the first rows
    of ``F^-1`` when ``first`` is square (m = d_in, every adaLN modulation, whose output is wider than its input): no
    statistics needed. Otherwise ``cov_input`` is."""
    first = first.to(torch.float64)
    d_in, full = first.shape
    if full == d_in:
        matrix = torch.linalg.inv(first)[:rank]
    else:
        if cov_input is None:
            raise ValueError(f"a factorisation of a {d_in}-input linear at rank {full} < {d_in} needs the input's second "
                             "moment for its LoRA map")
        narrow = first[:, :rank]
        projected = narrow.T @ cov_input.to(narrow)  # (k, d_in)
        # pinv: a never-active input (C = 0) maps every delta to 0, exact on the data; otherwise F^T C F = I to round-off
        matrix = torch.linalg.pinv(projected @ narrow, hermitian=True) @ projected
    return Segment("dense", 0, d_in, rank, matrix=matrix)
