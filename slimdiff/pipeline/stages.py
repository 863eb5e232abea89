"""DVC stages: each a thin command that reads ``params.yaml`` and files, calls the library, writes files.

    python -m slimdiff.pipeline.stages {curate,capture,gains,latency,score,allocate,decompose,evaluate,report} [--params params.yaml]

Paths in ``params.yaml`` are relative to the working directory (the DVC repository root). Every
output is written atomically, so an interrupted stage leaves the previous output or none. The two
long stages checkpoint as they go (``outputs/.checkpoints/``, not a DVC output, so ``dvc repro``
keeps it): a killed capture or gains stage, re-run, continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import yaml

OUT = Path("outputs")

SLIMSET_DIR = OUT / "slimset"

SLIMSET_FILE = SLIMSET_DIR / "slimset.jsonl"

CAPTURE_FILE = OUT / "capture.safetensors"

GAINS_FILE = OUT / "gains.json"

LATENCY_FILE = OUT / "latency.json"

CHECKPOINT_DIR = OUT / ".checkpoints"

CAPTURE_CHECKPOINT = CHECKPOINT_DIR / "capture.safetensors"

GAINS_CHECKPOINT = CHECKPOINT_DIR / "gains.json"

SCORES_FILE = OUT / "scores.json"

PLAN_DIR = OUT / "plan"

PLAN_FILE = PLAN_DIR / "width_plan.json"

PLAN_PLOT = PLAN_DIR / "width_plan.png"

PLAN_METRICS = PLAN_DIR / "plan_metrics.json"

MODEL_DIR = OUT / "model"

METRICS_FILE = OUT / "metrics.json"

REPORT_DIR = OUT / "report"


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    params = yaml.safe_load(path.read_text()) or {}
    for section in ("model", "curate", "sampler", "capture", "score", "latency", "allocate", "evaluate"):
        if section not in params:
            raise KeyError(f"{path} has no '{section}' section")
    return params


def sampler_settings(params: dict[str, Any]):
    from slimdiff.runtime.sampling import SamplerSettings

    s = params["sampler"]
    try:
        return SamplerSettings(int(s["steps"]), float(s["guidance"]), s.get("height"), s.get("width"), int(s.get("seed", 0)),
                               s.get("guidance_argument") or "guidance_scale", s.get("max_sequence_length"))
    except ValueError as error:
        raise ValueError(f"params.yaml sampler: {error}") from None


def config_from(params: dict[str, Any]):
    """The SlimDiffConfig these params describe (one place that maps params.yaml keys to settings)."""
    from slimdiff.compress import SlimDiffConfig
    from slimdiff.device import resolve_device, resolve_rank_step

    a, s, c, t = params["allocate"], params["score"], params["capture"], params["latency"]
    rank_step = resolve_rank_step(s["rank_step"], resolve_device(params["model"].get("device", "auto")))
    tie = a.get("tie_qk_vo", "auto")
    if tie not in (True, False, "auto"):
        raise ValueError(f"allocate.tie_qk_vo must be true, false or auto (tied for a latency budget), got {tie!r}")
    return SlimDiffConfig(
        budget=float(a["budget"]), budget_kind=str(a.get("budget_kind", "params")), tie_qk_vo=None if tie == "auto" else tie,
        latency_points=int(t["points"]), latency_repeats=int(t["repeats"]),
        allocator=a["allocator"], min_keep=float(a["min_keep"]),
        temperature=float(a.get("temperature", 0.1)), bucket_weights=tuple(a["bucket_weights"]) if a.get("bucket_weights") else None,
        reg=float(s["reg"]), ffn_step=int(s["ffn_step"]), rank_step=rank_step, max_ffn_points=int(s["max_ffn_points"]),
        gain_prompts=int(s["gain_prompts"]), gain_calls=int(s["gain_calls"]), rel_noise=float(s["rel_noise"]),
        gain_method=str(s.get("gain_method", SlimDiffConfig.gain_method)),
        gain_keep=s.get("gain_keep", SlimDiffConfig.gain_keep),
        gain_target=str(s.get("gain_target", SlimDiffConfig.gain_target)),
        num_buckets=int(c["num_buckets"]), batch_size=int(c["batch_size"]), timestep_grid=timestep_grid_setting(c),
    )


def timestep_grid_setting(capture: dict[str, Any]) -> int:
    """``capture.timestep_grid`` (default 64), a whole number >= 0."""
    value = capture.get("timestep_grid", 64)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"params.yaml capture.timestep_grid must be a whole number >= 0 (0: the sampler's timesteps only), "
                         f"got {value!r}")
    return value


def device_settings(params: dict[str, Any]):
    """(torch.device, torch.dtype) of ``model.device`` / ``model.dtype``, checked to run here before any work."""
    from slimdiff.compress import resolve_model_dtype
    from slimdiff.device import check_dtype_runs, resolve_device

    model = params["model"]
    device = resolve_device(model.get("device", "auto"))
    dtype = resolve_model_dtype(model.get("dtype", "float32"), model["path"])
    check_dtype_runs(device, dtype)
    return device, dtype


def _pipeline(params: dict[str, Any]):
    from slimdiff.compress import load_pipeline

    device, dtype = device_settings(params)
    pipe = load_pipeline(str(params["model"]["path"]), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _compressed_pipeline(params: dict[str, Any], original, folder: Path = MODEL_DIR):
    """The compressed pipeline of ``folder`` on ``model.device`` in ``model.dtype``, beside ``original``: its other
    torch components (text encoders, VAE: the decompose stage saved the original's) are the original's own modules,
    not a second copy in memory."""
    import torch

    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.runtime.folder import load

    device, dtype = device_settings(params)
    key, _ = denoiser_of(original)
    shared = {name: module for name, module in original.components.items()
              if name != key and isinstance(module, torch.nn.Module)}
    pipe = load(folder, device=device, dtype=dtype, **shared)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_slimset(path: Path = SLIMSET_FILE) -> list[str]:
    from slimdiff.compress import read_prompts

    return read_prompts(path)


def stage_curate(params: dict[str, Any]) -> None:
    from slimdiff.pipeline import curation

    c = params["curate"]
    pipe = _pipeline(params)
    dataset = curation.load_prompt_sources(list(c["sources"]))
    selected, stats = curation.curate(
        dataset, curation.text_embedder(pipe), curation.token_counter(pipe.tokenizer), pipe.tokenizer.model_max_length,
        n=int(c["n"]), near_duplicate=float(c["near_duplicate"]), seed=int(c["seed"]),
    )
    curation.write_slimset(selected, stats, SLIMSET_DIR)


RESOURCES_DIR = OUT / ".resources"

MEMORY_PREDICTION = OUT / "memory_prediction.json"


def check_model_supported(model: str | Path, sampler, guided_gains: bool = False) -> None:
    """Fail in one line when no adapter handles the pipeline's denoiser (naming its class and the supported ones), its
    call does not take the sampler settings, or (``guided_gains``) the sampler makes no unconditional prediction to
    measure guided gains on; built on the meta device from the configs, no weight is read."""
    from slimdiff.arch import UnsupportedModelError, find_groups
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.pipeline.memory import meta_pipeline

    pipe, _ = meta_pipeline(model)  # the index and every component's config, checked (one-line ValueError)
    try:
        _, denoiser = denoiser_of(pipe)
        find_groups(denoiser)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{Path(model)}: pipeline {type(pipe).__name__}: {error}") from None
    except ValueError as error:  # no denoiser component
        raise ValueError(f"{Path(model)}: {error}") from None
    sampler.check_pipeline(type(pipe))
    if guided_gains:
        from slimdiff.scoring.gains import check_guided

        check_guided(sampler, denoiser)


def predict_memory(params: dict[str, Any]):
    """(footprint, settings, per-stage prediction) of this job's memory (``slimdiff.pipeline.memory``; no weight is read)."""
    from slimdiff.pipeline.memory import footprint, predict, settings_from_params

    device, dtype = device_settings(params)
    sampler = sampler_settings(params)
    fp = footprint(params["model"]["path"], sampler, int(params["capture"]["batch_size"]))
    settings = settings_from_params(params, device, dtype, sampler.calls_per_step)
    return fp, settings, predict(fp, settings)


def check_memory(params: dict[str, Any], show: bool = True) -> dict[str, Any]:
    """Print the predicted peak memory of every stage and fail (one line: predicted, available, settings that would
    fit) when a stage would not fit in what this machine has (``slimdiff.pipeline.memory.available_memory``). Returns the
    prediction as a JSON-able record (written by the capture stage); writes nothing."""
    from slimdiff.pipeline.memory import (
        GIB,
        InsufficientMemoryError,
        available_memory,
        fits,
        suggestions,
        table,
    )

    fp, settings, stages = predict_memory(params)
    device, _ = device_settings(params)
    host, device_free = available_memory(device)
    if show:
        print(f"predicted peak memory per stage (docs/memory.md; {host / GIB:.1f} GiB host RAM available"
              + (f", {device_free / GIB:.1f} GiB free on {device}" if device_free is not None else "") + "):")
        print(table(stages))
    problems = fits(stages, host, device_free)  # the largest excess first
    if problems:
        fix = suggestions(fp, settings, host, device_free)
        raise InsufficientMemoryError(f"predicted memory does not fit: {problems[0]}"
                          + (f" (and {len(problems) - 1} more stage(s))" if len(problems) > 1 else "")
                          + ("; it fits with " + " or ".join(fix) if fix else "; no setting of capture.site_groups, "
                             "capture.num_buckets or model.dtype makes it fit on this machine"))
    return {"format": "slimdiff-memory-prediction/1", "available_host_bytes": host, "available_device_bytes": device_free,
            "settings": {k: str(v) for k, v in asdict(settings).items()}, "footprint": fp.to_dict(),
            "stages": {k: v.to_dict() for k, v in stages.items()}}


def stage_capture(params: dict[str, Any]) -> None:
    """Statistics of the SlimSet under the deployment sampler, checkpointed every ``capture.checkpoint_every`` prompts.
    The predicted memory of the job is checked first (a job that would not fit fails here, before any statistics)."""
    from slimdiff.files import write_json
    from slimdiff.statistics.recording import capture

    write_json(MEMORY_PREDICTION, check_memory(params, show=False))
    config = config_from(params)
    sampler = sampler_settings(params)
    prompts = read_slimset()
    pipe = _pipeline(params)
    if shard_count(params, "capture", "shards") * shard_count(params, "capture", "site_groups") > 1:
        capture_shards(params, pipe, prompts)  # docs/distributed.md
        return
    stats = capture(pipe, prompts, sampler, num_buckets=config.num_buckets, batch_size=config.batch_size,
                    model_id=str(params["model"].get("id", params["model"]["path"])), checkpoint=CAPTURE_CHECKPOINT,
                    checkpoint_every=int(params["capture"].get("checkpoint_every", 100)),
                    timestep_grid_points=config.timestep_grid)
    stats.save(CAPTURE_FILE)
    CAPTURE_CHECKPOINT.unlink(missing_ok=True)


SHARD_DIR = CHECKPOINT_DIR / "shards"


def capture_shards(params: dict[str, Any], pipe, prompts: list[str], folder: Path = SHARD_DIR, out: Path = CAPTURE_FILE):
    """``capture.shards`` x ``capture.site_groups`` content-addressed shards in ``folder``: those missing (none after
    the flow's distributed fan-out, ``flows.distributed``) are computed here, then all are verified and merged by
    streaming into ``out``; the shard files are removed once merged. Returns the plan."""
    from slimdiff.statistics.shards import capture_sharded

    c = params["capture"]
    plan, _ = capture_sharded(pipe, prompts, sampler_settings(params), folder, out,
                              shards=shard_count(params, "capture", "shards"),
                              site_groups=shard_count(params, "capture", "site_groups"), num_buckets=int(c["num_buckets"]),
                              batch_size=int(c["batch_size"]), model_id=str(params["model"].get("id", params["model"]["path"])),
                              checkpoint_every=int(c.get("checkpoint_every", 100)), timestep_grid_points=timestep_grid_setting(c))
    for shard in plan.shards:
        plan.path(folder, shard).unlink(missing_ok=True)
    return plan


GAIN_SHARD_DIR = CHECKPOINT_DIR / "gain_shards"


def shard_count(params: dict[str, Any], section: str, key: str) -> int:
    """``params[section][key]`` (default 1), a whole number >= 1: ``capture.shards``, ``capture.site_groups``,
    ``score.gain_shards``. Bad values fail with one line naming the key."""
    value = params[section].get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"params.yaml {section}.{key} must be a whole number >= 1, got {value!r}")
    return value


