"""Evaluation metrics against closed forms, on tiny seeded models (issue 6, part 1)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

from slimdiff.arch import compressible_groups
from slimdiff.calls import record_calls
from slimdiff.cost import count_macs, count_params, macs_per_call
from slimdiff.decomposition.apply import decompose
from slimdiff.pipeline.evaluation import (
    evaluate,
    fidelity,
    flatten_metrics,
    image_quality,
    latency,
    sqnr_db,
)
from slimdiff.runtime.resize import resize_group
from slimdiff.runtime.sampling import SamplerSettings
from tests.helpers import TINY_DENOISERS, TINY_PROMPTS, tiny_sd_pipeline

SAMPLER = SamplerSettings(num_inference_steps=3, guidance_scale=4.0, seed=3)
PROMPTS = TINY_PROMPTS[:4]


def half_widths(model) -> dict[str, int]:
    return {g.name: max(1, g.width // 2) for g in compressible_groups(model)}


def random_input_capture(model, tiny):
    """A capture from random denoiser inputs: enough to build a decomposed model for structure tests."""
    from slimdiff.arch.sites import sites_for
    from slimdiff.statistics.recorder import ActivationRecorder
    from slimdiff.statistics.sums import Capture

    with ActivationRecorder(model, sites_for(compressible_groups(model))) as recorder, torch.no_grad():
        for i, t in enumerate((100, 400, 700, 950)):
            tiny.output(model, tiny.inputs(model, 2, t, i))
    return Capture(recorder.stats, {})


@pytest.fixture(scope="module")
def pipes():
    """The tiny pipeline and a copy whose UNet is decomposed to half width."""
    original = tiny_sd_pipeline()
    compressed = tiny_sd_pipeline()
    tiny = TINY_DENOISERS["unet_sd1"]
    decompose(compressed.unet, random_input_capture(compressed.unet, tiny), half_widths(compressed.unet))
    return original, compressed


# ---- closed forms --------------------------------------------------------------------------------

def test_sqnr_of_identical_is_inf_and_of_known_noise_is_exact():
    torch.manual_seed(0)
    ref = torch.randn(4, 100, dtype=torch.float64)
    assert sqnr_db(ref, ref.clone()).item() == math.inf
    noise = torch.randn_like(ref)
    noise *= ref.norm() / noise.norm() / 10  # ||noise|| = ||ref|| / 10 -> 20 dB
    assert sqnr_db(ref, ref + noise).item() == pytest.approx(20.0, abs=1e-9)
    assert sqnr_db(ref.float(), (ref + 10 * noise).float()).item() == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="equal shapes"):
        sqnr_db(ref, ref[:2])


def test_psnr_ssim_closed_forms():
    torch.manual_seed(0)
    images = 0.2 + 0.6 * torch.rand(3, 3, 16, 16)
    same = image_quality(images, images.clone())
    assert same["psnr_db"] == math.inf and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    shifted = image_quality(images, images + 0.1)  # MSE 0.01 with data range 1 -> 20 dB
    assert shifted["psnr_db"] == pytest.approx(20.0, abs=1e-4) and shifted["ssim"] < 1
    small = image_quality(images[..., :8, :8], images[..., :8, :8].flip(-1))
    assert small["ssim_kernel_size"] == 7 and small["ssim"] < 1


def test_macs_of_single_linear_and_conv():
    linear = nn.Linear(12, 7)
    tokens = 5
    assert macs_per_call(linear, ((torch.randn(1, tokens, 12),), {})) == 12 * 7 * tokens
    assert macs_per_call(linear, ((torch.randn(3, tokens, 12),), {})) == 12 * 7 * tokens  # per sample
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    assert count_macs(conv, ((torch.randn(2, 4, 8, 8),), {}))["conv"] == 2 * 6 * 8 * 8 * (4 // 2) * 9


def _tokens_per_linear(model, call) -> dict[str, int]:
    tokens, handles = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(
                lambda mod, a, o, name=name: tokens.__setitem__(name, tokens.get(name, 0) + a[0].numel() // mod.in_features)))
    with torch.no_grad():
        model(*call[0], **call[1])
    for h in handles:
        h.remove()
    return tokens


def test_macs_drop_by_removed_weights_times_tokens():
    tiny = TINY_DENOISERS["unet_sd1"]
    model = tiny.build(0)
    call = ((), tiny.inputs(model, 2, 500, 0))
    before = count_macs(model, call)
    tokens = _tokens_per_linear(model, call)
    groups = {g.kind: g for g in compressible_groups(model)}  # the last block's groups
    ffn, qk, vo_self, vo = groups["ffn"], groups["qk_self"], groups["vo_self"], groups["vo_cross"]
    # the self-attention narrowed on both sides, the cross-attention's VO alone (its attention runs padded to QK's width)
    cut = {ffn.name: ffn.width - 8, qk.name: qk.width - 1, vo_self.name: vo_self.width - 1, vo.name: vo.width - 1}
    attn_qk, attn_vo = model.get_submodule(qk.path), model.get_submodule(vo.path)
    expected_linear = (
        tokens[f"{ffn.path}.net.0.proj"] * 8 * 2 * ffn.in_features  # gated: value and gate rows, no bias MACs
        + tokens[f"{ffn.path}.net.2"] * 8 * ffn.out_features
        + tokens[f"{qk.path}.to_q"] * qk.heads * attn_qk.to_q.in_features
        + tokens[f"{qk.path}.to_k"] * qk.heads * attn_qk.to_k.in_features
        + tokens[f"{qk.path}.to_v"] * vo_self.heads * attn_qk.to_v.in_features
        + tokens[f"{qk.path}.to_out.0"] * vo_self.heads * attn_qk.to_out[0].out_features
        + tokens[f"{vo.path}.to_v"] * vo.heads * attn_vo.to_v.in_features
        + tokens[f"{vo.path}.to_out.0"] * vo.heads * attn_vo.to_out[0].out_features
    )
    batch, n_query = 2, tokens[f"{qk.path}.to_q"] // 2
    # logits and weighted values of the self-attention one width narrower; the cross-attention saves nothing there
    expected_attention = 2 * batch * n_query * n_query * qk.heads
    for group in (ffn, qk, vo_self, vo):
        resize_group(model, group, cut[group.name])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.nan_to_num(p, 0.0, 0.0, 0.0).clamp(-1, 1))
    after = count_macs(model, call)
    assert before["linear"] - after["linear"] == expected_linear
    assert before["attention"] - after["attention"] == expected_attention
    assert before["conv"] == after["conv"]
    assert macs_per_call(model, call) == after["total"] // 2


@pytest.mark.parametrize("name", list(TINY_DENOISERS))
def test_count_params_matches_group_accounting(name):
    tiny = TINY_DENOISERS[name]
    model = tiny.build(0)
    groups = compressible_groups(model)
    counts = count_params(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    # counted from the modules (both factors of a factorised adaLN modulation) against the groups' own arithmetic
    assert counts["compressible"] == sum(g.params_at(g.width) for g in groups) == sum(counts["by_kind"].values())
    assert counts["groups"] == {g.name: g.params_at(g.width) for g in groups}
    widths = half_widths(model)
    decompose(model, random_input_capture(model, tiny), widths)
    after = count_params(model)
    removed = sum(g.params_at(g.width) - g.params_at(widths[g.name]) for g in groups)
    assert counts["compressible"] - after["compressible"] == removed == counts["total"] - after["total"]


# ---- fidelity, latency, evaluate -----------------------------------------------------------------

def test_fidelity_of_a_copy_is_perfect():
    original = tiny_sd_pipeline()
    copy_pipe = tiny_sd_pipeline()
    metrics = fidelity(original, copy_pipe, PROMPTS[:2], SAMPLER, batch_size=2)
    assert metrics["noise_sqnr_db"] == math.inf and metrics["image_psnr_db"] == math.inf
    assert metrics["image_ssim"] == pytest.approx(1.0, abs=1e-6) and metrics["guidance_cosine"] == pytest.approx(1.0)
    assert sum(metrics["denoiser_calls_by_bucket"].values()) == SAMPLER.num_inference_steps
    with pytest.raises(ValueError, match="same module"):
        fidelity(original, original, PROMPTS[:1], SAMPLER)


def test_fidelity_is_teacher_forced(pipes):
    """The reported SQNR equals replaying the original trajectory's inputs through the compressed UNet."""
    original, compressed = pipes
    metrics = fidelity(original, compressed, PROMPTS, SAMPLER, batch_size=2)
    signal = noise = 0.0
    for batch in (PROMPTS[:2], PROMPTS[2:]):
        calls = record_calls(original, batch, SAMPLER, num_calls=100)
        assert len(calls) == SAMPLER.num_inference_steps
        with torch.no_grad():
            for args, kwargs in calls:
                ref = original.unet(*args, **{**kwargs, "return_dict": False})[0].double()
                out = compressed.unet(*args, **{**kwargs, "return_dict": False})[0].double()
                signal += float(ref.pow(2).sum())
                noise += float((ref - out).pow(2).sum())
    assert metrics["noise_sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), abs=1e-6)
    assert 0 < metrics["noise_sqnr_db"] < 200 and -1 <= metrics["guidance_cosine"] < 1
    assert set(metrics["noise_sqnr_db_by_bucket"]) <= {"t0-250", "t250-500", "t500-750", "t750-1000"}
    assert math.isfinite(metrics["image_psnr_db"]) and metrics["image_ssim"] < 1


def test_latency_is_interleaved_median_with_threads():
    order: list[str] = []

    def slow(x):
        order.append("o")
        time.sleep(0.004)

    def fast(x):
        order.append("c")
        time.sleep(0.001)

    threads = torch.get_num_threads()
    result = latency(slow, fast, lambda: ((1,), {}), repeats=4, warmup=1, threads=1)
    assert order == ["o", "c"] + ["o", "c", "c", "o"] * 2
    assert result["threads"] == 1 and torch.get_num_threads() == threads
    assert len(result["original_runs_ms"]) == 4 and result["original_ms"] >= 3.5
    # the ratio of the medians; how large it comes out is timing, measured in benchmarks/timing_checks.py
    assert result["compressed_ms"] > 0 and result["speedup"] == pytest.approx(result["original_ms"] / result["compressed_ms"])
    with pytest.raises(ValueError, match="repeats"):
        latency(slow, fast, lambda: {}, repeats=0)


class FakeEvaluator:
    def __init__(self):
        self.seen = []

    def alignment(self, images, captions):
        self.seen.append((tuple(images.shape), list(captions)))
        return {"accuracy": float(images.mean()), "colour": 0.5}

    def frechet_distance(self, images_a, images_b):
        return float((images_a.mean(0) - images_b.mean(0)).pow(2).sum())


def test_evaluate_assembles_json_metrics(pipes):
    original, compressed = pipes
    evaluator = FakeEvaluator()
    metrics = evaluate(original, compressed, PROMPTS, SAMPLER, evaluator, batch_size=2, latency_repeats=2)
    text = json.dumps(metrics, allow_nan=False)
    assert json.loads(text) == metrics
    params = metrics["params"]
    assert params["removed"] == params["removed_compressible"] > 0
    assert params["original"]["compressible"] - params["compressed"]["compressible"] == params["removed"]
    assert 0 < metrics["macs"]["removed_fraction"] < 1 and metrics["macs"]["ratio"] > 1
    assert metrics["latency"]["threads"] == torch.get_num_threads()
    assert metrics["latency"]["denoiser"]["batch"] == 2  # one prompt, both CFG branches
    assert metrics["latency"]["macs_ratio"] == metrics["macs"]["ratio"] and metrics["latency"]["denoiser_speedup"] > 0
    assert evaluator.seen == [((4, 3, 16, 16), PROMPTS)] * 2
    assert metrics["alignment"]["compressed"]["colour"] == 0.5 and metrics["frechet_distance_to_original"] >= 0
    flat = flatten_metrics(metrics)
    assert flat["fidelity.noise_sqnr_db"] == metrics["fidelity"]["noise_sqnr_db"]
    assert all(isinstance(v, float) for v in flat.values())


def test_evaluate_copy_writes_null_for_infinite():
    original, copy_pipe = tiny_sd_pipeline(), tiny_sd_pipeline()
    metrics = evaluate(original, copy_pipe, PROMPTS[:1], SAMPLER, measure_latency=False)
    json.dumps(metrics, allow_nan=False)
    assert metrics["fidelity"]["noise_sqnr_db"] is None and metrics["fidelity"]["image_psnr_db"] is None
    assert metrics["params"]["removed"] == 0 and metrics["macs"]["ratio"] == 1.0 and "latency" not in metrics
