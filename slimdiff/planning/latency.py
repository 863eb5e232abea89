"""Latency lookup tables (HALP-style): every compressible unit timed on the job's device at its candidate widths.

A *unit* is what the allocator moves at one width under a latency budget: an attention (its QK and VO
groups held at one per-head width, so fused kernels apply) or a feed-forward layer. Each unit is timed in
isolation on the inputs it saw in one real denoiser call (the deployment batch and resolution), as the
module a compressed model would hold at that width (random weights: latency does not depend on values).
Units of identical shape are timed once. The predicted latency of a plan is the measured full denoiser
latency minus what each unit saves:

    T(plan) = T(denoiser) - sum_u [t_u(full) - t_u(width_u)]

The table is a versioned JSON artifact that names the device, dtype and call shape it was measured at;
an allocation checks it against the job before it uses it.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup, compressible_groups
from slimdiff.calls import DenoiserCall, module_inputs
from slimdiff.device import describe_device, module_device, synchronize
from slimdiff.files import complete_artifact, read_json_artifact, write_json
from slimdiff.runtime.resize import resize_group
from slimdiff.scoring.influence import Granularity, candidate_widths

LATENCY_FORMAT = "slimdiff-latency/1"

DEFAULT_POINTS = 16
# a unit's untimed widths are priced by interpolation only when its checks are within this fraction of its full-width
# time (an attention kernel whose time jumps between head widths, as the CPU's at SD 1.5's 4096 tokens, fails it)
INTERPOLATION_TOLERANCE = 0.05
# where, along a curve's timed widths, an untimed width is timed to check the interpolation
INTERPOLATION_POINTS = (0.25, 0.5, 0.75)


class LatencyTableError(ValueError):
    """A latency table that does not fit the job (other device, dtype, resolution, model or grid)."""


@dataclass
class LatencyCurve:
    """One unit's measured latency (median milliseconds of one call) at each timed width, ascending."""

    unit: str  # module path: an attention or a feed-forward layer
    groups: list[str]  # the groups that share this unit's width
    widths: list[int]
    ms: list[float]
    measured_as: str = ""  # the unit of identical shape that was actually timed ("" = this one)

    @property
    def full_width(self) -> int:
        return self.widths[-1]

    def at(self, width: int) -> float:
        """Milliseconds at a timed width; a width between timed ones is interpolated linearly."""
        if width in self.widths:
            return self.ms[self.widths.index(width)]
        if not self.widths[0] < width < self.widths[-1]:
            raise LatencyTableError(f"{self.unit}: width {width} is outside the timed range "
                                    f"{self.widths[0]}..{self.widths[-1]}")
        hi = next(i for i, w in enumerate(self.widths) if w > width)
        lo = hi - 1
        t = (width - self.widths[lo]) / (self.widths[hi] - self.widths[lo])
        return (1 - t) * self.ms[lo] + t * self.ms[hi]