def gain_shards(params: dict[str, Any]) -> int:
    """``score.gain_shards``: module subsets the gains are measured in (1 = one process), checked."""
    return shard_count(params, "score", "gain_shards")


def gain_reference(config, capture_file: Path = CAPTURE_FILE):
    """What truncation gains truncate with (``score.gain_method: truncation``): the capture, opened lazily (one group's
    sites read at a time; ``measure_gains`` checks it was taken on the same model); None for noise gains."""
    if config.gain_method != "truncation":
        return None
    from slimdiff.statistics.sums import open_capture

    return config.gain_reference(open_capture(capture_file, device="cpu"))


def factorisation_recorder(config, reference, pipe, root: Path = Path(".")):
    """What the truncation gains hand the score stage: each FFN's factorisation, recorded in the store of
    ``root / FACTORISATIONS_DIR`` for this capture (``slimdiff.scoring.influence.ffn_recorder``); None for noise gains,
    which decompose nothing."""
    if reference is None:
        return None
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.decomposition.factorisations import store_for
    from slimdiff.scoring.influence import ffn_recorder

    store = store_for(root / FACTORISATIONS_DIR, reference.capture, reference.reg, denoiser_of(pipe)[1])
    store.clear_others()
    return ffn_recorder(store, config.granularity)


