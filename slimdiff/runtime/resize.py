"""Resizing a group to a width: empty narrower linears and the slim processor (what loading a compressed model rebuilds
before its weights are read).
"""

from __future__ import annotations

from torch import nn

from slimdiff.arch import ModuleGroup
from slimdiff.arch.flux import single_block_columns
from slimdiff.runtime.attention import original_attention_scale, slim_processor_for
from slimdiff.runtime.layers import LowRankLinear


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _empty_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def resize_group(denoiser: nn.Module, group: ModuleGroup, width: int, attention_scale: float | None = None) -> None:
    """Replace a group's linears by empty ones of ``width`` (per head or FFN channels) in place.

    Attention groups get a ``SlimAttnProcessor`` with ``attention_scale`` (default: the uncompressed
    model's scale, kept across successive resizes of the same attention).
    """
    if not group.compressible:
        raise ValueError(f"{group.name} is not compressible: {group.note}")
    if not 1 <= width <= group.width:
        raise ValueError(f"width for {group.name} must be in 1..{group.width}, got {width}")
    module = denoiser.get_submodule(group.path)
    if group.kind in ("qk_joint", "vo_joint", "vo_single", "ffn_single", "adaln"):
        _resize_named(denoiser, group, width, attention_scale)
        return
    if group.kind == "ffn":
        act, down = module.net[0], module.net[2]
        up_rows = 2 * width if group.gated else width
        act.proj = _empty_linear(act.proj.in_features, up_rows, act.proj.bias is not None, act.proj)
        module.net[2] = _empty_linear(width, down.out_features, down.bias is not None, down)
        return
    scale = original_attention_scale(module) if attention_scale is None else attention_scale
    heads = group.heads
    if group.kind.startswith("qk"):
        module.to_q = _empty_linear(module.to_q.in_features, heads * width, module.to_q.bias is not None, module.to_q)
        module.to_k = _empty_linear(module.to_k.in_features, heads * width, module.to_k.bias is not None, module.to_k)
    else:
        to_out = module.to_out[0]
        module.to_v = _empty_linear(module.to_v.in_features, heads * width, module.to_v.bias is not None, module.to_v)
        module.to_out[0] = _empty_linear(heads * width, to_out.out_features, to_out.bias is not None, to_out)
    module.set_processor(slim_processor_for(module, scale))


def _resize_named(denoiser: nn.Module, group: ModuleGroup, width: int, attention_scale: float | None) -> None:
    """``resize_group`` for the layouts that name their linears (joint attention, Flux single blocks, adaLN)."""
    module = denoiser.get_submodule(group.path)

    def narrow_outputs(names: tuple[str, ...], out_features: int) -> None:
        for name in names:
            old = module.get_submodule(name)
            _set_submodule(module, name, _empty_linear(old.in_features, out_features, old.bias is not None, old))

    def narrow_inputs(names: tuple[str, ...], in_features: int) -> None:
        for name in names:
            old = module.get_submodule(name)
            _set_submodule(module, name, _empty_linear(in_features, old.out_features, old.bias is not None, old))

    if group.kind == "adaln":
        linear = module
        if width >= group.full_rank:
            return  # full rank: the original linear, never a larger factorisation
        weight = linear.up.weight if isinstance(linear, LowRankLinear) else linear.weight
        factorised = LowRankLinear(group.in_features, group.out_features, width, linear.bias is not None,
                                   device=weight.device, dtype=weight.dtype)
        _set_submodule(denoiser, group.path, factorised)
        return
    inner = group.heads * width
    if group.kind == "qk_joint":
        narrow_outputs(group.query + group.key, inner)
    elif group.kind == "vo_joint":
        narrow_outputs(group.value, inner)
        narrow_inputs(group.out, inner)
    else:  # Flux single block: the fused proj_out keeps the other part's columns
        attention, mlp = single_block_columns(module)
        if group.kind == "vo_single":
            narrow_outputs(group.value, inner)
            narrow_inputs(group.out, inner + mlp)
        else:
            narrow_outputs((group.up,), width)
            narrow_inputs(group.out, attention + width)
    attn = module.attn if group.kind == "vo_single" else module
    if group.kind != "ffn_single":
        scale = original_attention_scale(attn) if attention_scale is None else attention_scale
        attn.set_processor(slim_processor_for(attn, scale))
