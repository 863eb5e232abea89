"""The capture: the pipeline run over the calibration prompts with the recorder attached, checkpointed and resumable;
prompt and model identities.
"""

from __future__ import annotations

import hashlib
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from slimdiff.arch import ModuleGroup, adapter_for, compressible_groups
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.arch.sites import sites_for
from slimdiff.device import module_device
from slimdiff.runtime.sampling import (
    SAMPLER_DEFAULTS,
    SamplerSettings,
    prompt_hash,
    prompts_digest,
    prompts_digest_from_hashes,
)
from slimdiff.statistics.recorder import (
    ActivationRecorder,
    hooked_conditioning_sites,
    timestep_grid,
)
from slimdiff.statistics.sums import Capture, SiteStats

# timesteps at which the conditioning sites (adaLN inputs) are recorded, spread over the scheduler's range
DEFAULT_TIMESTEP_GRID = 64


def model_content_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_model(capture: Capture, denoiser: nn.Module, source: str = "the capture") -> None:
    """Fail when ``capture`` was taken on another checkpoint than ``denoiser`` (same shapes or not)."""
    recorded = capture.metadata.get("model_hash")
    if not recorded:
        raise ValueError(f"{source} records no model hash; re-run the capture with this slimdiff")
    actual = model_content_hash(denoiser)
    if actual != recorded:
        raise ValueError(f"{source} was taken on model {recorded[:12]}, but this model is {actual[:12]}; "
                         "re-run the capture for this checkpoint")


def check_calibration(capture: Capture, prompts: Sequence[str], sampler: "SamplerSettings", source: str = "the capture") -> None:
    """Fail when ``capture`` was taken on other calibration prompts or sampler settings than these."""
    recorded = capture.metadata.get("prompts_digest")
    if recorded != prompts_digest(prompts):
        raise ValueError(f"{source} was taken on {capture.metadata.get('num_prompts', '?')} other calibration prompts (digest "
                         f"{str(recorded)[:12]}), not on these {len(prompts)} (digest {prompts_digest(prompts)[:12]}); re-run the capture")
    recorded_sampler = {k: capture.metadata.get(k, SAMPLER_DEFAULTS.get(k)) for k in sampler.to_dict()}
    differ = {k: (recorded_sampler[k], v) for k, v in sampler.to_dict().items() if recorded_sampler[k] != v}
    if differ:
        detail = ", ".join(f"{k} {was} (now {now})" for k, (was, now) in differ.items())
        raise ValueError(f"{source} was taken with other sampler settings: {detail}; re-run the capture")


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@contextmanager
def _quiet_pipeline(pipe):
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe.set_progress_bar_config(disable=False)


def capture_fingerprint(denoiser: nn.Module, prompts: Sequence[str], sampler: SamplerSettings, sites: Sequence[str],
                        num_buckets: int, batch_size: int, scheduler, model_hash: str, timestep_grid: int = 0) -> dict:
    """Everything that decides the sums a capture accumulates, batch by batch (what a resumed capture must match)."""
    parameter = next(denoiser.parameters())
    ordered = hashlib.sha256("\n".join(prompt_hash(p) for p in prompts).encode()).hexdigest()
    return {
        "timestep_grid": timestep_grid,
        "model_hash": model_hash,
        "denoiser_class": type(denoiser).__name__,
        "sampler": sampler.to_dict(),
        "scheduler": _jsonable({"class": type(scheduler).__name__, **_scheduler_config(scheduler)}),
        "sites": hashlib.sha256("\n".join(sites).encode()).hexdigest(),
        "num_buckets": num_buckets,
        "batch_size": batch_size,
        "prompts_in_order": ordered,
        "device_type": parameter.device.type,
        "dtype": str(parameter.dtype),
    }


def _resume_point(checkpoint: Path, fingerprint: dict, device: torch.device) -> tuple[dict[str, SiteStats] | None, int, int]:
    """(statistics, prompts done, denoiser calls) of a checkpoint written with the same fingerprint, else (None, 0, 0)."""
    if not checkpoint.is_file():
        return None, 0, 0
    from safetensors import SafetensorError

    try:
        partial = Capture.load(checkpoint, device)
    except (ValueError, OSError, SafetensorError) as error:  # written atomically: only a foreign or damaged file
        print(f"capture: not resuming {checkpoint}: unreadable ({str(error).splitlines()[0][:120]}); starting over",
              file=sys.stderr)
        return None, 0, 0
    info = partial.metadata.get("checkpoint", {})
    written = info.get("fingerprint", {})
    if written != fingerprint:
        differing = sorted(k for k in set(fingerprint) | set(written) if written.get(k) != fingerprint.get(k))
        print(f"capture: not resuming {checkpoint}: it was written with other settings ({', '.join(differing)}); "
              "starting over", file=sys.stderr)
        return None, 0, 0
    print(f"capture: resuming {checkpoint} after {info['done']} prompts", file=sys.stderr)
    return partial.sites, int(info["done"]), int(info["denoiser_calls"])


