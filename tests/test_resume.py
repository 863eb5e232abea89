"""Checkpointed capture and gains survive a real kill: SIGKILL a run mid-way, re-run it, get the uninterrupted result."""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring.gains import Gains, measure_gains
from slimdiff.statistics.recording import capture
from slimdiff.statistics.sums import Capture
from tests.helpers import tiny_sd_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")]

REPO = Path(__file__).resolve().parents[1]

# The run a test kills and re-runs, in its own process; the test loads the same file in-process for the
# uninterrupted reference. Everything is seeded, and one thread keeps the float sums bit-identical
# between the processes (tests/conftest.py sets one thread too).
HELPER = '''
import sys

import torch

torch.set_num_threads(1)

from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring.gains import measure_gains
from slimdiff.statistics.recording import capture
from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

PROMPTS = [f"{prompt}, number {i}" for i, prompt in enumerate(TINY_PROMPTS * 2)][:60]
SAMPLER = SamplerSettings(num_inference_steps=3, guidance_scale=4.0, seed=7)


def run_capture(checkpoint=None, seed=7):
    pipe = tiny_sd_pipeline()
    sampler = SamplerSettings(num_inference_steps=3, guidance_scale=4.0, seed=seed)
    return capture(pipe, PROMPTS, sampler, batch_size=2, checkpoint=checkpoint, checkpoint_every=2, progress=False)


def run_gains(checkpoint=None, seed=0):
    return measure_gains(tiny_sd_pipeline(), PROMPTS[:4], SAMPLER, num_calls=4, seed=seed, checkpoint=checkpoint)


if __name__ == "__main__":
    mode, checkpoint, final = sys.argv[1:4]
    if mode == "capture":
        run_capture(checkpoint).save(final)
    else:
        run_gains(checkpoint).save(final)
'''


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "resume_helper.py"
    path.write_text(HELPER)
    return path, runpy.run_path(str(path))


