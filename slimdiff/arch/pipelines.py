"""Which component of a diffusers pipeline is its denoiser."""

from __future__ import annotations

from torch import nn


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """("unet", module) or ("transformer", module) of a diffusers pipeline."""
    for key in ("unet", "transformer"):
        module = getattr(pipe, key, None)
        if isinstance(module, nn.Module):
            return key, module
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' component to compress")
