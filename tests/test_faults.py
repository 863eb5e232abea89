"""Bad files and bad values fail with one line naming the file or value (issue 14, first cases)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from slimdiff.compress import SlimDiffConfig
from slimdiff.planning.allocation import allocate
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.statistics.recording import capture, check_model
from slimdiff.statistics.sums import Capture
from tests.helpers import TINY_PROMPTS, stage_workspace, tiny_sd_pipeline

SAMPLER = SamplerSettings(num_inference_steps=2, guidance_scale=4.0, seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_sd_pipeline()
    stats = capture(pipe, TINY_PROMPTS[:4], SAMPLER, batch_size=4, progress=False)
    path = stats.save(tmp_path_factory.mktemp("faults") / "capture.safetensors")
    return pipe, stats, path


def rewrite(stats: Capture, path, change) -> None:
    """Write ``stats`` to ``path`` with ``change(tensors)`` applied to the raw tensor dict (header kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stats.save(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata=metadata)


def first_site(stats: Capture) -> str:
    return next(iter(stats.sites))


def test_truncated_and_flipped_captures_name_the_file(saved, tmp_path):
    _, _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: unreadable capture .*re-run the capture"):
        Capture.load(truncated)
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:3] + bytes([data[3] ^ 0xFF]) + data[4:])  # the header length
    with pytest.raises(ValueError, match=r"flipped\.safetensors: unreadable capture"):
        Capture.load(flipped)


@pytest.mark.parametrize("change,message", [
    (lambda t, s: t.pop(f"{s}|count"), "lacks count"),
    (lambda t, s: t.__setitem__(f"{s}|sum", t[f"{s}|sum"][:-1].clone()), "are not \\(d, d\\) and \\(d,\\)"),
    (lambda t, s: t.__setitem__(f"{s}|sum_outer", t[f"{s}|sum_outer"].float()), "expected float64"),
    (lambda t, s: t.__setitem__(f"{s}|bucket_sum", t[f"{s}|bucket_sum"][:2].clone()), "do not match 4 buckets"),
    (lambda t, s: t.pop(f"{s}|bucket_sum_outer"), "only one of bucket_sum_outer and bucket_sum"),
])
def test_inconsistent_parts_are_refused(saved, tmp_path, change, message):
    _, stats, _ = saved
    path = tmp_path / "bad.safetensors"
    rewrite(stats, path, lambda tensors: change(tensors, first_site(stats)))
    with pytest.raises(ValueError, match=message):
        Capture.load(path)


def test_capture_of_another_checkpoint_is_refused(saved):
    pipe, stats, path = saved
    other = tiny_sd_pipeline(seed=1)  # same shapes, other weights
    check_model(Capture.load(path), pipe.unet, str(path))  # its own model passes
    with pytest.raises(ValueError, match=r"capture\.safetensors was taken on model [0-9a-f]{12}, but this model is [0-9a-f]{12}"):
        check_model(Capture.load(path), other.unet, str(path))


def test_score_stage_refuses_a_capture_from_another_checkpoint(saved, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from slimdiff.pipeline.stages import main

    _, _, path = saved
    repo = Path(__file__).resolve().parents[1]
    tiny_sd_pipeline(seed=1).save_pretrained(tmp_path / "model")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update({"path": "model", "device": "cpu"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "capture.safetensors").write_bytes(path.read_bytes())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["score"]) == 2
    err = capsys.readouterr().err.strip()
    assert "outputs/capture.safetensors was taken on model" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "outputs" / "scores.json").exists()


def test_overflowing_activations_stop_the_capture_naming_the_site():
    pipe = tiny_sd_pipeline()
    block = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with torch.no_grad():
        block.ff.net[0].proj.weight.fill_(1e38)  # the gated hidden activation overflows to inf / nan
    # the first non-finite sum stops the capture; later denoising steps carry the NaN to other sites, all counted
    with pytest.raises(ValueError, match=r"statistics of \S+ \(and \d+ more sites\) hold NaN/Inf"):
        capture(pipe, TINY_PROMPTS[:2], SAMPLER, batch_size=2, progress=False)


@pytest.mark.parametrize("weights", [(1.0, math.nan, 1.0, 1.0), (1.0, -1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 0.0)])
def test_bad_bucket_weights_are_refused(weights):
    with pytest.raises(ValueError, match="bucket_weights must be finite numbers >= 0 with a positive sum"):
        SlimDiffConfig(bucket_weights=weights)


def test_allocate_refuses_bad_bucket_weights(saved):
    from slimdiff.scoring.influence import score

    pipe, stats, _ = saved
    scores = score(pipe.unet, stats, require_gains=False)
    with pytest.raises(ValueError, match="bucket_weights must be finite"):
        allocate(scores, 0.3, bucket_weights=[1.0, math.inf, 1.0, 1.0])
    json.dumps(allocate(scores, 0.3, bucket_weights=[0.0, 1.0, 1.0, 0.0]).to_dict())  # a valid weighting still allocates


def test_custom_attention_scale_is_kept():
    """``scale_qk=False`` attention (scale 1): the slim processor keeps the attention's own scale, not 1/sqrt(d)."""
    from diffusers.models.attention_processor import Attention

    from slimdiff.runtime.attention import SlimAttnProcessor, original_attention_scale

    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, scale_qk=False).eval()
    assert original_attention_scale(attn) == attn.scale == 1.0
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = attn(x)
        attn.set_processor(SlimAttnProcessor(original_attention_scale(attn)))
        assert float((attn(x) - reference).abs().max()) < 1e-5


