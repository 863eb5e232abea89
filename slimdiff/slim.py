"""Slim modules: turn decompositions into an ordinary, narrower dense denoiser.

The adapter between the math (``slimdiff.decompose``), the statistics (``slimdiff.capture``) and
diffusers modules. ``resize_group`` changes a group's structure (empty narrower linears, the slim
attention processor); ``decompose`` fills them with the closed-form weights. ``load`` reuses
``resize_group`` to rebuild the structure before weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimdiff.capture import Capture, group_input_sites
from slimdiff.decompose import DEFAULT_REG, FFNDecomposition, QKDecomposition, VODecomposition, decompose_ffn, decompose_qk, decompose_vo
from slimdiff.device import linalg_device, module_device
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
        if self.logit_noise is not None:
            hidden_states = self._attend_with_logit_noise(query, key, value, attention_mask)
        else:
            hidden_states = attend(query, key, value, attention_mask, self.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * value.shape[-1])
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


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


def _empty_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=like.weight.device, dtype=like.weight.dtype)


def original_attention_scale(attn: nn.Module) -> float:
    """The softmax scale of the uncompressed attention: a slim processor's, else the attention's own
    ``scale`` (1/sqrt(head dim), or 1 for ``scale_qk=False``), which diffusers' processors apply."""
    processor = getattr(attn, "processor", None)
    if isinstance(processor, SlimAttnProcessor):
        return processor.scale
    return float(attn.scale)


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
    module.set_processor(SlimAttnProcessor(scale))


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


def _decompose_group(denoiser: nn.Module, group: ModuleGroup, capture: Capture, reg: float) -> Decomposition:
    where = linalg_device(module_device(denoiser))
    module = denoiser.get_submodule(group.path)
    x_site, y_site = group_input_sites(group)
    if group.kind == "ffn":
        return decompose_ffn(_x_w(module.net[2], where)[: group.width], capture.second_moment(x_site).to(where), reg)
    if group.kind.startswith("qk"):
        aug_q, aug_k = module.to_q.bias is not None, module.to_k.bias is not None
        cov_x = capture.second_moment(x_site, augment=aug_q).to(where)
        cov_y = cov_x if (y_site == x_site and aug_k == aug_q) else capture.second_moment(y_site, augment=aug_k).to(where)
        return decompose_qk(_x_w(module.to_q, where), _x_w(module.to_k, where), cov_x, cov_y, group.heads, reg)
    cov_y = capture.second_moment(y_site, augment=module.to_v.bias is not None).to(where)
    w_out = module.to_out[0].weight.detach().to(where, torch.float64).T
    return decompose_vo(_x_w(module.to_v, where), w_out, cov_y, group.heads, reg)


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


def _assign_weight_keep_bias(linear: nn.Linear, w: Tensor, bias: Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(w.T)
        if bias is not None:
            linear.bias.copy_(bias)


def decompose(denoiser: nn.Module, capture: Capture, widths: Mapping[str, int], reg: float = DEFAULT_REG,
              progress: bool = False) -> list[GroupResult]:
    """Compress ``denoiser`` in place to the given per-group ``widths`` (group name -> width).

    Every group named is decomposed from the capture of the uncompressed model and replaced by
    narrower dense linears; groups not named stay as they are.
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
        decomposition = decompose_group(denoiser, group, capture, reg)
        results.append(apply_decomposition(denoiser, group, decomposition, width))
    return results
