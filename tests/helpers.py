"""Tiny seeded diffusers models built from config, for tests and benchmarks (no network, no weights).

Three denoiser families go through one test mixin: an SD-1.x-style UNet (GEGLU, per-level head
counts), an SD-2-style UNet (linear projections, head dim 64) and a PixArt-style transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
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
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
    )
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


def stage_workspace(root, pipe, capture_file: bytes) -> dict:
    """A folder where ``python -m slimdiff.pipeline.stages decompose`` can run: ``pipe`` saved as ``model/``, this checkout's
    ``params.yaml`` pointing at it (CPU), and ``capture_file`` (a capture's bytes) as ``outputs/capture.safetensors``.
    The caller writes ``outputs/plan/width_plan.json``. Returns the params."""
    from pathlib import Path

    import yaml

    repo, root = Path(__file__).resolve().parents[1], Path(root)
    pipe.save_pretrained(root / "model")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update({"path": "model", "device": "cpu"})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "outputs" / "plan").mkdir(parents=True)
    (root / "outputs" / "capture.safetensors").write_bytes(capture_file)
    return params


def make_workspace(root, overrides: dict | None = None, family: str = "sd", pipeline=None):
    """A git+DVC workspace for flow tests: this checkout's ``dvc.yaml``, ``params.yaml`` and ``slimdiff/`` code, a tiny
    pipeline (``family``: ``sd`` or ``flux``; or ``pipeline``, of that family, saved as it is) and small prompt files
    (24 calibration prompts, 4 evaluation prompts, 2 sampler steps).

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
    pipelines = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
    if family not in pipelines:
        raise ValueError(f"unknown family {family!r}; valid: {', '.join(pipelines)}")
    (pipeline if pipeline is not None else pipelines[family]()).save_pretrained(root / "data" / "model")
    prompts = [f"{p} number {i}" for i, p in enumerate(TINY_PROMPTS * 2)]
    (root / "data" / "prompts.txt").write_text("\n".join(prompts) + "\n")
    (root / "data" / "eval.txt").write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update({"path": "data/model", "id": f"tiny-{family}", "device": "cpu", "dtype": "float32"})
    params["curate"].update({"sources": ["data/prompts.txt"], "n": 12})
    params["sampler"].update({"steps": 2, "guidance": 4.0})
    if family == "flux":  # the tiny Flux pipeline's default size is 256 px (4096 tokens); 32 px gives 64
        params["sampler"].update({"height": 32, "width": 32})
    params["capture"].update({"batch_size": 6})
    params["score"].update({"gain_prompts": 2, "gain_calls": 2})
    params["evaluate"].update({"prompts": "data/eval.txt", "n": 4, "evaluator": None, "latency_repeats": 2,
                               "samplers": [{"name": "3 steps", "steps": 3}], "held_out_n": 2})
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


TINY_CLIP_L_DIM = 16  # CLIP ViT-L/14 text width and projection (SD3, Flux: 768)

TINY_CLIP_G_DIM = 32  # OpenCLIP bigG text width and projection (SD3: 1280)

TINY_T5_DIM = 64  # T5-XXL v1.1 width (SD3, Flux: 4096); >= the concatenated CLIP widths, as in SD3

TINY_DIT_LATENT_CHANNELS = 16  # SD3 and Flux VAEs: 16 latent channels

TINY_DIT_SAMPLE = 16  # latent side of a default image (32 px; the tiny VAE downsamples by 2)


def t5_char_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` over single characters, built locally (no hub files): the real T5 pipeline (Metaspace
    pre-tokenizer, Unigram model, ``</s>`` appended) with ``<pad>``=0, ``</s>``=1, ``<unk>``=2 and no sentinel tokens."""
    import string

    from transformers import T5TokenizerFast

    chars = [c for c in string.printable if not c.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _tiny_clip_config(tokenizer, hidden: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def _tiny_t5_encoder(tokenizer):
    """T5 v1.1 encoder (gated GELU, relative position buckets) at width ``TINY_T5_DIM``."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=TINY_T5_DIM, d_kv=8, d_ff=2 * TINY_T5_DIM, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )).eval()


def _tiny_dit_vae(scaling_factor: float, shift_factor: float):
    """A two-level ``AutoencoderKL`` with 16 latent channels and no quant convs (as the SD3 and Flux VAEs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=TINY_DIT_LATENT_CHANNELS,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=2 * TINY_DIT_SAMPLE, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling_factor, shift_factor=shift_factor,
    ).eval()


def tiny_sd3_transformer(seed: int = 0, qk_norm: str | None = None, dual_attention_layers: tuple[int, ...] = ()):
    """SD3-Medium shapes scaled down (``SD3Transformer2DModel``): two ``JointTransformerBlock``s (the last one
    ``context_pre_only``), 4 heads of dim 8 (inner and caption-projection width 32), patch 2, 16 latent channels,
    latents up to 3x the default patch grid (``pos_embed_max_size`` 24 for 8x8 patches; SD3-Medium: 192 for 64x64),
    ``joint_attention_dim`` = the T5 width, ``pooled_projection_dim`` = the two CLIP projections concatenated.

    ``qk_norm="rms_norm", dual_attention_layers=(0,)`` gives an SD3.5-Medium-like model (RMS-normed q/k, a second
    self-attention ``attn2`` in block 0)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=TINY_DIT_SAMPLE, patch_size=2, in_channels=TINY_DIT_LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=TINY_T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=TINY_CLIP_L_DIM + TINY_CLIP_G_DIM, out_channels=TINY_DIT_LATENT_CHANNELS,
        pos_embed_max_size=3 * TINY_DIT_SAMPLE // 2, dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm,
    ).eval()


def tiny_sd3_pipeline(seed: int = 0, qk_norm: str | None = None, dual_attention_layers: tuple[int, ...] = ()):
    """A complete tiny ``StableDiffusion3Pipeline`` (SD3-Medium layout; SD3.5-Medium with ``qk_norm="rms_norm",
    dual_attention_layers=(0,)``), 32x32 images by default, built from config: CLIP-L- and bigG-like
    ``CLIPTextModelWithProjection``s (widths 16 and 32), a T5 v1.1-like encoder (width 64) with a local character
    tokenizer, a 16-channel VAE with SD3's scaling/shift factors, ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.

    CLIP prompts are cut at 48 tokens; T5 pads to the call's ``max_sequence_length`` (pipeline default 256, still fast)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = char_tokenizer(), char_tokenizer(), t5_char_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(
        _tiny_clip_config(tokenizer, TINY_CLIP_L_DIM, projection_dim=TINY_CLIP_L_DIM)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_clip_config(tokenizer_2, TINY_CLIP_G_DIM, projection_dim=TINY_CLIP_G_DIM)).eval()
    torch.manual_seed(seed + 2)
    text_encoder_3 = _tiny_t5_encoder(tokenizer_3)
    torch.manual_seed(seed + 3)
    vae = _tiny_dit_vae(scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE factors
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(seed + 4, qk_norm=qk_norm, dual_attention_layers=dual_attention_layers),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = False):
    """FLUX.1 shapes scaled down (``FluxTransformer2DModel``): one double-stream ``FluxTransformerBlock`` and two
    single-stream ``FluxSingleTransformerBlock``s (FLUX.1: 19 and 38), 2 heads of dim 8 with 3-axis RoPE (2, 2, 4)
    (FLUX.1: 16, 56, 56), ``in_channels`` = 4 x 16 latent channels (2x2 packed patches), ``joint_attention_dim`` = the
    T5 width, ``pooled_projection_dim`` = CLIP-L's width. ``guidance_embeds=True`` mirrors FLUX.1-dev (distilled
    guidance embedding), ``False`` FLUX.1-schnell."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * TINY_DIT_LATENT_CHANNELS, num_layers=1, num_single_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TINY_T5_DIM,
        pooled_projection_dim=TINY_CLIP_L_DIM, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False):
    """A complete tiny ``FluxPipeline`` (FLUX.1-schnell layout; FLUX.1-dev with ``guidance_embeds=True``), 32x32
    images by default, built from config: a CLIP-L-like ``CLIPTextModel`` (width 16, pooled output), a T5 v1.1-like
    encoder (width 64) with a local character tokenizer, a 16-channel VAE with Flux's scaling/shift factors and
    ``FlowMatchEulerDiscreteScheduler`` with FLUX.1's dynamic shifting, its sequence lengths scaled with the image
    (FLUX.1: 256..4096 tokens for 256..1024 px; here 16..256 tokens for 16..64 px).

    ``default_sample_size`` is set on the instance (16 latents: 32 px; FluxPipeline hard-codes 128, 256 px here),
    so it does not survive ``save_pretrained``: pass ``height``/``width`` to a reloaded pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = char_tokenizer(), t5_char_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_config(tokenizer, TINY_CLIP_L_DIM)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = _tiny_t5_encoder(tokenizer_2)
    torch.manual_seed(seed + 2)
    vae = _tiny_dit_vae(scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE factors
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=16,
                                                max_image_seq_len=256)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        transformer=tiny_flux_transformer(seed + 3, guidance_embeds=guidance_embeds))
    pipe.default_sample_size = TINY_DIT_SAMPLE
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass(frozen=True)
class TinyDiTDenoiser(TinyDenoiser):
    """A tiny MMDiT denoiser (SD3/SD3.5, Flux) and its random inputs, called as its pipeline calls it: 8x8 latents
    with 16 channels, ``TINY_TEXT_LEN`` text tokens at the T5 width, pooled text; SD3 takes the timestep in [0, 1000]
    and spatial latents, Flux the timestep / 1000, 2x2-packed latent tokens, RoPE ids and (FLUX.1-dev) guidance."""

    def inputs(self, model: nn.Module, batch: int, timestep: int, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        config = model.config
        latents = torch.randn(batch, TINY_DIT_LATENT_CHANNELS, 8, 8, generator=generator)
        text = torch.randn(batch, TINY_TEXT_LEN, config.joint_attention_dim, generator=generator)
        pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
        args = {"encoder_hidden_states": text, "pooled_projections": pooled}
        if "guidance_embeds" not in config:  # SD3
            return {"hidden_states": latents, "timestep": torch.full((batch,), float(timestep)), **args}
        # FluxPipeline._pack_latents: (B, C, H, W) -> (B, H/2 * W/2, 4C)
        packed = latents.view(batch, -1, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, 16, -1)
        img_ids = torch.zeros(4, 4, 3)
        img_ids[..., 1] += torch.arange(4)[:, None]
        img_ids[..., 2] += torch.arange(4)[None, :]
        args.update(hidden_states=packed, timestep=torch.full((batch,), timestep / 1000), img_ids=img_ids.reshape(16, 3),
                    txt_ids=torch.zeros(TINY_TEXT_LEN, 3))
        if config.guidance_embeds:
            args["guidance"] = torch.full((batch,), 3.5)
        return args


# Not in TINY_DENOISERS: ``TinyDenoiser.inputs`` builds UNet/PixArt inputs (4x8x8 ``sample``, 32-wide text) and tests
# parametrize over every TINY_DENOISERS entry, so new entries there would change what those tests run.
TINY_DIT_DENOISERS = {
    "sd3": TinyDiTDenoiser("sd3", tiny_sd3_transformer),
    "sd35": TinyDiTDenoiser("sd35", partial(tiny_sd3_transformer, qk_norm="rms_norm", dual_attention_layers=(0,))),
    "flux": TinyDiTDenoiser("flux", tiny_flux_transformer),
}


def record_capture(model: nn.Module, tiny: TinyDenoiser, timesteps, batch: int = 4, seed: int = 0, num_buckets: int = 4):
    """Capture of ``tiny``'s random inputs at ``timesteps`` (one call each), run in the model's own dtype on its own
    device; the timesteps are the scheduler's (scaled as the family's adapter says, e.g. Flux's t / 1000)."""
    from slimdiff.arch import adapter_for, compressible_groups
    from slimdiff.arch.sites import sites_for
    from slimdiff.statistics.recorder import ActivationRecorder
    from slimdiff.statistics.sums import Capture

    parameter = next(model.parameters())
    sites = sites_for(compressible_groups(model))
    with ActivationRecorder(model, sites, num_buckets, 1000, timestep_scale=adapter_for(model).TIMESTEP_SCALE) as recorder, \
            torch.no_grad():
        for i, t in enumerate(timesteps):
            tiny.output(model, cast(tiny.inputs(model, batch, t, seed + i), parameter.dtype, parameter.device))
    return Capture(recorder.stats, {})


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||a||."""
    return float((a - b).norm() / a.norm())


def xw(linear: nn.Linear) -> torch.Tensor:
    """A linear's weight in X W layout (float64), its bias as an extra last row."""
    w = linear.weight.detach().double().T
    return w if linear.bias is None else torch.cat([w, linear.bias.detach().double()[None]])


def assert_same_statistics(merged, single) -> None:
    """``merged`` (a sharded capture, merged) holds the statistics of ``single`` (the single-process capture of the same
    prompts, sampler and batch size), site by site, and its metadata.

    Each shard forms exactly the batches the single-process capture forms, so every per-call Gram matrix is the same
    and the pooled float64 sums differ only by the order of float64 additions (asserted to 1e-10 relative, observed
    0). Per-bucket sums are float32 (slimdiff/statistics/sums.py) and float32 addition is not associative: asserted to
    1e-6 relative (observed 0 on this machine; rounding of the shard additions could show ~1e-7)."""
    assert set(merged.sites) == set(single.sites)
    for site, ref in single.sites.items():
        got = merged.sites[site]
        assert torch.equal(got.count, ref.count), site
        for part in ("sum_outer", "sum"):
            a, b = getattr(got, part), getattr(ref, part)
            assert a.dtype == torch.float64
            assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max()), (site, part)
        for part in ("bucket_sum_outer", "bucket_sum"):
            a, b = getattr(got, part), getattr(ref, part)
            assert float((a.double() - b.double()).abs().max()) <= 1e-6 * float(b.abs().max()), (site, part)
    for key, value in single.metadata.items():
        assert merged.metadata[key] == value, key


def dvc_status(workspace, env: dict[str, str] | None = None) -> dict:
    """``dvc status --json`` of ``workspace`` (the venv's dvc; ``env`` else this process's, analytics off): the stages
    DVC would run, with what changed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    dvc = Path(sys.executable).with_name("dvc")
    env = env if env is not None else dict(os.environ, DVC_NO_ANALYTICS="1")
    result = subprocess.run([str(dvc) if dvc.exists() else "dvc", "status", "--json"], cwd=workspace, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "{}")
