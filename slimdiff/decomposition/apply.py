"""Applying decompositions: a group resized to its planned width and filled with the closed-form weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup, find_groups
from slimdiff.arch.flux import single_block_columns
from slimdiff.decomposition.closed_form import DEFAULT_REG, FFNDecomposition
from slimdiff.decomposition.closed_form import regularize
from slimdiff.decomposition.groups import (
    Decomposition,
    _out_w,
    _stacked_x_w,
    _x_w,
    decompose_group,
    ffn_operands,
    group_statistics,
)
from slimdiff.decomposition.lora_maps import input_heads, lowrank_input, output_heads, selection
from slimdiff.device import linalg_device, module_device
from slimdiff.runtime.lora import EXACT, LEAST_SQUARES, LinearMap
from slimdiff.runtime.resize import resize_group
from slimdiff.statistics.sums import Capture


def _assign(linear: nn.Linear, w_aug: Tensor) -> None:
    """Load an X W layout weight (bias as last row when the linear has one) into ``linear``."""
    with torch.no_grad():
        if linear.bias is None:
            linear.weight.copy_(w_aug.T)
        else:
            linear.weight.copy_(w_aug[:-1].T)
            linear.bias.copy_(w_aug[-1])


def recorded_decomposition(store, denoiser: nn.Module, group: ModuleGroup, capture: Capture,
                           widths: Sequence[int] = ()) -> Decomposition | None:
    """``group``'s decomposition as the score stage recorded it in ``store`` (a ``FactorisationStore``), on the
    model's linear-algebra device, or None when it holds none (for an FFN: none with channels at all of ``widths``)."""
    where = linalg_device(module_device(denoiser))
    if group.kind in ("ffn", "ffn_single") and group in store:
        cov_hidden, _ = group_statistics(denoiser, group, capture, device=where)
        return store.get(group, *reversed(ffn_operands(denoiser, group, cov_hidden, where)), device=where, widths=widths)
    return store.get(group, device=where)


@dataclass(frozen=True)
class GroupResult:
    """What one group became: its width before and after, the predicted output error, and the maps of its linears
    onto the slim ones (for moving LoRA deltas across; none where the group's linears are unchanged)."""

    name: str
    kind: str
    width_before: int
    width_after: int
    params_before: int
    params_after: int
    predicted_error: float
    method: str  # how the decomposition was obtained at this width (whitening or selection, and any fallback)
    maps: tuple[LinearMap, ...] = field(default=(), compare=False)


