"""The evaluate stage measures held-out sampler settings besides the calibration sampler (issue 23), and bad settings
fail in the flow's preflight with one line."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from tests import helpers as testing

STAGES = ("curate", "capture", "gains", "latency", "score", "allocate", "decompose", "evaluate")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    samplers = [{"name": "3 steps", "steps": 3},
                {"name": "Karras sigmas", "scheduler": "FlowMatchEulerDiscreteScheduler",
                 "scheduler_config": {"use_karras_sigmas": True}}]
    root = testing.make_workspace(tmp_path_factory.mktemp("held") / "ws", {"evaluate": {"samplers": samplers, "held_out_n": 2},
                                                                          "allocate": {"budget": 0.4}}, family="flux")
    previous = os.getcwd()
    os.chdir(root)
    try:
        from slimdiff.pipeline.stages import main

        for stage in STAGES:
            assert main([stage]) == 0, stage
    finally:
        os.chdir(previous)
    return root, json.loads((root / "outputs" / "metrics.json").read_text())


def test_each_held_out_sampler_is_measured_and_the_worst_is_named(evaluated):
    _, metrics = evaluated
    held = metrics["held_out"]
    assert set(held) == {"3 steps", "Karras sigmas"}
    assert held["3 steps"]["sampler"]["num_inference_steps"] == 3
    assert held["Karras sigmas"]["sampler"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    worst = metrics["worst"]["fidelity.noise_sqnr_db"]
    values = [metrics["fidelity"]["noise_sqnr_db"]] + [h["fidelity"]["noise_sqnr_db"] for h in held.values()]
    assert worst["value"] == min(values) and worst["sampler"] in {"calibration sampler", *held}


BAD = {
    "unknown scheduler 'NopeScheduler'": [{"scheduler": "NopeScheduler"}],
    "steps must be a whole number >= 1, got 0": [{"steps": 0}],
    "unknown key(s) ['stepz']": [{"stepz": 3}],
    "is used twice": [{"name": "a", "steps": 3}, {"name": "a", "steps": 4}],
}


@pytest.mark.parametrize("expected", list(BAD))
def test_bad_held_out_samplers_fail_in_preflight_with_one_line(tmp_path, capsys, expected):
    from flows.compress import main

    root = testing.make_workspace(tmp_path / "ws", family="flux")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["samplers"] = BAD[expected]
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    capsys.readouterr()  # what building the workspace printed
    assert main(["--workspace", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and "evaluate.samplers[" in err[0], err
    assert not (root / "outputs").exists() or not any((root / "outputs").iterdir())
