"""Sharded capture (issue 13): content-addressed shards, exact streaming merge, digest checks, and the compress flow
on a local Dask cluster of 2 worker processes with one worker SIGKILLed mid-shard. CPU only.

Equality: each shard forms exactly the batches the single-process capture forms, so every per-call Gram matrix is
the same and the pooled float64 sums differ only by the order of float64 additions (asserted to 1e-10 relative,
observed 0). Per-bucket sums are float32 (capture.py) and float32 addition is not associative: asserted to 1e-6
relative (observed 0 on this machine; rounding of the shard additions could show ~1e-7).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

import flows.compress  # noqa: F401  (imported here, not under a test's capsys: Prefect binds its log console to the
#                          stream active at import, and a closed capsys stream would break every later flow)
from slimdiff import shards as S
from slimdiff import testing
from slimdiff.capture import Capture, SamplerSettings, capture, check_calibration

SAMPLER = SamplerSettings(2, 4.0)
PROMPTS = [f"{p} number {i}" for i, p in enumerate(testing.TINY_PROMPTS[:24])]


@pytest.fixture(scope="module")
def pipe():
    return testing.tiny_sd_pipeline()


@pytest.fixture(scope="module")
def reference(pipe) -> Capture:
    return capture(pipe, PROMPTS, SAMPLER, num_buckets=4, batch_size=6, progress=False)


def assert_same_statistics(merged: Capture, single: Capture) -> None:
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


def test_split_prompts_whole_batches():
    runs = S.split_prompts(PROMPTS, 6, 3)
    assert [len(r) for r in runs] == [12, 6, 6] and sum(runs, []) == PROMPTS
    assert [len(r) for r in S.split_prompts(PROMPTS[:20], 6, 4)] == [6, 6, 6, 2]
    with pytest.raises(ValueError, match=r"capture.shards 5 exceeds the 4 batches of 24 prompts at capture.batch_size 6"):
        S.split_prompts(PROMPTS, 6, 5)
    with pytest.raises(ValueError, match=r"capture.shards must be a whole number >= 1, got 0"):
        S.split_prompts(PROMPTS, 6, 0)
    groups = S.split_sites(list("abcdef"), [10, 10, 10, 40, 10, 10], 2)
    assert sum(groups, []) == list("abcdef") and all(groups)


@pytest.mark.parametrize("shards,site_groups", [(1, 1), (2, 1), (4, 1), (3, 2)])
def test_merged_shards_equal_the_single_process_capture(pipe, reference, tmp_path, shards, site_groups):
    out = tmp_path / "capture.safetensors"
    plan, computed = S.capture_sharded(pipe, PROMPTS, SAMPLER, tmp_path / "shards", out, shards=shards,
                                       site_groups=site_groups, num_buckets=4, batch_size=6)
    assert computed == list(range(shards * site_groups)) and len({s.digest for s in plan.shards}) == len(plan.shards)
    if site_groups > 1:  # disjoint site sets, together all sites
        sets = [set(s.sites) for s in plan.shards if s.prompt_index == 0]
        assert sum(len(x) for x in sets) == len(set().union(*sets)) == len(reference.sites)
    merged = Capture.load(out)
    assert_same_statistics(merged, reference)
    check_calibration(merged, PROMPTS, SAMPLER)
    assert [e["digest"] for e in merged.metadata["shards"]] == [s.digest for s in plan.shards]
    assert S.shard_tags(out)["lineage.capture.shards"] == str(len(plan.shards))
    # read lazily, one site at a time: the same moments
    lazy = S.open_capture(out)
    for site in list(reference.sites)[:3]:
        assert torch.equal(lazy.second_moment(site), merged.second_moment(site))


def test_rerun_computes_only_missing_shards_and_resumes_a_killed_one(pipe, reference, tmp_path, capsys):
    folder = tmp_path / "shards"
    plan = S.plan_shards(pipe, PROMPTS, SAMPLER, shards=2, num_buckets=4, batch_size=6)
    S.capture_shard(pipe, plan, plan.shards[0], folder)
    # shard 1 dies after its first checkpoint (6 prompts, one batch of its two): an error on the third denoiser call
    calls = {"n": 0}

    def die(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == SAMPLER.num_inference_steps + 1:  # CFG: one call per step
            raise RuntimeError("worker lost")

    handle = pipe.unet.register_forward_pre_hook(die, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="worker lost"):
            S.capture_shard(pipe, plan, plan.shards[1], folder, checkpoint_every=6)
    finally:
        handle.remove()
    assert (folder / f".{plan.shards[1].digest}.ckpt").is_file() and not plan.path(folder, plan.shards[1]).exists()
    assert not (folder / f".{plan.shards[1].digest}.lease").exists()
    first = plan.path(folder, plan.shards[0]).stat().st_mtime_ns
    capsys.readouterr()
    assert S.run_shards(pipe, plan, folder, checkpoint_every=6) == [1]  # only the failed shard
    assert "resuming" in capsys.readouterr().err
    assert plan.path(folder, plan.shards[0]).stat().st_mtime_ns == first
    assert S.run_shards(pipe, plan, folder) == []  # nothing left to compute
    S.merge_shards(plan, folder, tmp_path / "capture.safetensors")
    assert_same_statistics(Capture.load(tmp_path / "capture.safetensors"), reference)


def test_a_shard_of_another_model_or_sampler_is_rejected(pipe, tmp_path):
    plan = S.plan_shards(pipe, PROMPTS, SAMPLER, shards=2, num_buckets=4, batch_size=6)
    folder = tmp_path / "shards"
    S.run_shards(pipe, plan, folder)
    good = plan.path(folder, plan.shards[1]).read_bytes()

    other_sampler = SamplerSettings(2, 3.0)
    foreign = S.plan_shards(pipe, PROMPTS, other_sampler, shards=2, num_buckets=4, batch_size=6)
    S.capture_shard(pipe, foreign, foreign.shards[1], tmp_path / "foreign")
    plan.path(folder, plan.shards[1]).write_bytes(foreign.path(tmp_path / "foreign", foreign.shards[1]).read_bytes())
    with pytest.raises(ValueError, match=r"is not the planned .*captured with another sampler .*rejected, not merged"):
        S.merge_shards(plan, folder, tmp_path / "capture.safetensors")
    assert not (tmp_path / "capture.safetensors").exists()

    other = testing.tiny_sd_pipeline()
    with torch.no_grad():
        other.unet.conv_in.weight.mul_(1.01)
    other_model = S.plan_shards(other, PROMPTS, SAMPLER, shards=2, num_buckets=4, batch_size=6)
    S.capture_shard(other, other_model, other_model.shards[1], tmp_path / "other")
    plan.path(folder, plan.shards[1]).write_bytes(other_model.path(tmp_path / "other", other_model.shards[1]).read_bytes())
    with pytest.raises(ValueError, match=r"captured with another model_hash .*rejected, not merged"):
        S.merge_shards(plan, folder, tmp_path / "capture.safetensors")
    # a worker whose model differs from the plan refuses to compute the shard at all
    with pytest.raises(ValueError, match=r"was planned for another model_hash"):
        S.capture_shard(other, plan, plan.shards[1], tmp_path / "refused")

    plan.path(folder, plan.shards[1]).write_bytes(good)
    S.merge_shards(plan, folder, tmp_path / "capture.safetensors")  # the right shard merges


@pytest.mark.parametrize("cluster,message", [
    ("tcp://127.0.0.1:9", "capture.cluster tcp://127.0.0.1:9 is unreachable"),
    ("banana", "capture.cluster 'banana' is neither 'local' nor a Dask scheduler address"),
])
def test_bad_cluster_fails_in_preflight_with_one_line(tmp_path, capsys, monkeypatch, cluster, message):
    from flows.compress import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = testing.make_workspace(tmp_path / "ws", {"capture": {"shards": 2, "cluster": cluster}})
    capsys.readouterr()  # building the workspace is noisy
    assert main(["--workspace", str(workspace)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (workspace / "outputs").exists()


# ------------------------------------------------------------------------------------------------ the flow


@pytest.fixture(scope="module")
def prefect_env():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


class WorkerKiller:
    """SIGKILLs the worker process that holds a shard lease once that shard has checkpointed (mid-shard)."""

    def __init__(self, folder: Path):
        self.folder, self.killed = folder, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            for checkpoint in self.folder.glob(".*.ckpt") if self.folder.is_dir() else []:
                digest = checkpoint.name[1:-len(".ckpt")]
                lease = self.folder / f".{digest}.lease"
                try:
                    pid = int(yaml.safe_load(lease.read_text())["pid"])
                except (OSError, ValueError, TypeError, KeyError):
                    continue
                if not (self.folder / f"{digest}.safetensors").exists():
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append((digest, pid))
                    return
            time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_flow_on_two_local_workers_with_a_killed_worker(prefect_env, tmp_path, monkeypatch):
    """4 shards on a local Dask cluster of 2 worker processes; one worker is SIGKILLed during a shard; the flow
    finishes, the statistics equal the single-process capture, and the MLflow lineage names the shard digests."""
    import mlflow
    from mlflow import MlflowClient

    from flows.compress import compress
    from slimdiff.compress import load_pipeline, read_prompts
    from slimdiff.stages import SHARD_DIR

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = testing.make_workspace(tmp_path / "ws", {
        "curate": {"n": 24}, "sampler": {"steps": 4},
        "capture": {"batch_size": 3, "checkpoint_every": 3, "shards": 4, "cluster": "local", "workers": 2}})
    killer = WorkerKiller(workspace / SHARD_DIR)
    try:
        result = compress(str(workspace))
    finally:
        killer.stop.set()
    assert killer.killed, "no shard was caught mid-way (after its checkpoint) to kill its worker"
    assert result["stages_run"]["capture"]
    assert not list((workspace / SHARD_DIR).glob("*.safetensors"))  # merged shards are removed

    merged = Capture.load(workspace / "outputs" / "capture.safetensors")
    pipe = load_pipeline(str(workspace / "data" / "model"), "cpu", torch.float32)
    prompts = read_prompts(workspace / "outputs" / "slimset" / "slimset.jsonl")
    sampler = SamplerSettings(4, 4.0)
    single = capture(pipe, prompts, sampler, num_buckets=4, batch_size=3, model_id="tiny-sd", progress=False)
    assert_same_statistics(merged, single)
    plan = S.plan_shards(pipe, prompts, sampler, shards=4, num_buckets=4, batch_size=3, model_id="tiny-sd")
    assert killer.killed[0][0] in {s.digest for s in plan.shards}

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    version = MlflowClient().get_model_version_by_alias("slimdiff-tiny-sd", "candidate")
    assert version.tags["lineage.capture.shards"] == "4"
    assert [version.tags[f"lineage.capture.shard.{i}"] for i in range(4)] == [s.digest for s in plan.shards]
