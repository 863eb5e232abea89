"""Tiny seeded SD3 / SD3.5 / Flux models and pipelines from ``tests.helpers``: built from config, no hub files."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from slimdiff.runtime.sampling import SamplerSettings
from tests.helpers import (
    TINY_DENOISERS,
    TINY_DIT_DENOISERS,
    TINY_PROMPTS,
    TinyDenoiser,
    tiny_flux_pipeline,
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd3_transformer,
)

PIPELINES = {
    "sd3": tiny_sd3_pipeline,
    "sd35": partial(tiny_sd3_pipeline, qk_norm="rms_norm", dual_attention_layers=(0,)),
    "flux_schnell": tiny_flux_pipeline,
    "flux_dev": partial(tiny_flux_pipeline, guidance_embeds=True),
}
PIPELINE_CLASSES = {"sd3": "StableDiffusion3Pipeline", "sd35": "StableDiffusion3Pipeline",
                    "flux_schnell": "FluxPipeline", "flux_dev": "FluxPipeline"}


def generate(pipe, **kwargs) -> np.ndarray:
    kwargs = {"num_inference_steps": 2, "guidance_scale": 4.0, "output_type": "np", **kwargs}
    return pipe(TINY_PROMPTS[:2], generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_pipeline_generates_finite_deterministic_images(name):
    """A 2-prompt batch at the default size (32 px) and at 64 px: finite, the right shape, identical across two builds
    with the same seed, different for another seed."""
    build = PIPELINES[name]
    pipe = build(seed=0)
    assert type(pipe).__name__ == PIPELINE_CLASSES[name]
    assert all(not m.training and m.dtype == torch.float32 for m in pipe.components.values() if isinstance(m, torch.nn.Module))
    images = generate(pipe)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
    assert images.std() > 0 and not np.array_equal(images[0], images[1])
    assert np.array_equal(images, generate(build(seed=0)))
    assert not np.array_equal(images, generate(build(seed=1)))
    large = generate(pipe, height=64, width=64, max_sequence_length=64)
    assert large.shape == (2, 64, 64, 3) and np.isfinite(large).all()


@pytest.mark.parametrize("name", ["sd35", "flux_dev"])
def test_pipeline_runs_with_the_project_sampler(name):
    """``SamplerSettings.pipe_kwargs`` (per-prompt generators, as capture and evaluate call pipelines) works as is."""
    pipe = PIPELINES[name]()
    sampler = SamplerSettings(num_inference_steps=2, guidance_scale=3.5, height=32, width=32, seed=0)
    images = pipe(**sampler.pipe_kwargs(pipe, TINY_PROMPTS[:2]), output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_sd3_transformer_blocks():
    """SD3-Medium-like: joint blocks, the last one ``context_pre_only``, no second attention, no q/k norm; the
    SD3.5-Medium-like variant adds ``attn2`` in block 0 and RMS q/k norms everywhere."""
    from diffusers.models.attention import JointTransformerBlock

    sd3 = tiny_sd3_transformer()
    blocks = sd3.transformer_blocks
    assert all(isinstance(b, JointTransformerBlock) for b in blocks) and len(blocks) == 2
    assert blocks[-1].context_pre_only and not blocks[0].context_pre_only
    assert all(not b.use_dual_attention and b.attn.norm_q is None for b in blocks)

    sd35 = tiny_sd3_transformer(qk_norm="rms_norm", dual_attention_layers=(0,))
    first, last = sd35.transformer_blocks
    assert first.use_dual_attention and isinstance(first.attn2, torch.nn.Module)
    assert not last.use_dual_attention and last.context_pre_only
    assert all(type(b.attn.norm_q).__name__ == "RMSNorm" for b in sd35.transformer_blocks)
    assert type(first.attn2.norm_q).__name__ == "RMSNorm"


def test_flux_transformer_blocks():
    """Flux: double-stream and single-stream blocks, packed 2x2 latents (in_channels 64), guidance embedding on dev."""
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    flux = tiny_flux_transformer()
    assert len(flux.transformer_blocks) >= 1 and len(flux.single_transformer_blocks) >= 1
    assert all(isinstance(b, FluxTransformerBlock) for b in flux.transformer_blocks)
    assert all(isinstance(b, FluxSingleTransformerBlock) for b in flux.single_transformer_blocks)
    assert flux.config.in_channels == 64 and sum(flux.config.axes_dims_rope) == flux.config.attention_head_dim
    assert not flux.config.guidance_embeds
    assert tiny_flux_transformer(guidance_embeds=True).config.guidance_embeds


@pytest.mark.parametrize("name", sorted(TINY_DIT_DENOISERS))
def test_dit_denoisers_run_on_their_inputs(name):
    """The ``TINY_DIT_DENOISERS`` entries follow the ``TinyDenoiser`` interface: seeded builds and inputs, an output
    shaped like the latent input, deterministic; they are kept out of ``TINY_DENOISERS``."""
    tiny = TINY_DIT_DENOISERS[name]
    assert isinstance(tiny, TinyDenoiser) and name not in TINY_DENOISERS
    model = tiny.build(0)
    inputs = tiny.inputs(model, 2, 500, 0)
    with torch.no_grad():
        out = tiny.output(model, inputs)
        again = tiny.output(tiny.build(0), tiny.inputs(model, 2, 500, 0))
    assert out.shape == inputs["hidden_states"].shape and torch.isfinite(out).all()
    assert torch.equal(out, again)
    if name == "flux":
        guided = tiny_flux_transformer(0, guidance_embeds=True)
        assert "guidance" in tiny.inputs(guided, 2, 500, 0)
