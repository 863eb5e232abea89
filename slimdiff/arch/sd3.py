"""Adapter for SD3 / SD3.5 (``SD3Transformer2DModel``, MMDiT ``JointTransformerBlock``).

Per block: the joint attention ``attn`` (QK and VO stacked over the image and text streams; QK left intact
where ``qk_norm`` puts RMSNorm on q and k, as in SD3.5), SD3.5-Medium's second, image-only attention ``attn2``
(a plain self-attention), the feed-forwards ``ff`` and ``ff_context`` (GELU-tanh; the last block is
``context_pre_only`` and has no ``ff_context`` nor ``to_add_out``), and the adaLN modulations ``norm1`` and
``norm1_context``; plus the model's final ``norm_out``. Every modulation linear reads silu(temb), the same
timestep + pooled-text embedding, so they share one capture site.
"""

from __future__ import annotations

from torch import nn

from slimdiff.arch.base import ModuleGroup, attention_groups, ffn_group, intact, joint_attention_groups, modulation_group

DENOISERS = ("SD3Transformer2DModel",)
FAMILY = "SD3 / SD3.5 (JointTransformerBlock)"
TIMESTEP_SCALE = 1.0  # StableDiffusion3Pipeline passes the scheduler's timestep (0..1000)
GUIDANCE_SCALE_DOUBLES_BATCH = True  # guidance_scale > 1: one call a step on the batch [unconditional; conditional]


def _modulation_linears(denoiser: nn.Module) -> list[tuple[str, str, nn.Module, str]]:
    """(block, path, module, note) of every adaLN modulation linear, in module order; a norm class this adapter does
    not know is reported (note) and left intact."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero, SD35AdaLayerNormZeroX

    known = (AdaLayerNormZero, SD35AdaLayerNormZeroX, AdaLayerNormContinuous)
    found = []
    for path, block in denoiser.named_modules():
        if isinstance(block, JointTransformerBlock):
            for name in ("norm1", "norm1_context"):
                norm = getattr(block, name)
                # the exact classes: a subclass may compute its modulation differently
                note = "" if type(norm) in known and getattr(norm, "emb", None) is None else (
                    f"unrecognised modulation {type(norm).__name__}; left intact")
                if hasattr(norm, "linear"):
                    found.append((path, f"{path}.{name}.linear", norm.linear, note))
    norm_out = getattr(denoiser, "norm_out", None)
    if type(norm_out) is AdaLayerNormContinuous:
        found.append(("norm_out", "norm_out.linear", norm_out.linear, ""))
    return found


def find_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Every JointTransformerBlock's joint QK/VO, second attention, FFNs and modulations, and ``norm_out``'s modulation."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.attention_processor import Attention

    modulations = _modulation_linears(denoiser)
    shared_site = next((path for _, path, _, note in modulations if not note), "")
    by_block: dict[str, list[ModuleGroup]] = {}
    for block, path, module, note in modulations:
        by_block.setdefault(block, []).append(modulation_group(block, path, module, shared_site, note))
    groups: list[ModuleGroup] = []
    for path, block in denoiser.named_modules():
        if not isinstance(block, JointTransformerBlock):
            continue
        block_groups = list(by_block.get(path, []))
        attn = block.attn
        if not isinstance(attn, Attention) or getattr(attn, "added_kv_proj_dim", None) is None:
            raise ValueError(f"{path}.attn is {type(attn).__name__} without added key/value projections: not an MMDiT block")
        qk_note = ""
        if any(getattr(attn, n, None) is not None for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
            qk_note = "q/k RMSNorm between projection and dot product (qk_norm); QK left intact"
        block_groups += joint_attention_groups(path, "attn", attn, qk_note)
        if getattr(block, "attn2", None) is not None:  # SD3.5-Medium: an image-only self-attention
            block_groups += attention_groups(path, "attn2", block.attn2)
        block_groups.append(ffn_group(path, block.ff))
        if getattr(block, "ff_context", None) is not None:
            block_groups.append(ffn_group(path, block.ff_context, "ff_context"))
        if any(g.kind == "adaln" and not g.compressible for g in block_groups):
            why = next(g.note for g in block_groups if g.kind == "adaln" and not g.compressible)
            block_groups = [g if not g.compressible else intact(g, f"block variant not recognised ({why})") for g in block_groups]
        groups += block_groups
    groups += by_block.get("norm_out", [])
    return groups