@dataclass
class LatencyTable:
    """Per-unit latency curves and the full denoiser's latency, with what they were measured on."""

    device: str
    dtype: str
    sample_shape: list[int]  # the denoiser call's sample: batch and resolution
    model_hash: str
    denoiser_ms: float
    granularity: dict[str, int]
    curves: list[LatencyCurve]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def compressible_ms(self) -> float:
        """Latency of the compressible units at full width (timed in isolation)."""
        return sum(c.ms[-1] for c in self.curves)

    def predict_ms(self, widths: Mapping[str, int]) -> tuple[float, bool]:
        """Predicted denoiser latency with the given group widths (groups not named stay full), and whether it is
        an upper bound.

        The table times an attention at one per-head width. Where QK and VO differ, attention runs zero-padded
        to the wider one (``slimdiff.runtime.attention.attend``) with narrower projections on one side, so the unit's time
        at the wider width bounds it from above; the prediction is then an upper bound.
        """
        saved, bound = 0.0, False
        for curve in self.curves:
            unit_widths = {widths.get(g, curve.full_width) for g in curve.groups}
            bound = bound or len(unit_widths) > 1
            saved += curve.ms[-1] - curve.at(max(unit_widths))
        return self.denoiser_ms - saved, bound

    def interpolation_errors(self) -> dict[str, float] | None:
        """Each timed curve's worst |measured - interpolated| over its interpolation checks, in ms (curves without
        untimed widths have none); None when the table holds no checks (measured before they were made)."""
        checks = self.settings.get("interpolation")
        if checks is None:
            return None
        worst: dict[str, float] = {}
        for check in checks:
            worst[check["unit"]] = max(worst.get(check["unit"], 0.0), abs(check["measured_ms"] - check["interpolated_ms"]))
        return worst

    def checked_curves(self) -> list[LatencyCurve]:
        """The curves whose interpolation was checked (their own checks, or those of the curve they were measured as)."""
        errors = self.interpolation_errors() or {}
        return [c for c in self.curves if (c.measured_as or c.unit) in errors]

    def interpolates(self, curve: LatencyCurve, tolerance: float = INTERPOLATION_TOLERANCE) -> bool:
        """Whether ``curve``'s untimed widths may be priced by interpolation: its checks (those of the curve it was
        measured as) are all within ``tolerance`` of its full-width time. A curve without checks: no."""
        worst = (self.interpolation_errors() or {}).get(curve.measured_as or curve.unit)
        return worst is not None and worst <= tolerance * curve.ms[-1]

    def check_matches(self, device: str | None = None, dtype: str | None = None, sample_shape: Sequence[int] | None = None,
                      model_hash: str | None = None, granularity: Mapping[str, int] | None = None, source: str = "latency table") -> None:
        """Raise ``LatencyTableError`` (one line) when the table was measured for another job."""
        checks = [("device", device, self.device), ("dtype", dtype, self.dtype),
                  ("call shape (batch, channels, resolution)", list(sample_shape) if sample_shape is not None else None,
                   self.sample_shape),
                  ("model", model_hash, self.model_hash),
                  ("width grid", dict(granularity) if granularity is not None else None, self.granularity)]
        for what, wanted, have in checks:
            if wanted is not None and wanted != have:
                raise LatencyTableError(f"{source} was measured for {what} {have}, this job has {wanted}; "
                                        "re-measure it (the latency stage, or slimdiff compress --latency)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": LATENCY_FORMAT, "device": self.device, "dtype": self.dtype, "sample_shape": self.sample_shape,
                "model_hash": self.model_hash, "denoiser_ms": self.denoiser_ms, "granularity": self.granularity,
                "settings": self.settings, "curves": [asdict(c) for c in self.curves]}

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        data = read_json_artifact(path, LATENCY_FORMAT, "latency table")
        with complete_artifact(path, "latency table"):
            curves = [LatencyCurve(**c) for c in data["curves"]]
            table = cls(data["device"], data["dtype"], list(data["sample_shape"]), data["model_hash"],
                        float(data["denoiser_ms"]), dict(data["granularity"]), curves, dict(data.get("settings", {})))
        for c in curves:
            if len(c.widths) != len(c.ms) or not c.widths or c.widths != sorted(set(c.widths)) or min(c.ms) <= 0:
                raise LatencyTableError(f"{path}: curve {c.unit} is malformed (widths ascending, one positive time each)")
        return table


NOT_MEASURED_FORMAT = "slimdiff-latency-not-measured/1"


def write_not_measured(path: str | Path, reason: str) -> Path:
    """The latency stage's output when no latency budget needs a table: a record that says why none was measured."""
    return write_json(path, {"format": NOT_MEASURED_FORMAT, "reason": reason})


def read_latency_table(path: str | Path) -> LatencyTable | None:
    """The table at ``path``, or None when the latency stage recorded that none was needed (``write_not_measured``)."""
    import json

    path = Path(path)
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("format") == NOT_MEASURED_FORMAT:
                return None
        except (json.JSONDecodeError, AttributeError):
            pass  # LatencyTable.load names the damage
    return LatencyTable.load(path)


@dataclass(frozen=True)
class Unit:
    """Groups held at one width, timed as the module at ``path``: an attention's QK and VO (or the one of them that is
    compressible), an FFN, or one part of a Flux single block (its attention or its MLP, timed as the whole block with
    the other part at full width: the two share one fused output projection)."""

    path: str
    groups: tuple[ModuleGroup, ...]
    name: str = ""  # the curve's name: the path, or the group's name where several units time one module

    @property
    def full_width(self) -> int:
        return self.groups[0].width

    @property
    def label(self) -> str:
        return self.name or self.path


# Flux single blocks: attention and MLP write through one fused proj_out, so each part is timed on the whole block
# and a block's saving is the sum of its parts' (an additive model, checked against joint timings: ``additivity``)
FUSED_KINDS = ("vo_single", "ffn_single")


def latency_units(denoiser: nn.Module) -> list[Unit]:
    """The denoiser's compressible groups as latency units (attention groups of one module held together; the two
    parts of a Flux single block as two units of the block)."""
    by_path: dict[str, list[ModuleGroup]] = {}
    units = []
    for group in compressible_groups(denoiser):
        if group.kind == "adaln":
            continue  # runs once per sample and call, not per token: the allocator keeps it whole under a latency budget
        if group.kind in FUSED_KINDS:
            units.append(Unit(group.path, (group,), group.name))
            continue
        by_path.setdefault(group.path, []).append(group)
    for path, groups in by_path.items():
        widths = {g.width for g in groups}
        if len(widths) > 1:
            raise LatencyTableError(f"{path}: QK width {groups[0].width} and VO width {groups[1].width} differ (an already "
                                    "compressed model?); a latency table times an attention at one per-head width")
        units.append(Unit(path, tuple(groups)))
    return units


