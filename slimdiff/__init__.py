"""slimdiff: training-free, activation-guided structural compression of text-to-image diffusion models.

One entry point per step:

    stats = slimdiff.capture(pipe, prompts, slimdiff.SamplerSettings(num_inference_steps=25))
    gains = slimdiff.measure_gains(pipe, prompts[:4], sampler, reference=slimdiff.TruncationReference(stats, reg=1e-3))
    scores = slimdiff.score(pipe.unet, stats, gains)
    plan = slimdiff.allocate(scores, budget=0.4)
    groups = slimdiff.decompose(pipe.unet, stats, plan.widths)
    slimdiff.save(pipe, "out/", full_widths=..., lora_maps=slimdiff.merge_maps(m for g in groups for m in g.maps))
    pipe = slimdiff.load("out/")
    slimdiff.project_lora("style.safetensors", "out/", "style-slim.safetensors")  # then pipe.load_lora_weights(...)

or all of it at once: ``slimdiff.compress_pipeline(pipe, prompts, SlimDiffConfig(budget=0.4))``.

The package is laid out by role: ``slimdiff.runtime`` is what a compressed model needs to load and run (it imports
nothing of the compressor); the compressor follows the data: ``statistics`` -> ``decomposition`` (the math) ->
``scoring`` -> ``planning`` -> back to ``decomposition`` to apply a plan; ``slimdiff.arch`` holds one adapter per
model family; ``slimdiff.pipeline`` the job's stages (curation, evaluation, the report). The names below are
imported when first used, so ``import slimdiff.runtime`` loads the runtime alone.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Budget": "slimdiff.planning.allocation", "BudgetError": "slimdiff.planning.allocation",
    "WidthPlan": "slimdiff.planning.allocation", "allocate": "slimdiff.planning.allocation",
    "Capture": "slimdiff.statistics.sums", "merge_captures": "slimdiff.statistics.sums",
    "capture": "slimdiff.statistics.recording", "SamplerSettings": "slimdiff.runtime.sampling",
    "CompressionResult": "slimdiff.compress", "SlimDiffConfig": "slimdiff.compress",
    "compress_pipeline": "slimdiff.compress", "load_pipeline": "slimdiff.compress",
    "DeviceError": "slimdiff.device",
    "ModuleGroup": "slimdiff.arch", "UnsupportedModelError": "slimdiff.arch", "find_groups": "slimdiff.arch",
    "Gains": "slimdiff.scoring.gains", "measure_gains": "slimdiff.scoring.gains",
    "TruncationReference": "slimdiff.scoring.gains",
    "Granularity": "slimdiff.scoring.influence", "InfluenceScores": "slimdiff.scoring.influence",
    "score": "slimdiff.scoring.influence",
    "CompressedModelError": "slimdiff.runtime.folder", "describe": "slimdiff.runtime.folder",
    "load": "slimdiff.runtime.folder", "save": "slimdiff.runtime.folder", "project_lora": "slimdiff.runtime.lora",
    "merge_maps": "slimdiff.runtime.lora",
    "decompose": "slimdiff.decomposition.apply",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimdiff' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