def test_gains_of_another_model_are_refused(saved):
    from slimdiff.scoring.gains import Gains
    from slimdiff.scoring.influence import score

    pipe, stats, _ = saved
    foreign = Gains({}, {}, {"model_hash": "0" * 64})
    with pytest.raises(ValueError, match=r"propagation gains were measured on model 000000000000, the capture on [0-9a-f]{12}"):
        score(pipe.unet, stats, foreign)


def test_a_gain_that_cannot_be_measured_is_an_error_not_zero():
    from slimdiff.arch import compressible_groups
    from slimdiff.scoring.gains import propagation_gains
    from tests.helpers import TINY_DENOISERS

    tiny = TINY_DENOISERS["unet_sd1"]
    model = tiny.build(0)
    ffn = next(g for g in compressible_groups(model) if g.kind == "ffn")
    with torch.no_grad():
        down = model.get_submodule(ffn.path).net[2]
        down.weight.zero_()
        down.bias.zero_()  # the module's output is exactly zero: no noise of known energy can be injected
    with pytest.raises(RuntimeError, match=f"{ffn.name}: the module's output is zero"):
        propagation_gains(model, [((), tiny.inputs(model, 2, 500, 0))], [ffn])


def test_decompose_stage_refuses_a_plan_for_another_model(saved, tmp_path, monkeypatch, capsys):
    """A width plan carries the model hash of its scores; decompose refuses it for another capture/model."""
    from slimdiff.pipeline.stages import main
    from slimdiff.scoring.influence import score

    pipe, stats, path = saved
    stage_workspace(tmp_path, pipe, path.read_bytes())
    plan = allocate(score(pipe.unet, stats, None, require_gains=False), 0.3)
    assert plan.settings["model_hash"] == stats.metadata["model_hash"]
    plan.settings["model_hash"] = "0" * 64
    plan.save(tmp_path / "outputs" / "plan" / "width_plan.json")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["decompose"]) == 2
    err = capsys.readouterr().err.strip()
    assert "width_plan.json was allocated for model 000000000000, but the capture and model are" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "outputs" / "model").exists()


def test_evaluation_refuses_a_model_compressed_from_another_checkpoint(saved, tmp_path):
    from slimdiff.pipeline.stages import check_compressed_from
    from slimdiff.runtime.folder import save
    from slimdiff.statistics.recording import model_content_hash

    pipe, _, _ = saved
    folder = save(pipe, tmp_path / "compressed", {"base_model": {"hash": model_content_hash(pipe.unet)}})
    check_compressed_from(pipe.unet, folder)  # its own base passes
    other = tiny_sd_pipeline(seed=1)
    with pytest.raises(ValueError, match=r"compressed was compressed from model [0-9a-f]{12}, but model.path holds [0-9a-f]{12}"):
        check_compressed_from(other.unet, folder)


def test_capture_of_other_prompts_or_sampler_settings_is_refused(saved):
    from slimdiff.statistics.recording import check_calibration

    _, stats, path = saved
    check_calibration(stats, TINY_PROMPTS[:4], SAMPLER, str(path))  # its own prompts and settings pass
    check_calibration(stats, list(reversed(TINY_PROMPTS[:4])), SAMPLER)  # the order of prompts does not matter
    with pytest.raises(ValueError, match=r"other calibration prompts \(digest [0-9a-f]{12}\), not on these 4"):
        check_calibration(stats, TINY_PROMPTS[1:5], SAMPLER)
    other = SamplerSettings(num_inference_steps=3, guidance_scale=4.0, seed=5)
    with pytest.raises(ValueError, match=r"other sampler settings: num_inference_steps 2 \(now 3\); re-run the capture"):
        check_calibration(stats, TINY_PROMPTS[:4], other)


def test_atomic_writes_give_the_usual_modes(tmp_path):
    """Artifacts written through mkstemp/mkdtemp get the mode a plain open()/mkdir would (umask applied)."""
    import os

    from slimdiff.files import atomic_dir, write_json

    mask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "model") as folder:
            (folder / "weights").write_text("w")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


def _json_artifacts(saved, tmp_path):
    """Every JSON artifact of the pipeline, written by the library: (loader, path)."""
    from slimdiff.planning.latency import LatencyCurve, LatencyTable
    from slimdiff.scoring.gains import Gains
    from slimdiff.scoring.influence import score

    pipe, stats, _ = saved
    scores = score(pipe.unet, stats, None, require_gains=False)
    table = LatencyTable("cpu", "float32", [2, 4, 8, 8], "h", 10.0, {"ffn_step": 8, "rank_step": 1},
                         [LatencyCurve("u", ["u.qk", "u.vo"], [1, 2], [1.0, 2.0])])
    return {
        "influence scores": (lambda p: type(scores).load(p), scores.save(tmp_path / "scores.json")),
        "propagation gains": (Gains.load, Gains({"a": 1.0}, {"b": 0.5}, {"model_hash": "h"}).save(tmp_path / "gains.json")),
        "width plan": (lambda p: type(allocate(scores, 0.3)).load(p), allocate(scores, 0.3).save(tmp_path / "plan.json")),
        "latency table": (LatencyTable.load, table.save(tmp_path / "latency.json")),
    }


@pytest.mark.parametrize("damage,message", [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: text.replace('"format": "slimdiff-', '"format": "other-'), "format"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k in ("format",)}), "not a complete"),
])
def test_damaged_json_artifacts_name_the_file_in_one_line(saved, tmp_path, damage, message):
    """Scores, gains, plan and latency table: truncated, of another format, or missing their content."""
    for what, (load, path) in _json_artifacts(saved, tmp_path).items():
        load(path)  # the intact file loads
        path.write_text(damage(path.read_text()))
        with pytest.raises(ValueError, match=message) as error:
            load(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value), what
