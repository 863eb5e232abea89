"""Save and load compressed pipelines: diffusers layout, safetensors only, no pickle.

A saved folder is the whole pipeline as ``save_pretrained`` writes it, plus
``<denoiser>/slimdiff_config.json`` holding every compressed module's width, the attention scales, how
each module was decomposed (``methods``) and the groups left intact with the reason (``left_intact``).
``load`` rebuilds the narrower structure from that file before any weight is read, then loads the
weights strictly, so a mismatch fails loudly instead of leaving random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from slimdiff.capture import denoiser_of
from slimdiff.groups import find_groups, left_intact
from slimdiff.slim import SlimAttnProcessor, resize_group, slim_processor_for
from slimdiff.utils import atomic_dir

SLIMDIFF_CONFIG_NAME = "slimdiff_config.json"
SLIMDIFF_CONFIG_FORMAT = "slimdiff"
SLIMDIFF_CONFIG_VERSION = 1
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


class CompressedModelError(ValueError):
    """A saved compressed model folder is incomplete or inconsistent."""


def structure_of(denoiser: nn.Module) -> dict[str, Any]:
    """The structural record of a (possibly compressed) denoiser: widths per group, slim attention scales,
    and the groups left intact with the reason."""
    groups = find_groups(denoiser)
    widths = {g.name: g.width for g in groups if g.compressible}
    scales = {
        name: module.processor.scale
        for name, module in denoiser.named_modules()
        if isinstance(getattr(module, "processor", None), SlimAttnProcessor)
    }
    return {"widths": widths, "attention_scales": scales, "left_intact": left_intact(groups)}


def save(pipe, folder: str | Path, info: dict[str, Any] | None = None, full_widths: dict[str, int] | None = None,
         overwrite: bool = False, methods: Mapping[str, str] | None = None) -> Path:
    """Write ``pipe`` (with its compressed denoiser) to ``folder`` atomically, in diffusers layout.

    ``full_widths`` are the uncompressed widths (default: the current ones); ``info`` (budget,
    allocator, base model, capture provenance, predicted errors, ...) is stored beside them;
    ``methods`` records how each decomposed group was obtained (group name -> the decomposition's
    ``method_at(width)``, e.g. "cholesky" or "eigh (3 of 320 eigenvalues clamped)").
    """
    key, denoiser = denoiser_of(pipe)
    structure = structure_of(denoiser)
    unknown = sorted(set(methods or {}) - set(structure["widths"]))
    if unknown:
        raise ValueError(f"methods name groups that {type(denoiser).__name__} cannot compress or does not have: {unknown[:3]}")
    full = dict(structure["widths"])
    full.update(full_widths or {})
    config = {
        "format": SLIMDIFF_CONFIG_FORMAT,
        "version": SLIMDIFF_CONFIG_VERSION,
        "denoiser": key,
        "denoiser_class": type(denoiser).__name__,
        **structure,
        "full_widths": full,
        "methods": dict(methods or {}),
        "info": info or {},
    }
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / key / SLIMDIFF_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def read_config(folder: str | Path) -> tuple[str, dict[str, Any]]:
    """(denoiser key, slimdiff config) of a saved folder; errors name the missing or bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompressedModelError(f"{folder}: not a folder")
    if not (folder / "model_index.json").is_file():
        raise CompressedModelError(f"{folder / 'model_index.json'}: missing; not a diffusers pipeline folder")
    for key in ("unet", "transformer"):
        path = folder / key / SLIMDIFF_CONFIG_NAME
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise CompressedModelError(f"{path}: not valid JSON ({error})") from None
            if config.get("format") != SLIMDIFF_CONFIG_FORMAT or config.get("version") != SLIMDIFF_CONFIG_VERSION:
                raise CompressedModelError(
                    f"{path}: unknown config format/version {config.get('format')!r}/{config.get('version')!r}; "
                    f"this slimdiff reads {SLIMDIFF_CONFIG_FORMAT!r}/{SLIMDIFF_CONFIG_VERSION}"
                )
            return key, config
    raise CompressedModelError(f"{folder}: no unet/{SLIMDIFF_CONFIG_NAME} or transformer/{SLIMDIFF_CONFIG_NAME}; not a slimdiff model")


