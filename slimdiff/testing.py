"""Tiny seeded diffusers models built from config, for tests and benchmarks (no network, no weights).

Three denoiser families go through one test mixin: an SD-1.x-style UNet (GEGLU, per-level head
counts), an SD-2-style UNet (linear projections, head dim 64) and a PixArt-style transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# Stable Diffusion 1.5's exact UNet configuration (benchmarks build it with seeded random weights).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)

TINY_CROSS_DIM = 32
TINY_TEXT_LEN = 16
TINY_PROMPT_TOKENS = 48


def char_tokenizer(model_max_length: int = TINY_PROMPT_TOKENS):
    """A CLIPTokenizer over single characters, built locally (no hub files)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length,
                         bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                         unk_token="<|endoftext|>")


def tiny_unet_sd1(seed: int = 0):
    """SD-1.x style: GEGLU feed-forward, per-level head counts (``attention_head_dim`` as a list), conv projections."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_DIM, attention_head_dim=(2, 4),
    ).eval()


def tiny_unet_sd2(seed: int = 0):
    """SD-2 style: linear projections in/out of the transformer, head dim 64 (64 and 128 channels)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_DIM, attention_head_dim=(1, 2), use_linear_projection=True,
    ).eval()


TINY_SDXL_POOLED = 16  # the second text encoder's projection width (SDXL: 1280)
TINY_SDXL_TIME_DIM = 8  # per time id (SDXL: 256); six time ids: original size, crop corner, target size


def tiny_unet_sdxl(seed: int = 0):
    """SDXL style: ``addition_embed_type="text_time"`` (pooled text and size ids added to the time embedding),
    linear projections, no attention at the first level, two transformer blocks per attention at the second."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_CROSS_DIM, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TINY_SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=TINY_SDXL_POOLED + 6 * TINY_SDXL_TIME_DIM,
    ).eval()


def tiny_pixart(seed: int = 0):
    """PixArt-style DiT: GELU(tanh) feed-forward, biased q/k/v, cross-attention to caption tokens."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=8, num_layers=2, num_attention_heads=3, attention_head_dim=8, in_channels=4,
        out_channels=4, patch_size=2, cross_attention_dim=24, caption_channels=TINY_CROSS_DIM,
        norm_type="ada_norm_single", norm_num_groups=8,
    ).eval()


def cast(inputs, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """Inputs (nested dicts of tensors) on ``device``, floating-point tensors in ``dtype``."""
    if isinstance(inputs, dict):
        return {k: cast(v, dtype, device) for k, v in inputs.items()}
    if torch.is_tensor(inputs):
        return inputs.to(device, dtype) if inputs.is_floating_point() else inputs.to(device)
    return inputs


@dataclass(frozen=True)
class TinyDenoiser:
    """A tiny denoiser factory and how to call it with random inputs."""

    name: str
    build: Callable[[int], nn.Module]

    def inputs(self, model: nn.Module, batch: int, timestep: int, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        sample = torch.randn(batch, 4, 8, 8, generator=generator)
        text = torch.randn(batch, TINY_TEXT_LEN, TINY_CROSS_DIM, generator=generator)
        args = {"timestep": torch.full((batch,), timestep), "encoder_hidden_states": text}
        if self.name == "pixart":
            args["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
            return {"hidden_states": sample, **args}
        if self.name == "unet_sdxl":
            args["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, TINY_SDXL_POOLED, generator=generator),
                                         "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]).repeat(batch, 1)}
        return {"sample": sample, **args}

    def output(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]


TINY_DENOISERS = {
    "unet_sd1": TinyDenoiser("unet_sd1", tiny_unet_sd1),
    "unet_sd2": TinyDenoiser("unet_sd2", tiny_unet_sd2),
    "pixart": TinyDenoiser("pixart", tiny_pixart),
    "unet_sdxl": TinyDenoiser("unet_sdxl", tiny_unet_sdxl),
}


def tiny_sd_pipeline(seed: int = 0):
    """A complete tiny StableDiffusionPipeline (16x16 images, 8x8 latents), built from config."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_CROSS_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TINY_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=tiny_unet_sd1(seed + 1),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0):
    """A complete tiny StableDiffusionXLPipeline (16x16 images): two text encoders (the second with a projection,
    whose pooled output conditions the UNet), the ``text_time`` UNet, built from config."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = char_tokenizer(), char_tokenizer()
    torch.manual_seed(seed)

    def text_config(hidden: int, **extra) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=TINY_PROMPT_TOKENS, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)

    # the UNet's cross-attention sees both encoders' hidden states concatenated: 16 + 16 = TINY_CROSS_DIM
    text_encoder = CLIPTextModel(text_config(TINY_CROSS_DIM // 2)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(text_config(TINY_CROSS_DIM // 2, projection_dim=TINY_SDXL_POOLED)).eval()
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
    ).eval()
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=tiny_unet_sdxl(seed + 1), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_PROMPTS = [
    f"a {size} {colour} {shape} at the {place}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square")
    for place in ("top left", "bottom right")
]


def make_workspace(root, overrides: dict | None = None):
    """A git+DVC workspace for flow tests: this checkout's ``dvc.yaml``, ``params.yaml`` and ``slimdiff/`` code, a tiny
    pipeline and small prompt files (24 calibration prompts, 4 evaluation prompts, 2 sampler steps).

    ``overrides`` updates sections of ``params.yaml`` (``{"capture": {"checkpoint_every": 12}}``).
    """
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(repo / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(repo / "slimdiff", root / "slimdiff", ignore=shutil.ignore_patterns("__pycache__"))
    tiny_sd_pipeline().save_pretrained(root / "data" / "model")
    prompts = [f"{p} number {i}" for i, p in enumerate(TINY_PROMPTS * 2)]
    (root / "data" / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "data" / "eval.txt").write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update({"path": "data/model", "id": "tiny-sd", "device": "cpu", "dtype": "float32"})
    params["curate"].update({"sources": ["data/prompts.txt"], "n": 12})
    params["sampler"].update({"steps": 2, "guidance": 4.0})
    params["capture"].update({"batch_size": 6})
    params["score"].update({"gain_prompts": 2, "gain_calls": 2})
    params["evaluate"].update({"prompts": "data/eval.txt", "n": 4, "evaluator": None, "latency_repeats": 2})
    params["report"] = {"samples": 2}
    params["gate"] = {"min_image_psnr_db": 0.0}
    params["recompress"] = {"source": "data/model", "cron": "0 3 * * *"}
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run([str(dvc) if dvc.exists() else "dvc", "init", "-q"], cwd=root, check=True,
                   env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    return root
