"""Gram kernels: one call's x^T x and token sum, accumulated into the float64 sums."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import Tensor


def gram_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """Precision of one call's Gram matrix: float64 for float64 activations, else float32."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


# Gram matrices wider than this are formed block by block, upper triangle only (a symmetric rank-k
# update: ~55 % of the multiply-adds at 5120 wide), then mirrored.
GRAM_BLOCK = 512


def gram(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(x^T x, sum of x) of row tokens ``rows`` (n, d), accumulated in ``gram_dtype`` on ``rows``' device.

    Half-precision inputs on CUDA go to the tensor cores with float32 accumulation (their products are
    exact in float32); TF32 is never used for float32 inputs. Wide matrices compute only the blocks on
    and above the diagonal.
    """
    out_dtype = gram_dtype(rows.dtype)
    if not (rows.is_cuda and rows.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        rows = rows.to(out_dtype)
    dim = rows.shape[1]
    if dim <= GRAM_BLOCK:
        outer = _product(rows, rows, out_dtype)
    else:
        outer = torch.empty(dim, dim, dtype=out_dtype, device=rows.device)
        edges = list(range(0, dim, GRAM_BLOCK)) + [dim]
        for i in range(len(edges) - 1):
            left = rows[:, edges[i]:edges[i + 1]]
            right = rows[:, edges[i]:]
            block = _product(left, right, out_dtype)  # row block i, columns i.. (upper triangle)
            outer[edges[i]:edges[i + 1], edges[i]:] = block
            outer[edges[i + 1]:, edges[i]:edges[i + 1]] = block[:, edges[i + 1] - edges[i]:].T
    return outer, rows.sum(0, dtype=out_dtype)


_MIXED_MM = {"available": True}


def _product(left: Tensor, right: Tensor, out_dtype: torch.dtype) -> Tensor:
    """left^T right with ``out_dtype`` accumulation and output."""
    if left.dtype == out_dtype:
        with _no_tf32():
            return left.T @ right
    if _MIXED_MM["available"]:
        try:
            return torch.mm(left.T, right, out_dtype=out_dtype)
        except (TypeError, RuntimeError) as error:
            # torch without a mixed-precision mm for these inputs: the same products after an upcast
            # (exact for half inputs, only slower); said once, never silently
            _MIXED_MM["available"] = False
            print(f"slimdiff: torch.mm(out_dtype=float32) unavailable ({str(error).splitlines()[0][:120]}); "
                  "Gram matrices upcast half-precision activations first", file=sys.stderr)
    with _no_tf32():
        return left.T.to(out_dtype) @ right.to(out_dtype)


@contextmanager
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


# rows of a (d, d) sum updated at a time: adding a float32 Gram matrix into a float64 sum converts it through a
# temporary, which would otherwise be the whole (d, d) matrix in float64 (1.2 GB at 12288 wide)
_ADD_BYTES = 64 << 20


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite, checked in row blocks (no full-size boolean mask at once)."""
    rows = max(1, _ADD_BYTES // max(1, tensor.shape[-1] * tensor.element_size()))
    return all(bool(torch.isfinite(tensor[start:start + rows]).all()) for start in range(0, tensor.shape[0], rows))


def _add_in_rows(total: Tensor, part: Tensor) -> None:
    """``total += part`` in row blocks, so that a dtype conversion never holds more than ``_ADD_BYTES`` at once."""
    if total.dtype == part.dtype:
        total.add_(part)
        return
    rows = max(1, _ADD_BYTES // max(1, total.shape[-1] * total.element_size()))
    for start in range(0, total.shape[0], rows):
        total[start:start + rows].add_(part[start:start + rows])