def stage_gains(params: dict[str, Any]) -> None:
    """Propagation gains on the first ``score.gain_prompts`` SlimSet prompts, checkpointed after every module; with
    ``score.gain_shards`` > 1, merged from module-subset shards (those the flow's fan-out did not write are measured
    here; docs/distributed.md). Truncation gains record each FFN's factorisation for the score stage."""
    from slimdiff.scoring.gain_shards import measure_gains_sharded
    from slimdiff.scoring.gains import measure_gains

    config = config_from(params)
    sampler = sampler_settings(params)
    prompts = read_slimset()[: config.gain_prompts]
    shards = gain_shards(params)
    pipe = _pipeline(params)
    reference = gain_reference(config)
    record = factorisation_recorder(config, reference, pipe)
    if shards > 1:
        gains, plan, measured = measure_gains_sharded(pipe, prompts, sampler, GAIN_SHARD_DIR, shards=shards,
                                                      num_calls=config.gain_calls, rel_noise=config.rel_noise,
                                                      seed=sampler.seed, progress=True, reference=reference,
                                                      record=record)
        print(f"gains: merged {len(plan.shards)} shards ({len(measured)} measured in this process)")
        gains.save(GAINS_FILE)
        for shard in plan.shards:
            plan.path(GAIN_SHARD_DIR, shard).unlink(missing_ok=True)
        return
    gains = measure_gains(pipe, prompts, sampler, config.gain_calls, config.rel_noise, seed=sampler.seed,
                          progress=True, checkpoint=GAINS_CHECKPOINT, reference=reference, record=record)
    gains.save(GAINS_FILE)
    GAINS_CHECKPOINT.unlink(missing_ok=True)


