"""Slim modules: turn decompositions into an ordinary, narrower dense denoiser.

The adapter between the math (``slimdiff.decompose``), the statistics (``slimdiff.capture``) and
diffusers modules. ``resize_group`` changes a group's structure (empty narrower linears, the slim
attention processor); ``decompose`` fills them with the closed-form weights. ``load`` reuses
``resize_group`` to rebuild the structure before weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimdiff.capture import Capture, group_input_sites, group_sites
from slimdiff.decompose import (DEFAULT_REG, FFNDecomposition, QKDecomposition, VODecomposition, decompose_ffn, decompose_lowrank,
                                decompose_qk, decompose_vo)
from slimdiff.device import linalg_device, module_device
from slimdiff.arch.flux import single_block_columns
from slimdiff.groups import ModuleGroup, find_groups


class SlimAttnProcessor:
    """Scaled dot-product attention whose query-key head width may differ from the value head width.

    It keeps the uncompressed model's softmax scale ``1/sqrt(original head_dim)``; stock diffusers
    attention would rescale by the new, smaller width.
    """

    def __init__(self, scale: float, logit_noise=None):
        self.scale = float(scale)
        # optional slimdiff.influence.LogitNoise: additive noise on the unscaled logits, used only to
        # measure propagation gains, never in a compressed model
        self.logit_noise = logit_noise

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        heads = attn.heads
        query = query.view(batch_size, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        key = key.view(batch_size, -1, heads, key.shape[-1] // heads).transpose(1, 2)
        value = value.view(batch_size, -1, heads, value.shape[-1] // heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = self._attend(query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


    def _attend(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(batch, heads, tokens, width) attention at the original scale, with the logit noise when measuring gains."""
        if self.logit_noise is not None:
            return self._attend_with_logit_noise(query, key, value, attention_mask)
        return attend(query, key, value, attention_mask, self.scale)

    def _attend_with_logit_noise(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Attention with noise on the logits, in query chunks (softmax is per query row, so chunks are exact)."""
        noise = self.logit_noise
        std = noise.sigma(query, key) * self.scale
        rows = noise.query_chunk(query, key)
        outputs = []
        for start in range(0, query.shape[-2], rows):
            chunk = query[:, :, start:start + rows]
            bias = noise.draw(chunk, key, std)
            if attention_mask is not None:
                bias = bias + (attention_mask if attention_mask.shape[-2] == 1 else attention_mask[..., start:start + rows, :])
            outputs.append(F.scaled_dot_product_attention(chunk, key, value, attn_mask=bias, dropout_p=0.0, is_causal=False,
                                                          scale=self.scale))
        return torch.cat(outputs, dim=2)


def attend(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scale: float) -> Tensor:
    """Scaled dot-product attention for per-head widths that may differ between query-key and value.

    Fused kernels (flash attention on CUDA and on the CPU) need equal head widths; unequal ones fall back to
    the math kernel, which materialises every logit (x4 slower at SD 1.5's 4096 tokens on the CPU). Zero
    columns appended to the narrower side keep the result exact: they add nothing to the logits, and the
    extra value columns are sliced off.
    """
    qk_width, v_width = query.shape[-1], value.shape[-1]
    if qk_width != v_width:
        width = max(qk_width, v_width)
        query, key = F.pad(query, (0, width - qk_width)), F.pad(key, (0, width - qk_width))
        value = F.pad(value, (0, width - v_width))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale)
    return out[..., :v_width] if out.shape[-1] != v_width else out


class SlimJointAttnProcessor(SlimAttnProcessor):
    """SD3's joint attention (diffusers ``JointAttnProcessor2_0``) with query-key and value head widths that may
    differ, at the uncompressed model's softmax scale."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        batch_size, image_tokens = hidden_states.shape[0], hidden_states.shape[1]
        heads = attn.heads

        def split(x: Tensor) -> Tensor:
            return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            context_query = split(attn.add_q_proj(encoder_hidden_states))
            context_key = split(attn.add_k_proj(encoder_hidden_states))
            context_value = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                context_query = attn.norm_added_q(context_query)
            if attn.norm_added_k is not None:
                context_key = attn.norm_added_k(context_key)
            query = torch.cat([query, context_query], dim=2)
            key = torch.cat([key, context_key], dim=2)
            value = torch.cat([value, context_value], dim=2)
        out = self._attend(query, key, value, attention_mask)
        out = out.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1]).to(query.dtype)
        image, context = out[:, :image_tokens], out[:, image_tokens:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return image, context


class SlimFluxAttnProcessor(SlimAttnProcessor):
    """Flux's attention (diffusers ``FluxAttnProcessor``: double blocks with a text stream, single blocks without an
    output projection) with a value head width that may differ from the query-key one."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb=None) -> Tensor:
        from diffusers.models.embeddings import apply_rotary_emb

        heads = attn.heads
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (heads, -1)))
        value = attn.to_v(hidden_states).unflatten(-1, (heads, -1))
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            context_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
            context_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (heads, -1)))
            context_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (heads, -1))
            query = torch.cat([context_query, query], dim=1)
            key = torch.cat([context_key, key], dim=1)
            value = torch.cat([context_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        context, image = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(context.contiguous())


def slim_processor_for(attn: nn.Module, scale: float, logit_noise=None) -> SlimAttnProcessor:
    """The slim processor that runs ``attn``'s own layout: Flux attention, SD3 joint attention, or diffusers ``Attention``."""
    if type(attn).__name__ == "FluxAttention":
        return SlimFluxAttnProcessor(scale, logit_noise)
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        return SlimJointAttnProcessor(scale, logit_noise)
    return SlimAttnProcessor(scale, logit_noise)


class LowRankLinear(nn.Module):
    """``up(down(x))``: a linear factorised at ``rank`` (adaLN modulation). ``bias`` is the second factor's."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _empty_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def original_attention_scale(attn: nn.Module) -> float:
    """The softmax scale of the uncompressed attention: a slim processor's, else the attention's own
    ``scale`` (1/sqrt(head dim), or 1 for ``scale_qk=False``), which diffusers' processors apply."""
    processor = getattr(attn, "processor", None)
    if isinstance(processor, SlimAttnProcessor):
        return processor.scale
    if hasattr(attn, "scale"):
        return float(attn.scale)
    return float(attn.head_dim) ** -0.5  # FluxAttention: the default SDPA scale of its query head width


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


def _x_w(linear: nn.Linear, device: torch.device | None = None) -> Tensor:
    """Weight in X W layout (float64, on ``device``, default the weight's), with the bias as an extra input row when present."""
    device = linear.weight.device if device is None else device
    weight = linear.weight.detach().to(device, torch.float64).T
    if linear.bias is None:
        return weight
    return torch.cat([weight, linear.bias.detach().to(device, torch.float64)[None]], dim=0)


def _assign(linear: nn.Linear, w_aug: Tensor) -> None:
    """Load an X W layout weight (bias as last row when the linear has one) into ``linear``."""
    with torch.no_grad():
        if linear.bias is None:
            linear.weight.copy_(w_aug.T)
        else:
            linear.weight.copy_(w_aug[:-1].T)
            linear.bias.copy_(w_aug[-1])


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


def recorded_decomposition(store, denoiser: nn.Module, group: ModuleGroup, capture: Capture) -> Decomposition | None:
    """``group``'s decomposition as the score stage recorded it in ``store`` (a ``FactorisationStore``), on the
    model's linear-algebra device, or None when it holds none."""
    where = linalg_device(module_device(denoiser))
    if group.kind in ("ffn", "ffn_single") and group in store:
        cov_hidden, _ = group_statistics(denoiser, group, capture, device=where)
        return store.get(group, *reversed(ffn_operands(denoiser, group, cov_hidden, where)), device=where)
    return store.get(group, device=where)


@dataclass(frozen=True)
class GroupResult:
    """What one group became: its width before and after, and the predicted output error."""

    name: str
    kind: str
    width_before: int
    width_after: int
    params_before: int
    params_after: int
    predicted_error: float
    method: str  # how the decomposition was obtained at this width (whitening or selection, and any fallback)


def apply_decomposition(denoiser: nn.Module, group: ModuleGroup, decomposition: Decomposition, width: int) -> GroupResult:
    """Resize ``group`` to ``width`` and load the decomposition's weights, cast to the model's dtype."""
    module = denoiser.get_submodule(group.path)
    if group.kind in ("qk_joint", "vo_joint", "vo_single", "ffn_single", "adaln"):
        error = _apply_named(denoiser, group, decomposition, width)
        return GroupResult(group.name, group.kind, group.width, width, group.params_at(group.width), group.params_at(width),
                           error, decomposition.method_at(width))
    if group.kind == "ffn":
        keep, w_down = decomposition.weights(width)
        up = module.net[0].proj
        rows = torch.cat([keep, keep + group.width]) if group.gated else keep
        up_w = _x_w(up)[:, rows.to(up.weight.device)]  # a row selection: stays on the model's device
        bias_down = None if module.net[2].bias is None else module.net[2].bias.detach().clone()
        error = decomposition.error(width)
        resize_group(denoiser, group, width)
        _assign(module.net[0].proj, up_w)
        _assign_weight_keep_bias(module.net[2], w_down, bias_down)
    elif group.kind.startswith("qk"):
        w_q, w_k = decomposition.weights(width)
        error = float(decomposition.tail[width])
        resize_group(denoiser, group, width)
        _assign(module.to_q, w_q)
        _assign(module.to_k, w_k)
    else:
        w_v, w_o = decomposition.weights(width)
        bias_out = None if module.to_out[0].bias is None else module.to_out[0].bias.detach().clone()
        error = float(decomposition.tail[width])
        resize_group(denoiser, group, width)
        _assign(module.to_v, w_v)
        _assign_weight_keep_bias(module.to_out[0], w_o, bias_out)
    return GroupResult(group.name, group.kind, group.width, width, group.params_at(group.width), group.params_at(width), error,
                       decomposition.method_at(width))


def _split_rows(w: Tensor, module: nn.Module, names: Sequence[str]) -> list[Tensor]:
    """Rows of a stacked X W weight back to each stream's linear (its inputs, then its bias row)."""
    sizes = [module.get_submodule(n).in_features + int(module.get_submodule(n).bias is not None) for n in names]
    return list(torch.split(w, sizes, dim=0))


def _apply_named(denoiser: nn.Module, group: ModuleGroup, decomposition: Decomposition, width: int) -> float:
    """``apply_decomposition`` for the layouts that name their linears; returns the predicted error."""
    module = denoiser.get_submodule(group.path)
    if group.kind == "adaln":
        error = float(decomposition.tail[min(width, decomposition.head_dim)])
        if width >= group.full_rank:
            return error  # the original linear stays
        first, second = decomposition.weights(width)
        bias = None if module.bias is None else module.bias.detach().clone()
        resize_group(denoiser, group, width)
        factorised = denoiser.get_submodule(group.path)
        _assign(factorised.down, first)
        _assign_weight_keep_bias(factorised.up, second, bias)
        return error
    if group.kind == "qk_joint":
        w_q, w_k = decomposition.weights(width)
        q_parts, k_parts = _split_rows(w_q, module, group.query), _split_rows(w_k, module, group.key)
        resize_group(denoiser, group, width)
        for name, part in [*zip(group.query, q_parts), *zip(group.key, k_parts)]:
            _assign(module.get_submodule(name), part)
        return float(decomposition.tail[width])
    if group.kind == "vo_joint":
        w_v, w_o = decomposition.weights(width)
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
        resize_group(denoiser, group, width)
        _assign(module.get_submodule(group.value[0]), w_v)
        new_out = torch.cat([w_o.T.to(old_out), old_out[:, attention:]], dim=1)
    else:
        keep, w_down = decomposition.weights(width)
        up = module.get_submodule(group.up)
        up_w = _x_w(up)[:, keep.to(up.weight.device)]  # a row selection: stays on the model's device
        error = decomposition.error(width)
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
    ``slimdiff.factorisations.FactorisationStore`` the scoring filled), a group's recorded factorisation is applied
    instead of being computed again.
    """
    from tqdm.auto import tqdm

    groups = {g.name: g for g in find_groups(denoiser)}
    unknown = sorted(set(widths) - set(groups))
    if unknown:
        raise KeyError(f"width plan names groups the denoiser does not have: {unknown[:3]}")
    results = []
    for name in tqdm(list(widths), desc="decompose", unit="group", disable=not progress):
        group = groups[name]
        width = int(widths[name])
        if not 1 <= width <= group.width:
            raise ValueError(f"width for {name} must be in 1..{group.width}, got {width}")
        decomposition = recorded_decomposition(store, denoiser, group, capture) if store is not None else None
        if decomposition is None:
            decomposition = decompose_group(denoiser, group, capture, reg)
        results.append(apply_decomposition(denoiser, group, decomposition, width))
    return results
