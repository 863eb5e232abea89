"""Save and load compressed pipelines: diffusers layout, safetensors only, no pickle.

A saved folder is the whole pipeline as ``save_pretrained`` writes it, plus
``<denoiser>/slimdiff_config.json`` holding every compressed module's width, the attention scales, how
each module was decomposed (``methods``), the groups left intact with the reason (``left_intact``) and the size
and sha256 of every file of the folder (``files``). ``load`` rebuilds the narrower structure from that file with
empty weights (no random initialisation, no host copy), checks the files against the record, then assigns the
safetensors tensors on the target device in the target dtype, strictly: a damaged or inconsistent folder fails
with one line naming the file and what is wrong, never with random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from slimdiff.arch import find_groups, left_intact
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.files import atomic_dir, stream_safetensors
from slimdiff.runtime.attention import SlimAttnProcessor, slim_processor_for
from slimdiff.runtime.resize import resize_group

SLIMDIFF_CONFIG_NAME = "slimdiff_config.json"

SLIMDIFF_CONFIG_FORMAT = "slimdiff"

# 2: adds ``files`` (size and sha256 of every file); 3: adds ``lora_maps`` (the maps LoRAs are projected with, their
# tensors in LORA_MAPS_NAME). Earlier versions still load; only projecting a LoRA onto them needs version 3.
SLIMDIFF_CONFIG_VERSION = 3

READABLE_CONFIG_VERSIONS = (1, 2, 3)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"

# safetensors shards written by save: bounds the host memory a save of a GPU model takes (one shard at a time)
MAX_SHARD_SIZE = "2GB"

_HASH_CHUNK = 1 << 22


class CompressedModelError(ValueError):
    """A saved compressed model folder is incomplete, damaged or inconsistent; the message names the file."""


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


def file_digest(path: Path) -> str:
    """sha256 of a file, read in chunks (no whole-file copy in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_record(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``folder`` (relative POSIX paths), the slimdiff config excluded."""
    record = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if path.name == SLIMDIFF_CONFIG_NAME:
            continue
        record[relative] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    return record


def save(pipe, folder: str | Path, info: dict[str, Any] | None = None, full_widths: dict[str, int] | None = None,
         overwrite: bool = False, methods: Mapping[str, str] | None = None, lora_maps: Mapping[str, Any] | None = None) -> Path:
    """Write ``pipe`` (with its compressed denoiser) to ``folder`` atomically, in diffusers layout.

    ``full_widths`` are the uncompressed widths (default: the current ones); ``info`` (budget,
    allocator, base model, capture provenance, predicted errors, ...) is stored beside them;
    ``methods`` records how each decomposed group was obtained (group name -> the decomposition's
    ``method_at(width)``, e.g. "cholesky" or "eigh (3 of 320 eigenvalues clamped)"). Weights are written in
    safetensors shards of at most ``MAX_SHARD_SIZE`` (a GPU model passes through the host one shard at a time).
    ``lora_maps`` (original linear name -> ``slimdiff.runtime.lora.LinearMap``, what ``decompose`` returned, merged)
    are written beside the weights in the model's dtype, so that LoRAs of the original can be projected onto it.
    """
    key, denoiser = denoiser_of(pipe)
    structure = structure_of(denoiser)
    unknown = sorted(set(methods or {}) - set(structure["widths"]))
    if unknown:
        raise ValueError(f"methods name groups that {type(denoiser).__name__} cannot compress or does not have: {unknown[:3]}")
    full = dict(structure["widths"])
    full.update(full_widths or {})
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
        described = None
        if lora_maps is not None:
            from slimdiff.runtime.lora import LORA_MAPS_NAME, maps_to_tensors

            dtype = next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), torch.float32)
            tensors, described = maps_to_tensors(lora_maps, dtype)
            stream_safetensors(tmp / key / LORA_MAPS_NAME, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                               tensors.__getitem__, {"format": "slimdiff-lora-maps"})
        config = {
            "format": SLIMDIFF_CONFIG_FORMAT,
            "version": SLIMDIFF_CONFIG_VERSION,
            "denoiser": key,
            "denoiser_class": type(denoiser).__name__,
            **structure,
            "full_widths": full,
            "methods": dict(methods or {}),
            "info": info or {},
            **({} if described is None else {"lora_maps": described}),
            "files": _file_record(tmp),
        }
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
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise CompressedModelError(f"{path}: not valid JSON ({str(error).splitlines()[0]})") from None
            if not isinstance(config, dict) or config.get("format") != SLIMDIFF_CONFIG_FORMAT \
                    or config.get("version") not in READABLE_CONFIG_VERSIONS:
                found = (config.get("format"), config.get("version")) if isinstance(config, dict) else (None, None)
                raise CompressedModelError(
                    f"{path}: unknown config format/version {found[0]!r}/{found[1]!r}; "
                    f"this slimdiff reads {SLIMDIFF_CONFIG_FORMAT!r}/{', '.join(map(str, READABLE_CONFIG_VERSIONS))}"
                )
            for field, kind in (("denoiser_class", str), ("widths", dict)):
                if not isinstance(config.get(field), kind):
                    raise CompressedModelError(f"{path}: no {field!r} ({kind.__name__}); the file is damaged")
            return key, config
    raise CompressedModelError(f"{folder}: no unet/{SLIMDIFF_CONFIG_NAME} or transformer/{SLIMDIFF_CONFIG_NAME}; not a slimdiff model")


def verify_files(folder: str | Path, config: dict[str, Any], hashes: bool = True, only: str | None = None) -> None:
    """Check the folder's files against the size and sha256 recorded at save time (``files`` of the config): a
    missing, truncated, grown or altered file fails with one line naming it. ``only``: that file, or the files under
    that subfolder.
    ``hashes=False`` checks sizes only. A version 1 folder recorded no files: nothing to check."""
    folder = Path(folder)
    for relative, expected in sorted((config.get("files") or {}).items()):
        if only is not None and relative != only and not relative.startswith(f"{only}/"):
            continue
        path = folder / relative
        if not path.is_file():
            raise CompressedModelError(f"{path}: missing (recorded when the model was saved)")
        size = path.stat().st_size
        if size != expected.get("bytes"):
            how = "truncated" if size < expected.get("bytes", 0) else "larger than saved"
            raise CompressedModelError(f"{path}: {how}: {size:,} bytes, {expected.get('bytes', 0):,} when saved")
        if hashes and file_digest(path) != expected.get("sha256"):
            raise CompressedModelError(f"{path}: content differs from the saved file (sha256 mismatch): damaged or altered")


def _weight_files(subfolder: Path) -> list[Path]:
    """The denoiser's safetensors files: the single file, or the shards its index names."""
    single, index = subfolder / WEIGHTS_NAME, subfolder / WEIGHTS_INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CompressedModelError(f"{index}: not a safetensors index ({type(error).__name__}); the file is damaged") from None
        for shard in shards:
            if Path(shard).name != shard:
                raise CompressedModelError(f"{index}: names a shard outside the folder: {shard!r}")
            if not (subfolder / shard).is_file():
                raise CompressedModelError(f"{subfolder / shard}: missing weight shard named in {index.name}")
        return [subfolder / shard for shard in shards]
    raise CompressedModelError(f"{single}: missing (no safetensors weights for the compressed denoiser)")


def weight_layout(subfolder: str | Path) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """{tensor name: (shape, safetensors dtype, file)} of the denoiser's weights, from the safetensors headers alone
    (no tensor is read). A truncated or corrupt header fails naming the file."""
    from safetensors import SafetensorError, safe_open

    layout: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for path in _weight_files(Path(subfolder)):
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    if name in layout:
                        raise CompressedModelError(f"{path}: tensor {name} is also in {layout[name][2].name}")
                    layout[name] = (tuple(piece.get_shape()), piece.get_dtype(), path)
        except (SafetensorError, OSError, ValueError) as error:
            if isinstance(error, CompressedModelError):
                raise
            raise CompressedModelError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0][:160]}); "
                                       "the file is truncated or damaged") from None
    return layout


