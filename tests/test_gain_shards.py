"""Sharded propagation gains (issue 13): module subsets measured apart equal the one-process gains, only missing
shards are measured again, a killed shard resumes from its checkpoint, and a foreign shard is rejected. CPU only;
the flow on a local Dask cluster is covered in tests/test_flows.py (test_flows_end_to_end's sharded run).

Equality is exact (``==``): every shard records the same clean calls and seeds each module's noise by its index in
the whole model, so each gain is computed by the same operations on the same numbers.
"""

from __future__ import annotations

import json

import pytest

from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring import gain_shards as G
from slimdiff.scoring import gains as influence
from slimdiff.scoring.gains import measure_gains
from tests import helpers as testing

SAMPLER = SamplerSettings(2, 4.0)
PROMPTS = list(testing.TINY_PROMPTS[:3])
CALLS, NOISE, SEED = 2, 0.05, 3


@pytest.fixture(scope="module")
def pipe():
    return testing.tiny_sd_pipeline()


@pytest.fixture(scope="module")
def single(pipe):
    return measure_gains(pipe, PROMPTS, SAMPLER, num_calls=CALLS, rel_noise=NOISE, seed=SEED)


def sharded(pipe, folder, shards):
    return G.measure_gains_sharded(pipe, PROMPTS, SAMPLER, folder, shards=shards, num_calls=CALLS, rel_noise=NOISE,
                                   seed=SEED)


def count_module_measurements(monkeypatch) -> list[str]:
    """Names of the modules whose gain is measured from here on (one entry per module)."""
    seen: list[str] = []
    original = influence._perturbed.__init__

    def spy(self, denoiser, group, *args, **kwargs):
        if not seen or seen[-1] != group.name:
            seen.append(group.name)
        original(self, denoiser, group, *args, **kwargs)

    monkeypatch.setattr(influence._perturbed, "__init__", spy)
    return seen


@pytest.mark.parametrize("shards", [2, 3, 100])
def test_sharded_gains_equal_the_one_process_gains(pipe, single, tmp_path, shards):
    gains, plan, measured = sharded(pipe, tmp_path, shards)
    modules = len(single.gains)
    assert len(plan.shards) == min(shards, modules) and measured == list(range(len(plan.shards)))
    assert [m for s in plan.shards for m in s.modules] == list(single.gains)  # disjoint, contiguous, all modules
    assert gains.gains == single.gains
    assert gains.block_influence == single.block_influence
    assert {k: v for k, v in gains.metadata.items() if k != "shards"} == single.metadata
    assert [e["digest"] for e in gains.metadata["shards"]] == [s.digest for s in plan.shards]


def test_rerun_measures_only_the_missing_shard(pipe, single, tmp_path, monkeypatch):
    _, plan, _ = sharded(pipe, tmp_path, 3)
    plan.path(tmp_path, plan.shards[1]).unlink()
    seen = count_module_measurements(monkeypatch)
    gains, _, measured = sharded(pipe, tmp_path, 3)
    assert measured == [1]
    assert seen == list(plan.shards[1].modules)
    assert gains.gains == single.gains


def test_a_killed_shard_resumes_from_its_checkpoint(pipe, single, tmp_path, monkeypatch):
    plan = G.plan_gain_shards(pipe, PROMPTS, SAMPLER, shards=2, num_calls=CALLS, rel_noise=NOISE, seed=SEED)
    shard = plan.shards[0]
    assert len(shard.modules) >= 3
    calls = {"n": 0}
    original = influence._output

    def dies_in_the_third_module(denoiser, call):
        calls["n"] += 1
        if calls["n"] > CALLS * (1 + 2):  # the clean passes, then two modules' perturbed passes
            raise KeyboardInterrupt("worker killed")
        return original(denoiser, call)

    monkeypatch.setattr(influence, "_output", dies_in_the_third_module)
    with pytest.raises(KeyboardInterrupt):
        G.measure_gain_shard(pipe, plan, shard, PROMPTS, SAMPLER, tmp_path)
    monkeypatch.setattr(influence, "_output", original)
    assert not plan.path(tmp_path, shard).exists()
    checkpoint = json.loads((tmp_path / f".{shard.digest}.ckpt").read_text())
    assert list(checkpoint["gains"]) == list(shard.modules[:2])

    seen = count_module_measurements(monkeypatch)
    G.measure_gain_shard(pipe, plan, shard, PROMPTS, SAMPLER, tmp_path)
    assert seen == list(shard.modules[2:])
    assert not (tmp_path / f".{shard.digest}.ckpt").exists()
    data = json.loads(plan.path(tmp_path, shard).read_text())
    assert data["gains"] == {m: single.gains[m] for m in shard.modules}


