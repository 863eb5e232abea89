"""The pipeline end to end on a tiny model in a temporary workspace: DVC stages, Prefect flows, MLflow (issue 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from slimdiff import testing

REPO = Path(__file__).resolve().parents[1]


def make_workspace(root: Path) -> Path:
    """A git+DVC workspace holding the repo's dvc.yaml and code, a tiny pipeline and small prompt files."""
    return testing.make_workspace(root)


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("flows") / "ws")


def mlflow_client(workspace: Path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    return MlflowClient()


def test_flows_end_to_end(prefect_env, workspace, monkeypatch):
    """recompress -> compress (unchanged) -> new budget -> new checkpoint, in one workspace."""
    import mlflow
    import torch
    from diffusers import StableDiffusionPipeline

    from flows.compress import compress
    from flows.recompress import recompress
    from flows.tracking import stage_hashes

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "slimdiff-tiny-sd"

    # a new checkpoint: recompress runs the compress flow, every stage runs, one run, one version
    first = recompress(str(workspace))
    assert first["compressed"] is True and all(first["stages_run"].values()), first["stages_run"]
    client = mlflow_client(workspace)
    runs = client.search_runs([client.get_experiment_by_name("slimdiff").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["allocate.budget"] == "0.4" and run.data.params["model.id"] == "tiny-sd"
    assert {"plan.removed_fraction", "fidelity.image_psnr_db", "macs.ratio"} <= set(run.data.metrics)
    assert run.inputs.dataset_inputs[0].dataset.name == "slimset"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"width_plan.json", "width_plan.png", "metrics.json", "report", "dvc.lock"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "report")} >= {"report/report.md", "report/samples.png"}
    version = client.get_model_version_by_alias(name, "candidate")
    lineage = {k[len("lineage."):]: v for k, v in version.tags.items() if k.startswith("lineage.")}
    assert lineage == stage_hashes(workspace / "dvc.lock")
    assert set(lineage) == {"curate", "capture", "gains", "latency", "score", "allocate", "decompose", "evaluate", "report"}
    assert run.data.tags["lineage.capture"] == lineage["capture"]
    # the test gate (min_image_psnr_db 0: a PSNR of images in [0, 1] is >= 0) passes: champion, with the reason
    assert version.tags["gate.decision"] == "champion", version.tags
    assert version.tags["gate.reason"].startswith("passed: fidelity.image_psnr_db="), version.tags["gate.reason"]
    assert client.get_model_version_by_alias(name, "champion").version == version.version
    # the workspace is a git repository without a commit: the tag says so instead of a bare "unknown"
    assert version.tags["git.commit"].startswith("unknown (git rev-parse HEAD failed in "), version.tags["git.commit"]

    # the same checkpoint again: nothing registered
    assert recompress(str(workspace))["compressed"] is False
    # compress with nothing changed: no stage re-runs, the registered version is reused
    again = compress(str(workspace))
    assert not any(again["stages_run"].values()) and again["reused"], again
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    # a new budget re-runs allocate onwards and a new gain setting gains onwards, never capture
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["allocate"]["budget"] = 0.3
    params["score"]["rel_noise"] = 0.04
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = compress(str(workspace))
    assert [s for s, r in third["stages_run"].items() if r] == ["gains", "score", "allocate", "decompose", "evaluate", "report"]
    assert len(client.search_model_versions(f"name='{name}'")) == 2

    # a changed checkpoint: recompress registers a new version with the new hash
    pipe = StableDiffusionPipeline.from_pretrained(workspace / "data" / "model")
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.01)
    pipe.save_pretrained(workspace / "data" / "model")
    fourth = recompress(str(workspace))
    assert fourth["compressed"] is True and fourth["stages_run"]["capture"]
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 3 and len({v.tags["checkpoint_hash"] for v in versions}) == 2

    # the registered model is a pyfunc that turns prompts into images
    model = mlflow.pyfunc.load_model(f"models:/{name}/{fourth['version']}")
    images = model.predict(["a small red circle at the top left"], params={"steps": 2})
    assert images.shape[0] == 1 and images.dtype.name == "uint8"


@pytest.mark.parametrize("change,message", [
    (lambda p: p["model"].update(path="data/missing"), "not a diffusers pipeline folder"),
    (lambda p: p["allocate"].update(budget=1.5), "budget 1.5"),
    (lambda p: p["curate"].update(sources=["data/empty.txt"]), "is empty"),
    (lambda p: p["model"].update(dtype="int8"), "unknown dtype 'int8'"),
    pytest.param(lambda p: p["model"].update(device="cuda"), "CUDA is not available",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_one_line_error_and_no_outputs(tmp_path, change, message):
    workspace = make_workspace(tmp_path / "ws")
    (workspace / "data" / "empty.txt").write_text("")
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    change(params)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "flows.compress", "--workspace", str(workspace)], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, MLFLOW_TRACKING_URI=""))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (workspace / "outputs").exists() and not (workspace / "mlflow.db").exists()


def test_unreachable_tracking_uri_fails_before_any_stage(tmp_path):
    workspace = make_workspace(tmp_path / "ws")
    result = subprocess.run([sys.executable, "-m", "flows.compress", "--workspace", str(workspace)], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert result.returncode == 2
    assert "unreachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (workspace / "outputs").exists()


def test_quality_gate_decisions():
    from flows.tracking import quality_gate

    metrics = {"fidelity": {"image_psnr_db": 20.0}, "alignment": {"ratio_to_original": 0.9}}
    assert quality_gate(metrics, {"min_image_psnr_db": 15}).passed
    decision = quality_gate(metrics, {"min_image_psnr_db": 15, "min_alignment_ratio": 0.95})
    assert not decision.passed and "alignment.ratio_to_original=0.9" in decision.reason
    with pytest.raises(KeyError, match="unknown gate threshold"):
        quality_gate(metrics, {"max_latency": 3})


@pytest.mark.parametrize("value", [None, float("nan"), "n/a"])
def test_quality_gate_fails_on_a_nan_or_missing_metric(value):
    """evaluate writes a NaN metric as null: the gate fails naming it (never float(None)), and never passes."""
    from flows.tracking import quality_gate

    metrics = {"fidelity": {"image_psnr_db": value}, "alignment": {"ratio_to_original": 0.99}}
    decision = quality_gate(metrics, {"min_image_psnr_db": 15, "min_alignment_ratio": 0.95})
    assert not decision.passed
    assert "metric fidelity.image_psnr_db is NaN/missing" in decision.reason and "the gate cannot pass" in decision.reason
    assert "alignment.ratio_to_original=0.99" not in decision.reason  # failures only; the passing check is not listed
    missing = quality_gate({"fidelity": {}}, {"min_noise_sqnr_db": 10})
    assert not missing.passed and "metric fidelity.noise_sqnr_db is NaN/missing" in missing.reason
    with pytest.raises(ValueError, match=r"params.yaml gate.min_image_psnr_db must be a finite number, got nan"):
        quality_gate(metrics, {"min_image_psnr_db": float("nan")})
