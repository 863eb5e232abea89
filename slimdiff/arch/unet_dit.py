"""Adapter for denoisers built from diffusers' ``BasicTransformerBlock``: UNets (SD 1.x/2.x, SDXL) and DiTs
(``Transformer2DModel``, ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``).

Each block has ``attn1`` (self), ``attn2`` (cross, where the model has text conditioning) and ``ff``. DiT-style
blocks add adaLN modulation: PixArt's one shared ``adaln_single.linear`` (silu of the timestep embedding ->
6 d), DiT's per-block ``norm1.linear`` (``AdaLayerNormZero`` with its own timestep and class embedding).
"""

from __future__ import annotations

from torch import nn

from slimdiff.arch.base import ModuleGroup, attention_groups, ffn_group, modulation_group

DENOISERS = ("UNet2DConditionModel", "Transformer2DModel", "PixArtTransformer2DModel", "DiTTransformer2DModel")
FAMILY = "UNet / DiT (BasicTransformerBlock)"
TIMESTEP_SCALE = 1.0  # the denoiser's timestep argument is the scheduler's timestep
GUIDANCE_SCALE_DOUBLES_BATCH = True  # guidance_scale > 1: one call a step on the batch [unconditional; conditional]


def find_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Every ``BasicTransformerBlock``'s QK/VO (self and cross) and FFN groups, and the adaLN modulation linears,
    in module order."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.normalization import AdaLayerNormSingle, AdaLayerNormZero

    groups: list[ModuleGroup] = []
    for path, module in denoiser.named_modules():
        if isinstance(module, AdaLayerNormSingle):  # PixArt: one modulation for all blocks, before them in module order
            linear = f"{path}.linear"
            groups.append(modulation_group(path, linear, module.linear, linear))
            continue
        if not isinstance(module, BasicTransformerBlock):
            continue
        norm1 = getattr(module, "norm1", None)
        if isinstance(norm1, AdaLayerNormZero) and getattr(norm1, "emb", None) is not None:
            linear = f"{path}.norm1.linear"  # DiT: reads silu of this block's own timestep/class embedding
            groups.append(modulation_group(path, linear, norm1.linear, linear))
        for attn_name in ("attn1", "attn2"):
            attn = getattr(module, attn_name, None)
            if attn is not None:
                groups.extend(attention_groups(path, attn_name, attn))
        if getattr(module, "ff", None) is not None:
            groups.append(ffn_group(path, module.ff))
    return groups