_SAFETENSORS_FLOAT = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def empty_denoiser(subfolder: str | Path, config: dict[str, Any]) -> nn.Module:
    """The compressed denoiser's structure with parameters on the meta device (no storage, no random init): the
    model's config, then every group resized to its recorded width and its slim attention processor set."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import ModelMixin

    subfolder = Path(subfolder)
    cls = getattr(diffusers, str(config["denoiser_class"]), None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise CompressedModelError(f"{subfolder / SLIMDIFF_CONFIG_NAME}: unknown denoiser class {config['denoiser_class']!r}")
    if not (subfolder / "config.json").is_file():
        raise CompressedModelError(f"{subfolder / 'config.json'}: missing model config")
    try:
        model_config = cls.load_config(str(subfolder))
    except (OSError, ValueError) as error:
        raise CompressedModelError(f"{subfolder / 'config.json'}: unreadable model config ({str(error).splitlines()[0][:160]})") from None
    with init_empty_weights():  # parameters on the meta device; buffers (small) as the model makes them
        try:
            denoiser = cls.from_config(model_config)
        except (TypeError, ValueError, AttributeError) as error:
            raise CompressedModelError(f"{subfolder / 'config.json'}: {cls.__name__} cannot be built from it "
                                       f"({str(error).splitlines()[0][:160]})") from None
    groups = {g.name: g for g in find_groups(denoiser)}
    scales = config.get("attention_scales", {})
    for name, width in config["widths"].items():
        if name not in groups:
            raise CompressedModelError(f"{subfolder / SLIMDIFF_CONFIG_NAME}: names module {name!r}, which {cls.__name__} does not have")
        group = groups[name]
        if not isinstance(width, int) or not 1 <= width <= group.width:
            raise CompressedModelError(f"{subfolder / SLIMDIFF_CONFIG_NAME}: width {width!r} of {name} is not in 1..{group.width}")
        if width != group.width:
            resize_group(denoiser, group, int(width), scales.get(group.path))
    for path, scale in scales.items():
        attn = denoiser.get_submodule(path)
        attn.set_processor(slim_processor_for(attn, scale))
    return denoiser.eval()


def _check_layout(denoiser: nn.Module, layout: dict[str, tuple[tuple[int, ...], str, Path]], where: Path) -> None:
    expected = denoiser.state_dict()
    problems = [f"missing {k}" for k in expected if k not in layout]
    problems += [f"unexpected {k}" for k in layout if k not in expected]
    problems += [
        f"{k}: file has {layout[k][0]}, config implies {tuple(v.shape)}"
        for k, v in expected.items() if k in layout and layout[k][0] != tuple(v.shape)
    ]
    if problems:
        raise CompressedModelError(f"{where}: does not match {SLIMDIFF_CONFIG_NAME}: " + "; ".join(problems[:5])
                                   + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def stored_dtype(layout: dict[str, tuple[tuple[int, ...], str, Path]]) -> torch.dtype:
    """The floating dtype the denoiser's weights are stored in (the first floating tensor's)."""
    return next((_SAFETENSORS_FLOAT[dtype] for _, dtype, _ in layout.values() if dtype in _SAFETENSORS_FLOAT), torch.float32)


def read_weights(subfolder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The denoiser's tensors, each read from its safetensors file straight onto ``device`` and cast to ``dtype``
    (floating tensors only; default: as stored)."""
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(subfolder)):
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                for name in handle.keys():
                    tensor = handle.get_tensor(name)
                    state[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except (SafetensorError, OSError) as error:
            raise CompressedModelError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0][:160]}); "
                                       "the file is truncated or damaged") from None
    return state


