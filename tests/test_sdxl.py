"""SDXL (``UNet2DConditionModel`` with ``addition_embed_type="text_time"``, two text encoders) end to end (issue 12)."""

from __future__ import annotations

import json

import torch

from slimdiff.capture import SamplerSettings
from slimdiff.testing import TINY_PROMPTS, tiny_sdxl_pipeline

SAMPLER = SamplerSettings(num_inference_steps=2, guidance_scale=4.0, height=16, width=16, seed=0)


def test_cli_compresses_a_tiny_sdxl_pipeline_and_the_saved_model_reloads(tmp_path, capsys):
    """`slimdiff compress` on a saved tiny SDXL pipeline: capture, gains, scores, plan, decomposition, save; the
    reloaded pipeline generates the same images as the compressed one in memory, and `slimdiff info` lists it."""
    from slimdiff.cli import main
    from slimdiff.io import describe, load

    source = tmp_path / "sdxl"
    tiny_sdxl_pipeline().save_pretrained(source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS[:6]) + "\n")
    out = tmp_path / "out"
    assert main(["compress", str(source), "--prompts", str(prompts), "--budget", "0.3", "--steps", "2", "--height", "16",
                 "--width", "16", "--batch-size", "3", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    plan = json.loads((out / "width_plan.json").read_text())
    assert 0.3 <= plan["params"]["removed_fraction"] < 0.35
    info = describe(out)
    assert info["denoiser"] == "UNet2DConditionModel" and info["params"]["removed_fraction"] >= 0.3
    assert all(m["method"] != "not recorded" for m in info["modules"].values())
    reloaded = load(out)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded).__name__ == "StableDiffusionXLPipeline"
    images = reloaded(**SAMPLER.pipe_kwargs(reloaded, TINY_PROMPTS[:2]), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "UNet2DConditionModel" in capsys.readouterr().out
