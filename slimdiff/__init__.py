"""slimdiff: training-free, activation-guided structural compression of text-to-image diffusion models.

One entry point per step:

    stats = slimdiff.capture(pipe, prompts, slimdiff.SamplerSettings(num_inference_steps=25))
    gains = slimdiff.measure_gains(pipe, prompts[:4], sampler)
    scores = slimdiff.score(pipe.unet, stats, gains)
    plan = slimdiff.allocate(scores, budget=0.4)
    slimdiff.decompose(pipe.unet, stats, plan.widths)
    slimdiff.save(pipe, "out/", full_widths=...)
    pipe = slimdiff.load("out/")

or all of it at once: ``slimdiff.compress_pipeline(pipe, prompts, SlimDiffConfig(budget=0.4))``.
"""

from slimdiff.allocate import Budget, BudgetError, WidthPlan, allocate
from slimdiff.capture import Capture, SamplerSettings, capture, merge_captures
from slimdiff.compress import CompressionResult, SlimDiffConfig, compress_pipeline, load_pipeline
from slimdiff.device import DeviceError
from slimdiff.groups import ModuleGroup, UnsupportedModelError, find_groups
from slimdiff.influence import Gains, Granularity, InfluenceScores, measure_gains, score
from slimdiff.io import CompressedModelError, describe, load, save
from slimdiff.slim import decompose

__version__ = "0.1.0"

__all__ = [
    "Budget", "BudgetError", "Capture", "CompressedModelError", "CompressionResult", "DeviceError", "Gains", "Granularity",
    "InfluenceScores", "ModuleGroup", "SamplerSettings", "SlimDiffConfig", "UnsupportedModelError", "WidthPlan", "allocate",
    "capture", "compress_pipeline", "decompose", "describe", "find_groups", "load", "load_pipeline", "measure_gains",
    "merge_captures", "save", "score",
]