def capture(
    pipe,
    prompts: Sequence[str],
    sampler: SamplerSettings = SamplerSettings(),
    *,
    num_buckets: int = 4,
    batch_size: int = 8,
    groups: Sequence[ModuleGroup] | None = None,
    extra_sites: Sequence[str] = (),
    model_id: str = "",
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    model_hash: str | None = None,
    timestep_grid_points: int = DEFAULT_TIMESTEP_GRID,
) -> Capture:
    """Run ``pipe`` over ``prompts`` with the deployment sampler and return the accumulated statistics.

    Inputs that depend only on the timestep and pooled conditions (adaLN modulations, ``conditioning_sites``) are
    recorded over ``timestep_grid_points`` timesteps spread over the scheduler's whole range, replaying each batch's
    first denoiser call with its pooled text (method.md §7): their statistics then hold at any step count,
    scheduler or resolution shift, not only at the sampler's timesteps. 0 records them from the sampler's calls.

    Statistics accumulate on the denoiser's device. ``extra_sites`` names further ``nn.Linear``
    modules (by path in the denoiser) whose inputs to record, e.g. for per-matrix baselines. With
    ``checkpoint``, the partial sums are written there atomically every ``checkpoint_every`` prompts
    (rounded up to whole batches), and a checkpoint left by an interrupted run with the same model,
    prompts and settings is resumed; the result equals an uninterrupted capture. The caller removes
    the checkpoint once the final capture is saved. ``model_hash``: the denoiser's ``model_content_hash``
    when the caller already computed it for this loaded model (hashing a 12 B model takes a while).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture needs at least one prompt")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every calibration prompt must be a non-empty string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 prompt, got {checkpoint_every}")
    _, denoiser = denoiser_of(pipe)
    device = module_device(denoiser)
    groups = list(groups) if groups is not None else compressible_groups(denoiser)
    # every diffusers scheduler config has it; 1000 is diffusers' own default for the few that omit it
    num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    sites = list(dict.fromkeys([*sites_for(groups), *extra_sites]))
    model_hash = model_hash or model_content_hash(denoiser)
    conditioning = hooked_conditioning_sites(denoiser, sites)
    grid = timestep_grid(num_train_timesteps, timestep_grid_points) if conditioning else []
    fingerprint = capture_fingerprint(denoiser, prompts, sampler, sites, num_buckets, batch_size, pipe.scheduler, model_hash,
                                      len(grid))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    stats, done, calls = _resume_point(checkpoint, fingerprint, device) if checkpoint else (None, 0, 0)
    recorder = ActivationRecorder(denoiser, sites, num_buckets, num_train_timesteps, stats=stats,
                                  timestep_scale=adapter_for(denoiser).TIMESTEP_SCALE,
                                  conditioning_sites=conditioning if grid else ())
    recorder.calls = calls
    batches_per_checkpoint = max(1, math.ceil(checkpoint_every / batch_size))
    with recorder, _quiet_pipeline(pipe), torch.inference_mode():
        bar = tqdm(total=len(prompts), initial=done, desc="capture", unit="prompt", disable=not progress)
        for index, batch in enumerate(_batches(prompts[done:], batch_size), 1):
            recorder.keep_call = bool(grid)
            pipe(**sampler.pipe_kwargs(pipe, batch), output_type="latent")
            recorder.record_grid(grid)  # the batch's pooled conditions at every grid timestep
            done += len(batch)
            bar.update(len(batch))
            if checkpoint is not None and index % batches_per_checkpoint == 0 and done < len(prompts):
                partial = Capture(recorder.stats, {"checkpoint": {"fingerprint": fingerprint, "done": done,
                                                                  "denoiser_calls": recorder.calls}})
                partial.check_finite(f"capture after {done} prompts")
                partial.save(checkpoint)
        bar.close()
    hashes = [prompt_hash(p) for p in prompts]
    metadata = {
        "model_id": model_id,
        "model_hash": model_hash,
        "denoiser_class": type(denoiser).__name__,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": _jsonable(_scheduler_config(pipe.scheduler))},
        **sampler.to_dict(),
        "bucket_edges": recorder.edges,
        "num_prompts": len(prompts),
        "prompt_hashes": sorted(hashes),
        "prompts_digest": prompts_digest_from_hashes(hashes),
        "denoiser_calls": recorder.calls,
        "site_tokens": dict(recorder.site_tokens),
        "call": recorder.call,
        "conditioning": {"sites": sorted(recorder.conditioning_sites), "timestep_grid": len(grid),
                         "timesteps": "uniform over [0, num_train_timesteps)"} if grid else None,
        "dtype": fingerprint["dtype"],
        "device_type": device.type,
    }
    result = Capture(recorder.stats, metadata)
    result.check_finite()
    return result


def _scheduler_config(scheduler) -> dict:
    """The scheduler's settings; diffusers' ``_use_default_values`` is dropped: it lists a set, in an order that
    changes from process to process, so a checkpoint or shard written by another process would never match."""
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