def stage_latency(params: dict[str, Any]) -> None:
    """The latency table on ``model.device``, when ``allocate.budget_kind`` is ``latency``; otherwise a record that none
    was needed (timing every unit of a large model takes a while, and only a latency budget reads it)."""
    from slimdiff.planning.latency import INTERPOLATION_TOLERANCE, measure_pipeline_latency, write_not_measured

    config = config_from(params)
    if config.budget_kind != "latency":
        write_not_measured(LATENCY_FILE, f"allocate.budget_kind is {config.budget_kind}: no latency table needed")
        print(f"latency: not measured (allocate.budget_kind {config.budget_kind}; a latency budget measures it)")
        return
    table = measure_pipeline_latency(_pipeline(params), read_slimset()[:1], sampler_settings(params), config.granularity,
                                     config.latency_points, config.latency_repeats, progress=True)
    table.save(LATENCY_FILE)
    print(f"denoiser {table.denoiser_ms:.4g} ms on {table.device} (call shape {table.sample_shape}); compressible units at full "
          f"width {table.compressible_ms:.4g} ms ({len(table.curves)} units)")
    for check in table.settings.get("additivity", []):
        print(f"latency: fused block {check['module']} at widths {check['widths']}: measured {check['measured_ms']:.4g} ms, "
              f"additive prediction {check['predicted_ms']:.4g} ms ({check['relative_error']:+.1%})")
    checked = table.checked_curves()
    if checked:
        trusted = [c for c in checked if table.interpolates(c)]
        print(f"latency: interpolation between timed widths checked on {len(checked)} unit(s): within "
              f"{INTERPOLATION_TOLERANCE:.0%} of the unit's time on {len(trusted)} (their untimed widths may be chosen), "
              f"not on {len(checked) - len(trusted)} (timed widths only)")


