"""Sharded capture (issue 13): content-addressed shards, exact streaming merge, digest checks, preflight of the
cluster setting, streamed decomposition. CPU only.

Equality with the single-process capture: ``tests.helpers.assert_same_statistics`` (float64 sums to 1e-10 relative,
float32 per-bucket sums to 1e-6; observed 0). The compress flow on a local Dask cluster of 2 worker processes with one
worker SIGKILLed mid-shard (at a fixed point: after its shard's first checkpoint,
``flows.distributed.kill_after_checkpoint``), the gains in 3 module shards on the same kind of cluster, and the MLflow
lineage of the shards are asserted in ``tests/test_flows.py::test_flows_end_to_end``: its changed-checkpoint run is
that sharded run (``check_sharded_run``), instead of a full flow run of its own here.
"""

from __future__ import annotations

import re

import pytest
import torch

import flows.compress  # noqa: F401  (imported here, not under a test's capsys: Prefect binds its log console to the
from slimdiff.runtime.sampling import SamplerSettings

#                          stream active at import, and a closed capsys stream would break every later flow)
from slimdiff.statistics import shards as S
from slimdiff.statistics import sums
from slimdiff.statistics.recording import capture, check_calibration
from slimdiff.statistics.sums import Capture
from tests import helpers as testing

SAMPLER = SamplerSettings(2, 4.0)
PROMPTS = [f"{p} number {i}" for i, p in enumerate(testing.TINY_PROMPTS[:24])]


@pytest.fixture(scope="module")
def pipe():
    return testing.tiny_sd_pipeline()


