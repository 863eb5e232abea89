"""Global width allocation under a parameter budget (method.md §4).

Allocators share one interface, ``allocate(scores, budget, allocator=...)``, and return a
``WidthPlan``: the artifact that says how wide every module is, what it costs and what error it is
predicted to cause.
- ``slimdiff``: greedy; repeatedly remove the width step with the smallest increase of spectral
  influence score per parameter removed.
- ``uniform``: the same kept fraction in every module.
- ``modegpt``: per-block sparsity proportional to softmax(-block influence / temperature).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from slimdiff.influence import InfluenceScores, ModuleScore
from slimdiff.utils import atomic_path, read_json_artifact, write_json

PLAN_FORMAT = "slimdiff-plan/1"
ALLOCATORS = ("slimdiff", "uniform", "modegpt")
DEFAULT_MIN_KEEP = 0.1
DEFAULT_TEMPERATURE = 0.1


class BudgetError(ValueError):
    """A budget that cannot be met; the message names the valid range."""


@dataclass(frozen=True)
class Budget:
    """Parameters to remove: a fraction of the compressible parameters (0 < b < 1) or a whole count (>= 2)."""

    value: float

    def __post_init__(self) -> None:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BudgetError(f"budget must be a fraction in (0, 1) or a whole number of parameters >= 1, got {value!r}")
        if value <= 0:
            raise BudgetError(f"budget must be > 0: a fraction in (0, 1) or a whole number of parameters, got {value}")
        if value == 1:
            raise BudgetError("budget 1 is ambiguous: give a fraction in (0, 1) or a whole number of parameters >= 2")
        if value > 1 and float(value) != int(value):
            raise BudgetError(
                f"budget {value} is neither a fraction in (0, 1) nor a whole number of parameters to remove")

    @classmethod
    def parse(cls, text: str | float) -> "Budget":
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise BudgetError(f"budget must be a number, got {text!r}") from None
        return cls(int(value) if math.isfinite(value) and value >= 1 and value == int(value) else value)

    @property
    def is_fraction(self) -> bool:
        return self.value < 1

    def params(self, compressible: int) -> int:
        """Parameters to remove out of ``compressible``."""
        return int(round(self.value * compressible)) if self.is_fraction else int(self.value)


@dataclass
class PlanEntry:
    name: str
    kind: str
    block: str
    full_width: int
    width: int
    unit_params: int
    predicted_sis: float
    unit_macs: int = 0  # MACs per unit of width for one sample and one denoiser call (0: unknown)

    @property
    def params_before(self) -> int:
        return self.unit_params * self.full_width

    @property
    def params_after(self) -> int:
        return self.unit_params * self.width

    @property
    def kept_fraction(self) -> float:
        return self.width / self.full_width


@dataclass
class WidthPlan:
    """Per-module widths with their cost and predicted error, and how they were chosen."""

    allocator: str
    modules: list[PlanEntry]
    target_removed: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def widths(self) -> dict[str, int]:
        return {m.name: m.width for m in self.modules}

    @property
    def params_before(self) -> int:
        return sum(m.params_before for m in self.modules)

    @property
    def params_after(self) -> int:
        return sum(m.params_after for m in self.modules)

    @property
    def removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def predicted_error(self) -> float:
        return sum(m.predicted_sis for m in self.modules)

    @property
    def macs_before(self) -> int:
        """Compressible MACs per sample and denoiser call at full width (0 when the scores held no token counts)."""
        return sum(m.unit_macs * m.full_width for m in self.modules)

    @property
    def macs_after(self) -> int:
        return sum(m.unit_macs * m.width for m in self.modules)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "allocator": self.allocator,
            "settings": self.settings,
            "params": {
                "compressible_before": self.params_before,
                "compressible_after": self.params_after,
                "removed": self.removed,
                "target_removed": self.target_removed,
                "removed_fraction": self.removed / self.params_before,
            },
            "macs": {
                "compressible_before": self.macs_before,
                "compressible_after": self.macs_after,
                "kept_fraction": self.macs_after / self.macs_before if self.macs_before else None,
            },
            "predicted_error": self.predicted_error,
            "modules": [{**asdict(m), "params_before": m.params_before, "params_after": m.params_after} for m in self.modules],
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "WidthPlan":
        data = read_json_artifact(path, PLAN_FORMAT, "width plan")
        keys = PlanEntry.__dataclass_fields__
        entries = [PlanEntry(**{k: v for k, v in m.items() if k in keys}) for m in data["modules"]]
        return cls(data["allocator"], entries, data["params"]["target_removed"], data["settings"])

    def table(self) -> str:
        """A printable table: one row per module, then totals."""
        rows = [f"{'module':<72} {'kind':<8} {'width':>11} {'kept':>6} {'params saved':>12} {'SIS':>10}"]
        for m in self.modules:
            rows.append(f"{m.name:<72} {m.kind:<8} {m.width:>5}/{m.full_width:<5} {m.kept_fraction:>6.0%} "
                        f"{m.params_before - m.params_after:>12,} {m.predicted_sis:>10.3g}")
        rows.append(f"allocator {self.allocator}: compressible {self.params_before:,} -> {self.params_after:,} "
                    f"(removed {self.removed:,} = {self.removed / self.params_before:.1%}, target {self.target_removed:,}); "
                    f"predicted error {self.predicted_error:.4g}"
                    + (f"; MACs kept {self.macs_after / self.macs_before:.1%}" if self.macs_before else ""))
        return "\n".join(rows)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """PNG: kept fraction per transformer block, one bar per functional group."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        blocks = list(dict.fromkeys(m.block for m in self.modules))
        kinds = list(dict.fromkeys(m.kind for m in self.modules))
        kept = {(m.block, m.kind): m.kept_fraction for m in self.modules}
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(blocks) + 2), 4))
        bar = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            xs = [b + (i - (len(kinds) - 1) / 2) * bar for b in range(len(blocks))]
            ax.bar(xs, [kept.get((blk, kind), float("nan")) for blk in blocks], bar, label=kind)
        ax.set_xticks(range(len(blocks)))
        ax.set_xticklabels([_short_block(b) for b in blocks], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("kept fraction of width")
        ax.set_ylim(0, 1.05)
        ax.set_title(title or f"{self.allocator}: removed {self.removed / self.params_before:.0%} of compressible parameters")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return path


def _short_block(block: str) -> str:
    return (block.replace("down_blocks", "down").replace("up_blocks", "up").replace("mid_block", "mid")
            .replace(".attentions", "").replace(".transformer_blocks", ".tb").replace("transformer_blocks", "tb"))


BUDGET_KINDS = ("params", "macs")


def allowed_widths(module: ModuleScore, min_keep: float) -> list[int]:
    """Grid widths that keep at least ``min_keep`` of the module (the full width is always allowed)."""
    floor = min_keep * module.full_width
    return [w for w in module.widths if w >= floor - 1e-9] or [module.full_width]


def unit_cost(module: ModuleScore, budget_kind: str) -> int:
    """What one unit of ``module``'s width costs in the budget's currency: parameters or MACs."""
    return module.unit_params if budget_kind == "params" else module.unit_macs


def removable(scores: InfluenceScores, min_keep: float, budget_kind: str = "params") -> int:
    """The most cost (parameters or MACs) that can go without breaking ``min_keep``."""
    return sum(unit_cost(m, budget_kind) * (m.full_width - allowed_widths(m, min_keep)[0]) for m in scores.modules)


def check_budget(scores: InfluenceScores, budget: Budget, min_keep: float = DEFAULT_MIN_KEEP, budget_kind: str = "params") -> int:
    """Cost to remove (parameters, or MACs per sample and call); raises ``BudgetError`` naming the valid range
    when the budget cannot be met.

    ``params``: the budget is the parameters to remove (a fraction of the compressible ones, or a count).
    ``macs``: the budget is the fraction F of the compressible MACs (at the capture's resolution) to keep.
    """
    if not 0 <= min_keep < 1 or min_keep != min_keep:
        raise BudgetError(f"min_keep must be in [0, 1), got {min_keep}")
    if budget_kind not in BUDGET_KINDS:
        raise BudgetError(f"unknown budget kind {budget_kind!r}; valid: {', '.join(BUDGET_KINDS)}")
    if budget_kind == "params":
        compressible = scores.compressible_params
        max_removable = removable(scores, min_keep)
        target = budget.params(compressible)
        if target < 1 or target > max_removable:
            raise BudgetError(
                f"budget {budget.value} asks to remove {target:,} of {compressible:,} compressible parameters; with "
                f"min_keep={min_keep} at most {max_removable:,} can be removed: valid budgets are fractions in "
                f"(0, {max_removable / compressible:.4f}] or whole numbers in [1, {max_removable:,}]")
        return target
    unknown = [m.name for m in scores.modules if m.unit_macs <= 0]
    if unknown:
        raise BudgetError(f"the scores hold no MAC counts for {unknown[0]} (and {len(unknown) - 1} more): they predate MAC "
                          "counting or their capture saw no single resolution; re-run the capture and score stages")
    keep = budget.value
    if not 0 < keep < 1:
        raise BudgetError(f"a MACs budget is the fraction of compressible MACs to keep, 0 < F < 1; got {keep}")
    total = sum(m.unit_macs * m.full_width for m in scores.modules)
    max_removable = removable(scores, min_keep, "macs")
    target = int(round((1 - keep) * total))
    if target < 1 or target > max_removable:
        raise BudgetError(f"--macs {keep} asks to keep {keep:.1%} of the compressible MACs; with min_keep={min_keep} at least "
                          f"{1 - max_removable / total:.4f} must be kept: valid F are in [{1 - max_removable / total:.4f}, 1)")
    return target


@dataclass(frozen=True)
class _Unit:
    """What an allocator moves: one module, or a QK and a VO module held at one width (``tie_qk_vo``)."""

    names: tuple[str, ...]
    widths: list[int]  # allowed widths, ascending (last = full)
    cost: int  # budget cost of one unit of width
    sis: list[float]  # SIS at each allowed width (summed over the tied modules)
    weight_key: str  # module whose proportional weight applies (uniform/modegpt)


def _units(modules: Sequence[ModuleScore], sis: dict, min_keep: float, budget_kind: str, tie_qk_vo: bool) -> list[_Unit]:
    by_name = {m.name: m for m in modules}
    partner: dict[str, str] = {}
    if tie_qk_vo:
        for m in modules:
            if m.kind.startswith("qk"):
                vo = m.name[: -len(".qk")] + ".vo"
                if vo in by_name and by_name[vo].full_width == m.full_width:
                    partner[m.name], partner[vo] = vo, m.name
    units, seen = [], set()
    for m in modules:
        if m.name in seen:
            continue
        group = [m] + ([by_name[partner[m.name]]] if m.name in partner else [])
        seen.update(g.name for g in group)
        allowed = sorted(set.intersection(*(set(allowed_widths(g, min_keep)) for g in group)))
        curve = [sum(float(sis[g.name][g.widths.index(w)]) for g in group) for w in allowed]
        units.append(_Unit(tuple(g.name for g in group), allowed, sum(unit_cost(g, budget_kind) for g in group), curve, m.name))
    return units


def allocate(scores: InfluenceScores, budget: Budget | float, allocator: str = "slimdiff",
             min_keep: float = DEFAULT_MIN_KEEP, bucket_weights: Sequence[float] | None = None,
             temperature: float = DEFAULT_TEMPERATURE, budget_kind: str = "params", tie_qk_vo: bool = False) -> WidthPlan:
    """Choose every module's width so that the budget is met (to within one width step).

    ``budget_kind``: ``params`` (remove a fraction or count of the compressible parameters) or ``macs``
    (keep at most a fraction of the compressible MACs at the capture's resolution). ``tie_qk_vo`` gives
    the query-key and value-output groups of an attention one per-head width, so fused attention kernels
    that need equal head widths (flash attention) apply.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    if bucket_weights is not None and (any(not math.isfinite(float(w)) or w < 0 for w in bucket_weights)
                                       or not sum(bucket_weights) > 0):
        raise ValueError(f"bucket_weights must be finite numbers >= 0 with a positive sum, got {list(bucket_weights)}")
    target = check_budget(scores, budget, min_keep, budget_kind)
    sis = {m.name: m.sis(bucket_weights) for m in scores.modules}
    units = _units(scores.modules, sis, min_keep, budget_kind, tie_qk_vo)
    if tie_qk_vo and sum(u.cost * (u.widths[-1] - u.widths[0]) for u in units) < target:
        raise BudgetError(f"with QK and VO tied to one width, at most {sum(u.cost * (u.widths[-1] - u.widths[0]) for u in units):,} "
                          f"of the {target:,} to remove can go (their common widths are fewer); lower the budget or untie them")
    if allocator == "slimdiff":
        unit_widths = _greedy(units, target)
    elif allocator == "uniform":
        unit_widths = _proportional(units, {u.weight_key: 1.0 for u in units}, target)
    else:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        missing = sorted({m.block for m in scores.modules} - set(scores.block_influence))
        if missing:
            raise ValueError(f"modegpt needs block influence for every block; missing {missing[:3]} (measure gains first)")
        blocks = sorted({m.block for m in scores.modules})
        influence = torch.tensor([scores.block_influence[b] for b in blocks], dtype=torch.float64)
        share = len(blocks) * torch.softmax(-influence / temperature, dim=0)
        weight = {b: float(s) for b, s in zip(blocks, share)}
        block_of = {m.name: m.block for m in scores.modules}
        unit_widths = _proportional(units, {u.weight_key: weight[block_of[u.weight_key]] for u in units}, target)
    widths = {name: unit_widths[u.weight_key] for u in units for name in u.names}
    entries = []
    for m in scores.modules:
        index = m.widths.index(widths[m.name])
        entries.append(PlanEntry(m.name, m.kind, m.block, m.full_width, widths[m.name], m.unit_params,
                                 float(sis[m.name][index]), m.unit_macs))
    settings = {
        "budget": budget.value, "budget_kind": budget_kind, "tie_qk_vo": tie_qk_vo, "min_keep": min_keep,
        "bucket_weights": list(bucket_weights) if bucket_weights else None,
        "granularity": asdict(scores.granularity), "temperature": temperature if allocator == "modegpt" else None,
        "gains_measured": scores.metadata.get("gains_measured"),
    }
    return WidthPlan(allocator, entries, target, settings)


def _greedy(units: Sequence[_Unit], target: int) -> dict[str, int]:
    """Remove the step with the least SIS increase per unit of cost until ``target`` cost is gone."""
    position = {u.weight_key: len(u.widths) - 1 for u in units}  # index into allowed widths (last = full)
    by_key = {u.weight_key: u for u in units}
    heap: list[tuple[float, int, str]] = []

    def push(key: str, order: int) -> None:
        pos = position[key]
        if pos == 0:
            return
        unit = by_key[key]
        increase = unit.sis[pos - 1] - unit.sis[pos]
        heapq.heappush(heap, (increase / (unit.cost * (unit.widths[pos] - unit.widths[pos - 1])), order, key))

    for order, u in enumerate(units):
        push(u.weight_key, order)
    removed = 0
    while removed < target:
        _, order, key = heapq.heappop(heap)
        unit = by_key[key]
        pos = position[key]
        removed += unit.cost * (unit.widths[pos] - unit.widths[pos - 1])
        position[key] = pos - 1
        push(key, order)
    return {key: by_key[key].widths[pos] for key, pos in position.items()}


def _proportional(units: Sequence[_Unit], weight: dict[str, float], target: int) -> dict[str, int]:
    """Remove fraction t * weight of every unit, t found by bisection, then single steps to meet the target."""

    def widths_at(t: float) -> dict[str, int]:
        out = {}
        for u in units:
            want = u.widths[-1] * (1 - min(1.0, t * weight[u.weight_key]))
            out[u.weight_key] = next((w for w in u.widths if w >= want - 1e-9), u.widths[-1])
        return out

    def removed(widths: dict[str, int]) -> int:
        return sum(u.cost * (u.widths[-1] - widths[u.weight_key]) for u in units)

    lo, hi = 0.0, 1.0 / max(min(weight.values()), 1e-12)
    for _ in range(100):
        mid = (lo + hi) / 2
        if removed(widths_at(mid)) < target:
            lo = mid
        else:
            hi = mid
    widths = widths_at(lo)
    total = removed(widths)
    order = {u.weight_key: i for i, u in enumerate(units)}
    while total < target:
        # the unit furthest behind its desired removal fraction takes the next step
        candidates = [u for u in units if widths[u.weight_key] > u.widths[0]]
        u = max(candidates, key=lambda u: (weight[u.weight_key] * hi - (1 - widths[u.weight_key] / u.widths[-1]), -order[u.weight_key]))
        smaller = max(w for w in u.widths if w < widths[u.weight_key])
        total += u.cost * (widths[u.weight_key] - smaller)
        widths[u.weight_key] = smaller
    return widths
