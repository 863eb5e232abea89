"""Tests of the Flux-style reference model (issue 26): the committed FluxPipeline folder, its tokenizer, the
rectified-flow objective, and bit-exact resumable training of a tiny config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest
import torch

from slimdiff.reference import (
    REFERENCE_FLUX_MODEL_DIR,
    load_pipeline,
    reference_flux_call_kwargs,
)
from slimdiff.reference.data import grammar_words, make_split
from slimdiff.reference.flux_model import (
    FluxReferenceConfig,
    build_pipeline,
    build_t5_tokenizer,
    compressible_units,
    flow_matching_pair,
    pack_latents,
)
from slimdiff.reference.flux_train import FluxTrainConfig, train_flux
from slimdiff.statistics.recording import model_content_hash
from slimdiff.runtime.sampling import guidance_kwargs

TINY = {
    "clip": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32},
    "t5": {"d_model": 16, "d_kv": 8, "num_heads": 2, "d_ff": 32, "num_layers": 1},
    "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 8, "num_attention_heads": 2,
                    "axes_dims_rope": [2, 2, 4]},
    "vae": {"block_out_channels": [8, 8], "norm_num_groups": 4},
}


@pytest.fixture(scope="module")
def committed():
    """The committed folder, loaded with plain `FluxPipeline.from_pretrained` (offline, safetensors only)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(REFERENCE_FLUX_MODEL_DIR, local_files_only=True, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_committed_folder_is_a_small_flux_pipeline(committed):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )
    from diffusers.models.normalization import AdaLayerNormZero, AdaLayerNormZeroSingle
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    from transformers import CLIPTextModel, T5EncoderModel

    size = sum(f.stat().st_size for f in REFERENCE_FLUX_MODEL_DIR.rglob("*") if f.is_file())
    assert size <= 40e6, size
    assert not list(REFERENCE_FLUX_MODEL_DIR.rglob("*.bin")) and not list(REFERENCE_FLUX_MODEL_DIR.rglob("*.pt"))
    t = committed.transformer
    assert isinstance(t, FluxTransformer2DModel) and not t.config.guidance_embeds
    assert len(t.transformer_blocks) >= 1 and len(t.single_transformer_blocks) >= 1
    assert isinstance(t.pos_embed, FluxPosEmbed) and sum(t.pos_embed.axes_dim) == t.config.attention_head_dim
    for block in list(t.transformer_blocks) + list(t.single_transformer_blocks):
        assert isinstance(block.attn.norm_q, torch.nn.RMSNorm) and isinstance(block.attn.norm_k, torch.nn.RMSNorm)
    assert all(isinstance(b.norm1, AdaLayerNormZero) for b in t.transformer_blocks)
    assert all(isinstance(b.norm, AdaLayerNormZeroSingle) for b in t.single_transformer_blocks)
    assert isinstance(committed.text_encoder, CLIPTextModel) and isinstance(committed.text_encoder_2, T5EncoderModel)
    assert isinstance(committed.vae, AutoencoderKL) and isinstance(committed.scheduler, FlowMatchEulerDiscreteScheduler)
    assert committed.tokenizer.model_max_length < 100 and committed.tokenizer_2.model_max_length < 100
    # 32 px images: the pipeline's own latent preparation gives 8x8 = 64 packed tokens of 4 x latent channels
    kwargs = reference_flux_call_kwargs()
    assert kwargs["height"] == kwargs["width"] == 32
    latents, ids = committed.prepare_latents(1, t.config.in_channels // 4, 32, 32, torch.float32, "cpu",
                                             torch.Generator().manual_seed(0))
    assert latents.shape == (1, 64, t.config.in_channels) and ids.shape == (64, 3)


def test_committed_pipeline_generates_32px(committed):
    kwargs = reference_flux_call_kwargs()
    out = committed("a large red circle at the top left", num_inference_steps=2, true_cfg_scale=4.0,
                    negative_prompt=[""], output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.images.shape == (1, 3, 32, 32) and torch.isfinite(out.images).all()
    assert type(load_pipeline("cpu", REFERENCE_FLUX_MODEL_DIR)).__name__ == "FluxPipeline"


def test_flow_matching_pair_and_euler_step():
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x_t, v = flow_matching_pair(x0, noise, sigma)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], (x0[1] + noise[1]) / 2)
    torch.testing.assert_close(v, noise - x0)
    # an exact velocity makes the scheduler's Euler step land on the same line at the next sigma
    later, _ = flow_matching_pair(x0, noise, torch.full((3,), 0.25))
    torch.testing.assert_close(x_t[1] + (0.25 - 0.5) * v[1], later[1])


def test_pack_latents_is_the_pipelines_layout():
    latents = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 4)
    packed = pack_latents(latents)
    assert packed.shape == (2, 4, 16)
    assert packed[0, 1].tolist() == latents[0, :, 0:2, 2:4].reshape(-1).tolist()  # token (row 0, col 1): (C, dy, dx)


def test_t5_tokenizer_one_token_per_grammar_word():
    tok = build_t5_tokenizer(24)
    for word in grammar_words():
        assert len(tok.tokenize(" " + word)) == 1, word
    ids = tok("a small red circle at the top left", padding="max_length", max_length=24).input_ids
    assert len(ids) == 24 and ids[8] == tok.eos_token_id and ids[9:] == [tok.pad_token_id] * 15
    assert tok("", padding="max_length", max_length=4).input_ids == [tok.eos_token_id] + [tok.pad_token_id] * 3


