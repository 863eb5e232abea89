"""Denoiser calls as values: one type, one recorder.

A ``DenoiserCall`` is the ``(args, kwargs)`` of one denoiser forward. ``record_calls`` runs a pipeline and keeps its
denoiser's calls (the first, or a few spread over the schedule): the gains replay them with noise, the latency table
and the evaluation time them, the memory footprint runs one on the meta device. ``module_inputs`` keeps what chosen
submodules receive during one call. ``call_spec`` / ``meta_call`` turn a call into its shapes and back (on the meta
device), so that what a model costs at a capture's call shape can be counted without the pipeline or any weight.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from slimdiff.arch.pipelines import denoiser_of
from slimdiff.runtime.sampling import SamplerSettings

DenoiserCall = tuple[tuple, dict]  # (args, kwargs) of one denoiser forward


def detach_clone(value):
    """``value`` with every tensor (inside dicts, lists and tuples too) detached and copied."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: detach_clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(detach_clone(v) for v in value)
    return value


class _Enough(Exception):
    """Ends a generation once the calls wanted are recorded."""


def spread(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``range(count)``, the first and the last included (all when fewer)."""
    return torch.linspace(0, count - 1, min(wanted, count), device="cpu").round().long().unique().tolist()


def record_calls(pipe, prompts: Sequence[str], sampler: SamplerSettings, num_calls: int | None = None,
                 first_only: bool = False, whole_steps: bool = False) -> list[DenoiserCall]:
    """The denoiser's calls while ``pipe`` samples ``prompts``: the first one only (``first_only``: the rest of the
    generation does not run), or ``num_calls`` spread evenly over the schedule (all with None). Inputs are kept on
    the model's device, and only those asked for: which they are is decided at the first call from the calls the
    scheduler's timesteps predict (``sampler.calls_per_step`` a timestep), and a generation that makes another
    number of calls is refused. With ``whole_steps``, ``num_calls`` counts sampling steps, each with all its calls
    in order (true classifier-free guidance: the conditional call, then the unconditional one)."""
    _, denoiser = denoiser_of(pipe)
    per_step = sampler.calls_per_step if whole_steps else 1
    calls: list[DenoiserCall] = []
    seen = 0
    expected = 0
    wanted: set[int] | None = None  # None: every call

    def keep(module, args, kwargs):
        nonlocal seen, expected, wanted
        if seen == 0 and num_calls is not None and not first_only:
            expected = len(pipe.scheduler.timesteps) * sampler.calls_per_step
            wanted = {step * per_step + j for step in spread(max(expected // per_step, 1), num_calls) for j in range(per_step)}
        if wanted is None or seen in wanted:
            calls.append((detach_clone(args), detach_clone(kwargs)))
        seen += 1
        if first_only:
            raise _Enough

    handle = denoiser.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        pipe.set_progress_bar_config(disable=True)
        with torch.inference_mode():
            pipe(**sampler.pipe_kwargs(pipe, list(prompts)), output_type="latent")
    except _Enough:
        pass
    finally:
        handle.remove()
    if not calls:
        raise RuntimeError("the pipeline never called its denoiser")
    if wanted is not None and seen != expected:
        raise RuntimeError(f"{type(pipe).__name__} made {seen} denoiser calls where its scheduler's "
                           f"{len(pipe.scheduler.timesteps)} timesteps x {sampler.calls_per_step} call(s) a step "
                           f"predicted {expected}: the calls to keep could not be chosen over its schedule")
    return calls


def first_call(pipe, prompts: Sequence[str], sampler: SamplerSettings) -> DenoiserCall:
    """The inputs of the first denoiser call of a generation of ``prompts`` (the rest is not run)."""
    return record_calls(pipe, prompts, sampler, first_only=True)[0]


def module_inputs(model: nn.Module, paths: Sequence[str], call: DenoiserCall) -> dict[str, DenoiserCall]:
    """What each submodule at ``paths`` receives during ``call`` (the first time it runs in it)."""
    seen: dict[str, DenoiserCall] = {}

    def keep(path: str):
        def hook(module, args, kwargs):
            if path not in seen:
                seen[path] = (detach_clone(args), detach_clone(kwargs))
        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(keep(path), with_kwargs=True)
               for path in dict.fromkeys(paths)]
    try:
        with torch.inference_mode():
            args, kwargs = call
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [p for p in dict.fromkeys(paths) if p not in seen]
    if missing:
        raise RuntimeError(f"{missing[0]} (and {len(missing) - 1} more) did not run in the denoiser call")
    return seen


def call_spec(arguments: dict[str, Any]) -> dict[str, Any]:
    """A JSON-able spec of a call's bound arguments: tensors as their shape and dtype, dicts recursively, plain
    values as they are (anything else as its type name)."""
    def spec(value):
        if torch.is_tensor(value):
            return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        if isinstance(value, dict):
            return {"dict": {str(k): spec(v) for k, v in value.items()}}
        if value is None or isinstance(value, (bool, int, float, str)):
            return {"value": value}
        return {"unsupported": type(value).__name__}

    return {name: spec(value) for name, value in arguments.items()}


def meta_call(spec: dict[str, Any]) -> DenoiserCall:
    """The call a ``call_spec`` describes, with tensors of those shapes and dtypes on the meta device (keyword
    arguments only). Raises ``ValueError`` for a spec holding a value it cannot rebuild."""
    def build(name, entry):
        if "tensor" in entry:
            return torch.empty(entry["tensor"], dtype=getattr(torch, entry["dtype"]), device="meta")
        if "dict" in entry:
            return {k: build(f"{name}.{k}", v) for k, v in entry["dict"].items()}
        if "value" in entry:
            return entry["value"]
        raise ValueError(f"the recorded call's argument {name} ({entry.get('unsupported', entry)}) cannot be rebuilt")

    return (), {name: build(name, entry) for name, entry in spec.items()}
