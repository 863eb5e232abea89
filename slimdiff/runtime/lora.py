"""LoRA adapters made for the original model, projected onto the compressed one (docs/lora.md).

Compressing a group changes the shapes of its linears by a linear map of their inputs or outputs, and a saved folder
records these maps (``<denoiser>/slimdiff_lora_maps.safetensors``, described by the config's ``lora_maps``). A LoRA
pair ``(A, B)`` of an original linear (``delta W = B A``) becomes ``(A J_in^T, J_out B)`` on the slim linear, where
``J`` takes the original's coordinates to the slim model's:

- query, key, value (change of basis): per head, the slim projection is the original one times a basis ``M_h``, so
  ``J_out = blockdiag(M_h^T)``: exact, as the slim weight is of the original;
- attention output (change of basis): per head the slim rows are ``Q_h`` times the original's, ``J_in =
  blockdiag(Q_h)``: exact;
- FFN up projection (selection): the kept channels' rows: exact;
- FFN down projection (selection with the Nyström correction): ``J_in = [I | C_SS^-1 C_S,removed]``, the
  least-squares map under the hidden activations' second moment ``C`` that corrects the slim weight itself;
- adaLN factorised at rank k (``up(down(x))``): the delta moves onto ``up``, ``J_in = U_k^T S^T`` (the whitened
  least-squares projection onto ``down``'s range).

No slimdiff code is needed at inference: the projected LoRA is a plain diffusers/PEFT LoRA of the slim model's
modules (``pipe.load_lora_weights``).
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

LORA_MAPS_NAME = "slimdiff_lora_maps.safetensors"

EXACT, LEAST_SQUARES = "exact", "least squares"


class LoraError(ValueError):
    """A LoRA that cannot be projected onto this compressed model; the message names the module and the shapes."""


@dataclass(frozen=True)
class Segment:
    """A block of an original linear's inputs or outputs, starting at ``start`` (original coordinates), and the map
    ``J`` of its ``full`` coordinates onto the slim model's ``slim`` ones:

    - ``heads``: ``matrix`` (heads, slim/heads, full/heads), one map per head;
    - ``select``: the ``index`` kept (ascending), plus ``matrix`` (slim, removed) times the ``removed`` coordinates
      when the slim weight corrects for them (the Nyström down projection);
    - ``dense``: ``matrix`` (slim, full).
    """

    kind: str
    start: int
    full: int
    slim: int
    matrix: Tensor | None = None
    index: Tensor | None = None
    removed: Tensor | None = None

    def cast(self, dtype: torch.dtype, device: torch.device | str) -> "Segment":
        """This segment with its matrix in ``dtype`` on ``device`` (indices as int64 there)."""
        move = lambda t, d: None if t is None else t.detach().to(device, d)  # noqa: E731
        return replace(self, matrix=move(self.matrix, dtype), index=move(self.index, torch.int64),
                       removed=move(self.removed, torch.int64))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.matrix, self.index, self.removed) if t is not None)

    def apply(self, values: Tensor, dim: int) -> Tensor:
        """``J`` applied along ``dim`` of ``values`` (whose ``dim`` has this segment's ``full`` entries)."""
        moved = values.movedim(dim, 0)
        rest = moved.shape[1:]
        flat = moved.reshape(self.full, -1)
        if self.kind == "identity":
            out = flat
        elif self.kind == "heads":
            heads, slim_head, full_head = self.matrix.shape
            out = torch.einsum("hsf,hfk->hsk", self.matrix.to(flat), flat.reshape(heads, full_head, -1)).reshape(self.slim, -1)
        elif self.kind == "select":
            out = flat[self.index.to(flat.device)]
            if self.matrix is not None and self.removed is not None and self.removed.numel():
                out = out + self.matrix.to(flat) @ flat[self.removed.to(flat.device)]
        elif self.kind == "dense":
            out = self.matrix.to(flat) @ flat
        else:
            raise ValueError(f"unknown segment kind {self.kind!r}")
        return out.reshape(self.slim, *rest).movedim(0, dim)


@dataclass(frozen=True)
class LinearMap:
    """How an original linear ``module`` (``in_features`` x ``out_features``) became the slim linear ``target``: maps
    of blocks of its inputs and outputs (any block not named is kept as it is), and whether a LoRA delta moves across
    exactly or in the least-squares sense (``how``), with what the group is (``note``)."""

    module: str
    target: str
    in_features: int
    out_features: int
    inputs: tuple[Segment, ...] = ()
    outputs: tuple[Segment, ...] = ()
    how: str = EXACT
    note: str = ""
    # the group's predicted relative output error at its width (on the original weights: what the compression itself
    # costs there; a LoRA delta seen through the same map loses about as much of its effect where it lies in the
    # calibration activations' span), None where not recorded
    predicted_error: float | None = None

    def merged(self, other: "LinearMap") -> "LinearMap":
        """This map and ``other`` (another group's blocks of the same linear, e.g. a Flux single block's fused output
        projection: attention columns from one group, MLP columns from another) as one map."""
        if (other.module, other.target, other.in_features, other.out_features) != \
                (self.module, self.target, self.in_features, self.out_features):
            raise ValueError(f"maps of {self.module} and {other.module} disagree on the linear")
        how = EXACT if self.how == other.how == EXACT else LEAST_SQUARES
        errors = [e for e in (self.predicted_error, other.predicted_error) if e is not None]
        return replace(self, inputs=_disjoint(self.inputs + other.inputs, self.in_features, self.module),
                       outputs=_disjoint(self.outputs + other.outputs, self.out_features, self.module),
                       how=how, note="; ".join(n for n in (self.note, other.note) if n),
                       predicted_error=max(errors) if errors else None)

    @property
    def slim_in_features(self) -> int:
        return self.in_features + sum(s.slim - s.full for s in self.inputs)

    @property
    def slim_out_features(self) -> int:
        return self.out_features + sum(s.slim - s.full for s in self.outputs)

    def project(self, lora_a: Tensor, lora_b: Tensor) -> tuple[Tensor, Tensor]:
        """(A J_in^T, J_out B) for a LoRA pair of this linear (``lora_a`` (rank, in), ``lora_b`` (out, rank))."""
        return _apply_segments(lora_a, 1, self.inputs, self.in_features), _apply_segments(lora_b, 0, self.outputs,
                                                                                            self.out_features)


def _disjoint(segments: Iterable[Segment], size: int, module: str) -> tuple[Segment, ...]:
    ordered = sorted(segments, key=lambda s: s.start)
    end = 0
    for segment in ordered:
        if segment.start < end or segment.start + segment.full > size:
            raise ValueError(f"{module}: overlapping or out-of-range blocks in its map")
        end = segment.start + segment.full
    return tuple(ordered)


def _apply_segments(values: Tensor, dim: int, segments: tuple[Segment, ...], size: int) -> Tensor:
    if values.shape[dim] != size:
        raise ValueError(f"expected {size} entries along dim {dim}, got {values.shape[dim]}")
    if not segments:
        return values
    parts, position = [], 0
    for segment in segments:
        if segment.start > position:
            parts.append(values.narrow(dim, position, segment.start - position))
        parts.append(segment.apply(values.narrow(dim, segment.start, segment.full), dim))
        position = segment.start + segment.full
    if position < size:
        parts.append(values.narrow(dim, position, size - position))
    return torch.cat(parts, dim=dim)


def merge_maps(maps: Iterable[LinearMap]) -> dict[str, LinearMap]:
    """One map per original linear, the partial maps of several groups merged."""
    merged: dict[str, LinearMap] = {}
    for item in maps:
        merged[item.module] = merged[item.module].merged(item) if item.module in merged else item
    return merged


# ---- the folder's record ---------------------------------------------------------------------------------------


def maps_to_tensors(maps: Mapping[str, LinearMap], dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, description) of ``maps`` for the folder: float tensors in ``dtype``, indices as int64, on their device, named
    ``<module>.<inputs|outputs>.<i>.<matrix|index|removed>``; the description (JSON) holds the rest."""
    tensors: dict[str, Tensor] = {}
    described: dict[str, Any] = {}
    for module, item in sorted(maps.items()):
        entry = {"target": item.target, "in_features": item.in_features, "out_features": item.out_features,
                 "how": item.how, "note": item.note, "predicted_error": item.predicted_error}
        for side in ("inputs", "outputs"):
            rows = []
            for i, segment in enumerate(getattr(item, side)):
                row = {"kind": segment.kind, "start": segment.start, "full": segment.full, "slim": segment.slim}
                for part in ("matrix", "index", "removed"):
                    value = getattr(segment, part)
                    if value is not None:
                        name = f"{module}.{side}.{i}.{part}"
                        tensors[name] = (value.to(dtype) if part == "matrix" else value.to(torch.int64)).detach().contiguous()
                        row[part] = name
                rows.append(row)
            entry[side] = rows
        described[module] = entry
    return tensors, described


def maps_from_tensors(described: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, LinearMap]:
    """The maps ``maps_to_tensors`` wrote."""
    maps = {}
    for module, entry in described.items():
        sides = {}
        for side in ("inputs", "outputs"):
            sides[side] = tuple(Segment(row["kind"], int(row["start"]), int(row["full"]), int(row["slim"]),
                                        **{part: tensors[row[part]] for part in ("matrix", "index", "removed") if part in row})
                                for row in entry.get(side, []))
        maps[module] = LinearMap(module, entry["target"], int(entry["in_features"]), int(entry["out_features"]),
                                 sides["inputs"], sides["outputs"], entry.get("how", EXACT), entry.get("note", ""),
                                 entry.get("predicted_error"))
    return maps


def read_maps(folder: str | Path) -> tuple[str, dict[str, LinearMap], dict[str, Any]]:
    """(denoiser key, the maps of every compressed linear, the folder's slimdiff config) of a saved folder, the maps
    file checked against its recorded hash first. A folder written before LoRA maps existed fails in one line."""
    from safetensors.torch import load_file

    from slimdiff.runtime.folder import CompressedModelError, read_config, verify_files

    folder = Path(folder)
    key, config = read_config(folder)
    described = config.get("lora_maps")
    if described is None:
        raise CompressedModelError(
            f"{folder / key}: written by a slimdiff without LoRA maps (config version {config.get('version')}); "
            "compress the model again (or re-run the decompose stage) to project LoRAs onto it")
    # the maps file only: hashing the weights too would read a FLUX-size model's whole denoiser to project a LoRA
    verify_files(folder, config, only=f"{key}/{LORA_MAPS_NAME}")
    path = folder / key / LORA_MAPS_NAME
    tensors = load_file(str(path)) if described else {}
    return key, maps_from_tensors(described, tensors), config


# ---- projecting a LoRA file ------------------------------------------------------------------------------------

UNCHANGED = "unchanged"

_PROCESSOR_LORA = re.compile(r"^(?P<attention>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<side>down|up)\.weight$")
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<side>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.(?P<part>weight|bias)$")
_COMPONENTS = ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass(frozen=True)
class ProjectedModule:
    """One LoRA pair as projected: the original module, the slim module it now targets, its rank and how it moved."""

    component: str
    module: str
    target: str
    rank: int
    how: str  # "exact", "least squares" or "unchanged"
    note: str = ""
    predicted_error: float | None = None  # the map's group: predicted relative output error at its width


@dataclass
class LoraProjection:
    """What ``project_lora`` wrote: one row per LoRA pair, and the file."""

    path: Path
    modules: list[ProjectedModule] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = {EXACT: 0, LEAST_SQUARES: 0, UNCHANGED: 0}
        for row in self.modules:
            counts[row.how] += 1
        return counts

    def summary(self) -> str:
        counts = self.counts()
        errors = [r.predicted_error for r in self.modules if r.predicted_error is not None]
        worst = f"; largest predicted relative error of a projected module's group: {max(errors):.3g}" if errors else ""
        return (f"{len(self.modules)} LoRA module(s) projected to {self.path}: {counts[EXACT]} exact (change of basis or "
                f"selection), {counts[LEAST_SQUARES]} least squares (Nyström or low-rank factor), {counts[UNCHANGED]} on "
                f"unchanged modules, 0 dropped{worst}")


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, module, 'A'|'B', 'weight'|'bias') of a LoRA tensor name in the diffusers, PEFT, old attention
    processor or kohya-converted layouts; None for other names (alphas, DoRA magnitudes)."""
    component = ""
    for name in sorted(_COMPONENTS, key=len, reverse=True):
        if key.startswith(name + "."):
            component, key = name, key[len(name) + 1:]
            break
    match = _PROCESSOR_LORA.match(key)
    if match:
        projection = "to_out.0" if match["proj"] == "to_out" else match["proj"]
        return component, f"{match['attention']}.{projection}", "A" if match["side"] == "down" else "B", "weight"
    match = _LORA_KEY.match(key)
    if match is None:
        return None
    side = "A" if match["side"] in ("lora_A", "lora.down", "lora_down") else "B"
    return component, match["module"], side, match["part"]


def _alpha_module(key: str) -> tuple[str, str]:
    """(component, module) a network alpha's name refers to."""
    base = key[: -len(".alpha")] if key.endswith(".alpha") else key
    parts = _split_key(base if base.endswith((".weight", ".bias")) else base + ".lora_A.weight")
    if parts is None:
        return "", base
    return parts[0], parts[1]


def _metadata_alpha(metadata: Mapping[str, Any], component: str, module: str) -> float | None:
    """The lora_alpha that PEFT metadata (``lora_adapter_metadata``) gives ``module``: its alpha_pattern, else lora_alpha."""
    prefix = f"{component}." if component and any(k.startswith(f"{component}.") for k in metadata) else ""
    patterns = metadata.get(f"{prefix}alpha_pattern") or {}
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(value)
    value = metadata.get(f"{prefix}lora_alpha")
    return None if value is None else float(value)


def read_lora(path: str | Path, pipeline_class: type | None = None) -> tuple[dict[tuple[str, str], dict[str, Tensor]], dict]:
    """The LoRA pairs of a safetensors file, {(component, module): {"A", "B"[, "bias"], "scale"}}, each pair's scale
    ``alpha / rank`` from its network alpha or PEFT metadata (1 without either). Kohya and older diffusers layouts are
    converted by ``pipeline_class.lora_state_dict`` when the class has one. Only safetensors is read (never a pickle)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            file_metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as error:
        raise LoraError(f"{path}: not a readable safetensors file ({str(error).splitlines()[0][:120]}); slimdiff reads "
                        "LoRAs from .safetensors only and never unpickles .bin/.pt/.ckpt files") from None
    if not state:
        raise LoraError(f"{path}: holds no tensors")
    try:
        metadata = json.loads(file_metadata.get("lora_adapter_metadata") or "{}")
    except json.JSONDecodeError:
        raise LoraError(f"{path}: its lora_adapter_metadata is not JSON") from None
    if any("lora_magnitude_vector" in name or ".dora_scale" in name for name in state):
        raise LoraError(f"{path}: a DoRA adapter (magnitude vectors); its per-column normalisation does not move across a "
                        "change of width linearly: only plain LoRA pairs can be projected")
    alphas: dict[str, float] = {}
    converter = getattr(pipeline_class, "lora_state_dict", None)
    if converter is not None:  # kohya and older layouts to diffusers'; the diffusers and PEFT layouts pass unchanged
        converted = converter(dict(state), **({"return_alphas": True} if "return_alphas" in inspect.signature(converter).parameters else {}))
        state, alphas = (converted[0], converted[1] or {}) if isinstance(converted, tuple) else (converted, {})
    alphas = {**{k: float(v) for k, v in state.items() if k.endswith(".alpha")}, **{k: float(v) for k, v in alphas.items()}}
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for name, tensor in state.items():
        if name.endswith(".alpha"):
            continue
        parts = _split_key(name)
        if parts is None:
            unknown.append(name)
            continue
        component, module, side, part = parts
        entry = pairs.setdefault((component, module), {})
        entry["bias" if part == "bias" else side] = tensor
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} tensor name(s) are not LoRA pairs, e.g. {unknown[0]!r} (expected "
                        "<module>.lora_A/lora_B.weight, .lora.down/up.weight or kohya lora_down/lora_up)")
    alpha_of = {_alpha_module(k): v for k, v in alphas.items()}
    for (component, module), entry in pairs.items():
        if "A" not in entry or "B" not in entry:
            raise LoraError(f"{path}: {module} has only its {'A (down)' if 'A' in entry else 'B (up)'} matrix")
        rank = entry["A"].shape[0]
        if entry["B"].shape[1] != rank:
            raise LoraError(f"{path}: {module}: A has rank {rank} but B {tuple(entry['B'].shape)}")
        alpha = alpha_of.get((component, module), alpha_of.get(("", module)))
        if alpha is None:
            alpha = _metadata_alpha(metadata, component, module)
        entry["scale"] = torch.tensor(1.0 if alpha is None else alpha / rank)
    return pairs, metadata


def _pipeline_class(folder: Path) -> type | None:
    try:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None
    import diffusers

    return getattr(diffusers, name, None)


def project_lora(lora: str | Path, folder: str | Path, out: str | Path, overwrite: bool = False) -> LoraProjection:
    """Project a LoRA made for the original model onto the compressed model in ``folder`` and write it to ``out``
    (safetensors, PEFT layout ``<component>.<module>.lora_A/lora_B.weight``, each pair's alpha/rank folded into B),
    atomically. Loads with ``pipe.load_lora_weights(out)`` on ``slimdiff.load(folder)``. A LoRA whose shapes are not
    the original model's fails naming the module, before anything is written."""
    from safetensors.torch import save_file

    from slimdiff.files import atomic_path
    from slimdiff.runtime.folder import weight_layout

    folder, out = Path(folder), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    key, maps, _ = read_maps(folder)
    layout = weight_layout(folder / key)
    pairs, _ = read_lora(lora, _pipeline_class(folder))
    projection = LoraProjection(out)
    tensors: dict[str, Tensor] = {}
    for (component, module), entry in sorted(pairs.items()):
        a, b = entry["A"], entry["B"]
        scaled_b = b.to(torch.float32) * entry["scale"]
        if component in ("", key):
            item, prefix = maps.get(module), key
            if item is None:  # a linear (or convolution) compression left alone: checked against its stored shape
                stored = layout.get(f"{module}.weight")
                if stored is None:
                    raise LoraError(f"{lora}: targets {module}, which the {key} of {folder} does not have")
                item = LinearMap(module, module, stored[0][1], stored[0][0], how=UNCHANGED)
            if a.shape[1] != item.in_features or b.shape[0] != item.out_features:
                raise LoraError(f"{lora}: {module}: LoRA of a ({b.shape[0]} x {a.shape[1]}) weight, but the original "
                                f"model's is ({item.out_features} x {item.in_features}): a LoRA of another model")
            new_a, new_b = item.project(a.to(torch.float32), scaled_b)
            target, how, note, error = item.target, item.how, item.note, item.predicted_error
        else:  # a text encoder's: not compressed, kept with its scale folded in
            new_a, new_b, target, how, note, error, prefix = a, scaled_b, module, UNCHANGED, "", None, component
        if "bias" in entry:
            raise LoraError(f"{lora}: {module}: LoRA with a bias on B (lora_bias) is not supported")
        dtype = a.dtype if a.is_floating_point() else torch.float32
        tensors[f"{prefix}.{target}.lora_A.weight"] = new_a.to(dtype).contiguous()
        tensors[f"{prefix}.{target}.lora_B.weight"] = new_b.to(dtype).contiguous()
        projection.modules.append(ProjectedModule(prefix, module, target, int(a.shape[0]), how, note, error))
    report = {"source": str(lora), "model": str(folder), "counts": projection.counts()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "slimdiff": json.dumps(report, sort_keys=True)})
    return projection