def start(helper_path: Path, mode: str, checkpoint: Path, final: Path, log: Path, kill_at: str = "") -> subprocess.Popen:
    """The helper in its own process and session; stdout and stderr go to ``log`` (a file: a full pipe cannot stall
    it). ``kill_at``: ``SLIMDIFF_KILL_AT`` (``slimdiff.failpoints``), a deterministic SIGKILL at that point."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true", "SLIMDIFF_KILL_AT": kill_at}
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, str(helper_path), mode, str(checkpoint), str(final)], cwd=str(REPO),
                                env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                                start_new_session=True)


def killed_at(helper_path: Path, mode: str, checkpoint: Path, final: Path, log: Path, point: str) -> None:
    """Run the helper until ``slimdiff.failpoints`` kills it at ``point``; fail if it ends any other way."""
    process = start(helper_path, mode, checkpoint, final, log, kill_at=point)
    try:
        returncode = process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    assert returncode == -signal.SIGKILL, f"not killed at {point!r} (rc {returncode}):\n{log.read_text()[-2000:]}"


def finish(helper_path: Path, mode: str, checkpoint: Path, final: Path, log: Path) -> str:
    """Run the helper to completion; its output."""
    process = start(helper_path, mode, checkpoint, final, log)
    try:
        returncode = process.wait(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    output = log.read_text()
    assert returncode == 0, output[-3000:]
    return output


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float, what: str) -> None:
    a, b = a.double().cpu(), b.double().cpu()
    scale = float(b.norm())
    assert float((a - b).norm()) <= rel * max(scale, 1e-300), what


def test_killed_capture_resumes_to_the_uninterrupted_result(helper, tmp_path):
    helper_path, lib = helper
    checkpoint, final = tmp_path / "capture.ckpt.safetensors", tmp_path / "capture.safetensors"
    # killed right after the second checkpoint (4 of 60 prompts), a point of the work, not of the clock
    killed_at(helper_path, "capture", checkpoint, final, tmp_path / "killed.log", f"wrote {checkpoint.as_posix()}@2")
    assert not final.exists()
    done_at_kill = Capture.load(checkpoint).metadata["checkpoint"]["done"]

    err = finish(helper_path, "capture", checkpoint, final, tmp_path / "resumed.log")
    total = len(lib["PROMPTS"])
    match = re.search(r"capture: resuming (.+) after (\d+) prompts", err)
    assert match, err[-2000:]
    resumed_after = int(match.group(2))
    print(f"\ncapture killed and resumed after {resumed_after} of {total} prompts")
    assert resumed_after == done_at_kill == 4 and resumed_after < total
    assert Path(match.group(1)) == checkpoint

    resumed = Capture.load(final)
    reference = Capture.load(lib["run_capture"]().save(tmp_path / "reference.safetensors"))
    # metadata written by another process (scheduler config included) equals this process's
    assert resumed.metadata == reference.metadata
    assert resumed.metadata["denoiser_calls"] == total // 2 * 3
    assert resumed.sites.keys() == reference.sites.keys()
    for site, stats in reference.sites.items():
        other = resumed.sites[site]
        assert torch.equal(other.count, stats.count), site
        for part in ("sum_outer", "sum", "bucket_sum_outer", "bucket_sum"):
            assert_close(getattr(other, part), getattr(stats, part), 1e-10, f"{site} {part}")


def test_killed_gains_resume_to_the_uninterrupted_result(helper, tmp_path):
    helper_path, lib = helper
    checkpoint, final = tmp_path / "gains.ckpt.json", tmp_path / "gains.json"

    killed_at(helper_path, "gains", checkpoint, final, tmp_path / "killed.log", f"wrote {checkpoint.as_posix()}@3")
    assert len(json.loads(checkpoint.read_text())["gains"]) >= 1  # the checkpoint holds the modules measured
    assert not final.exists()

    err = finish(helper_path, "gains", checkpoint, final, tmp_path / "resumed.log")
    match = re.search(r"gains: resuming (.+) with (\d+) modules measured", err)
    assert match, err[-2000:]
    resumed = Gains.load(final)
    reference = lib["run_gains"]()
    print(f"\ngains killed and resumed with {match.group(2)} of {len(reference.gains)} modules measured")
    assert 0 < int(match.group(2)) < len(reference.gains)
    assert resumed.gains.keys() == reference.gains.keys()
    for name, value in reference.gains.items():
        assert resumed.gains[name] == pytest.approx(value, rel=1e-12, abs=0), name
    for name, value in reference.block_influence.items():
        assert resumed.block_influence[name] == pytest.approx(value, rel=1e-12, abs=0), name


def test_checkpoint_of_other_settings_is_not_resumed(helper, tmp_path, capsys):
    _, lib = helper
    sampler = SamplerSettings(num_inference_steps=2, guidance_scale=4.0, seed=7)
    prompts = lib["PROMPTS"][:4]
    checkpoint = tmp_path / "capture.ckpt.safetensors"
    pipe = tiny_sd_pipeline()
    # a run with another seed leaves a checkpoint after its first batch (the caller removes it after the final save)
    capture(pipe, prompts, SamplerSettings(2, 4.0, seed=8), batch_size=2, checkpoint=checkpoint, checkpoint_every=2, progress=False)
    assert checkpoint.is_file()
    capsys.readouterr()
    result = capture(pipe, prompts, sampler, batch_size=2, checkpoint=checkpoint, checkpoint_every=2, progress=False)
    err = capsys.readouterr().err
    assert f"capture: not resuming {checkpoint}: it was written with other settings (sampler); starting over" in err, err
    assert "resuming" not in err.replace("not resuming", "")
    plain = capture(pipe, prompts, sampler, batch_size=2, progress=False)
    for site, stats in plain.sites.items():
        assert torch.equal(result.sites[site].sum_outer, stats.sum_outer), site

    gains_checkpoint = tmp_path / "gains.ckpt.json"
    measure_gains(pipe, prompts[:2], sampler, num_calls=2, seed=1, checkpoint=gains_checkpoint)
    assert gains_checkpoint.is_file()
    capsys.readouterr()
    gains = measure_gains(pipe, prompts[:2], sampler, num_calls=2, seed=0, checkpoint=gains_checkpoint)
    err = capsys.readouterr().err
    assert f"gains: not resuming {gains_checkpoint}: it was written with other settings; starting over" in err, err
    assert gains.gains == measure_gains(pipe, prompts[:2], sampler, num_calls=2, seed=0).gains


def test_damaged_checkpoints_are_reported_and_not_resumed(tmp_path, capsys):
    """A foreign or truncated checkpoint file is said and ignored; the run equals a fresh one."""
    pipe = tiny_sd_pipeline()
    sampler = SamplerSettings(num_inference_steps=2, guidance_scale=4.0, seed=3)
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    capture_ckpt, gains_ckpt = tmp_path / "capture.ckpt", tmp_path / "gains.ckpt"
    capture_ckpt.write_bytes(b"\x00" * 40)
    gains_ckpt.write_text('{"fingerprint": ')
    resumed = capture(pipe, prompts, sampler, batch_size=2, checkpoint=capture_ckpt, checkpoint_every=100, progress=False)
    gains = measure_gains(pipe, prompts[:2], sampler, num_calls=2, checkpoint=gains_ckpt)
    err = capsys.readouterr().err
    assert f"not resuming {capture_ckpt}: unreadable" in err and f"not resuming {gains_ckpt}: not a readable" in err
    fresh = capture(pipe, prompts, sampler, batch_size=2, progress=False)
    for site, stats in fresh.sites.items():
        assert torch.equal(stats.sum_outer, resumed.sites[site].sum_outer), site
    assert gains.gains == measure_gains(pipe, prompts[:2], sampler, num_calls=2).gains
