"""Which component of a diffusers pipeline is its denoiser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn


def read_model_index(folder: str | Path) -> dict[str, Any]:
    """A diffusers folder's ``model_index.json``, checked: a JSON object whose ``_class_name`` is a pipeline class of
    the installed diffusers. ``ValueError`` in one line naming the file and what is wrong; no weight is read."""
    import diffusers

    path = Path(folder) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): not a diffusers "
                         "model_index.json") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno})") from None
    if not isinstance(index, dict):
        raise ValueError(f"{path} holds a JSON {type(index).__name__}, not an object with _class_name and the "
                         "pipeline's components")
    name = index.get("_class_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{path} has no _class_name naming the pipeline class (e.g. \"StableDiffusionPipeline\", "
                         f"\"FluxPipeline\"); found {name!r}")
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline)):
        raise ValueError(f"{path} names pipeline class {name!r}, which is not a pipeline class of diffusers "
                         f"{diffusers.__version__}")
    return index


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """("unet", module) or ("transformer", module) of a diffusers pipeline."""
    for key in ("unet", "transformer"):
        module = getattr(pipe, key, None)
        if isinstance(module, nn.Module):
            return key, module
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' component to compress")
