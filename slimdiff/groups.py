"""Functional groups of a diffusers denoiser: where SlimDiff can cut, and how many parameters each cut saves.

A *module* is one functional group inside one transformer block (method.md §1):
``qk_self``, ``vo_self``, ``qk_cross``, ``vo_cross`` and ``ffn``. This file is the thin adapter that
knows diffusers' module layout; the math in ``slimdiff.decompose`` never sees a diffusers class.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

GROUP_KINDS = ("qk_self", "vo_self", "qk_cross", "vo_cross", "ffn")
SUPPORTED_DENOISERS = ("UNet2DConditionModel", "Transformer2DModel", "PixArtTransformer2DModel", "DiTTransformer2DModel")
GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")
ELEMENTWISE_ACTIVATIONS = ("GELU", "ApproximateGELU", "LinearActivation")
# class-name markers of video denoisers and their temporal layers (UNet3DConditionModel, TransformerTemporalModel,
# UNetSpatioTemporalConditionModel, TemporalBasicTransformerBlock, UNetMotionModel, LatteTransformer3DModel, ...):
# their spatial blocks look like image blocks, but frames fold into the batch and temporal attention mixes them
VIDEO_CLASS_MARKERS = ("Temporal", "Motion", "3D", "Video")


class UnsupportedModelError(ValueError):
    """The denoiser has no transformer block slimdiff knows how to compress."""


@dataclass(frozen=True)
class ModuleGroup:
    """One compressible functional group.

    ``width`` is the current per-head width (QK: query/key head dim, VO: value head dim) or the FFN
    inner width. For QK ``in_features``/``out_features`` are the query and key input dims; for VO the
    value input and output dims; for the FFN the block width in and out. ``compressible`` is False for
    a group that is reported but left intact, with the reason in ``note``.
    """

    name: str
    kind: str
    block: str
    path: str
    heads: int
    width: int
    in_features: int
    out_features: int
    bias_in: bool
    gated: bool = False
    compressible: bool = True
    note: str = ""

    @property
    def unit_params(self) -> int:
        """Parameters that one unit of width holds (one rank of every head, or one FFN channel)."""
        if self.kind.startswith("qk"):
            # to_q row + to_k row (in_features = query dim, out_features = key/value input dim)
            return self.heads * (self.in_features + self.out_features + 2 * int(self.bias_in))
        if self.kind.startswith("vo"):
            # to_v row (+bias) and to_out column
            return self.heads * (self.in_features + int(self.bias_in) + self.out_features)
        # ffn: up-projection rows (two for gated), their biases, and one down-projection column
        up_rows = 2 if self.gated else 1
        return up_rows * (self.in_features + int(self.bias_in)) + self.out_features

    def unit_macs(self, query_tokens: int, key_tokens: int) -> int:
        """Multiply-accumulates that one unit of width costs per sample and call, with ``query_tokens`` rows
        (FFN: its tokens) and ``key_tokens`` key/value rows: the projections, and for attention the logits
        (QK) or the probability-weighted values (VO). Biases and softmax are not counted."""
        if self.kind.startswith("qk"):
            return self.heads * (query_tokens * self.in_features + key_tokens * self.out_features + query_tokens * key_tokens)
        if self.kind.startswith("vo"):
            return self.heads * (key_tokens * self.in_features + query_tokens * self.out_features + query_tokens * key_tokens)
        up_rows = 2 if self.gated else 1
        return query_tokens * (up_rows * self.in_features + self.out_features)

    def params_at(self, width: int) -> int:
        """Parameters of this group at ``width``, not counting width-independent biases."""
        return self.unit_params * width


def _attention_groups(block_path: str, attn_name: str, attn: nn.Module) -> list[ModuleGroup]:
    path = f"{block_path}.{attn_name}"
    side = "cross" if getattr(attn, "is_cross_attention", False) else "self"
    heads = int(attn.heads)
    to_q, to_k, to_v, to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]
    qk_width = to_q.out_features // heads
    v_width = to_v.out_features // heads
    qk_note, qk_ok = "", True
    if getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None:
        qk_ok, qk_note = False, "q/k normalisation between projection and dot product; QK left intact"
    # the attention's own (config) dims, not the linears': a compressed VO legitimately differs from QK
    grouped_kv = getattr(attn, "inner_kv_dim", None) != getattr(attn, "inner_dim", None)
    if grouped_kv:
        qk_ok, qk_note = False, "grouped key/value heads; QK left intact"
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return [
            ModuleGroup(f"{path}.qk", f"qk_{side}", block_path, path, heads, qk_width, to_q.in_features,
                        to_k.in_features, to_q.bias is not None, compressible=False,
                        note="added key/value projections (joint attention); left intact"),
        ]
    vo_ok, vo_note = True, ""
    if grouped_kv:
        vo_ok, vo_note = False, "grouped key/value heads; VO left intact"
    return [
        ModuleGroup(f"{path}.qk", f"qk_{side}", block_path, path, heads, qk_width, to_q.in_features,
                    to_k.in_features, to_q.bias is not None, compressible=qk_ok, note=qk_note),
        ModuleGroup(f"{path}.vo", f"vo_{side}", block_path, path, heads, v_width, to_v.in_features,
                    to_out.out_features, to_v.bias is not None, compressible=vo_ok, note=vo_note),
    ]


def _ffn_group(block_path: str, ff: nn.Module) -> ModuleGroup:
    path = f"{block_path}.ff"
    act = ff.net[0]
    down = ff.net[2]
    act_name = type(act).__name__
    gated = act_name in GATED_ACTIVATIONS
    ok = gated or act_name in ELEMENTWISE_ACTIVATIONS
    up = act.proj
    return ModuleGroup(
        f"{path}", "ffn", block_path, path, 1, down.in_features, up.in_features, down.out_features,
        up.bias is not None, gated=gated, compressible=ok,
        note="" if ok else f"unknown feed-forward activation {act_name}; left intact",
    )


def _check_not_video(denoiser: nn.Module) -> None:
    """Refuse a video denoiser by class name, before any hook could meet its temporal layers."""
    video = [(path, type(m).__name__) for path, m in denoiser.named_modules()
             if any(marker in type(m).__name__ for marker in VIDEO_CLASS_MARKERS)]
    if video:
        layer = next(((path, name) for path, name in video if path), None)
        where = f" (temporal layer {layer[1]} at {layer[0]})" if layer else ""
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} is a video denoiser{where}; slimdiff compresses image denoisers: "
            f"{', '.join(SUPPORTED_DENOISERS)}"
        )


def find_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Enumerate every transformer block's QK/VO (self and cross) and FFN groups, in module order, the
    ones left intact included (``compressible=False``, the reason in ``note``).

    Raises ``UnsupportedModelError`` when the denoiser holds no ``BasicTransformerBlock`` or is a video
    denoiser (temporal layers).
    """
    from diffusers.models.attention import BasicTransformerBlock

    _check_not_video(denoiser)
    groups: list[ModuleGroup] = []
    for block_path, block in denoiser.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        for attn_name in ("attn1", "attn2"):
            attn = getattr(block, attn_name, None)
            if attn is not None:
                groups.extend(_attention_groups(block_path, attn_name, attn))
        if getattr(block, "ff", None) is not None:
            groups.append(_ffn_group(block_path, block.ff))
    if not groups:
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} has no supported transformer block (diffusers BasicTransformerBlock); "
            f"supported denoisers: {', '.join(SUPPORTED_DENOISERS)}"
        )
    return groups


def compressible_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Only the groups slimdiff will cut."""
    return [g for g in find_groups(denoiser) if g.compressible]


def left_intact(groups: list[ModuleGroup]) -> dict[str, dict[str, str]]:
    """The groups slimdiff reports but does not cut, for every listing: ``{name: {"kind": ..., "note": why}}``."""
    return {g.name: {"kind": g.kind, "note": g.note} for g in groups if not g.compressible}
