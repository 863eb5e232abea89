"""The pipeline end to end on a tiny model in a temporary workspace: DVC stages, Prefect flows, MLflow (issue 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import helpers as testing

REPO = Path(__file__).resolve().parents[1]


def make_workspace(root: Path) -> Path:
    """A git+DVC workspace holding the repo's dvc.yaml and code, a tiny pipeline and small prompt files."""
    return testing.make_workspace(root)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A fresh workspace that no job has run in (and an empty prompt file), copied by the end-to-end test and by each
    bad-input case: one workspace built for the module."""
    workspace = make_workspace(tmp_path_factory.mktemp("pristine") / "ws")
    (workspace / "data" / "empty.txt").write_text("")
    return workspace


def copy_pristine(pristine: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(pristine, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def workspace(pristine, tmp_path_factory):
    return copy_pristine(pristine, tmp_path_factory.mktemp("flows") / "ws")


def mlflow_client(workspace: Path):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    return MlflowClient()


@pytest.mark.slow
def test_flows_end_to_end(prefect_api_url, workspace, tmp_path, monkeypatch):
    """recompress -> compress (unchanged) -> new budget -> new checkpoint, in one workspace. The new checkpoint's run
    is the sharded one of issue 13 (``check_sharded_run``; POSIX only): capture and gains fanned out to a local Dask
    cluster of 2 worker processes, one of them SIGKILLed mid-shard."""
    import mlflow
    import torch
    from diffusers import StableDiffusionPipeline

    from flows.compress import compress_flow
    from flows.distributed import KILL_AFTER_CHECKPOINT
    from flows.recompress import recompress_flow
    from flows.tracking import stage_hashes

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    name = "slimdiff-tiny-sd"

    # a new checkpoint: recompress runs the compress flow, every stage runs, one run, one version
    first = recompress_flow(str(workspace))
    assert first["compressed"] is True and all(first["stages_run"].values()), first["stages_run"]
    client = mlflow_client(workspace)
    runs = client.search_runs([client.get_experiment_by_name("slimdiff").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["allocate.budget"] == "0.4" and run.data.params["model.id"] == "tiny-sd"
    assert {"plan.removed_fraction", "fidelity.image_psnr_db", "macs.ratio"} <= set(run.data.metrics)
    # each stage's measured peak host memory beside the job's prediction (issue 21)
    for stage in ("capture", "score", "decompose", "evaluate"):
        assert 0 < run.data.metrics[f"resources.{stage}.peak_host_gib"], stage
        assert 0 < run.data.metrics[f"resources.{stage}.predicted_host_gib"], stage
    assert run.inputs.dataset_inputs[0].dataset.name == "slimset"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"width_plan.json", "width_plan.png", "metrics.json", "report", "dvc.lock.yaml"} <= artifacts  # .yaml: previewed
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
    check_tracking_ux(client, run, version, name)
    check_prefect_ux(name, first["version"], workspace)

    # the same checkpoint again: nothing registered
    assert recompress_flow(str(workspace))["compressed"] is False
    # compress with nothing changed: no stage re-runs, the registered version is reused
    again = compress_flow(str(workspace))
    assert not any(again["stages_run"].values()) and again["reused"], again
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    # a new budget re-runs allocate onwards and a new gain setting gains onwards, never capture
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["allocate"]["budget"] = 0.3
    params["score"]["rel_noise"] = 0.04
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = compress_flow(str(workspace))
    assert [s for s, r in third["stages_run"].items() if r] == ["gains", "score", "allocate", "decompose", "evaluate", "report"]
    assert len(client.search_model_versions(f"name='{name}'")) == 2
    # its description says what changed against the champion (version 1)
    described = client.get_model_version(name, third["version"]).description
    assert f"vs champion (version {first['version']}" in described and "`allocate.budget` 0.4 → 0.3" in described, described
    assert "fidelity.image_psnr_db:" in described, described

    # a changed checkpoint: recompress registers a new version with the new hash
    pipe = StableDiffusionPipeline.from_pretrained(workspace / "data" / "model")
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.01)
    pipe.save_pretrained(workspace / "data" / "model")
    # the changed checkpoint alone makes the capture stale (checked before the sharding settings below, which are
    # capture params too and would re-run it anyway)
    assert "capture" in testing.dvc_status(workspace)
    # this run is also the sharded one (issue 13; one full run for both instead of one each): 24 prompts in 4 shards
    # of 2 batches of 3, a checkpoint after each batch, on a local Dask cluster of 2 worker processes whose first shard
    # try to start a denoiser call after its checkpoint SIGKILLs its own worker (flows.distributed.kill_after_checkpoint:
    # a known point, no race); the gains in 3 module shards on the same kind of cluster
    sharded = sys.platform != "win32"  # the kill is a POSIX signal
    fault = tmp_path / "fault"
    if sharded:
        params = yaml.safe_load((workspace / "params.yaml").read_text())
        params["curate"]["n"] = 24
        params["capture"].update({"batch_size": 3, "checkpoint_every": 3, "shards": 4, "cluster": "local", "workers": 2})
        params["score"]["gain_shards"] = 3
        (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        monkeypatch.setenv(KILL_AFTER_CHECKPOINT, str(fault))  # inherited by the cluster's worker processes
    fourth = recompress_flow(str(workspace))
    monkeypatch.delenv(KILL_AFTER_CHECKPOINT, raising=False)
    assert fourth["compressed"] is True and fourth["stages_run"]["capture"]
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 3 and len({v.tags["checkpoint_hash"] for v in versions}) == 2
    if sharded:
        check_sharded_run(workspace, fourth, fault, client, name)

    # the registered model is a pyfunc that turns prompts into images; its params are honoured, not ignored
    model = mlflow.pyfunc.load_model(f"models:/{name}/{fourth['version']}")
    assert {p.name for p in model.metadata.signature.params.params} == {"steps", "guidance", "seed", "height", "width"}
    import pandas as pd

    prompts = pd.DataFrame({"prompt": ["a small red circle at the top left"]})  # the signature's input: a 'prompt' column
    images = model.predict(prompts, params={"steps": 2})
    assert images.shape[0] == 1 and images.dtype.name == "uint8"
    two = model.predict({"prompt": ["a small red circle at the top left", "a blue square"]}, params={"steps": 2})
    assert two.shape[0] == 2 and (two[:1] == images).all()  # a dict of lists: one image per prompt, not one per list
    same, reseeded = (model.predict(prompts, params={"steps": 2, "seed": s}) for s in (0, 1))
    assert (same == images).all() and not (reseeded == images).all()
    with pytest.raises(Exception, match=r"param seed must be a whole number in 0\.\.9223372036854775807, got -1"):
        model.predict(prompts, params={"steps": 2, "seed": -1})


def check_sharded_run(workspace: Path, result: dict, fault: Path, client, name: str) -> None:
    """The sharded run (issue 13): 4 capture shards on a local Dask cluster of 2 worker processes; the first shard try
    to start a denoiser call after writing its checkpoint SIGKILLed its own worker. The shard was retried in another
    process and resumed from its checkpoint, no other shard was computed twice, the statistics equal the
    single-process capture, and the MLflow lineage names the shard digests. The gains ran as 3 module shards on the
    same kind of cluster and equal the one-process gains."""
    import json

    import torch

    from slimdiff.compress import load_pipeline, read_prompts
    from slimdiff.pipeline.stages import (
        CAPTURE_FILE,
        GAIN_SHARD_DIR,
        SHARD_DIR,
        config_from,
        gain_reference,
        load_params,
        sampler_settings,
    )
    from slimdiff.runtime.sampling import SamplerSettings
    from slimdiff.scoring.gain_shards import plan_gain_shards
    from slimdiff.scoring.gains import Gains, measure_gains
    from slimdiff.statistics import shards as S
    from slimdiff.statistics.recording import capture
    from slimdiff.statistics.sums import Capture

    assert (fault / "killed.json").is_file(), "no shard try reached the kill point (after its first checkpoint)"
    killed = json.loads((fault / "killed.json").read_text())
    tries: dict[int, list[dict]] = {}
    for line in (fault / "tries.jsonl").read_text().splitlines():
        entry = json.loads(line)
        tries.setdefault(entry["index"], []).append(entry)
    # each shard: 6 prompts in 2 batches of 3, a checkpoint after the first. The killed try died after it; the retry
    # ran in another process from that checkpoint (3 prompts done); every other shard ran once, from the start
    assert sorted(tries) == [0, 1, 2, 3], tries
    again = tries[killed["index"]]
    assert [t["resumed_from"] for t in again] == [0, 3] and again[0]["pid"] == killed["pid"] != again[1]["pid"], again
    assert all([t["resumed_from"] for t in tries[i]] == [0] for i in tries if i != killed["index"]), tries
    assert result["stages_run"]["capture"]
    # every shard computed on the cluster exactly by its last try (none found its file written by an earlier one)
    assert result["fanned_out"]["capture"] == {"finished": [0, 1, 2, 3], "computed": [0, 1, 2, 3]}, result["fanned_out"]
    assert result["fanned_out"]["gains"] == {"finished": [0, 1, 2], "computed": [0, 1, 2]}, result["fanned_out"]
    assert not list((workspace / SHARD_DIR).glob("*.safetensors"))  # merged shards are removed

    merged = Capture.load(workspace / "outputs" / "capture.safetensors")
    pipe = load_pipeline(str(workspace / "data" / "model"), "cpu", torch.float32)
    prompts = read_prompts(workspace / "outputs" / "slimset" / "slimset.jsonl")
    sampler = SamplerSettings(2, 4.0)  # the workspace's sampler (tests.helpers.make_workspace)
    single = capture(pipe, prompts, sampler, num_buckets=4, batch_size=3, model_id="tiny-sd", progress=False)
    testing.assert_same_statistics(merged, single)
    plan = S.plan_shards(pipe, prompts, sampler, shards=4, num_buckets=4, batch_size=3, model_id="tiny-sd")
    assert killed["digest"] == plan.shards[killed["index"]].digest

    version = client.get_model_version_by_alias(name, "candidate")
    assert str(version.version) == str(result["version"]), (version.version, result["version"])  # this run's version
    assert version.tags["lineage.capture.shards"] == "4"
    assert [version.tags[f"lineage.capture.shard.{i}"] for i in range(4)] == [s.digest for s in plan.shards]

    params = load_params(workspace / "params.yaml")
    score, sampler = params["score"], sampler_settings(params)
    reference = gain_reference(config_from(params), workspace / CAPTURE_FILE)  # truncation gains read the capture
    assert reference is not None
    gain_prompts = prompts[: score["gain_prompts"]]
    gains = Gains.load(workspace / "outputs" / "gains.json")
    one_process = measure_gains(pipe, gain_prompts, sampler, score["gain_calls"], score["rel_noise"], seed=sampler.seed,
                                reference=reference)
    assert gains.gains == one_process.gains and gains.block_influence == one_process.block_influence
    gain_plan = plan_gain_shards(pipe, gain_prompts, sampler, shards=3, num_calls=score["gain_calls"],
                                 rel_noise=score["rel_noise"], seed=sampler.seed, reference=reference)
    assert [e["digest"] for e in gains.metadata["shards"]] == [s.digest for s in gain_plan.shards]
    assert not list((workspace / GAIN_SHARD_DIR).glob("*.json"))  # merged shards are removed
    assert version.tags["lineage.gains.shards"] == "3"
    assert [version.tags[f"lineage.gains.shard.{i}"] for i in range(3)] == [s.digest for s in gain_plan.shards]


def check_tracking_ux(client, run, version, name: str) -> None:
    """MLflow tells the story of the run: a model experiment (not GenAI), the run spans the job, headline metrics only
    (per-group tables as logged tables), descriptions on the run, the version and the registered model."""
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development", experiment.tags
    stage_seconds = {k: v for k, v in run.data.metrics.items() if k.startswith("duration.") and k != "duration.total_s"}
    assert set(stage_seconds) == {f"duration.{s}_s" for s in ("curate", "capture", "gains", "latency", "score", "allocate",
                                                              "decompose", "evaluate", "report")}
    assert run.data.metrics["duration.total_s"] >= sum(stage_seconds.values())
    # the run starts with the job, not with the logging: it spans every stage
    assert (run.info.end_time - run.info.start_time) / 1000 >= sum(stage_seconds.values())
    assert not [k for k in run.data.metrics if ".groups." in k or k.startswith("settings.") or "_by_bucket." in k]
    assert len(run.data.metrics) < 100, len(run.data.metrics)
    # settings of a measurement are params, not metrics; a value logged under two names is logged once
    assert not [k for k in run.data.metrics if k.endswith((".repeats", ".warmup", ".threads", "kernel_size"))]
    assert "latency.macs_ratio" not in run.data.metrics and "macs.ratio" in run.data.metrics
    assert run.data.params["measured_with.fidelity.image_ssim_kernel_size"] == "11"
    assert not [k for k in run.data.params if "/" in k], [k for k in run.data.params if "/" in k]  # no model-config copies
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    assert tables == {"tables/params_by_group.json", "tables/metrics_by_bucket.json", "tables/stage_resources.json",
                      "tables/held_out_samplers.json"}, tables
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"**{name}**: remove 0.4 of the compressible parameters, allocator `slimdiff`"), note
    assert "gate → `champion`: passed" in note and "no champion yet" in note and "- job " in note, note
    assert "reference run (docs/reference-run/): no reference" in note, note
    assert version.description == note
    assert f"mlflow models serve -m models:/{name}@champion --env-manager local" in client.get_registered_model(name).description
    assert run.data.params["job.torch_threads"].isdigit()


def check_prefect_ux(name: str, version: str, workspace: Path) -> None:
    """Prefect tells the story too: task runs named by stage (no random suffix), the flow's and the stages' own log
    lines, and a markdown artifact with the gate decision and the link to the MLflow run. The first compress flow run
    of ``workspace`` (the session's Prefect server holds other tests' runs too)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    from flows.tasks import STAGES

    APILogHandler().flush()  # records still queued for the API

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["slimdiff-compress"])))
            mine = [r for r in runs if Path(str(r.parameters.get("workspace"))).resolve() == workspace.resolve()]
            flow_run = sorted(mine, key=lambda r: r.start_time)[0]
            tasks = await client.read_task_runs()
            logs, page = [], None
            while page is None or len(page) == 200:
                page = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200,
                                              offset=len(logs))
                logs += page
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[name])))
            return (flow_run, [t for t in tasks if t.flow_run_id == flow_run.id], logs,
                    [a for a in artifacts if a.flow_run_id == flow_run.id])

    flow_run, tasks, logs, artifacts = asyncio.run(read())
    assert sorted(t.name for t in tasks) == sorted([*STAGES, "track", "summary"]), [t.name for t in tasks]
    messages = [log.message for log in logs]
    assert any("stage curate: done in" in m for m in messages), messages[:20]  # a stage's own line, from its task
    assert any(m.startswith("torch threads for every stage:") for m in messages), messages[:20]
    assert any(m.startswith(f"registered {name} version {version} (champion)") for m in messages), messages[-10:]
    assert len(artifacts) == 1, artifacts
    markdown = artifacts[0].data
    assert f"# {name} version {version} → `champion`" in markdown and "- gate: passed" in markdown, markdown
    assert "- MLflow run: [" in markdown and "/#/experiments/" in markdown and "| fidelity.image_psnr_db |" in markdown


