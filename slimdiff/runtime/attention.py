"""Slim attention processors: query-key and value head widths that differ, at the original softmax scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SlimAttnProcessor:
    """Scaled dot-product attention whose query-key head width may differ from the value head width.

    It keeps the uncompressed model's softmax scale ``1/sqrt(original head_dim)``; stock diffusers
    attention would rescale by the new, smaller width.
    """

    def __init__(self, scale: float, logit_noise=None):
        self.scale = float(scale)
        # optional slimdiff.scoring.gains.LogitNoise: additive noise on the unscaled logits, used only to
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


def original_attention_scale(attn: nn.Module) -> float:
    """The softmax scale of the uncompressed attention: a slim processor's, else the attention's own
    ``scale`` (1/sqrt(head dim), or 1 for ``scale_qk=False``), which diffusers' processors apply."""
    processor = getattr(attn, "processor", None)
    if isinstance(processor, SlimAttnProcessor):
        return processor.scale
    if hasattr(attn, "scale"):
        return float(attn.scale)
    return float(attn.head_dim) ** -0.5  # FluxAttention: the default SDPA scale of its query head width
