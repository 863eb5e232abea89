"""Builds the Flux-style reference model's components from a plain config (issue 26).

A `FluxPipeline` in diffusers' layout: a `FluxTransformer2DModel` (double- and single-stream blocks, 3-axis RoPE,
RMS-normed q/k, adaLN modulation, as FLUX.1), a small `CLIPTextModel` whose pooled output feeds the adaLN
(`pooled_projections`), a small `T5EncoderModel` whose token states are the joint-attention text stream
(`encoder_hidden_states`), a two-level `AutoencoderKL` (32 px images -> 16x16 latents -> 8x8 = 64 packed tokens)
and `FlowMatchEulerDiscreteScheduler`. Both tokenizers are written by the project from the caption grammar.

Pure helpers for the rectified-flow objective (`flow_matching_pair`, `logit_normal_sigmas`) and the packing of
latents into tokens (`pack_latents`, `latent_token_ids`: the pipeline's own static methods) live here too, so the
training loop and the tests share them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from slimdiff.reference.data import grammar_words
from slimdiff.reference.model import ReferenceConfig, VaeConfig
from slimdiff.reference.tokenizer import build_tokenizer

T5_PAD, T5_EOS, T5_UNK, T5_SPACE = "<pad>", "</s>", "<unk>", "\u2581"


@dataclass
class FluxVaeConfig(VaeConfig):
    """Two levels: x2 downsampling, so a 32 px image gives a 16x16 latent and 8x8 = 64 packed tokens."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])


@dataclass
class ClipConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    model_max_length: int = 24


@dataclass
class T5Config:
    d_model: int = 128
    d_kv: int = 32
    num_heads: int = 4
    d_ff: int = 512
    num_layers: int = 2
    relative_attention_num_buckets: int = 16
    relative_attention_max_distance: int = 32
    # The pipeline pads T5 prompts to its `max_sequence_length` (default 512): call it with this value.
    model_max_length: int = 24


@dataclass
class TransformerConfig:
    num_layers: int = 2  # double-stream blocks (FLUX.1: 19)
    num_single_layers: int = 4  # single-stream blocks (FLUX.1: 38)
    attention_head_dim: int = 64  # FLUX.1: 128
    num_attention_heads: int = 4  # FLUX.1: 24
    axes_dims_rope: list[int] = field(default_factory=lambda: [16, 24, 24])  # sums to attention_head_dim


@dataclass
class FluxSchedulerConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0


