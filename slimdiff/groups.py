"""Functional groups of a diffusers denoiser: the stable import path for ``slimdiff.arch``.

The groups themselves (``ModuleGroup``) and the per-family adapters live in ``slimdiff.arch``; this module
re-exports what callers use.
"""

from slimdiff.arch import (ADAPTERS, GROUP_KINDS, SUPPORTED_DENOISERS, ModuleGroup, UnsupportedModelError, adapter_for,
                           compressible_groups, find_groups, left_intact)
from slimdiff.arch.base import ELEMENTWISE_ACTIVATIONS, GATED_ACTIVATIONS

__all__ = ["ADAPTERS", "ELEMENTWISE_ACTIVATIONS", "GATED_ACTIVATIONS", "GROUP_KINDS", "ModuleGroup", "SUPPORTED_DENOISERS",
           "UnsupportedModelError", "adapter_for", "compressible_groups", "find_groups", "left_intact"]