def linear_features(denoiser: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear of ``denoiser`` by name: the original shapes the LoRA maps refer to."""
    return {name: (m.in_features, m.out_features) for name, m in denoiser.named_modules() if isinstance(m, nn.Linear)}


class _Maps:
    """Collects a group's ``LinearMap``s in the model's dtype on its device (the maps of a big model stay off the host)."""

    def __init__(self, denoiser: nn.Module, group: ModuleGroup, features: Mapping[str, tuple[int, int]] | None):
        parameter = next(denoiser.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self.group, self.features = group, features if features is not None else linear_features(denoiser)
        self.maps: list[LinearMap] = []
        self.predicted_error: float | None = None  # relative; set once the group's error is known

    def add(self, name: str, inputs=(), outputs=(), how: str = EXACT, note: str = "", target: str | None = None) -> None:
        module = f"{self.group.path}.{name}" if name else self.group.path
        in_features, out_features = self.features[module]
        cast = lambda segments: tuple(s.cast(self.dtype, self.device) for s in segments)  # noqa: E731
        self.maps.append(LinearMap(module, target or module, in_features, out_features, cast(inputs), cast(outputs), how,
                                   note or f"{self.group.kind} group {self.group.name}"))

    def finish(self, error: float, total: float) -> tuple[LinearMap, ...]:
        """The maps, each with the group's predicted relative error (``error / total``, the output energy)."""
        relative = error / total if total > 0 else 0.0
        return tuple(replace(m, predicted_error=relative) for m in self.maps)


def apply_decomposition(denoiser: nn.Module, group: ModuleGroup, decomposition: Decomposition, width: int,
                        features: Mapping[str, tuple[int, int]] | None = None,
                        cov_input: Tensor | None = None) -> GroupResult:
    """Resize ``group`` to ``width`` and load the decomposition's weights, cast to the model's dtype.

    ``features`` are the original shapes of the model's linears (``linear_features`` before any group was applied;
    default: the current ones); an adaLN group factorised below its full rank whose input is wider than its output
    needs ``cov_input``, its input's regularised second moment, for its LoRA map."""
    maps = _Maps(denoiser, group, features)
    module = denoiser.get_submodule(group.path)
    if group.kind in ("qk_joint", "vo_joint", "vo_single", "ffn_single", "adaln"):
        error = _apply_named(denoiser, group, decomposition, width, maps, cov_input)
        return GroupResult(group.name, group.kind, group.width, width, group.params_at(group.width), group.params_at(width),
                           error, decomposition.method_at(width), maps.finish(error, _output_energy(decomposition)))
    if group.kind == "ffn":
        keep, w_down = decomposition.weights(width)
        up = module.net[0].proj
        rows = torch.cat([keep, keep + group.width]) if group.gated else keep
        up_w = _x_w(up)[:, rows.to(up.weight.device)]  # a row selection: stays on the model's device
        bias_down = None if module.net[2].bias is None else module.net[2].bias.detach().clone()
        error = decomposition.error(width)
        _ffn_maps(maps, group, decomposition, width, "net.0.proj", "net.2", down_start=0)
        resize_group(denoiser, group, width)
        _assign(module.net[0].proj, up_w)
        _assign_weight_keep_bias(module.net[2], w_down, bias_down)
    elif group.kind.startswith("qk"):
        w_q, w_k = decomposition.weights(width)
        error = float(decomposition.tail[width])
        _basis_maps(maps, group, [("to_q", _x_w(module.to_q, w_q.device), w_q), ("to_k", _x_w(module.to_k, w_k.device), w_k)])
        resize_group(denoiser, group, width)
        _assign(module.to_q, w_q)
        _assign(module.to_k, w_k)
    else:
        w_v, w_o = decomposition.weights(width)
        bias_out = None if module.to_out[0].bias is None else module.to_out[0].bias.detach().clone()
        error = float(decomposition.tail[width])
        _basis_maps(maps, group, [("to_v", _x_w(module.to_v, w_v.device), w_v)])
        _out_maps(maps, group, ["to_out.0"], _out_w(module, ["to_out.0"], w_o.device), w_o)
        resize_group(denoiser, group, width)
        _assign(module.to_v, w_v)
        _assign_weight_keep_bias(module.to_out[0], w_o, bias_out)
    return GroupResult(group.name, group.kind, group.width, width, group.params_at(group.width), group.params_at(width), error,
                       decomposition.method_at(width), maps.finish(error, _output_energy(decomposition)))


def _output_energy(decomposition: Decomposition) -> float:
    """The group's predicted output energy at width 0 (what a relative error is relative to)."""
    if isinstance(decomposition, FFNDecomposition):
        return decomposition.output_energy
    return float(decomposition.tail[0])


def _basis_maps(maps: _Maps, group: ModuleGroup, projections: Sequence[tuple[Sequence[str] | str, Tensor, Tensor]]) -> None:
    """Output maps of query/key/value projections (``names``, original, slim X W weights; stacked rows for the
    streams of a joint attention, which share one map)."""
    for names, original, slim in projections:
        segment, how = output_heads(original, slim, group.heads)
        for name in [names] if isinstance(names, str) else names:
            maps.add(name, outputs=(segment,), how=how)


def _out_maps(maps: _Maps, group: ModuleGroup, names: Sequence[str], original: Tensor, slim: Tensor, start: int = 0) -> None:
    """Input maps of the output projections ``names`` (their X W weights side by side: one map for every stream)."""
    segment, how = input_heads(original, slim, group.heads, start)
    for name in names:
        maps.add(name, inputs=(segment,), how=how)


def _ffn_maps(maps: _Maps, group: ModuleGroup, decomposition, width: int, up: str, down: str, down_start: int) -> None:
    """The up projection's kept rows (both halves of a gated one) and the down projection's kept inputs with the
    Nyström correction of the removed ones."""
    full = group.width
    if width == full:
        keep, correction = torch.arange(full, device=decomposition.cov_hidden.device), None
    else:
        keep, correction = decomposition.correction(width)
    halves = (0, full) if group.gated else (0,)
    maps.add(up, outputs=tuple(selection(keep, full, start) for start in halves))
    maps.add(down, inputs=(selection(keep, full, down_start, correction),),
             how=EXACT if correction is None else LEAST_SQUARES)


def _split_rows(w: Tensor, module: nn.Module, names: Sequence[str]) -> list[Tensor]:
    """Rows of a stacked X W weight back to each stream's linear (its inputs, then its bias row)."""
    sizes = [module.get_submodule(n).in_features + int(module.get_submodule(n).bias is not None) for n in names]
    return list(torch.split(w, sizes, dim=0))


def _apply_named(denoiser: nn.Module, group: ModuleGroup, decomposition: Decomposition, width: int, maps: _Maps,
                 cov_input: Tensor | None) -> float:
    """``apply_decomposition`` for the layouts that name their linears; returns the predicted error."""
    module = denoiser.get_submodule(group.path)
    if group.kind == "adaln":
        error = float(decomposition.tail[min(width, decomposition.head_dim)])
        if width >= group.full_rank:
            return error  # the original linear stays
        first, second = decomposition.weights(width)
        maps.add("", inputs=(lowrank_input(decomposition.v_factors[0], width, cov_input),), how=LEAST_SQUARES,
                 target=f"{group.path}.up")
        bias = None if module.bias is None else module.bias.detach().clone()
        resize_group(denoiser, group, width)
        factorised = denoiser.get_submodule(group.path)
        _assign(factorised.down, first)
        _assign_weight_keep_bias(factorised.up, second, bias)
        return error
    if group.kind == "qk_joint":
        w_q, w_k = decomposition.weights(width)
        _basis_maps(maps, group, [(group.query, _stacked_x_w(module, group.query, w_q.device), w_q),
                                  (group.key, _stacked_x_w(module, group.key, w_k.device), w_k)])
        q_parts, k_parts = _split_rows(w_q, module, group.query), _split_rows(w_k, module, group.key)
        resize_group(denoiser, group, width)
        for name, part in [*zip(group.query, q_parts), *zip(group.key, k_parts)]:
            _assign(module.get_submodule(name), part)
        return float(decomposition.tail[width])
    if group.kind == "vo_joint":
        w_v, w_o = decomposition.weights(width)
        _basis_maps(maps, group, [(group.value, _stacked_x_w(module, group.value, w_v.device), w_v)])
        _out_maps(maps, group, group.out, _out_w(module, group.out, w_o.device), w_o)
        v_parts = _split_rows(w_v, module, group.value)
        outs = [module.get_submodule(n) for n in group.out]
        o_parts = torch.split(w_o, [o.out_features for o in outs], dim=1)
        biases = [None if o.bias is None else o.bias.detach().clone() for o in outs]
        resize_group(denoiser, group, width)
        for name, part in zip(group.value, v_parts):
            _assign(module.get_submodule(name), part)
        for name, part, bias in zip(group.out, o_parts, biases):
            _assign_weight_keep_bias(module.get_submodule(name), part, bias)
        return float(decomposition.tail[width])
    attention, mlp = single_block_columns(module)
    proj_out = module.proj_out
    old_out = proj_out.weight.detach().clone()
    bias_out = None if proj_out.bias is None else proj_out.bias.detach().clone()
    if group.kind == "vo_single":
        w_v, w_o = decomposition.weights(width)
        error = float(decomposition.tail[width])
        _basis_maps(maps, group, [(group.value[0], _x_w(module.get_submodule(group.value[0]), w_v.device), w_v)])
        _out_maps(maps, group, group.out, old_out[:, :attention].T.to(w_o.device, torch.float64), w_o)
        resize_group(denoiser, group, width)
        _assign(module.get_submodule(group.value[0]), w_v)
        new_out = torch.cat([w_o.T.to(old_out), old_out[:, attention:]], dim=1)
    else:
        keep, w_down = decomposition.weights(width)
        up = module.get_submodule(group.up)
        up_w = _x_w(up)[:, keep.to(up.weight.device)]  # a row selection: stays on the model's device
        error = decomposition.error(width)
        # the MLP columns of proj_out start after the attention's original width (the attention may be narrowed already)
        original_attention = maps.features[f"{group.path}.{group.out[0]}"][0] - group.width
        _ffn_maps(maps, group, decomposition, width, group.up, group.out[0], down_start=original_attention)
        resize_group(denoiser, group, width)
        _assign(module.get_submodule(group.up), up_w)
        new_out = torch.cat([old_out[:, :attention], w_down.T.to(old_out)], dim=1)
    with torch.no_grad():
        module.proj_out.weight.copy_(new_out)
        if bias_out is not None:
            module.proj_out.bias.copy_(bias_out)
    return error


def _assign_weight_keep_bias(linear: nn.Linear, w: Tensor, bias: Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(w.T)
        if bias is not None:
            linear.bias.copy_(bias)


def decompose(denoiser: nn.Module, capture: Capture, widths: Mapping[str, int], reg: float = DEFAULT_REG,
              progress: bool = False, store=None) -> list[GroupResult]:
    """Compress ``denoiser`` in place to the given per-group ``widths`` (group name -> width).

    Every group named is decomposed from the capture of the uncompressed model and replaced by
    narrower dense linears; groups not named stay as they are. With ``store`` (a
    ``slimdiff.decomposition.factorisations.FactorisationStore`` the scoring filled), a group's recorded factorisation is applied
    instead of being computed again.
    """
    from tqdm.auto import tqdm

    groups = {g.name: g for g in find_groups(denoiser)}
    unknown = sorted(set(widths) - set(groups))
    if unknown:
        raise KeyError(f"width plan names groups the denoiser does not have: {unknown[:3]}")
    results = []
    features = linear_features(denoiser)
    for name in tqdm(list(widths), desc="decompose", unit="group", disable=not progress):
        group = groups[name]
        decomposition = recorded_decomposition(store, denoiser, group, capture) if store is not None else None
        results.append(apply_group(denoiser, group, capture, int(widths[name]), reg, decomposition, features))
    return results


def apply_group(denoiser: nn.Module, group: ModuleGroup, capture: Capture, width: int, reg: float = DEFAULT_REG,
                decomposition: Decomposition | None = None,
                features: Mapping[str, tuple[int, int]] | None = None) -> GroupResult:
    """Compress one ``group`` of ``denoiser`` in place to ``width``: with ``decomposition`` (of the capture of the
    uncompressed model) when the caller has it, else decomposed here."""
    if not 1 <= width <= group.width:
        raise ValueError(f"width for {group.name} must be in 1..{group.width}, got {width}")
    if decomposition is None:
        decomposition = decompose_group(denoiser, group, capture, reg)
    cov_input = None
    if group.kind == "adaln" and width < group.full_rank < group.in_features:  # see lora_maps.lowrank_input
        where = linalg_device(module_device(denoiser))
        cov_input = regularize(group_statistics(denoiser, group, capture, device=where)[0], reg)
    return apply_decomposition(denoiser, group, decomposition, width, features, cov_input)