@pytest.mark.parametrize("change,message", [
    (lambda p: p["model"].update(path="data/missing"), "not a diffusers pipeline folder"),
    (lambda p: p["allocate"].update(budget=1.5), "budget 1.5"),
    (lambda p: p["curate"].update(sources=["data/empty.txt"]), "is empty"),
    (lambda p: p["model"].update(dtype="int8"), "unknown dtype 'int8'"),
    (lambda p: p["sampler"].update(guidance_argument="true_cfg_scale"),
     "StableDiffusionPipeline takes no 'true_cfg_scale' argument"),
    (lambda p: p["sampler"].update(max_sequence_length=0), "params.yaml sampler: max_sequence_length must be a whole number"),
    (lambda p: p["score"].update(gain_target="both"), "unknown gain target 'both'; choose one of call, guided"),
    (lambda p: (p["score"].update(gain_target="guided"), p["sampler"].update(guidance=1.0)),
     "score.gain_target: guided measures gains on the classifier-free-guided prediction, and this sampler makes no "
     "unconditional prediction"),
    (lambda p: p.pop("code"), "params.yaml has no code:"),
    (lambda p: p.update(code="elsewhere"), "params.yaml code: 'elsewhere' does not hold slimdiff/"),
    pytest.param(lambda p: p["model"].update(device="cuda"), "CUDA is not available",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_input_one_line_error_and_no_outputs(pristine, tmp_path, change, message, monkeypatch, capsys):
    """The command's ``main`` in this process (the subprocess path, ``python -m flows.compress``, is the unreachable
    tracking case below): exit code 2, one line on stderr, nothing written."""
    import shutil

    from flows.compress import main

    workspace = tmp_path / "ws"
    shutil.copytree(pristine, workspace, symlinks=True)
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    change(params)
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert main(["--workspace", str(workspace)]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (workspace / "outputs").exists() and not (workspace / "mlflow.db").exists()


def test_a_pipeline_no_adapter_supports_fails_in_preflight_naming_its_class(pristine, tmp_path, monkeypatch, capsys):
    """Issue 26's bad input: a pipeline folder whose denoiser no adapter handles (an unconditional DDPM UNet without
    attention) fails before any stage, naming the class and the supported ones."""
    import shutil

    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from flows.compress import main

    workspace = tmp_path / "ws"
    shutil.copytree(pristine, workspace, symlinks=True)
    shutil.rmtree(workspace / "data" / "model")
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(workspace / "data" / "model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert main(["--workspace", str(workspace)]) == 2
    stderr = capsys.readouterr().err
    assert "UNet2DModel has no supported transformer block; supported denoisers: UNet2DConditionModel" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (workspace / "outputs").exists()


def test_unreachable_tracking_uri_fails_before_any_stage(pristine, tmp_path):
    workspace = copy_pristine(pristine, tmp_path / "ws")
    result = subprocess.run([sys.executable, "-m", "flows.compress", "--workspace", str(workspace)], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, MLFLOW_TRACKING_URI="http://127.0.0.1:9"))
    assert result.returncode == 2
    assert "unreachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (workspace / "outputs").exists()


def test_quality_gate_decisions():
    from flows.gate import quality_gate

    metrics = {"fidelity": {"image_psnr_db": 20.0}, "alignment": {"ratio_to_original": 0.9}}
    assert quality_gate(metrics, {"min_image_psnr_db": 15}).passed
    decision = quality_gate(metrics, {"min_image_psnr_db": 15, "min_alignment_ratio": 0.95})
    assert not decision.passed and "alignment.ratio_to_original=0.9" in decision.reason
    with pytest.raises(KeyError, match="unknown gate threshold"):
        quality_gate(metrics, {"max_latency": 3})


def test_stage_resources_pair_each_measured_peak_with_its_prediction(tmp_path):
    import json

    from flows.run_metrics import stage_resources

    (tmp_path / ".resources").mkdir()
    gib = 2**30
    (tmp_path / ".resources" / "capture.json").write_text(json.dumps(
        {"stage": "capture", "seconds": 3.0, "peak_host_bytes": 2 * gib, "peak_device_bytes": gib // 2}))
    (tmp_path / ".resources" / "report.json").write_text(json.dumps(
        {"stage": "report", "seconds": 1.0, "peak_host_bytes": gib, "peak_device_bytes": 0}))
    (tmp_path / ".resources" / "broken.json").write_text("{")  # a damaged record is skipped, not fatal
    (tmp_path / "memory_prediction.json").write_text(json.dumps(
        {"stages": {"capture": {"host_bytes": 3 * gib, "device_bytes": gib}}}))
    metrics, rows = stage_resources(tmp_path)
    assert metrics == {"resources.capture.peak_host_gib": 2.0, "resources.capture.predicted_host_gib": 3.0,
                       "resources.capture.peak_device_gib": 0.5, "resources.capture.predicted_device_gib": 1.0,
                       "resources.report.peak_host_gib": 1.0}
    assert [r["stage"] for r in rows] == ["capture", "report"] and rows[1]["predicted_host_gib"] is None


def test_the_gate_checks_each_metric_at_its_worst_sampler():
    from flows.gate import quality_gate
    from slimdiff.pipeline.stages import worst_case

    metrics = {"fidelity": {"image_psnr_db": 20.0}, "alignment": {"ratio_to_original": 0.99},
               "held_out": {"dpm 10 steps": {"fidelity": {"image_psnr_db": 12.5}, "alignment": {"ratio_to_original": 0.97}},
                            "euler": {"fidelity": {"image_psnr_db": 18.0}, "alignment": {"ratio_to_original": 1.0}}}}
    metrics["worst"] = worst_case(metrics)
    decision = quality_gate(metrics, {"min_image_psnr_db": 15, "min_alignment_ratio": 0.95})
    assert not decision.passed
    assert "fidelity.image_psnr_db=12.5 (worst sampler: dpm 10 steps) vs min_image_psnr_db=15" in decision.reason
    passed = quality_gate(metrics, {"min_image_psnr_db": 12, "min_alignment_ratio": 0.95})
    assert passed.passed and "alignment.ratio_to_original=0.97 (worst sampler: dpm 10 steps)" in passed.reason
    metrics["held_out"]["euler"]["fidelity"]["image_psnr_db"] = None  # NaN under one sampler: cannot pass
    decision = quality_gate(metrics, {"min_image_psnr_db": 1})
    assert not decision.passed and "held-out sampler euler" in decision.reason


@pytest.mark.parametrize("gate", [None, {}])
def test_no_gate_section_keeps_the_version_a_candidate_and_says_why(gate):
    from flows.gate import quality_gate

    decision = quality_gate({"fidelity": {"image_psnr_db": 40.0}}, gate)
    assert not decision.passed
    assert decision.reason.startswith("no gate: params.yaml has no gate thresholds, so nothing was checked and the "
                                      "version stays a candidate"), decision.reason


def test_headline_metrics_leave_out_measurement_settings_and_duplicates():
    import json as _json

    from flows.run_metrics import headline_metrics, measurement_settings, metric_tables

    metrics = _json.loads((REPO / "docs" / "reference-run" / "metrics.json").read_text())
    headline = headline_metrics(metrics)
    for setting in ("latency.denoiser.repeats", "latency.generation.warmup", "latency.threads", "fidelity.image_ssim_kernel_size",
                    "fidelity.num_prompts", "latency.denoiser.batch"):
        assert setting not in headline and measurement_settings(metrics)[f"measured_with.{setting}"]
    for duplicate, kept in (("latency.macs_ratio", "macs.ratio"), ("latency.denoiser.speedup", "latency.denoiser_speedup"),
                            ("plan.compressible_before", "params.original.compressible"), ("plan.removed", "params.removed")):
        assert duplicate not in headline and kept in headline, (duplicate, kept)
    changed = _json.loads(_json.dumps(metrics))
    changed["latency"]["macs_ratio"] = 2.0  # no longer the same value: both are logged
    assert {"latency.macs_ratio", "macs.ratio"} <= set(headline_metrics(changed))
    assert len(headline) + 10 < 75, len(headline)  # with the ten stage durations
    tables = metric_tables(metrics)
    for table in (tables["tables/metrics_by_bucket.json"], tables["tables/held_out_samplers.json"]):
        assert not [c for c in table.columns if "." in c], list(table.columns)  # dotted names render as blank cells
    # the held-out samplers are a table, one row each beside the calibration sampler; their worst stays a metric
    held_out = tables["tables/held_out_samplers.json"]
    assert list(held_out["sampler"]) == ["calibration sampler", *metrics["held_out"]]
    assert not [k for k in headline if k.startswith("held_out.")] and "worst.fidelity.image_psnr_db.value" in headline


def test_summary_links_where_the_mlflow_ui_runs(tmp_path, monkeypatch):

    from flows.descriptions import summary_markdown
    from flows.tracking_server import experiment_url, run_url

    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "metrics.json").write_text((REPO / "docs" / "reference-run" / "metrics.json").read_text())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = {"name": "slimdiff-x", "version": "3", "gate": False, "reason": "no gate: ...", "run_id": "abc", "tracking_uri": uri,
              "run_url": run_url(uri, "1", "abc"), "experiment_url": experiment_url(uri, "1")}
    markdown = summary_markdown(tmp_path, {}, result, {"curate": 1.0})
    assert "(http://127.0.0.1:5000/#/experiments/1/runs/abc) (open `mlflow ui --backend-store-uri" in markdown, markdown
    assert "- all runs: [http://127.0.0.1:5000/#/experiments/1/runs]" in markdown, markdown
    monkeypatch.setenv("SLIMDIFF_MLFLOW_UI_URL", "http://mlflow.team.internal:8080/")
    assert run_url(uri, "1", "abc") == "http://mlflow.team.internal:8080/#/experiments/1/runs/abc"
    assert experiment_url("http://tracking:5000", "7") == "http://mlflow.team.internal:8080/#/experiments/7/runs"
    monkeypatch.delenv("SLIMDIFF_MLFLOW_UI_URL")
    assert run_url("http://tracking:5000/", "7", "r") == "http://tracking:5000/#/experiments/7/runs/r"


def test_stage_output_without_dvc_git_advice():
    """The workspace's dvc.lock is not committed (README), so DVC's "git add dvc.lock" advice is dropped from every
    stage's output; everything else passes, progress bars as they come."""
    from flows.tasks import _DropDvcAdvice

    text = (b"Running stage 'x':\n> python -m slimdiff.pipeline.stages x\ncapture:  10%\rcapture: 100%\nstage x: done\n"
            b"Updating lock file 'dvc.lock'\n\nTo track the changes with git, run:\n\n\tgit add dvc.lock\n\n"
            b"To enable auto staging, run:\n\n\tdvc config core.autostage true\n\nUse `dvc push` to send your updates.\n\nend")
    advice = _DropDvcAdvice()
    shown = "".join(advice.feed(text[i:i + 7]) for i in range(0, len(text), 7)) + advice.close()
    assert shown == ("Running stage 'x':\n> python -m slimdiff.pipeline.stages x\ncapture:  10%\rcapture: 100%\nstage x: done\n"
                     "Updating lock file 'dvc.lock'\nUse `dvc push` to send your updates.\n\nend")


@pytest.mark.parametrize("value", [None, float("nan"), "n/a"])
def test_quality_gate_fails_on_a_nan_or_missing_metric(value):
    """evaluate writes a NaN metric as null: the gate fails naming it (never float(None)), and never passes."""
    from flows.gate import quality_gate

    metrics = {"fidelity": {"image_psnr_db": value}, "alignment": {"ratio_to_original": 0.99}}
    decision = quality_gate(metrics, {"min_image_psnr_db": 15, "min_alignment_ratio": 0.95})
    assert not decision.passed
    assert "metric fidelity.image_psnr_db is NaN/missing" in decision.reason and "the gate cannot pass" in decision.reason
    assert "alignment.ratio_to_original=0.99" not in decision.reason  # failures only; the passing check is not listed
    missing = quality_gate({"fidelity": {}}, {"min_noise_sqnr_db": 10})
    assert not missing.passed and "metric fidelity.noise_sqnr_db is NaN/missing" in missing.reason
    with pytest.raises(ValueError, match=r"params.yaml gate.min_image_psnr_db must be a finite number, got nan"):
        quality_gate(metrics, {"min_image_psnr_db": float("nan")})


# ---- issue 15: threads, Prefect log lines, the reference run, lineage that a fresh clone keeps clean ----------------


@pytest.mark.parametrize("value,expected", [("1", 1), ("3", 3), (2, 2)])
def test_threads_setting_whole_numbers(value, expected):
    from slimdiff.device import choose_threads

    assert choose_threads(value) == (expected, f"SLIMDIFF_THREADS={expected}")


def test_threads_auto_fits_the_machine(monkeypatch):
    from slimdiff import device

    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    monkeypatch.setattr(device, "busy_cores", lambda interval=0.2: 1.2)  # one core busy elsewhere: one thread
    assert device.choose_threads("auto")[0] == 1
    monkeypatch.setattr(device, "busy_cores", lambda interval=0.2: 5.0)  # overloaded: still at least one
    assert device.choose_threads("auto") == (1, "SLIMDIFF_THREADS=auto: 2 usable core(s), 5.0 busy elsewhere")
    monkeypatch.setattr(device, "usable_cores", lambda: 16)
    monkeypatch.setattr(device, "busy_cores", lambda interval=0.2: 0.3)
    assert device.choose_threads("auto")[0] == 16
    monkeypatch.setenv("SLIMDIFF_THREADS", "auto")
    threads, _ = device.apply_threads()
    import torch

    try:
        assert torch.get_num_threads() == threads == 16
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("value", ["0", "-2", "1.5", "many", ""])
def test_bad_threads_setting_names_the_value(value):
    from slimdiff.device import DeviceError, choose_threads

    with pytest.raises(DeviceError, match=rf"SLIMDIFF_THREADS must be a whole number >= 1 or 'auto', got '{value}'"):
        choose_threads(value)


def test_bad_threads_fails_a_stage_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "slimdiff.pipeline.stages", "allocate", "--params", str(tmp_path / "none.yaml")],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, SLIMDIFF_THREADS="lots"))
    assert result.returncode == 2
    assert result.stderr.strip() == "stage allocate: error: SLIMDIFF_THREADS must be a whole number >= 1 or 'auto', got 'lots'"


def test_stage_output_lines_for_the_prefect_ui():
    """Complete lines of a stage's output become log records; a progress bar redrawn with carriage returns becomes
    one record, its last state."""
    import logging

    from flows.tasks import _LineLogger

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test.stage_output")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(Keep())
    lines = _LineLogger(logger)
    for chunk in (b"Running stage 'capture':\n> python -m slimdiff", b".pipeline.stages capture\ncapture:  10%|# | 1/10\r",
                  b"capture:  50%|#####     | 5/10\rcapture: 100%|##########| 10/10\n\n", b"stage capture: done in 3.2 s"):
        lines.feed(chunk)
    lines.close()
    assert records == ["Running stage 'capture':", "> python -m slimdiff.pipeline.stages capture", "capture: 100%|##########| 10/10",
                       "stage capture: done in 3.2 s"]


def test_metrics_compared_with_the_committed_reference_run(tmp_path):
    import json as _json
    import shutil

    from flows.reference_run import compare_with_reference

    params = yaml.safe_load((REPO / "docs" / "reference-run" / "params.yaml").read_text())
    metrics = _json.loads((REPO / "docs" / "reference-run" / "metrics.json").read_text())
    assert compare_with_reference(tmp_path, params, metrics).status == "no reference"
    shutil.copytree(REPO / "docs" / "reference-run", tmp_path / "docs" / "reference-run")
    same = compare_with_reference(tmp_path, params, metrics)
    assert same.status == "match" and "largest relative difference 0.0e+00" in same.detail, same
    nudged = _json.loads(_json.dumps(metrics))
    nudged["fidelity"]["image_psnr_db"] *= 1 + 1e-8  # another machine's float sums: within tolerance
    nudged["latency"]["denoiser"]["compressed_ms"] *= 3  # a measured time: never compared
    assert compare_with_reference(tmp_path, params, nudged).status == "match"
    nudged["alignment"]["compressed"]["overall"] -= 0.01
    differs = compare_with_reference(tmp_path, params, nudged)
    assert differs.status == "differs" and "alignment.compressed.overall" in differs.detail, differs
    changed = yaml.safe_load(yaml.safe_dump(params))
    changed["allocate"]["budget"] = 0.3
    other = compare_with_reference(tmp_path, changed, metrics)
    assert other.status == "not comparable" and "allocate.budget 0.4 -> 0.3" in other.detail, other
    changed = yaml.safe_load(yaml.safe_dump(params))
    changed["mlflow"]["experiment"] = "elsewhere"  # not a result-affecting setting
    assert compare_with_reference(tmp_path, changed, metrics).status == "match"


def test_files_the_job_rewrites_are_not_committed_outputs():
    """Every metrics file of dvc.yaml (written by each run, not bit-reproducible across machines) is git-ignored, so a
    fresh clone's run leaves the tracked tree as it was; the reference copy lives where the job does not write."""
    if subprocess.run(["git", "rev-parse"], cwd=REPO, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())
    metrics = [str(next(iter(m)) if isinstance(m, dict) else m) for s in spec["stages"].values() for m in s.get("metrics", [])]
    assert metrics, "dvc.yaml declares no metrics"
    for path in metrics:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert ignored.returncode == 0, f"{path} is written by every run but not git-ignored"
    for name in ("metrics.json", "plan_metrics.json", "params.yaml", "dvc.lock"):
        assert (REPO / "docs" / "reference-run" / name).is_file()
