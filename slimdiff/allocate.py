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
                    f"predicted error {self.predicted_error:.4g}")
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


def allowed_widths(module: ModuleScore, min_keep: float) -> list[int]:
    """Grid widths that keep at least ``min_keep`` of the module (the full width is always allowed)."""
    floor = min_keep * module.full_width
    return [w for w in module.widths if w >= floor - 1e-9] or [module.full_width]


def removable_params(scores: InfluenceScores, min_keep: float) -> int:
    return sum(m.unit_params * (m.full_width - allowed_widths(m, min_keep)[0]) for m in scores.modules)


def check_budget(scores: InfluenceScores, budget: Budget, min_keep: float = DEFAULT_MIN_KEEP) -> int:
    """Parameters to remove; raises ``BudgetError`` naming the valid range when the budget cannot be met."""
    if not 0 <= min_keep < 1 or min_keep != min_keep:
        raise BudgetError(f"min_keep must be in [0, 1), got {min_keep}")
    compressible = scores.compressible_params
    max_removable = removable_params(scores, min_keep)
    target = budget.params(compressible)
    if target < 1 or target > max_removable:
        raise BudgetError(
            f"budget {budget.value} asks to remove {target:,} of {compressible:,} compressible parameters; with "
            f"min_keep={min_keep} at most {max_removable:,} can be removed: valid budgets are fractions in "
            f"(0, {max_removable / compressible:.4f}] or whole numbers in [1, {max_removable:,}]")
    return target


def allocate(scores: InfluenceScores, budget: Budget | float, allocator: str = "slimdiff",
             min_keep: float = DEFAULT_MIN_KEEP, bucket_weights: Sequence[float] | None = None,
             temperature: float = DEFAULT_TEMPERATURE) -> WidthPlan:
    """Choose every module's width so that the budget is met (to within one width step)."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    target = check_budget(scores, budget, min_keep)
    sis = {m.name: m.sis(bucket_weights) for m in scores.modules}
    allowed = {m.name: allowed_widths(m, min_keep) for m in scores.modules}
    if allocator == "slimdiff":
        widths = _greedy(scores.modules, sis, allowed, target)
    elif allocator == "uniform":
        widths = _proportional(scores.modules, {m.name: 1.0 for m in scores.modules}, allowed, target)
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
        widths = _proportional(scores.modules, {m.name: weight[m.block] for m in scores.modules}, allowed, target)
    entries = []
    for m in scores.modules:
        index = m.widths.index(widths[m.name])
        entries.append(PlanEntry(m.name, m.kind, m.block, m.full_width, widths[m.name], m.unit_params, float(sis[m.name][index])))
    settings = {
        "budget": budget.value, "min_keep": min_keep, "bucket_weights": list(bucket_weights) if bucket_weights else None,
        "granularity": asdict(scores.granularity), "temperature": temperature if allocator == "modegpt" else None,
        "gains_measured": scores.metadata.get("gains_measured"),
    }
    return WidthPlan(allocator, entries, target, settings)


def _greedy(modules: Sequence[ModuleScore], sis: dict, allowed: dict, target: int) -> dict[str, int]:
    """Remove the step with the least SIS increase per parameter until ``target`` parameters are gone."""
    by_name = {m.name: m for m in modules}
    position = {m.name: len(allowed[m.name]) - 1 for m in modules}  # index into allowed widths (last = full)
    widths = {m.name: m.full_width for m in modules}
    heap: list[tuple[float, int, str]] = []

    def push(name: str, order: int) -> None:
        pos = position[name]
        if pos == 0:
            return
        module = by_name[name]
        current, smaller = allowed[name][pos], allowed[name][pos - 1]
        curve = sis[name]
        increase = float(curve[module.widths.index(smaller)] - curve[module.widths.index(current)])
        heapq.heappush(heap, (increase / (module.unit_params * (current - smaller)), order, name))

    for order, m in enumerate(modules):
        push(m.name, order)
    removed = 0
    while removed < target:
        _, order, name = heapq.heappop(heap)
        module = by_name[name]
        pos = position[name]
        removed += module.unit_params * (allowed[name][pos] - allowed[name][pos - 1])
        position[name] = pos - 1
        widths[name] = allowed[name][pos - 1]
        push(name, order)
    return widths


def _proportional(modules: Sequence[ModuleScore], weight: dict[str, float], allowed: dict, target: int) -> dict[str, int]:
    """Remove fraction t * weight_m of every module, t found by bisection, then single steps to meet the target."""

    def widths_at(t: float) -> dict[str, int]:
        out = {}
        for m in modules:
            want = m.full_width * (1 - min(1.0, t * weight[m.name]))
            out[m.name] = next((w for w in allowed[m.name] if w >= want - 1e-9), m.full_width)
        return out

    def removed(widths: dict[str, int]) -> int:
        return sum(m.unit_params * (m.full_width - widths[m.name]) for m in modules)

    lo, hi = 0.0, 1.0 / max(min(weight.values()), 1e-12)
    for _ in range(100):
        mid = (lo + hi) / 2
        if removed(widths_at(mid)) < target:
            lo = mid
        else:
            hi = mid
    widths = widths_at(lo)
    total = removed(widths)
    while total < target:
        # the module furthest behind its desired removal fraction takes the next step
        candidates = [m for m in modules if widths[m.name] > allowed[m.name][0]]
        m = max(candidates, key=lambda m: (weight[m.name] * hi - (1 - widths[m.name] / m.full_width), -modules.index(m)))
        smaller = max(w for w in allowed[m.name] if w < widths[m.name])
        total += m.unit_params * (widths[m.name] - smaller)
        widths[m.name] = smaller
    return widths
