"""A denoiser call as a value: its inputs, or the shapes of its inputs (a spec that rebuilds them on the meta device).

A capture records the spec of its first denoiser call, so that what a compressed model costs at the capture's call
shape (``slimdiff info``'s MACs) can be counted later without the pipeline, the prompts or any weight.
"""

from __future__ import annotations

from typing import Any

import torch

DenoiserCall = tuple[tuple, dict]  # (args, kwargs) of one denoiser forward


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
