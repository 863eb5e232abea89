"""What every architecture adapter builds: functional groups (``ModuleGroup``) and the shared group builders.

A *group* is one functional unit inside one transformer block (method.md §1, §6): ``qk_*``/``vo_*`` of an
attention, an ``ffn``, or an adaLN modulation linear (``adaln``). Adapters (one module per denoiser family in
``slimdiff.arch``) name the groups and the capture sites their decompositions read; the math in
``slimdiff.decomposition.closed_form`` never sees a diffusers class.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

# qk_self/vo_self/qk_cross/vo_cross/ffn: diffusers Attention and FeedForward (BasicTransformerBlock, and the FFNs
# of SD3/Flux blocks). qk_joint/vo_joint: one attention over image and text streams (SD3, Flux double blocks).
# vo_single/ffn_single: Flux single blocks, whose fused proj_out reads [attention output; MLP activation].
# adaln: an adaLN modulation linear, factorised (rank) instead of narrowed.
GROUP_KINDS = ("qk_self", "vo_self", "qk_cross", "vo_cross", "qk_joint", "vo_joint", "vo_single", "ffn", "ffn_single", "adaln")
GATED_ACTIVATIONS = ("GEGLU", "SwiGLU")
ELEMENTWISE_ACTIVATIONS = ("GELU", "ApproximateGELU", "LinearActivation")


class UnsupportedModelError(ValueError):
    """The denoiser has no transformer block slimdiff knows how to compress."""


@dataclass(frozen=True)
class ModuleGroup:
    """One functional group.

    ``width`` is the current per-head width (QK: query/key head dim, VO: value head dim), the FFN inner
    width, or the rank of an adaLN modulation (its smaller dimension while unfactorised). For QK
    ``in_features``/``out_features`` are the query and key input dims (summed over streams for joint
    attention); for VO the value input and output dims; for the FFN the block width in and out; for adaLN
    the conditioning width and the modulation width. ``compressible`` is False for a group that is reported
    but left intact, with the reason in ``note``.

    Joint and fused layouts name their linears relative to ``path``: ``query``/``key``/``value`` hold one
    projection per stream (image, then text), ``out`` the output projections (one per stream that has one; a
    Flux single block's fused ``proj_out``), ``up`` a Flux single block's ``proj_mlp``; ``sites`` are the
    capture sites (full names) of the streams' inputs, in stream order, or the one input of an ``ffn_single``
    or ``adaln`` group. ``params_per_unit`` is set by the adapter where the layout is not the diffusers
    Attention/FeedForward one.
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
    query: tuple[str, ...] = ()
    key: tuple[str, ...] = ()
    value: tuple[str, ...] = ()
    out: tuple[str, ...] = ()
    up: str = ""
    sites: tuple[str, ...] = ()
    stream_in: tuple[int, ...] = ()  # input width of each stream's projection (joint layouts)
    stream_out: tuple[int, ...] = ()  # output width of each stream's output projection (VO of joint layouts)
    params_per_unit: int = 0

    @property
    def unit_params(self) -> int:
        """Parameters that one unit of width holds (one rank of every head, one FFN channel, one modulation rank)."""
        if self.params_per_unit:
            return self.params_per_unit
        if self.kind.startswith("qk"):
            # to_q row + to_k row (in_features = query dim, out_features = key/value input dim)
            return self.heads * (self.in_features + self.out_features + 2 * int(self.bias_in))
        if self.kind.startswith("vo"):
            # to_v row (+bias) and to_out column
            return self.heads * (self.in_features + int(self.bias_in) + self.out_features)
        if self.kind == "adaln":
            return self.in_features + self.out_features
        # ffn: up-projection rows (two for gated), their biases, and one down-projection column
        up_rows = 2 if self.gated else 1
        return up_rows * (self.in_features + int(self.bias_in)) + self.out_features

    @property
    def full_rank(self) -> int:
        """adaLN: the rank of the unfactorised modulation (its smaller dimension)."""
        return min(self.in_features, self.out_features)

    def params_at(self, width: int) -> int:
        """Parameters of this group at ``width``, not counting width-independent biases. An adaLN modulation at
        its full rank is the original linear (``in x out``); below it, two factors (``rank x (in + out)``)."""
        if self.kind == "adaln" and width >= self.full_rank:
            return self.in_features * self.out_features
        return self.unit_params * width

    def saves_params_at(self, width: int) -> bool:
        """Whether ``width`` holds fewer parameters than the full group (a factorisation can hold more)."""
        full = self.full_rank if self.kind == "adaln" else self.width
        return width >= full or self.params_at(width) < self.params_at(full)

    def unit_macs(self, query_tokens: int, key_tokens: int) -> int:
        """Multiply-accumulates of the projections that one unit of width costs per sample and call, with
        ``query_tokens`` rows (FFN: its tokens) and ``key_tokens`` key/value rows. The attention products are not
        per group: both run at the wider of an attention's QK and VO widths (``slimdiff.runtime.attention.attend`` pads the
        narrower), ``attention_pairs`` per unit of that width. Biases and softmax are not counted. Joint layouts
        count from the tokens of every stream (``slimdiff.scoring.influence.unit_macs_of``)."""
        if self.kind.startswith("qk"):
            return self.heads * (query_tokens * self.in_features + key_tokens * self.out_features)
        if self.kind.startswith("vo"):
            return self.heads * (key_tokens * self.in_features + query_tokens * self.out_features)
        if self.kind == "adaln":
            return self.in_features + self.out_features  # once per sample and call, not per token
        up_rows = 2 if self.gated else 1
        return query_tokens * (up_rows * self.in_features + self.out_features)


def intact(group: ModuleGroup, note: str) -> ModuleGroup:
    """``group`` reported but left intact, with the reason."""
    return replace(group, compressible=False, note=note)


def attention_groups(block_path: str, attn_name: str, attn: nn.Module) -> list[ModuleGroup]:
    """QK and VO of a diffusers ``Attention`` (self or cross; no added key/value projections)."""
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
    vo_ok, vo_note = True, ""
    if grouped_kv:
        vo_ok, vo_note = False, "grouped key/value heads; VO left intact"
    return [
        ModuleGroup(f"{path}.qk", f"qk_{side}", block_path, path, heads, qk_width, to_q.in_features,
                    to_k.in_features, to_q.bias is not None, compressible=qk_ok, note=qk_note),
        ModuleGroup(f"{path}.vo", f"vo_{side}", block_path, path, heads, v_width, to_v.in_features,
                    to_out.out_features, to_v.bias is not None, compressible=vo_ok, note=vo_note),
    ]


def ffn_group(block_path: str, ff: nn.Module, name: str = "ff") -> ModuleGroup:
    """A diffusers ``FeedForward`` (``net[0]`` activation with ``proj``, ``net[2]`` down projection)."""
    path = f"{block_path}.{name}"
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


def linear_dims(module: nn.Module) -> tuple[int, int, int]:
    """(in, out, rank) of a modulation linear: an ``nn.Linear`` (rank = its smaller dim) or a ``LowRankLinear``."""
    rank = getattr(module, "rank", None)
    if rank is not None:
        return int(module.in_features), int(module.out_features), int(rank)
    return int(module.in_features), int(module.out_features), min(int(module.in_features), int(module.out_features))


def modulation_group(block: str, path: str, module: nn.Module, site: str, note: str = "") -> ModuleGroup:
    """An adaLN modulation linear at ``path`` (``Linear(d_c -> k d)`` of silu(conditioning)), reading capture ``site``
    (one site for every modulation linear of a model that feeds all of them the same embedding)."""
    d_in, d_out, rank = linear_dims(module)
    ok = not note
    return ModuleGroup(f"{path}", "adaln", block, path, 1, rank, d_in, d_out, False, compressible=ok, note=note, sites=(site,))


def joint_attention_groups(block_path: str, attn_name: str, attn: nn.Module, qk_note: str = "") -> list[ModuleGroup]:
    """QK and VO of a joint attention (SD3 ``Attention`` with added key/value projections, Flux ``FluxAttention``):
    one softmax over image tokens (``to_q/k/v``) and text tokens (``add_q/k/v_proj``), outputs split back through
    ``to_out[0]`` and ``to_add_out`` (absent where the text stream ends: ``context_pre_only``). A head's width is
    shared by both streams, so each decomposition stacks them (method.md §6). ``qk_note`` leaves QK intact
    (q/k normalisation or rotary embedding between projection and dot product)."""
    path = f"{block_path}.{attn_name}"
    heads = int(attn.heads)
    image_site, text_site = f"{path}.to_q", f"{path}.add_q_proj"
    query, key, value = ("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj")
    to_add_out = getattr(attn, "to_add_out", None)
    out = ("to_out.0", "to_add_out") if to_add_out is not None else ("to_out.0",)
    linears = {name: attn.get_submodule(name) for name in (*query, *key, *value, *out)}
    qk_width = linears["to_q"].out_features // heads
    v_width = linears["to_v"].out_features // heads
    if linears["add_q_proj"].out_features != linears["to_q"].out_features or linears["add_v_proj"].out_features != linears["to_v"].out_features:
        raise ValueError(f"{path}: image and text projections have different widths; not a joint attention slimdiff wrote")

    def rows(names: tuple[str, ...]) -> int:  # inputs (+ bias) summed over streams
        return sum(linears[n].in_features + int(linears[n].bias is not None) for n in names)

    q_in = sum(linears[n].in_features for n in query)
    k_in = sum(linears[n].in_features for n in key)
    v_in = sum(linears[n].in_features for n in value)
    out_dims = sum(linears[n].out_features for n in out)
    bias = linears["to_q"].bias is not None
    sites = (image_site, text_site)
    note = qk_note
    if getattr(attn, "fused_projections", False):
        note = "fused q/k/v projections (fuse_qkv_projections); left intact"
    qk = ModuleGroup(f"{path}.qk", "qk_joint", block_path, path, heads, qk_width, q_in, k_in, bias,
                     compressible=not note, note=note, query=query, key=key, sites=sites,
                     stream_in=tuple(linears[n].in_features for n in query), params_per_unit=heads * (rows(query) + rows(key)))
    vo_note = "fused q/k/v projections (fuse_qkv_projections); left intact" if getattr(attn, "fused_projections", False) else ""
    vo = ModuleGroup(f"{path}.vo", "vo_joint", block_path, path, heads, v_width, v_in, out_dims,
                     linears["to_v"].bias is not None, compressible=not vo_note, note=vo_note, value=value, out=out,
                     sites=sites, stream_in=tuple(linears[n].in_features for n in value),
                     stream_out=tuple(linears[n].out_features for n in out), params_per_unit=heads * (rows(value) + out_dims))
    return [qk, vo]