FACTORISATIONS_DIR = CHECKPOINT_DIR / "factorisations"


def stage_score(params: dict[str, Any]) -> None:
    """Scores of every group, streaming the capture one group's sites at a time (host memory does not grow with the
    number of sites); each group's factorisation is recorded for the decompose stage (``FACTORISATIONS_DIR``), and the
    FFNs' the truncation gains recorded there are read back."""
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.decomposition.factorisations import store_for
    from slimdiff.scoring.gains import Gains
    from slimdiff.scoring.influence import score
    from slimdiff.statistics.recording import check_calibration, check_model
    from slimdiff.statistics.sums import open_capture

    config = config_from(params)
    _, denoiser = denoiser_of(_pipeline(params))
    stats = open_capture(CAPTURE_FILE, device="cpu")
    check_model(stats, denoiser, str(CAPTURE_FILE))
    check_calibration(stats, read_slimset(), sampler_settings(params), str(CAPTURE_FILE))
    store = store_for(FACTORISATIONS_DIR, stats, config.reg, denoiser)
    store.clear_others()
    scores = score(denoiser, stats, Gains.load(GAINS_FILE), config.granularity, config.reg, config.max_ffn_points,
                   progress=True, store=store)
    scores.save(SCORES_FILE)
    print(f"score: {store.reads} FFN factorisation(s) the gains stage recorded were read back, not recomputed")
    print(f"score: factorisations recorded for the decompose stage: {store.nbytes() / 2**20:,.1f} MiB in {store.folder}")


def stage_allocate(params: dict[str, Any]) -> None:
    from slimdiff.device import describe_device
    from slimdiff.files import write_json
    from slimdiff.planning.allocation import Budget, allocate
    from slimdiff.planning.latency import read_latency_table
    from slimdiff.scoring.influence import InfluenceScores

    config = config_from(params)
    table = read_latency_table(LATENCY_FILE)  # None unless a latency budget asked the latency stage for one
    if table is not None:  # it must come from the device and dtype this job runs on (allocation itself loads no model)
        device, dtype = device_settings(params)
        table.check_matches(device=describe_device(device), dtype=str(dtype).removeprefix("torch."), source=str(LATENCY_FILE))
    plan = allocate(InfluenceScores.load(SCORES_FILE), Budget.parse(config.budget), config.allocator, config.min_keep,
                    config.bucket_weights, config.temperature, config.budget_kind, config.tie_qk_vo, table)
    plan.save(PLAN_FILE)
    plan.plot(PLAN_PLOT)
    write_json(PLAN_METRICS, {"compressible_before": plan.params_before, "compressible_after": plan.params_after,
                              "removed": plan.removed, "removed_fraction": plan.removed / plan.params_before,
                              "predicted_error": plan.predicted_error,
                              "macs_kept_fraction": plan.macs_after / plan.macs_before if plan.macs_before else None,
                              "predicted_latency_fraction": plan.latency["predicted_fraction"] if plan.latency else None,
                              "predicted_latency_upper_bound": plan.latency["upper_bound"] if plan.latency else None})
    print(plan.table().splitlines()[-1])


