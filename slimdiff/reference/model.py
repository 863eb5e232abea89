"""Builds the reference model's diffusers/transformers components from a plain config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from slimdiff.reference.tokenizer import build_tokenizer


@dataclass
class VaeConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32


@dataclass
class TextConfig:
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    intermediate_size: int = 512
    model_max_length: int = 24


@dataclass
class UnetConfig:
    block_out_channels: list[int] = field(default_factory=lambda: [64, 128])
    layers_per_block: int = 1
    transformer_layers_per_block: int = 2
    # diffusers' legacy name: the number of attention heads per level (as in SD 1.x).
    attention_head_dim: list[int] = field(default_factory=lambda: [2, 4])
    norm_num_groups: int = 32


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"


@dataclass
class ReferenceConfig:
    image_size: int = 32
    vae: VaeConfig = field(default_factory=VaeConfig)
    text: TextConfig = field(default_factory=TextConfig)
    unet: UnetConfig = field(default_factory=UnetConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ReferenceConfig":
        """Build from nested dicts (e.g. params.yaml's `model` section); unknown keys are errors."""
        parts = {"vae": VaeConfig, "text": TextConfig, "unet": UnetConfig, "scheduler": SchedulerConfig}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if key in parts:
                known = {f.name for f in fields(parts[key])}
                unknown = set(value) - known
                if unknown:
                    raise ValueError(f"unknown {key} config keys {sorted(unknown)}; known: {sorted(known)}")
                kwargs[key] = parts[key](**value)
            elif key == "image_size":
                kwargs[key] = int(value)
            else:
                raise ValueError(f"unknown model config key {key!r}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.vae.block_out_channels) - 1)


def build_vae(config: ReferenceConfig) -> AutoencoderKL:
    n = len(config.vae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(config.vae.block_out_channels),
        layers_per_block=config.vae.layers_per_block,
        latent_channels=config.vae.latent_channels,
        norm_num_groups=config.vae.norm_num_groups,
        sample_size=config.image_size,
    )


def build_text_encoder(config: ReferenceConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    t = config.text
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            max_position_embeddings=t.model_max_length,
            projection_dim=t.hidden_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet(config: ReferenceConfig) -> UNet2DConditionModel:
    u = config.unet
    n = len(u.block_out_channels)
    return UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.vae.latent_channels,
        out_channels=config.vae.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        transformer_layers_per_block=u.transformer_layers_per_block,
        attention_head_dim=tuple(u.attention_head_dim),
        cross_attention_dim=config.text.hidden_size,
        norm_num_groups=u.norm_num_groups,
    )


def build_scheduler(config: ReferenceConfig) -> DPMSolverMultistepScheduler:
    """The deployment sampler (DPM-Solver++ 2M); training uses the same betas and prediction type."""
    s = config.scheduler
    return DPMSolverMultistepScheduler(
        num_train_timesteps=s.num_train_timesteps,
        beta_schedule=s.beta_schedule,
        prediction_type=s.prediction_type,
        steps_offset=1,
    )


def build_pipeline(config: ReferenceConfig) -> StableDiffusionPipeline:
    """A randomly initialised `StableDiffusionPipeline` with the reference architecture."""
    tokenizer = build_tokenizer(config.text.model_max_length)
    return assemble_pipeline(
        build_vae(config), build_text_encoder(config, tokenizer), tokenizer, build_unet(config), build_scheduler(config)
    )


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def transformer_share(unet: torch.nn.Module) -> tuple[int, int]:
    """(parameters inside `BasicTransformerBlock`s, all parameters) of a UNet."""
    from diffusers.models.attention import BasicTransformerBlock

    inside = sum(
        p.numel() for m in unet.modules() if isinstance(m, BasicTransformerBlock) for p in m.parameters()
    )
    return inside, sum(p.numel() for p in unet.parameters())