def interpolation_checks(grid: Sequence[int], timed: Sequence[int]) -> list[int]:
    """Untimed grid widths to time as checks of the interpolation: the middle of the gap between timed widths at
    ``INTERPOLATION_POINTS`` along the curve (none when every grid width is timed)."""
    gaps = [(a, b) for a, b in zip(timed, timed[1:]) if any(a < w < b for w in grid)]
    if not gaps:
        return []
    picked = dict.fromkeys(gaps[min(len(gaps) - 1, int(f * len(gaps)))] for f in INTERPOLATION_POINTS)
    checks = []
    for a, b in picked:
        inside = [w for w in grid if a < w < b]
        checks.append(inside[len(inside) // 2])
    return checks


def timed_widths(unit: Unit, granularity: Granularity, points: int = DEFAULT_POINTS) -> list[int]:
    """The grid widths a unit is timed at: all of them, or ``points`` spread evenly (ends included).

    Under a latency budget the allocator chooses a unit's untimed widths only where its interpolation checks hold
    (``LatencyTable.interpolates``); otherwise every width it picks for the unit was timed.
    """
    if points < 2:
        raise ValueError(f"latency points must be >= 2, got {points}")
    grid = candidate_widths(unit.full_width, granularity.step(unit.groups[0].kind))
    if len(grid) <= points:
        return grid
    index = torch.linspace(0, len(grid) - 1, points, device="cpu").round().long().unique().tolist()
    return [grid[i] for i in index]


def _unit_at(module: nn.Module, units: Sequence[Unit], widths: Sequence[int], generator: torch.Generator) -> nn.Module:
    """A copy of ``module`` with each of ``units`` (units of this module) resized to its width, random weights (what a
    compressed model would run)."""
    copied = copy.deepcopy(module)
    if all(width == unit.full_width for unit, width in zip(units, widths)):
        return copied
    for unit, width in zip(units, widths):
        if width == unit.full_width:
            continue
        for group in unit.groups:
            resize_group(copied, replace(group, path=""), width)
    with torch.no_grad():
        for parameter in copied.parameters():
            # uninitialised memory may hold NaN or denormal values, which run slower on some CPUs
            parameter.normal_(0.0, 0.02, generator=generator)
    return copied


def _signature(unit: Unit, inputs: DenoiserCall) -> tuple:
    shapes = tuple(tuple(a.shape) if isinstance(a, Tensor) else a for a in inputs[0])
    kw = tuple(sorted((k, tuple(v.shape) if isinstance(v, Tensor) else repr(v)) for k, v in inputs[1].items()))
    groups = tuple((g.kind, g.heads, g.width, g.in_features, g.out_features, g.bias_in, g.gated) for g in unit.groups)
    return groups, shapes, kw


def _time(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1000


def measure_latency_table(denoiser: nn.Module, call: DenoiserCall, granularity: Granularity = Granularity(),
                          points: int = DEFAULT_POINTS, repeats: int = 5, warmup: int = 1, model_hash: str = "",
                          progress: bool = False) -> LatencyTable:
    """Time the full denoiser and every unit at its timed widths on ``call`` (one real denoiser call's inputs).

    Medians of ``repeats`` runs after ``warmup``; the widths of a unit are timed round-robin, in alternating
    order, so a load change on the machine touches every width alike.
    """
    from tqdm.auto import tqdm

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    device = module_device(denoiser)
    dtype = next(denoiser.parameters()).dtype
    units = latency_units(denoiser)
    inputs = module_inputs(denoiser, [unit.path for unit in units], call)  # each unit's inputs in one real call
    args, kwargs = call
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    generator = torch.Generator(device=device).manual_seed(0)  # random weights drawn where the model lives
    with torch.inference_mode():
        for _ in range(warmup):
            denoiser(*args, **kwargs)
        denoiser_ms = statistics.median(_time(lambda: denoiser(*args, **kwargs), device) for _ in range(repeats))
        timed: dict[tuple, LatencyCurve] = {}
        curves = []
        interpolation: list[dict[str, Any]] = []
        for unit in tqdm(units, desc="latency table", unit="unit", disable=not progress):
            signature = _signature(unit, inputs[unit.path])
            names = [g.name for g in unit.groups]
            if signature in timed:
                first = timed[signature]
                curves.append(LatencyCurve(unit.label, names, list(first.widths), list(first.ms), measured_as=first.unit))
                continue
            widths = timed_widths(unit, granularity, points)
            checks = interpolation_checks(candidate_widths(unit.full_width, granularity.step(unit.groups[0].kind)), widths)
            module = denoiser.get_submodule(unit.path)
            # the checks are timed with the curve, round-robin, so a load change touches both alike
            ms = _time_variants([_unit_at(module, [unit], [w], generator) for w in widths + checks], inputs[unit.path],
                                device, repeats, warmup)
            curve = LatencyCurve(unit.label, names, widths, ms[: len(widths)])
            interpolation += [{"unit": unit.label, "width": w, "measured_ms": m, "interpolated_ms": curve.at(w)}
                              for w, m in zip(checks, ms[len(widths):])]
            timed[signature] = curve
            curves.append(curve)
        additivity = _additivity_check(denoiser, units, curves, inputs, generator, device, repeats, warmup)
    settings = {"points": points, "repeats": repeats, "warmup": warmup, "torch": torch.__version__,
                "threads": torch.get_num_threads() if device.type == "cpu" else None, "interpolation": interpolation}
    if additivity:
        settings["additivity"] = additivity
    return LatencyTable(describe_device(device), str(dtype).removeprefix("torch."), list(sample.shape), model_hash, denoiser_ms,
                        asdict(granularity), curves, settings)


def _time_variants(variants: Sequence[nn.Module], inputs: DenoiserCall, device: torch.device, repeats: int,
                   warmup: int) -> list[float]:
    """Median milliseconds of each variant on ``inputs``, timed round-robin in alternating order (a load change on the
    machine touches every variant alike)."""
    unit_args, unit_kwargs = inputs
    runs: list[list[float]] = [[] for _ in variants]
    for _ in range(warmup):
        for variant in variants:
            variant(*unit_args, **unit_kwargs)
    for r in range(repeats):
        order = range(len(variants)) if r % 2 == 0 else reversed(range(len(variants)))
        for i in order:
            runs[i].append(_time(lambda: variants[i](*unit_args, **unit_kwargs), device))
    return [statistics.median(r) for r in runs]


# joint widths (as fractions of each part's timed grid) at which a fused block's additive model is checked
ADDITIVITY_POINTS = (0.25, 0.5, 0.75)


def _additivity_check(denoiser: nn.Module, units: Sequence[Unit], curves: Sequence[LatencyCurve], inputs: dict,
                      generator: torch.Generator, device: torch.device, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """For the first module whose units are timed apart (a Flux single block), time it with both parts narrowed at a
    few width pairs and compare with the additive prediction t(block) - saving(attention) - saving(MLP)."""
    by_path: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        by_path.setdefault(unit.path, []).append(index)
    fused = next(((path, idx) for path, idx in by_path.items() if len(idx) > 1 and all(units[i].name for i in idx)), None)
    if fused is None:
        return []
    path, index = fused
    parts, part_curves = [units[i] for i in index], [curves[i] for i in index]
    pairs = list(dict.fromkeys(tuple(c.widths[min(len(c.widths) - 1, int(round(f * (len(c.widths) - 1))))] for c in part_curves)
                               for f in ADDITIVITY_POINTS))
    module = denoiser.get_submodule(path)
    measured = _time_variants([_unit_at(module, parts, pair, generator) for pair in pairs], inputs[path], device,
                              repeats, warmup)
    full = statistics.mean(c.ms[-1] for c in part_curves)
    checks = []
    for pair, ms in zip(pairs, measured):
        predicted = full - sum(c.ms[-1] - c.at(w) for c, w in zip(part_curves, pair))
        checks.append({"module": path, "widths": dict(zip((u.label for u in parts), pair)), "measured_ms": ms,
                       "predicted_ms": predicted, "relative_error": ms / predicted - 1})
    return checks


def pareto_widths(curve: LatencyCurve, allowed: Sequence[int]) -> list[int]:
    """The widths of ``allowed`` (ascending, full last) worth choosing: each strictly faster than every wider one.

    A narrower width that is not faster (a kernel that dislikes it, or timing noise) would cost quality for no time.
    """
    kept, best = [], float("inf")
    for width in sorted(allowed, reverse=True):
        ms = curve.at(width)
        if ms < best:
            kept.append(width)
            best = ms
    return sorted(kept)


def measure_pipeline_latency(pipe, prompts: Sequence[str], sampler, granularity: Granularity = Granularity(),
                             points: int = DEFAULT_POINTS, repeats: int = 5, warmup: int = 1, progress: bool = False) -> LatencyTable:
    """``measure_latency_table`` on the first denoiser call of a generation of ``prompts`` with ``sampler``
    (its batch: the prompts, doubled by classifier-free guidance; its resolution: the sampler's)."""
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.calls import first_call
    from slimdiff.statistics.recording import model_content_hash

    _, denoiser = denoiser_of(pipe)
    call = first_call(pipe, prompts, sampler)
    return measure_latency_table(denoiser, call, granularity, points, repeats, warmup, model_content_hash(denoiser), progress)