def stage_decompose(params: dict[str, Any]) -> None:
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.compress import CompressionResult
    from slimdiff.decomposition.apply import decompose
    from slimdiff.decomposition.factorisations import store_for
    from slimdiff.planning.allocation import WidthPlan
    from slimdiff.runtime.folder import save
    from slimdiff.statistics.recording import check_model
    from slimdiff.statistics.sums import open_capture

    config = config_from(params)
    pipe = _pipeline(params)
    _, denoiser = denoiser_of(pipe)
    # streamed: one group's sites in memory at a time (docs/distributed.md). Read onto the CPU as Capture.load did;
    # each group's moments move to the model's linalg device in group_statistics.
    stats = open_capture(CAPTURE_FILE, device="cpu")
    check_model(stats, denoiser, str(CAPTURE_FILE))
    plan = WidthPlan.load(PLAN_FILE)
    planned_for = plan.settings.get("model_hash")
    if planned_for != stats.metadata["model_hash"]:
        raise ValueError(f"{PLAN_FILE} was allocated for model {str(planned_for)[:12]}, but the capture and model are "
                         f"{stats.metadata['model_hash'][:12]}; re-run the score and allocate stages")
    # the factorisations the score stage recorded for this capture (a missing one is computed here)
    store = store_for(FACTORISATIONS_DIR, stats, config.reg, denoiser)
    groups = decompose(denoiser, stats, plan.widths, config.reg, progress=True, store=store)
    result = CompressionResult(config, stats, None, plan, groups)
    save(pipe, MODEL_DIR, result.info(str(params["model"].get("id", ""))), full_widths={m.name: m.full_width for m in plan.modules},
         overwrite=True, methods={g.name: g.method for g in groups}, lora_maps=result.lora_maps)


def check_compressed_from(original_denoiser, folder: Path = MODEL_DIR) -> None:
    """Fail when the compressed model in ``folder`` was not made from ``original_denoiser`` (its recorded base hash)."""
    from slimdiff.runtime.folder import read_config
    from slimdiff.statistics.recording import model_content_hash

    _, config = read_config(folder)
    recorded = config.get("info", {}).get("base_model", {}).get("hash")
    actual = model_content_hash(original_denoiser)
    if recorded != actual:
        raise ValueError(f"{folder} was compressed from model {str(recorded)[:12]}, but model.path holds {actual[:12]}; "
                         "re-run the pipeline from the capture on")


def evaluation_prompts(params: dict[str, Any]) -> list[str]:
    from slimdiff.compress import read_prompts

    e = params["evaluate"]
    prompts = read_prompts(e["prompts"])
    return prompts[: int(e["n"])]