@dataclass
class FluxReferenceConfig:
    image_size: int = 32
    vae: FluxVaeConfig = field(default_factory=FluxVaeConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    t5: T5Config = field(default_factory=T5Config)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    scheduler: FluxSchedulerConfig = field(default_factory=FluxSchedulerConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FluxReferenceConfig":
        """Build from nested dicts (params.yaml's `model` section); unknown keys are errors."""
        parts = {f.name: f.default_factory for f in fields(cls) if f.name != "image_size"}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in parts:
                part = parts[key]
                known = {f.name for f in fields(part)}
                unknown = set(value) - known
                if unknown:
                    raise ValueError(f"unknown {key} config keys {sorted(unknown)}; known: {sorted(known)}")
                kwargs[key] = part(**value)
            elif key == "image_size":
                kwargs[key] = int(value)
            else:
                raise ValueError(f"unknown model config key {key!r}")
        config = cls(**kwargs)
        t = config.transformer
        if sum(t.axes_dims_rope) != t.attention_head_dim:
            raise ValueError(f"axes_dims_rope {t.axes_dims_rope} must sum to attention_head_dim {t.attention_head_dim}")
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def image_tokens(self) -> int:
        """Packed tokens per image at the native resolution (2x2 latent patches)."""
        return (self.latent_size // 2) ** 2

    def vae_reference_config(self) -> ReferenceConfig:
        """The UNet reference's config type with this VAE, so `train.train_vae` trains it unchanged."""
        return ReferenceConfig(image_size=self.image_size, vae=VaeConfig(**asdict(self.vae)))

    def sampler_defaults(self) -> dict[str, Any]:
        """Call arguments every `FluxPipeline` call of this model needs (the pipeline's defaults are 1024 px and
        512 T5 tokens; this model was trained at `image_size` px with `t5.model_max_length` tokens)."""
        return {"height": self.image_size, "width": self.image_size, "max_sequence_length": self.t5.model_max_length}


# ---------------------------------------------------------------------------------------- tokenizers


def build_t5_tokenizer(model_max_length: int = 24):
    """A `T5TokenizerFast` (T5's Metaspace pre-tokenizer, Unigram model, `</s>` appended) written from the caption
    grammar: every grammar word is one piece (`\u2581word`); other text falls back to single characters.
    `<pad>` = 0, `</s>` = 1, `<unk>` = 2, no sentinel tokens."""
    import string

    from transformers import T5TokenizerFast

    words = sorted(set(grammar_words()))
    chars = [c for c in string.ascii_lowercase + string.digits + string.punctuation]
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, -2.0)]
    vocab += [(T5_SPACE + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_clip_tokenizer(model_max_length: int = 24):
    """The UNet reference's CLIP BPE over the grammar (`slimdiff.reference.tokenizer`)."""
    return build_tokenizer(model_max_length)


# ------------------------------------------------------------------------------------------ models


def build_vae(config: FluxReferenceConfig):
    """The two-level `AutoencoderKL` (built exactly as the UNet reference's VAE, with this config)."""
    from slimdiff.reference.model import build_vae as build_reference_vae

    return build_reference_vae(config.vae_reference_config())


def build_clip(config: FluxReferenceConfig, tokenizer) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    c = config.clip
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            max_position_embeddings=c.model_max_length,
            projection_dim=c.hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_t5(config: FluxReferenceConfig, tokenizer) -> nn.Module:
    """A T5 v1.1-style encoder (gated GELU, relative position buckets, no dropout)."""
    from transformers import T5Config as HfT5Config
    from transformers import T5EncoderModel

    t = config.t5
    return T5EncoderModel(
        HfT5Config(
            vocab_size=len(tokenizer),
            d_model=t.d_model,
            d_kv=t.d_kv,
            d_ff=t.d_ff,
            num_layers=t.num_layers,
            num_heads=t.num_heads,
            relative_attention_num_buckets=t.relative_attention_num_buckets,
            relative_attention_max_distance=t.relative_attention_max_distance,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
    )


def build_transformer(config: FluxReferenceConfig) -> nn.Module:
    """`FluxTransformer2DModel` without a guidance embedding (FLUX.1-schnell layout; CFG is done by the pipeline's
    `true_cfg_scale`), initialised for training from scratch (`init_for_training`)."""
    from diffusers import FluxTransformer2DModel

    t = config.transformer
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * config.vae.latent_channels,
        num_layers=t.num_layers,
        num_single_layers=t.num_single_layers,
        attention_head_dim=t.attention_head_dim,
        num_attention_heads=t.num_attention_heads,
        joint_attention_dim=config.t5.d_model,
        pooled_projection_dim=config.clip.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=tuple(t.axes_dims_rope),
    )
    init_for_training(model)
    return model


def adaln_linears(transformer: nn.Module) -> dict[str, nn.Linear]:
    """Every adaLN modulation linear (blocks' `norm1`, `norm1_context`, `norm` and the final `norm_out`) by name."""
    out = {}
    for name, module in transformer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("norm1", "norm1_context", "norm", "norm_out") and isinstance(getattr(module, "linear", None), nn.Linear):
            out[f"{name}.linear"] = module.linear
    return out


@torch.no_grad()
def init_for_training(transformer: nn.Module) -> None:
    """DiT's initialisation (Peebles & Xie 2023): Xavier-uniform linears with zero bias, N(0, 0.02) timestep and
    pooled-text embedding MLPs, and *adaLN-Zero*: zero modulation linears and output projection, so every block
    starts as the identity and the model's first prediction is 0. diffusers' own init targets loading pretrained
    weights; this one trains."""
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for module in transformer.time_text_embed.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
    for linear in adaln_linears(transformer).values():
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
    nn.init.zeros_(transformer.proj_out.weight)
    nn.init.zeros_(transformer.proj_out.bias)


def build_scheduler(config: FluxReferenceConfig):
    """FLUX.1-schnell's sampler: `FlowMatchEulerDiscreteScheduler` with a fixed shift (no resolution-dependent
    shifting: one resolution)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = config.scheduler
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=s.num_train_timesteps, shift=s.shift, use_dynamic_shifting=False
    )


def assemble_pipeline(vae, clip, clip_tokenizer, t5, t5_tokenizer, transformer, scheduler):
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_pipeline(config: FluxReferenceConfig, seed: int = 0):
    """A randomly initialised `FluxPipeline` with the reference architecture (VAE with scaling 1, shift 0)."""
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer(config.clip.model_max_length)
    t5_tokenizer = build_t5_tokenizer(config.t5.model_max_length)
    vae = build_vae(config)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    return assemble_pipeline(
        vae,
        build_clip(config, clip_tokenizer),
        clip_tokenizer,
        build_t5(config, t5_tokenizer),
        t5_tokenizer,
        build_transformer(config),
        build_scheduler(config),
    )


# ------------------------------------------------------------------------------- flow matching, packing


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow as FLUX.1 / `FlowMatchEulerDiscreteScheduler`: x_t = (1 - sigma) x_0 + sigma * eps, and the
    velocity target eps - x_0 (the Euler step x_{t'} = x_t + (sigma' - sigma) v moves along it). `sigma` is (B,)."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training noise levels sigmoid(N(mean, std^2)) (SD3's logit-normal sampling), in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): `FluxPipeline._pack_latents`."""
    from diffusers import FluxPipeline

    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def latent_token_ids(latent_size: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(tokens, 3) RoPE ids (0, row, col) of the packed tokens: `FluxPipeline._prepare_latent_image_ids`."""
    from diffusers import FluxPipeline

    return FluxPipeline._prepare_latent_image_ids(1, latent_size // 2, latent_size // 2, device, dtype)


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per component, and the transformer's compressible units (attention, MLP, adaLN linears)."""
    t = pipe.transformer
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "text_encoder", "text_encoder_2", "vae")}
    units = {kind: sum(p.numel() for m in modules for p in m.parameters()) for kind, modules in compressible_units(t).items()}
    counts.update({f"transformer_{kind}": n for kind, n in units.items()})
    counts["transformer_compressible_share"] = round(sum(units.values()) / counts["transformer"], 4)
    return counts


def compressible_units(transformer: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules a structural compressor resizes, by kind: `attention` (the whole `FluxAttention`: q/k/v and
    output projections, q/k RMSNorm, RoPE, SDPA), `mlp` (double blocks' `ff`, `ff_context`; single blocks'
    `proj_mlp` + `act_mlp` and the fused `proj_out`, which also carries the attention output), `adaln` (the
    modulation linears). Disjoint; everything else (embedders, norms, residual arithmetic, final layer) is not."""
    units: dict[str, list[nn.Module]] = {"attention": [], "mlp": [], "adaln": []}
    for block in transformer.transformer_blocks:
        units["attention"].append(block.attn)
        units["mlp"] += [block.ff, block.ff_context]
        units["adaln"] += [block.norm1.linear, block.norm1_context.linear]
    for block in transformer.single_transformer_blocks:
        units["attention"].append(block.attn)
        units["mlp"] += [block.proj_mlp, block.act_mlp, block.proj_out]
        units["adaln"].append(block.norm.linear)
    return units


def denoiser_inputs(config: FluxReferenceConfig, batch: int, generator: torch.Generator | None = None) -> dict:
    """Random inputs shaped as `FluxPipeline` calls the transformer at the native resolution: packed latent tokens,
    T5 token states padded to `t5.model_max_length`, pooled CLIP output, timestep in [0, 1], RoPE ids."""
    n_text = config.t5.model_max_length
    latents = torch.randn(batch, config.vae.latent_channels, config.latent_size, config.latent_size, generator=generator)
    return {
        "hidden_states": pack_latents(latents),
        "encoder_hidden_states": torch.randn(batch, n_text, config.t5.d_model, generator=generator),
        "pooled_projections": torch.randn(batch, config.clip.hidden_size, generator=generator),
        "timestep": torch.rand(batch, generator=generator),
        "img_ids": latent_token_ids(config.latent_size),
        "txt_ids": torch.zeros(n_text, 3),
    }


@torch.no_grad()
def compressible_latency(transformer: nn.Module, config: FluxReferenceConfig, batch: int = 1, repeats: int = 20,
                         warmup: int = 3) -> dict[str, Any]:
    """Share of the transformer's forward wall time spent inside its compressible units (`compressible_units`).

    Measured with forward pre/post hooks that read `time.perf_counter` around every unit (the units are disjoint,
    so their times add up), over `repeats` forwards after `warmup`; the whole forward is timed around the call.
    A second pass without hooks gives the hook overhead. Times are per forward, in milliseconds."""
    import time

    transformer.eval()
    inputs = denoiser_inputs(config, batch, torch.Generator().manual_seed(0))
    for _ in range(warmup):
        transformer(**inputs)
    plain = []
    for _ in range(repeats):
        start = time.perf_counter()
        transformer(**inputs)
        plain.append(time.perf_counter() - start)
    spent = {kind: 0.0 for kind in ("attention", "mlp", "adaln")}
    starts: dict[int, float] = {}
    handles = []
    for kind, modules in compressible_units(transformer).items():
        for module in modules:
            def pre(m, args, _id=id(module)):
                starts[_id] = time.perf_counter()

            def post(m, args, out, _id=id(module), _kind=kind):
                spent[_kind] += time.perf_counter() - starts.pop(_id)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        hooked = []
        for _ in range(repeats):
            start = time.perf_counter()
            transformer(**inputs)
            hooked.append(time.perf_counter() - start)
    finally:
        for handle in handles:
            handle.remove()
    total = sum(hooked)
    result: dict[str, Any] = {
        "batch": batch,
        "image_tokens": inputs["hidden_states"].shape[1],
        "text_tokens": inputs["encoder_hidden_states"].shape[1],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "forward_ms": round(1000 * total / repeats, 3),
        "forward_ms_without_hooks": round(1000 * sum(plain) / repeats, 3),
    }
    for kind, seconds in spent.items():
        result[f"{kind}_ms"] = round(1000 * seconds / repeats, 3)
        result[f"{kind}_share"] = round(seconds / total, 4)
    result["compressible_share"] = round(sum(spent.values()) / total, 4)
    return result
