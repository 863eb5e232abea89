"""Adapter for Flux (``FluxTransformer2DModel``: double blocks ``FluxTransformerBlock``, single blocks
``FluxSingleTransformerBlock``).

Double blocks: the joint attention's VO (image and text streams stacked; QK left intact: RMSNorm on q and k,
then the rotary embedding), the feed-forwards ``ff`` and ``ff_context`` and the modulations ``norm1`` and
``norm1_context``. Single blocks run attention and MLP side by side and one fused ``proj_out`` reads
``[attention output; MLP activation]``: VO narrows ``attn.to_v`` and the attention columns of ``proj_out``, the
MLP (``proj_mlp``, GELU-tanh) is selected by Nyström with the correction applied to the MLP columns of
``proj_out``; their modulation is ``norm.linear``. Every modulation linear reads silu(temb) (timestep, pooled
text, guidance), so they share one capture site.
"""

from __future__ import annotations

from torch import nn

from slimdiff.arch.base import ModuleGroup, ffn_group, intact, joint_attention_groups, modulation_group

DENOISERS = ("FluxTransformer2DModel",)
FAMILY = "Flux (FluxTransformerBlock, FluxSingleTransformerBlock)"
TIMESTEP_SCALE = 1000.0  # FluxPipeline passes timestep / 1000; the transformer scales it back
# FluxPipeline's guidance_scale is FLUX.1-dev's embedded guidance (one call a step, no unconditional prediction);
# its classifier-free guidance is true_cfg_scale (two calls a step)
GUIDANCE_SCALE_DOUBLES_BATCH = False
QK_NOTE = "q/k RMSNorm and rotary embedding between projection and dot product; QK left intact"


def single_block_columns(block: nn.Module) -> tuple[int, int]:
    """(attention, MLP) input columns of a single block's fused ``proj_out``, from its current linears."""
    return int(block.attn.to_v.out_features), int(block.proj_mlp.out_features)


def mlp_site(path: str, block: nn.Module) -> str:
    """Capture site of a single block's MLP activation: the MLP columns of ``proj_out``'s input."""
    attention, mlp = single_block_columns(block)
    return f"{path}.proj_out[{attention}:{attention + mlp}]"


def _single_block_groups(path: str, block: nn.Module, site: str) -> list[ModuleGroup]:
    attn = block.attn
    heads = int(attn.heads)
    to_v, proj_out, proj_mlp = attn.to_v, block.proj_out, block.proj_mlp
    attention, mlp = single_block_columns(block)
    if proj_out.in_features != attention + mlp:
        raise ValueError(f"{path}.proj_out reads {proj_out.in_features} columns, attention {attention} + MLP {mlp} expected")
    bias_v, bias_up = to_v.bias is not None, proj_mlp.bias is not None
    vo = ModuleGroup(f"{path}.attn.vo", "vo_single", path, path, heads, attention // heads, to_v.in_features,
                     proj_out.out_features, bias_v, value=("attn.to_v",), out=("proj_out",), sites=(f"{path}.attn.to_q",),
                     stream_in=(to_v.in_features,), stream_out=(proj_out.out_features,),
                     params_per_unit=heads * (to_v.in_features + int(bias_v) + proj_out.out_features))
    act = type(block.act_mlp).__name__
    mlp_note = "" if act == "GELU" else f"unknown MLP activation {act}; left intact"
    ffn = ModuleGroup(f"{path}.mlp", "ffn_single", path, path, 1, mlp, proj_mlp.in_features, proj_out.out_features, bias_up,
                      compressible=not mlp_note, note=mlp_note, up="proj_mlp", out=("proj_out",),
                      sites=(mlp_site(path, block),), params_per_unit=proj_mlp.in_features + int(bias_up) + proj_out.out_features)
    if getattr(attn, "fused_projections", False):
        vo = intact(vo, "fused q/k/v projections (fuse_qkv_projections); left intact")
    modulation = modulation_group(path, f"{path}.norm.linear", block.norm.linear, site)
    qk = ModuleGroup(f"{path}.attn.qk", "qk_self", path, f"{path}.attn", heads, int(attn.to_q.out_features) // heads,
                     attn.to_q.in_features, attn.to_k.in_features, attn.to_q.bias is not None, compressible=False, note=QK_NOTE)
    return [modulation, qk, vo, ffn]


def find_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Every double and single block's groups, and ``norm_out``'s modulation, in module order."""
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

    blocks = [(p, m) for p, m in denoiser.named_modules() if isinstance(m, (FluxTransformerBlock, FluxSingleTransformerBlock))]
    site = next((f"{p}.norm1.linear" if isinstance(m, FluxTransformerBlock) else f"{p}.norm.linear" for p, m in blocks), "")
    groups: list[ModuleGroup] = []
    for path, block in blocks:
        if isinstance(block, FluxTransformerBlock):
            block_groups = [modulation_group(path, f"{path}.{n}.linear", getattr(block, n).linear, site)
                            for n in ("norm1", "norm1_context")]
            block_groups += joint_attention_groups(path, "attn", block.attn, QK_NOTE)
            block_groups += [ffn_group(path, block.ff), ffn_group(path, block.ff_context, "ff_context")]
            # the exact classes: a subclass may compute its modulation differently
            norms_ok = type(block.norm1) is AdaLayerNormZero and type(block.norm1_context) is AdaLayerNormZero
        else:
            block_groups = _single_block_groups(path, block, site)
            norms_ok = type(block.norm) is AdaLayerNormZeroSingle
        if not norms_ok:
            block_groups = [intact(g, "block variant not recognised (modulation norm class); left intact") if g.compressible else g
                            for g in block_groups]
        groups += block_groups
    norm_out = getattr(denoiser, "norm_out", None)
    if type(norm_out) is AdaLayerNormContinuous:
        groups.append(modulation_group("norm_out", "norm_out.linear", norm_out.linear, site))
    return groups