@pytest.fixture(scope="module")
def reference(pipe) -> Capture:
    return capture(pipe, PROMPTS, SAMPLER, num_buckets=4, batch_size=6, progress=False)


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
    testing.assert_same_statistics(merged, reference)
    check_calibration(merged, PROMPTS, SAMPLER)
    assert [e["digest"] for e in merged.metadata["shards"]] == [s.digest for s in plan.shards]
    assert S.shard_tags(out)["lineage.capture.shards"] == str(len(plan.shards))
    # read lazily, one site at a time: the same moments
    lazy = sums.open_capture(out)
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
    testing.assert_same_statistics(Capture.load(tmp_path / "capture.safetensors"), reference)


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


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A fresh workspace that no job has run in, copied by each bad-cluster case (which sets its capture section)."""
    return testing.make_workspace(tmp_path_factory.mktemp("pristine") / "ws")


@pytest.mark.parametrize("cluster,message", [
    ("tcp://127.0.0.1:9", "capture.cluster tcp://127.0.0.1:9 is unreachable"),
    ("banana", "capture.cluster 'banana' is neither 'local' nor a Dask scheduler address"),
])
def test_bad_cluster_fails_in_preflight_with_one_line(pristine, tmp_path, capsys, monkeypatch, cluster, message):
    import shutil

    import yaml

    from flows.compress import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    workspace = tmp_path / "ws"
    shutil.copytree(pristine, workspace, symlinks=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["capture"].update({"shards": 2, "cluster": cluster})
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    capsys.readouterr()  # only what main prints
    assert main(["--workspace", str(workspace)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (workspace / "outputs").exists()


# ------------------------------------------------------------------------------------------------ streamed decompose


def tiny_capture(family: str, pipe, reference: Capture) -> tuple[torch.nn.Module, Capture]:
    """(model, capture): the tiny SD UNet with the real capture of the module (its metadata records bucket_edges),
    or a tiny Flux transformer (joint and fused groups) with a recorded capture whose metadata records nothing."""
    import copy

    if family == "unet":
        return copy.deepcopy(pipe.unet), reference
    model = testing.tiny_flux_transformer()
    return model, testing.record_capture(model, testing.TINY_DIT_DENOISERS["flux"], (100, 400, 700, 950), batch=2)


def half_widths(model) -> dict[str, int]:
    from slimdiff.arch import compressible_groups

    return {g.name: max(1, g.width // 2) for g in compressible_groups(model)}


class ReadCounter:
    """Counts the sites a lazily read capture reads and the safetensors files opened."""

    def __init__(self, monkeypatch):
        import collections

        import safetensors

        self.sites: collections.Counter = collections.Counter()
        self.opened = 0
        read, open_file = sums._LazySites.__getitem__, safetensors.safe_open

        def counted_read(lazy, site):
            self.sites[site] += 1
            return read(lazy, site)

        def counted_open(*args, **kwargs):
            self.opened += 1
            return open_file(*args, **kwargs)

        monkeypatch.setattr(sums._LazySites, "__getitem__", counted_read)
        monkeypatch.setattr(safetensors, "safe_open", counted_open)


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_streamed_decompose_reads_each_site_once_per_group(pipe, reference, tmp_path, monkeypatch, family):
    import collections

    from slimdiff.arch import compressible_groups
    from slimdiff.arch.sites import group_sites
    from slimdiff.decomposition.apply import decompose

    model, stats = tiny_capture(family, pipe, reference)
    lazy = sums.open_capture(stats.save(tmp_path / "capture.safetensors"))
    reads = ReadCounter(monkeypatch)
    site = next(iter(stats.sites))
    assert site in lazy.sites and "no.such.site" not in lazy.sites and set(lazy.sites) == set(stats.sites)
    assert reads.opened == 0 and not reads.sites  # membership answers from the index
    widths = half_widths(model)
    needed = collections.Counter(s for g in compressible_groups(model) if g.name in widths for s in group_sites(g))
    decompose(model, lazy, widths)
    assert reads.sites == needed  # once per group that reads it (a self-attention input: its QK and its VO group)
    assert reads.opened == sum(needed.values())


def test_num_buckets_answers_from_the_metadata(pipe, reference, tmp_path, monkeypatch):
    one = capture(pipe, PROMPTS[:2], SAMPLER, num_buckets=1, batch_size=2, progress=False)
    for stats, buckets in ((reference, 4), (one, 1)):
        path = stats.save(tmp_path / f"capture{buckets}.safetensors")
        loaded, lazy = Capture.load(path), sums.open_capture(path)
        reads = ReadCounter(monkeypatch)
        assert lazy.num_buckets == loaded.num_buckets == buckets == next(iter(stats.sites.values())).num_buckets
        assert reads.opened == 0 and not reads.sites
        monkeypatch.undo()
    # no recorded bucket_edges (e.g. a capture checkpoint): the first site answers, as before
    recorded = Capture(reference.sites, {k: v for k, v in reference.metadata.items() if k != "bucket_edges"})
    assert sums.open_capture(recorded.save(tmp_path / "bare.safetensors")).num_buckets == 4
    # edges that contradict the statistics are refused by both readers, up front
    Capture(reference.sites, {**reference.metadata, "bucket_edges": [0.0, 500.0, 1000.0]}).save(tmp_path / "odd.safetensors")
    odd = r"odd\.safetensors: its metadata records 2 timestep buckets, its statistics hold 4; the file is corrupt"
    for read in (Capture.load, sums.open_capture):
        with pytest.raises(ValueError, match=odd):
            read(tmp_path / "odd.safetensors")


@pytest.mark.parametrize("family", ["unet", "flux"])
def test_streamed_decompose_equals_the_loaded_one(pipe, reference, tmp_path, family):
    import copy

    from slimdiff.decomposition.apply import decompose

    model, stats = tiny_capture(family, pipe, reference)
    path = stats.save(tmp_path / "capture.safetensors")
    loaded, streamed, widths = copy.deepcopy(model), copy.deepcopy(model), half_widths(model)
    a = decompose(loaded, Capture.load(path), widths)
    b = decompose(streamed, sums.open_capture(path), widths)
    assert a == b
    left, right = loaded.state_dict(), streamed.state_dict()
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_decompose_stage_streams_and_writes_the_loaded_result(pipe, reference, tmp_path, monkeypatch, capsys):
    import copy

    from slimdiff.decomposition.apply import decompose
    from slimdiff.pipeline.stages import config_from, main
    from slimdiff.planning.allocation import allocate
    from slimdiff.runtime.folder import read_weights
    from slimdiff.scoring.influence import score

    reference.save(tmp_path / "capture.safetensors")
    params = testing.stage_workspace(tmp_path, pipe, (tmp_path / "capture.safetensors").read_bytes())
    plan = allocate(score(pipe.unet, reference, None, require_gains=False), 0.3)
    plan.save(tmp_path / "outputs" / "plan" / "width_plan.json")
    monkeypatch.chdir(tmp_path)
    loads = []
    monkeypatch.setattr(Capture, "load", classmethod(lambda cls, *a, **k: loads.append(a) or pytest.fail("Capture.load")))
    assert main(["decompose"]) == 0, capsys.readouterr().err
    assert not loads
    monkeypatch.undo()
    expected = copy.deepcopy(pipe.unet)
    decompose(expected, Capture.load(tmp_path / "outputs" / "capture.safetensors"), plan.widths, config_from(params).reg)
    written = read_weights(tmp_path / "outputs" / "model" / "unet")
    state = expected.state_dict()
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


def test_a_damaged_capture_fails_at_open_with_the_capture_line(reference, tmp_path):
    import json

    from safetensors.torch import save_file

    path = reference.save(tmp_path / "capture.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as loaded:
        Capture.load(truncated)
    with pytest.raises(ValueError, match=r"truncated\.safetensors: unreadable capture \(.*\); the file is truncated or "
                                         r"corrupt, re-run the capture") as opened:
        sums.open_capture(truncated)
    assert str(opened.value) == str(loaded.value) and len(str(opened.value).splitlines()) == 1
    # a site whose parts are missing or disagree: the same line as Capture.load's, from the header alone
    site = next(iter(reference.sites))
    header = {"slimdiff": json.dumps({"format": S._capture_format(), "metadata": reference.metadata}, sort_keys=True)}
    changes = {"lacks count": lambda t: t.pop(f"{site}|count"),
               "count is torch.int32": lambda t: t.__setitem__(f"{site}|count", t[f"{site}|count"].int()),
               "expected float64": lambda t: t.__setitem__(f"{site}|sum_outer", t[f"{site}|sum_outer"].float()),
               "do not match 4 buckets": lambda t: t.__setitem__(f"{site}|bucket_sum", t[f"{site}|bucket_sum"][:2].clone())}
    for message, change in changes.items():
        tensors = {f"{s}|{part}": getattr(stats, part) for s, stats in reference.sites.items()
                   for part in ("sum_outer", "sum", "count", "bucket_sum_outer", "bucket_sum")}
        change(tensors)
        save_file(tensors, str(tmp_path / "parts.safetensors"), metadata=header)
        with pytest.raises(ValueError) as loaded:
            Capture.load(tmp_path / "parts.safetensors")
        with pytest.raises(ValueError, match=message) as opened:
            sums.open_capture(tmp_path / "parts.safetensors")
        assert str(opened.value) == str(loaded.value)
    with pytest.raises(FileNotFoundError, match="capture file not found"):
        sums.open_capture(tmp_path / "missing.safetensors")
    # the file changes or goes away after opening: the capture's wording, naming the file and the site
    lazy = sums.open_capture(path)
    path.write_bytes(data[:-8] + bytes(8))
    changed = rf"capture\.safetensors: site {re.escape(site)}: the capture file changed since it was opened"
    with pytest.raises(ValueError, match=changed):
        lazy.sites[site]
    lazy = sums.open_capture(path)
    path.unlink()
    gone = rf"capture\.safetensors: site {re.escape(site)}: unreadable capture \(.*\); the file is truncated or corrupt"
    with pytest.raises(ValueError, match=gone):
        lazy.second_moment(site)