def build_denoiser(subfolder: str | Path, config: dict[str, Any], device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the compressed denoiser from its folder on ``device`` in ``dtype`` (default: as stored): config ->
    empty narrower structure -> header check -> each safetensors tensor read onto ``device``, cast, and assigned
    (strict). Peak memory is the model in ``dtype`` plus one tensor: no random or float32 copy."""
    subfolder = Path(subfolder)
    denoiser = empty_denoiser(subfolder, config)
    layout = weight_layout(subfolder)
    _check_layout(denoiser, layout, subfolder / WEIGHTS_NAME if len({p for *_, p in layout.values()}) == 1
                  else subfolder / WEIGHTS_INDEX_NAME)
    dtype = stored_dtype(layout) if dtype is None else dtype
    device = torch.device(device)
    denoiser.load_state_dict(read_weights(subfolder, device, dtype), strict=True, assign=True)
    # buffers the state dict does not hold (made at construction, on the CPU) follow the weights
    denoiser.to(device)
    left = [name for name, t in [*denoiser.named_parameters(), *denoiser.named_buffers()] if t.is_meta]
    if left:
        raise CompressedModelError(f"{subfolder / WEIGHTS_NAME}: holds no values for {left[0]} (and {len(left) - 1} more)")
    return denoiser.eval()


def load(folder: str | Path, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         verify: bool = True, **from_pretrained_kwargs):
    """Load a folder written by ``slimdiff.save`` (or ``slimdiff compress``): the full pipeline, compressed denoiser in
    place, on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; default the CPU) in ``dtype`` (default or ``auto``:
    as stored).

    The denoiser is built with empty weights and its safetensors tensors are assigned on the device in the dtype
    (no random initialisation, no float32 copy). ``verify`` checks every file against the size and sha256 recorded
    at save time first (``verify=False``: sizes only). A damaged folder raises ``CompressedModelError`` with one line
    naming the file and what is wrong. Other keyword arguments go to ``DiffusionPipeline.from_pretrained``.
    """
    from diffusers import DiffusionPipeline

    from slimdiff.device import check_dtype_runs, resolve_device, resolve_dtype
    from slimdiff.environment import quiet_libraries

    quiet_libraries()
    folder = Path(folder)
    if "torch_dtype" in from_pretrained_kwargs:  # diffusers' old name: one dtype for every component
        legacy = from_pretrained_kwargs.pop("torch_dtype")
        dtype = legacy if dtype is None else dtype
    target = resolve_device(device if device is not None else "cpu")
    key, config = read_config(folder)
    verify_files(folder, config, hashes=verify)
    as_stored = dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto")
    torch_dtype = None if as_stored else resolve_dtype(dtype)
    if torch_dtype is not None:
        check_dtype_runs(target, torch_dtype)
    denoiser = build_denoiser(folder / key, config, target, torch_dtype)
    torch_dtype = torch_dtype or next(p.dtype for p in denoiser.parameters() if p.is_floating_point())
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), **{key: denoiser}, dtype=torch_dtype, **from_pretrained_kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        raise CompressedModelError(f"{folder}: a pipeline component does not load ({str(error).splitlines()[0][:200]})") from None
    return pipe.to(target)


def describe(folder: str | Path, verify: bool = True) -> dict[str, Any]:
    """Parameter counts (total; compressible before and after), per-module widths and decomposition methods, and the
    groups left intact (with the reason) of a saved model, from its config and the safetensors headers alone: the
    structure is built on the meta device and no weight is read (``verify`` hashes the files to detect damage)."""
    folder = Path(folder)
    key, config = read_config(folder)
    verify_files(folder, config, hashes=verify, only=key)
    subfolder = folder / key
    denoiser = empty_denoiser(subfolder, config)
    layout = weight_layout(subfolder)
    _check_layout(denoiser, layout, subfolder / WEIGHTS_NAME)
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
    total = sum(_numel(shape) for shape, _, _ in layout.values())
    return {
        "model": str(folder),
        "denoiser": config["denoiser_class"],
        "dtype": str(stored_dtype(layout)).removeprefix("torch."),
        "bytes": sum(os.path.getsize(p) for p in {p for *_, p in layout.values()}),
        "params": {
            "total": total,
            "compressible_before": before,
            "compressible_after": after,
            "removed": before - after,
            "removed_fraction": (before - after) / before if before else 0.0,
        },
        "modules": modules,
        "left_intact": left_intact(list(groups.values())),
        "info": config.get("info", {}),
    }


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count