def _read_weights(subfolder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single, index = subfolder / WEIGHTS_NAME, subfolder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, torch.Tensor] = {}
        for shard in shards:
            if not (subfolder / shard).is_file():
                raise CompressedModelError(f"{subfolder / shard}: missing weight shard named in {index.name}")
            weights.update(load_file(str(subfolder / shard)))
        return weights
    raise CompressedModelError(f"{single}: missing (no safetensors weights for the compressed denoiser)")


def build_denoiser(subfolder: str | Path, config: dict[str, Any]) -> nn.Module:
    """Rebuild the compressed denoiser from its folder: config -> narrower structure -> strict safetensors load."""
    import diffusers

    subfolder = Path(subfolder)
    cls = getattr(diffusers, config["denoiser_class"], None)
    if cls is None:
        raise CompressedModelError(f"{subfolder / SLIMDIFF_CONFIG_NAME}: unknown denoiser class {config['denoiser_class']!r}")
    if not (subfolder / "config.json").is_file():
        raise CompressedModelError(f"{subfolder / 'config.json'}: missing model config")
    denoiser = cls.from_config(cls.load_config(str(subfolder)))
    groups = {g.name: g for g in find_groups(denoiser)}
    scales = config.get("attention_scales", {})
    for name, width in config.get("widths", {}).items():
        if name not in groups:
            raise CompressedModelError(f"{subfolder / SLIMDIFF_CONFIG_NAME}: names module {name!r}, which {cls.__name__} does not have")
        group = groups[name]
        if width != group.width:
            resize_group(denoiser, group, int(width), scales.get(group.path))
    for path, scale in scales.items():
        attn = denoiser.get_submodule(path)
        attn.set_processor(slim_processor_for(attn, scale))
    weights = _read_weights(subfolder)
    expected = denoiser.state_dict()
    problems = [f"missing {k}" for k in expected if k not in weights]
    problems += [f"unexpected {k}" for k in weights if k not in expected]
    problems += [
        f"{k}: file has {tuple(weights[k].shape)}, config implies {tuple(v.shape)}"
        for k, v in expected.items() if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        raise CompressedModelError(f"{subfolder / WEIGHTS_NAME}: does not match {SLIMDIFF_CONFIG_NAME}: " + "; ".join(problems[:5])
                                   + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), torch.float32)
    if dtype != next(denoiser.parameters()).dtype:
        denoiser = denoiser.to(dtype)
    denoiser.load_state_dict(weights, strict=True)
    return denoiser.eval()


def load(folder: str | Path, **from_pretrained_kwargs):
    """Load a folder written by ``slimdiff.save`` (or ``slimdiff compress``): the full pipeline, compressed denoiser in place."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    key, config = read_config(folder)
    denoiser = build_denoiser(folder / key, config)
    torch_dtype = from_pretrained_kwargs.get("torch_dtype")
    if torch_dtype is not None:
        denoiser = denoiser.to(torch_dtype)
    return DiffusionPipeline.from_pretrained(str(folder), **{key: denoiser}, **from_pretrained_kwargs)


def describe(folder: str | Path) -> dict[str, Any]:
    """Parameter counts (total; compressible before and after), per-module widths and decomposition methods,
    and the groups left intact (with the reason) of a saved model."""
    folder = Path(folder)
    key, config = read_config(folder)
    denoiser = build_denoiser(folder / key, config)
    groups = {g.name: g for g in find_groups(denoiser)}
    methods = config.get("methods", {})
    modules = {}
    before = after = 0
    for name, width in config["widths"].items():
        group = groups[name]
        full = int(config.get("full_widths", {}).get(name, width))
        before += group.params_at(full)
        after += group.params_at(width)
        # a model saved without methods (before they were recorded, or by a caller that passed none) says so
        modules[name] = {"kind": group.kind, "width": width, "full_width": full, "heads": group.heads,
                         "method": methods.get(name, "not recorded")}
    return {
        "model": str(folder),
        "denoiser": config["denoiser_class"],
        "params": {
            "total": sum(p.numel() for p in denoiser.parameters()),
            "compressible_before": before,
            "compressible_after": after,
            "removed": before - after,
            "removed_fraction": (before - after) / before if before else 0.0,
        },
        "modules": modules,
        "left_intact": left_intact(list(groups.values())),
        "info": config.get("info", {}),
    }