def stage_evaluate(params: dict[str, Any]) -> None:
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.files import write_json
    from slimdiff.pipeline.evaluation import evaluate

    e = params["evaluate"]
    original = _pipeline(params)
    check_compressed_from(denoiser_of(original)[1])
    compressed = _compressed_pipeline(params, original)
    evaluator = _evaluator(params)
    metrics = evaluate(original, compressed, evaluation_prompts(params), sampler_settings(params), evaluator=evaluator,
                       latency_repeats=int(e.get("latency_repeats", 5)), progress=True)
    metrics["plan"] = json.loads(PLAN_METRICS.read_text())
    if "latency" in metrics:  # the latency table's prediction (a latency budget's) against this measurement
        denoiser = metrics["latency"]["denoiser"]
        measured = denoiser["compressed_ms"] / denoiser["original_ms"]
        predicted = metrics["plan"].get("predicted_latency_fraction")
        metrics["latency"]["measured_fraction"] = measured
        if predicted is not None:
            metrics["latency"].update(predicted_fraction=predicted,
                                      predicted_upper_bound=metrics["plan"]["predicted_latency_upper_bound"],
                                      prediction_error=measured / predicted - 1)
    _alignment_ratio(metrics)
    held_out = {}
    prompts = evaluation_prompts(params)[: int(e.get("held_out_n", 50))]
    for name, sampler, scheduler in held_out_samplers(params):  # the settings the model was not calibrated on
        other_original, other_compressed = with_scheduler(original, scheduler), with_scheduler(compressed, scheduler)
        result = evaluate(other_original, other_compressed, prompts, sampler, evaluator=evaluator, measure_latency=False,
                          progress=True)
        held_out[name] = {"sampler": {**sampler.to_dict(), "scheduler": type(other_original.scheduler).__name__},
                          "fidelity": result["fidelity"], **({"alignment": result["alignment"]} if "alignment" in result else {})}
        _alignment_ratio(held_out[name])
    if held_out:
        metrics["held_out"] = held_out
        metrics["worst"] = worst_case(metrics)
    write_json(METRICS_FILE, metrics)


# the metrics a held-out sampler can make worse, and which way is worse: the gate checks the worst of every sampler
WORST_OF = {"fidelity.noise_sqnr_db": min, "fidelity.image_psnr_db": min, "alignment.ratio_to_original": min}


def worst_case(metrics: dict[str, Any]) -> dict[str, Any]:
    """Each of ``WORST_OF`` at its worst over the calibration sampler and every held-out sampler, and where."""
    from slimdiff.pipeline.evaluation import flatten

    worst = {}
    for key, pick in WORST_OF.items():
        values = {"calibration sampler": flatten(metrics).get(key)}
        values.update({name: flatten(entry).get(key) for name, entry in metrics.get("held_out", {}).items()})
        known = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if known:
            where = pick(known, key=known.get)
            worst[key] = {"value": known[where], "sampler": where}
    return worst


def _alignment_ratio(metrics: dict[str, Any]) -> None:
    if "alignment" in metrics:
        original, compressed_acc = metrics["alignment"]["original"]["overall"], metrics["alignment"]["compressed"]["overall"]
        metrics["alignment"]["ratio_to_original"] = compressed_acc / original if original else None


