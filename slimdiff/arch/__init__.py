"""Architecture adapters: one module per denoiser family, discovered from the denoiser's class.

Each adapter module declares ``DENOISERS`` (the diffusers class names it handles), ``FAMILY``,
``TIMESTEP_SCALE`` (what the denoiser's timestep argument is multiplied by to reach the scheduler's
timesteps) and ``find_groups(denoiser)``. The math is shared; adapters only name groups and capture sites.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from slimdiff.arch import flux, sd3, unet_dit
from slimdiff.arch.base import GROUP_KINDS, ModuleGroup, UnsupportedModelError

ADAPTERS: tuple[ModuleType, ...] = (unet_dit, sd3, flux)
SUPPORTED_DENOISERS = tuple(name for adapter in ADAPTERS for name in adapter.DENOISERS)
# class-name markers of video denoisers and their temporal layers (UNet3DConditionModel, TransformerTemporalModel,
# UNetSpatioTemporalConditionModel, TemporalBasicTransformerBlock, UNetMotionModel, LatteTransformer3DModel, ...):
# their spatial blocks look like image blocks, but frames fold into the batch and temporal attention mixes them
VIDEO_CLASS_MARKERS = ("Temporal", "Motion", "3D", "Video")

__all__ = ["ADAPTERS", "GROUP_KINDS", "ModuleGroup", "SUPPORTED_DENOISERS", "UnsupportedModelError", "adapter_for",
           "compressible_groups", "find_groups", "left_intact"]


def _check_not_video(denoiser: nn.Module) -> None:
    """Refuse a video denoiser by class name, before any hook could meet its temporal layers."""
    video = [(path, type(m).__name__) for path, m in denoiser.named_modules()
             if any(marker in type(m).__name__ for marker in VIDEO_CLASS_MARKERS)]
    if video:
        layer = next(((path, name) for path, name in video if path), None)
        where = f" (temporal layer {layer[1]} at {layer[0]})" if layer else ""
        raise UnsupportedModelError(
            f"{type(denoiser).__name__} is a video denoiser{where}; slimdiff compresses image denoisers: "
            f"{', '.join(SUPPORTED_DENOISERS)}"
        )


def adapter_for(denoiser: nn.Module) -> ModuleType:
    """The adapter module for ``denoiser``'s class; ``UnsupportedModelError`` names the class and the supported ones."""
    _check_not_video(denoiser)
    name = type(denoiser).__name__
    for adapter in ADAPTERS:
        if name in adapter.DENOISERS:
            return adapter
    from diffusers.models.attention import BasicTransformerBlock

    # another class built from BasicTransformerBlocks (a wrapper, a custom DiT): the blocks are what the adapter reads
    if any(isinstance(m, BasicTransformerBlock) for m in denoiser.modules()):
        return unet_dit
    raise UnsupportedModelError(f"{name} has no supported transformer block; supported denoisers: {', '.join(SUPPORTED_DENOISERS)}")


def find_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Every functional group of ``denoiser``'s transformer blocks, in module order, the ones left intact included
    (``compressible=False``, the reason in ``note``).

    Raises ``UnsupportedModelError`` for a class no adapter handles, a video denoiser (temporal layers), or a
    denoiser without a single transformer block its adapter knows.
    """
    adapter = adapter_for(denoiser)
    groups = adapter.find_groups(denoiser)
    if not groups:
        raise UnsupportedModelError(f"{type(denoiser).__name__} has no transformer block the {adapter.FAMILY} adapter knows; "
                                    f"supported denoisers: {', '.join(SUPPORTED_DENOISERS)}")
    return groups


def compressible_groups(denoiser: nn.Module) -> list[ModuleGroup]:
    """Only the groups slimdiff will cut."""
    return [g for g in find_groups(denoiser) if g.compressible]


def left_intact(groups: list[ModuleGroup]) -> dict[str, dict[str, str]]:
    """The groups slimdiff reports but does not cut, for every listing: ``{name: {"kind": ..., "note": why}}``."""
    return {g.name: {"kind": g.kind, "note": g.note} for g in groups if not g.compressible}
