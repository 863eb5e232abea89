"""A group's statistics and weights in the math's layout, and its closed-form decomposition (all widths at once)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup
from slimdiff.arch.flux import single_block_columns
from slimdiff.arch.sites import group_input_sites, group_sites
from slimdiff.decomposition.closed_form import (
    DEFAULT_REG,
    FFNDecomposition,
    QKDecomposition,
    VODecomposition,
    decompose_ffn,
    decompose_lowrank,
    decompose_qk,
    decompose_vo,
)
from slimdiff.device import linalg_device, module_device
from slimdiff.runtime.layers import LowRankLinear
from slimdiff.statistics.sums import Capture


def _x_w(linear: nn.Linear, device: torch.device | None = None) -> Tensor:
    """Weight in X W layout (float64, on ``device``, default the weight's), with the bias as an extra input row when present."""
    device = linear.weight.device if device is None else device
    weight = linear.weight.detach().to(device, torch.float64).T
    if linear.bias is None:
        return weight
    return torch.cat([weight, linear.bias.detach().to(device, torch.float64)[None]], dim=0)


Decomposition = QKDecomposition | VODecomposition | FFNDecomposition


def decompose_group(denoiser: nn.Module, group: ModuleGroup, capture: Capture, reg: float = DEFAULT_REG) -> Decomposition:
    """The closed-form decomposition of one group from the capture (all widths at once), in float64 on
    ``linalg_device`` of the model (its GPU when that has usable float64, else the CPU)."""
    if not group.compressible:
        raise ValueError(f"{group.name} is not compressible: {group.note}")
    try:
        return _decompose_group(denoiser, group, capture, reg)
    except ValueError as error:  # the math names what is wrong; this names where
        raise ValueError(f"{group.name}: {error}") from None


def group_statistics(denoiser: nn.Module, group: ModuleGroup, capture: Capture, buckets: Sequence[int] | None = None,
                     device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """(cov_x, cov_y): the second moments a group's decomposition reads, over ``buckets`` (all by default), on
    ``device``. QK: query input and key input (stacked block-diagonally over the streams of a joint attention,
    bias rows included); VO: the value input, twice; FFN: the hidden activation, twice; adaLN: its input, twice.
    Each site the group reads is taken from ``capture`` once (a capture from ``open_capture`` reads it from disk)."""
    capture = capture.subset(group_sites(group))
    module = denoiser.get_submodule(group.path)
    has_bias = lambda name: module.get_submodule(name).bias is not None  # noqa: E731
    if group.kind == "qk_joint":
        cov_x = capture.stacked_second_moment(group.sites, [has_bias(n) for n in group.query], buckets)
        cov_y = capture.stacked_second_moment(group.sites, [has_bias(n) for n in group.key], buckets)
    elif group.kind in ("vo_joint", "vo_single"):
        cov_x = cov_y = capture.stacked_second_moment(group.sites, [has_bias(n) for n in group.value], buckets)
    elif group.kind in ("ffn_single", "adaln"):
        cov_x = cov_y = capture.second_moment(group.sites[0], buckets)
    else:
        x_site, y_site = group_input_sites(group)
        if group.kind == "ffn":
            cov_x = cov_y = capture.second_moment(x_site, buckets)
        elif group.kind.startswith("qk"):
            aug_q, aug_k = module.to_q.bias is not None, module.to_k.bias is not None
            cov_x = capture.second_moment(x_site, buckets, augment=aug_q)
            cov_y = cov_x if (y_site == x_site and aug_k == aug_q) else capture.second_moment(y_site, buckets, augment=aug_k)
        else:
            cov_x = cov_y = capture.second_moment(y_site, buckets, augment=module.to_v.bias is not None)
    if device is not None:
        same = cov_y is cov_x
        cov_x = cov_x.to(device)
        cov_y = cov_x if same else cov_y.to(device)
    return cov_x, cov_y


def _stacked_x_w(module: nn.Module, names: Sequence[str], device: torch.device) -> Tensor:
    return torch.cat([_x_w(module.get_submodule(n), device) for n in names], dim=0)


def _out_w(module: nn.Module, names: Sequence[str], device: torch.device, columns: slice | None = None) -> Tensor:
    """Output projections in X W layout, side by side (one per stream); ``columns``: the input columns a group owns."""
    weights = [module.get_submodule(n).weight.detach().to(device, torch.float64).T for n in names]
    if columns is not None:
        weights = [w[columns] for w in weights]
    return torch.cat(weights, dim=1)


def _decompose_group(denoiser: nn.Module, group: ModuleGroup, capture: Capture, reg: float) -> Decomposition:
    where = linalg_device(module_device(denoiser))
    module = denoiser.get_submodule(group.path)
    cov_x, cov_y = group_statistics(denoiser, group, capture, device=where)
    if group.kind == "qk_joint":
        return decompose_qk(_stacked_x_w(module, group.query, where), _stacked_x_w(module, group.key, where), cov_x, cov_y,
                            group.heads, reg)
    if group.kind in ("vo_joint", "vo_single"):
        columns = None
        if group.kind == "vo_single":
            columns = slice(0, single_block_columns(module)[0])
        return decompose_vo(_stacked_x_w(module, group.value, where), _out_w(module, group.out, where, columns), cov_y,
                            group.heads, reg)
    if group.kind in ("ffn", "ffn_single"):
        return decompose_ffn(*ffn_operands(denoiser, group, cov_x, where), reg)
    if group.kind == "adaln":
        if isinstance(module, LowRankLinear):
            raise ValueError("already factorised; decompose the uncompressed model")
        return decompose_lowrank(module.weight.detach().to(where, torch.float64).T, cov_x, reg)
    if group.kind.startswith("qk"):
        return decompose_qk(_x_w(module.to_q, where), _x_w(module.to_k, where), cov_x, cov_y, group.heads, reg)
    w_out = module.to_out[0].weight.detach().to(where, torch.float64).T
    return decompose_vo(_x_w(module.to_v, where), w_out, cov_y, group.heads, reg)


def ffn_operands(denoiser: nn.Module, group: ModuleGroup, cov_hidden: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """(down projection in X W layout, hidden covariance) of an FFN group on ``device``: what its Nyström selection
    reads (a Flux single block's down projection is the MLP columns of its fused ``proj_out``)."""
    module = denoiser.get_submodule(group.path)
    if group.kind == "ffn_single":
        attention, mlp = single_block_columns(module)
        return _out_w(module, group.out, device, slice(attention, attention + mlp)), cov_hidden
    return _x_w(module.net[2], device)[: group.width], cov_hidden