def test_a_shard_of_other_settings_is_rejected_not_merged(pipe, tmp_path):
    _, plan, _ = sharded(pipe, tmp_path / "seed3", 2)
    other = G.plan_gain_shards(pipe, PROMPTS, SAMPLER, shards=2, num_calls=CALLS, rel_noise=NOISE, seed=SEED + 1)
    assert [s.digest for s in other.shards] != [s.digest for s in plan.shards]  # another seed, another address
    for mine, theirs in zip(plan.shards, other.shards):  # files of the seed-3 run under the seed-4 names
        (tmp_path / "seed3" / mine.filename()).rename(tmp_path / "seed3" / theirs.filename())
    with pytest.raises(ValueError, match=r"was measured with another seed than this model"):
        G.merge_gain_shards(other, tmp_path / "seed3")
    with pytest.raises(ValueError, match=r"planned for another seed"):
        measure_gains(pipe, PROMPTS, SAMPLER, num_calls=CALLS, rel_noise=NOISE, seed=SEED, expect=other.fingerprint)


def test_disagreeing_block_influence_is_rejected(pipe, tmp_path):
    _, plan, _ = sharded(pipe, tmp_path, 2)
    path = plan.path(tmp_path, plan.shards[1])
    data = json.loads(path.read_text())
    block = next(iter(data["block_influence"]))
    data["block_influence"][block] *= 1 + 1e-4
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"block influence of .* shard 0 measured"):
        G.merge_gain_shards(plan, tmp_path)


def test_bad_shard_count_and_unknown_module_are_refused(pipe):
    with pytest.raises(ValueError, match=r"gain shards must be a whole number >= 1, got 0"):
        G.split_modules(["a", "b"], 0)
    with pytest.raises(ValueError, match=r"not compressible groups of this denoiser, e.g. 'nope'"):
        measure_gains(pipe, PROMPTS, SAMPLER, num_calls=CALLS, only=["nope"])
    from slimdiff.pipeline.stages import gain_shards

    with pytest.raises(ValueError, match=r"score.gain_shards must be a whole number >= 1, got 'two'"):
        gain_shards({"score": {"gain_shards": "two"}})


def test_sharded_truncation_gains_equal_the_one_process_gains_and_are_their_own_shards(pipe, tmp_path):
    from slimdiff.decomposition.closed_form import DEFAULT_REG
    from slimdiff.scoring.gains import TruncationReference
    from slimdiff.statistics.recording import capture

    stats = capture(pipe, PROMPTS, SAMPLER, num_buckets=2, batch_size=3, progress=False)
    reference = TruncationReference(stats, DEFAULT_REG)
    one = measure_gains(pipe, PROMPTS, SAMPLER, num_calls=CALLS, rel_noise=NOISE, seed=SEED, reference=reference)
    gains, plan, measured = G.measure_gains_sharded(pipe, PROMPTS, SAMPLER, tmp_path, shards=3, num_calls=CALLS,
                                                    rel_noise=NOISE, seed=SEED, reference=reference)
    assert measured == [0, 1, 2] and gains.gains == one.gains
    assert gains.metadata["method"] == one.metadata["method"] == "truncation"
    noise = G.plan_gain_shards(pipe, PROMPTS, SAMPLER, shards=3, num_calls=CALLS, rel_noise=NOISE, seed=SEED)
    assert noise.fingerprint["method"] == "noise" and not {s.digest for s in noise.shards} & {s.digest for s in plan.shards}
    other_keep = G.plan_gain_shards(pipe, PROMPTS, SAMPLER, shards=3, num_calls=CALLS, rel_noise=NOISE, seed=SEED,
                                    reference=TruncationReference(stats, DEFAULT_REG, keep=0.25))
    assert other_keep.missing(tmp_path) == other_keep.shards  # another reference width: nothing reused