def held_out_samplers(params: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``evaluate.samplers``: the held-out sampler settings the evaluate stage measures besides the calibration one,
    each ``{name, steps, scheduler, guidance, height, width}`` (omitted keys: the calibration sampler's; ``scheduler``:
    a diffusers scheduler class, built from the pipeline's scheduler config; ``scheduler_config``: overrides). Returns
    (name, SamplerSettings, (scheduler class, overrides) or None) each; a bad entry fails with one line naming it."""
    import diffusers
    from diffusers import SchedulerMixin

    base = sampler_settings(params)
    entries = params["evaluate"].get("samplers") or []
    if not isinstance(entries, list):
        raise ValueError(f"params.yaml evaluate.samplers must be a list of sampler settings, got {type(entries).__name__}")
    out, names = [], set()
    for index, entry in enumerate(entries):
        where = f"params.yaml evaluate.samplers[{index}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping (name, steps, scheduler, ...), got {entry!r}")
        unknown = sorted(set(entry) - {"name", "steps", "scheduler", "scheduler_config", "guidance", "height", "width"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: name, steps, scheduler, scheduler_config, guidance, "
                             "height, width")
        steps = entry.get("steps", base.num_inference_steps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{where}: steps must be a whole number >= 1, got {steps!r}")
        scheduler = entry.get("scheduler")
        if scheduler is not None:
            cls = getattr(diffusers, str(scheduler), None)
            if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
                raise ValueError(f"{where}: unknown scheduler {scheduler!r}; give a diffusers scheduler class, e.g. "
                                 "DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, "
                                 "FlowMatchEulerDiscreteScheduler")
            scheduler = (cls, dict(entry.get("scheduler_config") or {}))
        elif entry.get("scheduler_config"):
            raise ValueError(f"{where}: scheduler_config needs a scheduler")
        try:
            sampler = replace(base, num_inference_steps=steps, guidance_scale=float(entry.get("guidance", base.guidance_scale)),
                              height=entry.get("height", base.height), width=entry.get("width", base.width))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: {error}") from None
        name = str(entry.get("name") or f"{steps} steps" + (f", {entry['scheduler']}" if entry.get("scheduler") else ""))
        if name in names:
            raise ValueError(f"{where}: the name {name!r} is used twice")
        names.add(name)
        out.append((name, sampler, scheduler))
    return out


def with_scheduler(pipe, scheduler):
    """A pipeline sharing ``pipe``'s modules with another scheduler, or ``pipe`` itself."""
    if scheduler is None:
        return pipe
    cls, overrides = scheduler
    other = type(pipe)(**{**pipe.components, "scheduler": cls.from_config(pipe.scheduler.config, **overrides)})
    other.set_progress_bar_config(disable=True)
    return other


def _evaluator(params: dict[str, Any]):
    path = params["evaluate"].get("evaluator")
    if not path:
        return None
    from slimdiff.reference.evaluator import load_evaluator

    return load_evaluator(path)


def stage_report(params: dict[str, Any]) -> None:
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.pipeline.report import write_report

    original = _pipeline(params)
    check_compressed_from(denoiser_of(original)[1])
    compressed = _compressed_pipeline(params, original)
    prompts = evaluation_prompts(params)[: int(params.get("report", {}).get("samples", 8))]
    write_report(REPORT_DIR, params, json.loads(PLAN_FILE.read_text()), json.loads(METRICS_FILE.read_text()), PLAN_PLOT,
                 original, compressed, prompts, sampler_settings(params), progress=True)


MODEL_STAGES = ("curate", "capture", "gains", "latency", "score", "decompose", "evaluate", "report")

STAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "curate": stage_curate,
    "capture": stage_capture,
    "gains": stage_gains,
    "latency": stage_latency,
    "score": stage_score,
    "allocate": stage_allocate,
    "decompose": stage_decompose,
    "evaluate": stage_evaluate,
    "report": stage_report,
}


def main(argv: list[str] | None = None) -> int:
    from slimdiff.environment import quiet_libraries

    parser = argparse.ArgumentParser(prog="python -m slimdiff.pipeline.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    quiet_libraries()
    start = time.perf_counter()
    try:
        from slimdiff.device import apply_threads

        threads, why = apply_threads()  # before any torch work; the compress flow passes one number to every stage
        print(f"stage {args.stage}: {threads} torch thread(s) ({why})", flush=True)
        params = load_params(args.params)
        if args.stage in MODEL_STAGES:
            device_settings(params)  # a device or dtype this machine cannot run fails before any work
        STAGES[args.stage](params)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"stage {args.stage}: error: {message}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    resources = record_resources(args.stage, seconds)
    print(f"stage {args.stage}: done in {seconds:.1f} s (peak host RSS {resources['peak_host_bytes'] / 2**30:.2f} GiB"
          + (f", peak GPU memory {resources['peak_device_bytes'] / 2**30:.2f} GiB" if resources["peak_device_bytes"] else "")
          + ")")
    return 0


def record_resources(stage: str, seconds: float) -> dict[str, Any]:
    """This stage process's wall time, peak host RSS and peak GPU memory (reserved by torch), written to
    ``outputs/.resources/<stage>.json``: the flow logs them, the memory benchmark compares them with the prediction."""
    import torch

    from slimdiff.files import write_json
    from slimdiff.pipeline.memory import peak_host_rss

    device = 0
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = max(torch.cuda.max_memory_reserved(i) for i in range(torch.cuda.device_count()))
    record = {"stage": stage, "seconds": seconds, "peak_host_bytes": peak_host_rss(),
              "peak_device_bytes": device}
    write_json(RESOURCES_DIR / f"{stage}.json", record)
    return record


if __name__ == "__main__":
    raise SystemExit(main())
