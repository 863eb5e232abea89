"""End to end on the smallest real pipeline: a tiny StableDiffusionPipeline with a locally built tokenizer (issue 2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import slimdiff
from slimdiff.cli import main
from slimdiff.compress import SlimDiffConfig, compress_pipeline
from slimdiff.runtime.folder import (
    SLIMDIFF_CONFIG_NAME,
    WEIGHTS_NAME,
    CompressedModelError,
)
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.statistics.recording import capture
from slimdiff.statistics.sums import merge_captures
from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

SAMPLER = SamplerSettings(num_inference_steps=3, guidance_scale=4.0, seed=7)
PROMPTS = TINY_PROMPTS[:16]


def images(pipe, prompts=PROMPTS[:2]):
    return pipe(**SAMPLER.pipe_kwargs(pipe, prompts), output_type="pt").images


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    pipe = tiny_sd_pipeline()
    original_params = sum(p.numel() for p in pipe.unet.parameters())
    original_images = images(pipe)
    result = compress_pipeline(pipe, PROMPTS, SlimDiffConfig(budget=0.5, batch_size=4), SAMPLER, progress=False)
    folder = tmp_path_factory.mktemp("e2e") / "tiny-slim"
    slimdiff.save(pipe, folder, result.info("tiny"), full_widths={m.name: m.full_width for m in result.plan.modules})
    return pipe, result, folder, original_params, original_images


def test_shard_captures_merge_to_full_capture():
    pipe = tiny_sd_pipeline()
    full = capture(pipe, PROMPTS[:8], SAMPLER, batch_size=4, progress=False)
    merged = merge_captures([capture(pipe, PROMPTS[4:8], SAMPLER, batch_size=4, progress=False),
                             capture(pipe, PROMPTS[:4], SAMPLER, batch_size=4, progress=False)])
    assert merged.metadata["prompts_digest"] == full.metadata["prompts_digest"]
    for site, stats in full.sites.items():
        other = merged.sites[site]
        assert torch.equal(stats.count, other.count)
        assert float((stats.sum_outer - other.sum_outer).norm() / stats.sum_outer.norm()) < 1e-10
    # every denoiser call of both CFG branches: 4 prompts x 2 batches x 3 steps, 2 branches per call
    assert full.metadata["denoiser_calls"] == 2 * 3


def test_capture_file_round_trip(tmp_path):
    pipe = tiny_sd_pipeline()
    stats = capture(pipe, PROMPTS[:4], SAMPLER, batch_size=4, progress=False)
    again = slimdiff.Capture.load(stats.save(tmp_path / "capture.safetensors"))
    assert again.metadata == stats.metadata
    for site in stats.sites:
        assert torch.equal(again.sites[site].sum_outer, stats.sites[site].sum_outer)
    for key in ("model_hash", "prompts_digest", "scheduler", "num_inference_steps", "guidance_scale", "seed", "bucket_edges"):
        assert again.metadata[key] not in (None, "")


def test_half_budget_gives_finite_images_and_exact_counts(compressed):
    pipe, result, folder, original_params, original_images = compressed
    out = images(pipe)
    assert torch.isfinite(out).all() and out.shape == original_images.shape
    target = 0.5 * result.plan.params_before
    assert abs(result.plan.removed - target) <= max(m.unit_params * 8 for m in result.plan.modules)
    compressed_params = sum(p.numel() for p in pipe.unet.parameters())
    assert original_params - compressed_params == result.plan.removed


def test_info_reports_true_parameter_counts(compressed, capsys):
    pipe, result, folder, original_params, _ = compressed
    assert main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == sum(p.numel() for p in pipe.unet.parameters())
    assert info["params"]["compressible_before"] - info["params"]["compressible_after"] == original_params - info["params"]["total"]
    assert {name: m["width"] for name, m in info["modules"].items()} == result.plan.widths


def test_save_load_round_trip_is_bit_exact(compressed):
    pipe, _, folder, _, _ = compressed
    loaded = slimdiff.load(folder)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    state, again = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    assert torch.equal(images(pipe), images(loaded))


def test_load_errors_name_the_file_and_problem(compressed, tmp_path):
    folder = compressed[2]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "unet" / WEIGHTS_NAME).unlink()
    with pytest.raises(CompressedModelError, match=f"{WEIGHTS_NAME}: missing"):
        slimdiff.load(broken)

    shutil.rmtree(broken)
    shutil.copytree(folder, broken)
    config_path = broken / "unet" / SLIMDIFF_CONFIG_NAME
    config = json.loads(config_path.read_text())
    name = next(iter(config["widths"]))
    config["widths"][name] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(CompressedModelError, match="does not match"):
        slimdiff.load(broken)

    config["widths"][name] -= 1
    config["version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(CompressedModelError, match=f"{SLIMDIFF_CONFIG_NAME}: unknown config format/version"):
        slimdiff.load(broken)

    with pytest.raises(CompressedModelError, match="model_index.json: missing"):
        slimdiff.load(tmp_path)


def test_cli_compress_and_bad_input(tmp_path, capsys):
    source = tmp_path / "tiny"
    tiny_sd_pipeline().save_pretrained(source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:8]) + "\n")
    out = tmp_path / "out"
    args = ["compress", str(source), "--prompts", str(prompts), "--budget", "0.3", "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--quiet"]
    assert main(args) == 0
    assert (out / "unet" / SLIMDIFF_CONFIG_NAME).is_file() and (out / "width_plan.json").is_file()
    assert (out / "width_plan.png").read_bytes()[:4] == b"\x89PNG"
    assert slimdiff.load(out).unet is not None

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = {
        "no such folder": ["compress", str(tmp_path / "nope"), "--prompts", str(prompts), "--budget", "0.3", "--out", str(tmp_path / "o1")],
        "holds no prompts": ["compress", str(source), "--prompts", str(empty), "--budget", "0.3", "--out", str(tmp_path / "o2")],
        "budget 1.5": ["compress", str(source), "--prompts", str(prompts), "--budget", "1.5", "--out", str(tmp_path / "o3")],
        "already exists": args,
        "valid budgets": ["compress", str(source), "--prompts", str(prompts), "--budget", "0.97", "--out", str(tmp_path / "o4")],
    }
    capsys.readouterr()
    for expected, argv in cases.items():
        assert main(argv) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