def test_config_checks():
    with pytest.raises(ValueError, match="unknown"):
        FluxReferenceConfig.from_dict({"transformer": {"depth": 3}})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxReferenceConfig.from_dict({"transformer": {"attention_head_dim": 32}})
    config = FluxReferenceConfig.from_dict({})
    assert config.image_tokens == 64 and config.sampler_defaults()["max_sequence_length"] == config.t5.model_max_length


def test_guidance_kwargs():
    assert guidance_kwargs("guidance_scale", 4.0, 3) == {"guidance_scale": 4.0}
    assert guidance_kwargs("true_cfg_scale", 4.0, 2) == {"true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    with pytest.raises(ValueError):
        guidance_kwargs("cfg", 4.0, 1)


def test_tiny_pipeline_units_and_adaln_zero_init():
    pipe = build_pipeline(FluxReferenceConfig.from_dict(TINY))
    units = compressible_units(pipe.transformer)
    assert len(units["attention"]) == 2 and len(units["adaln"]) == 3
    assert all(not m.weight.detach().any() for m in units["adaln"])  # adaLN-Zero: blocks start as identity


def test_tiny_training_bit_reproducible_and_resumable(tmp_path):
    config = FluxReferenceConfig.from_dict(TINY)
    images, captions = make_split("train", seed=0, size=16)
    latents = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    train = FluxTrainConfig(steps=4, batch_size=4, warmup_steps=1, checkpoint_every=2)
    *_, straight, _, _, log = train_flux(config, train, latents, captions, seed=3, device="cpu")
    part = FluxTrainConfig(**dict(vars(train), steps=4))
    ckpt = tmp_path / "ckpt"
    # a run killed after its step-2 checkpoint: same config, stopped early by raising from the data
    with pytest.raises(IndexError):
        train_flux(config, part, _Stop(latents, calls=2), captions, seed=3, device="cpu", checkpoint_dir=ckpt)
    assert (ckpt / "progress.json").exists()
    *_, resumed, _, _, _ = train_flux(config, part, latents, captions, seed=3, device="cpu", checkpoint_dir=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert log and all(torch.isfinite(torch.tensor(loss)) for _, loss in log)


def weights_fingerprint(modules) -> list[str]:
    return [model_content_hash(m) for m in modules]


def test_tiny_refinement_starts_from_its_base_and_resumes_exactly(tmp_path):
    config = FluxReferenceConfig.from_dict(TINY)
    _, captions = make_split("train", seed=0, size=16)
    latents = torch.randn(16, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    phase1 = FluxTrainConfig(steps=2, batch_size=4, warmup_steps=1, checkpoint_every=2)
    clip, t5, base, *_ = train_flux(config, phase1, latents, captions, seed=3, device="cpu")
    before = weights_fingerprint((clip, t5, base))
    refine = FluxTrainConfig(steps=4, batch_size=4, warmup_steps=1, lr=1e-4, text_lr=1e-4, checkpoint_every=2)
    # no step at all: the EMA is the base, so the refinement really starts from it
    unchanged = train_flux(config, FluxTrainConfig(**dict(vars(refine), steps=0)), latents, captions, seed=3,
                           device="cpu", init=(clip, t5, base), step_offset=2)
    assert weights_fingerprint(unchanged[:3]) == before
    *_, straight, _, _, log = train_flux(config, refine, latents, captions, seed=3, device="cpu",
                                         init=(clip, t5, base), step_offset=2)
    assert weights_fingerprint((clip, t5, base)) == before  # the base modules are not trained in place
    assert not torch.equal(straight.proj_out.weight, base.proj_out.weight)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(IndexError):
        train_flux(config, refine, _Stop(latents, calls=2), captions, seed=3, device="cpu", checkpoint_dir=ckpt,
                   init=(clip, t5, base), step_offset=2)
    *_, resumed, _, _, _ = train_flux(config, refine, latents, captions, seed=3, device="cpu", checkpoint_dir=ckpt,
                                      init=(clip, t5, base), step_offset=2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # another base, or the same base at another step offset, does not resume this refinement's checkpoint
    with pytest.raises(ValueError, match="other settings"):
        train_flux(config, refine, latents, captions, seed=3, device="cpu", checkpoint_dir=ckpt,
                   init=(clip, t5, straight), step_offset=2)
    with pytest.raises(ValueError, match="other settings"):
        train_flux(config, refine, latents, captions, seed=3, device="cpu", checkpoint_dir=ckpt,
                   init=(clip, t5, base), step_offset=0)
    # its draws are not phase 1's: the same steps from offset 0 end elsewhere
    *_, offset0, _, _, _ = train_flux(config, refine, latents, captions, seed=3, device="cpu", init=(clip, t5, base))
    assert not torch.equal(offset0.proj_out.weight, straight.proj_out.weight)
    assert log and all(torch.isfinite(torch.tensor(loss)) for _, loss in log)


class _Stop:
    """A latents tensor whose indexing fails after `calls` batches (kills a training run mid-way)."""

    def __init__(self, latents: torch.Tensor, calls: int):
        self.latents, self.calls = latents, calls

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, idx):
        if self.calls == 0:
            raise IndexError("stopped")
        self.calls -= 1
        return self.latents[idx]
