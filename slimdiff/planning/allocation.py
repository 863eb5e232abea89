"""Global width allocation under a budget in parameters, MACs or measured latency (method.md §4).

Allocators share one interface, ``allocate(scores, budget, allocator=...)``, and return a
``WidthPlan``: the artifact that says how wide every module is, what it costs and what error it is
predicted to cause.
- ``slimdiff``: greedy; repeatedly remove the width step with the smallest increase of spectral
  influence score per unit of cost removed (parameters, MACs, or milliseconds from a latency table).
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

from slimdiff.files import (
    atomic_path,
    complete_artifact,
    read_json_artifact,
    write_json,
)
from slimdiff.planning.latency import LatencyTable, LatencyTableError, pareto_widths
from slimdiff.scoring.influence import InfluenceScores, ModuleScore

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
    method: str = ""  # how its decomposition whitens or selects (fallbacks included)
    full_params: int = 0  # parameters at full width where not unit x full width (an unfactorised adaLN modulation)
    full_macs: int = 0  # likewise for MACs
    attention_pairs: int = 0  # attention groups: query-key pairs per sample and call, summed over heads
    attention_floor: int = 0  # the width of this attention's other group when it is left intact

    def _params(self, width: int) -> int:
        return self.full_params if (self.full_params and width >= self.full_width) else self.unit_params * width

    def macs_at(self, width: int) -> int:
        return self.full_macs if (self.full_macs and width >= self.full_width) else self.unit_macs * width

    @property
    def params_before(self) -> int:
        return self._params(self.full_width)

    @property
    def params_after(self) -> int:
        return self._params(self.width)

    @property
    def kept_fraction(self) -> float:
        return self.width / self.full_width


@dataclass
class WidthPlan:
    """Per-module widths with their cost and predicted error, and how they were chosen."""

    allocator: str
    modules: list[PlanEntry]
    target_removed: float  # in the budget's currency: parameters, MACs per sample and call, or milliseconds
    settings: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] | None = None  # predicted latency from a latency table (None: no table given)
    left_intact: dict[str, dict[str, str]] = field(default_factory=dict)  # groups not compressed, with the reason

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
        """Compressible MACs per sample and denoiser call at full width (0 when the scores held no token counts):
        projections, and the attention products at each attention's run width (``macs_of``)."""
        return macs_of(self.modules, {m.name: m.full_width for m in self.modules})

    @property
    def macs_after(self) -> int:
        return macs_of(self.modules, self.widths)

    @property
    def budget_kind(self) -> str:
        return self.settings.get("budget_kind", "params")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "allocator": self.allocator,
            "settings": self.settings,
            "target": {"kind": self.budget_kind, "removed": self.target_removed},
            "params": {
                "compressible_before": self.params_before,
                "compressible_after": self.params_after,
                "removed": self.removed,
                "target_removed": self.target_removed if self.budget_kind == "params" else None,
                "removed_fraction": self.removed / self.params_before,
            },
            "macs": {
                "compressible_before": self.macs_before,
                "compressible_after": self.macs_after,
                "kept_fraction": self.macs_after / self.macs_before if self.macs_before else None,
            },
            "latency": self.latency,
            "left_intact": self.left_intact,
            "predicted_error": self.predicted_error,
            "modules": [{**asdict(m), "params_before": m.params_before, "params_after": m.params_after} for m in self.modules],
        }

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "WidthPlan":
        data = read_json_artifact(path, PLAN_FORMAT, "width plan")
        keys = PlanEntry.__dataclass_fields__
        with complete_artifact(path, "width plan"):
            entries = [PlanEntry(**{k: v for k, v in m.items() if k in keys}) for m in data["modules"]]
            return cls(data["allocator"], entries, data["target"]["removed"], data["settings"], data.get("latency"),
                       data.get("left_intact", {}))

    def table(self) -> str:
        """A printable table: one row per module, then totals."""
        rows = [f"{'module':<72} {'kind':<8} {'width':>11} {'kept':>6} {'params saved':>12} {'SIS':>10}"]
        for m in self.modules:
            rows.append(f"{m.name:<72} {m.kind:<8} {m.width:>5}/{m.full_width:<5} {m.kept_fraction:>6.0%} "
                        f"{m.params_before - m.params_after:>12,} {m.predicted_sis:>10.3g}")
        for name, intact in self.left_intact.items():
            rows.append(f"{name:<72} {intact['kind']:<8} left intact: {intact['note']}")
        kind = self.budget_kind
        target = (f"target {self.target_removed:,}" if kind == "params" else
                  f"target: keep {self.settings.get('budget', float('nan')):.1%} of the {'MACs' if kind == 'macs' else 'latency'}")
        rows.append(f"allocator {self.allocator}: compressible {self.params_before:,} -> {self.params_after:,} "
                    f"(removed {self.removed:,} = {self.removed / self.params_before:.1%}, {target}); "
                    f"predicted error {self.predicted_error:.4g}"
                    + (f"; MACs kept {self.macs_after / self.macs_before:.1%}" if self.macs_before else "")
                    + (f"; predicted latency {'at most ' if self.latency['upper_bound'] else ''}"
                       f"{self.latency['predicted_fraction']:.1%} of {self.latency['denoiser_ms']:.4g} ms on {self.latency['device']}"
                       + (f" ({self.latency['interpolated_units']} unit(s) at untimed widths, interpolated: "
                          + ("not checked" if self.latency.get("interpolation_error_fraction") is None else
                             f"checked within {self.latency['interpolation_error_fraction']:.1%}") + ")"
                          if self.latency.get("interpolated_units") else "")
                       if self.latency else ""))
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


BUDGET_KINDS = ("params", "macs", "latency")


def macs_of(modules: Sequence, widths: dict[str, int]) -> int:
    """Compressible MACs per sample and call of ``modules`` (score or plan entries) at ``widths``, as the kernels run
    them: every module's projections at its width, and each attention's two products (logits and weighted values)
    at its run width, the wider of its QK and VO widths (``slimdiff.runtime.attention.attend`` pads the narrower; a group left
    intact keeps its full width, ``attention_floor``). One count for a plan's prediction and the evaluated model."""
    total = 0
    runs: dict[str, tuple[int, int]] = {}  # attention -> (pairs, run width)
    for m in modules:
        width = widths.get(m.name, m.full_width)
        total += m.macs_at(width)
        if m.attention_pairs:
            attention = m.name.rsplit(".", 1)[0]
            pairs, run = runs.get(attention, (m.attention_pairs, 0))
            runs[attention] = (pairs, max(run, width, m.attention_floor))
    return total + sum(2 * pairs * run for pairs, run in runs.values())


# budgets that hold an attention's QK and VO at one width, and why: the attention products run at the wider of the
# two (``slimdiff.runtime.attention.attend`` pads the narrower), so only one width is a saving a table or a MAC count can see
TIED_BUDGETS = {
    "latency": "a latency budget ties QK and VO to one per-head width (its table times attentions so); leave tie_qk_vo "
               "unset (auto) or true",
    "macs": "a MACs budget ties QK and VO to one per-head width (attention runs at the wider of the two, so narrowing one "
            "alone saves no attention MACs); leave tie_qk_vo unset (auto) or true",
}


def allowed_widths(module: ModuleScore, min_keep: float) -> list[int]:
    """Grid widths that keep at least ``min_keep`` of the module (the full width is always allowed)."""
    floor = min_keep * module.full_width
    return [w for w in module.widths if w >= floor - 1e-9] or [module.full_width]


def cost_at(modules: Sequence[ModuleScore], width: int, budget_kind: str) -> int:
    """What ``modules`` (one, or an attention's QK and VO held at one width) cost at ``width`` in the budget's
    currency: parameters or MACs (their attention products at the run width, ``macs_of``)."""
    if budget_kind == "params":
        return sum(m.params_at(width) for m in modules)
    return macs_of(modules, {m.name: width for m in modules})


def removable(scores: InfluenceScores, min_keep: float, budget_kind: str = "params") -> int:
    """The most cost (parameters or MACs) that can go without breaking ``min_keep``."""
    units = _tied_groups(scores.modules) if budget_kind == "macs" else [[m] for m in scores.modules]
    return sum(cost_at(u, max(m.full_width for m in u), budget_kind) - cost_at(u, _common_widths(u, min_keep)[0], budget_kind)
               for u in units)


def check_budget(scores: InfluenceScores, budget: Budget, min_keep: float = DEFAULT_MIN_KEEP, budget_kind: str = "params",
                 latency_table: LatencyTable | None = None) -> float:
    """Cost to remove (parameters, MACs per sample and call, or milliseconds per call); raises ``BudgetError``
    naming the valid range when the budget cannot be met.

    ``params``: the budget is the parameters to remove (a fraction of the compressible ones, or a count).
    ``macs``: the budget is the fraction F of the compressible MACs (at the capture's resolution) to keep.
    ``latency``: the budget is the fraction F of the whole denoiser's measured latency to keep (``latency_table``).
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
    if budget_kind == "latency":
        return _check_latency_budget(scores, budget, min_keep, latency_table)
    unknown = [m.name for m in scores.modules if m.unit_macs <= 0]
    if unknown:
        raise BudgetError(f"the scores hold no MAC counts for {unknown[0]} (and {len(unknown) - 1} more): they predate MAC "
                          "counting or their capture saw no single resolution; re-run the capture and score stages")
    keep = budget.value
    if not 0 < keep < 1:
        raise BudgetError(f"a MACs budget is the fraction of compressible MACs to keep, 0 < F < 1; got {keep}")
    total = macs_of(scores.modules, {m.name: m.full_width for m in scores.modules})
    max_removable = removable(scores, min_keep, "macs")
    target = int(round((1 - keep) * total))
    if target < 1 or target > max_removable:
        raise BudgetError(f"--macs {keep} asks to keep {keep:.1%} of the compressible MACs; with min_keep={min_keep} at least "
                          f"{1 - max_removable / total:.4f} must be kept: valid F are in [{1 - max_removable / total:.4f}, 1)")
    return target


@dataclass(frozen=True)
class _Unit:
    """What an allocator moves: one module, or modules held at one width (QK and VO of an attention)."""

    names: tuple[str, ...]
    widths: list[int]  # allowed widths, ascending (last = full)
    cost: list[float]  # budget cost of the unit at each allowed width
    sis: list[float]  # SIS at each allowed width (summed over the tied modules)
    weight_key: str  # module whose proportional weight applies (uniform/modegpt)

    def saved(self, index: int) -> float:
        """Cost removed at allowed width ``index`` relative to full width."""
        return self.cost[-1] - self.cost[index]


def _tied_groups(modules: Sequence[ModuleScore]) -> list[list[ModuleScore]]:
    by_name = {m.name: m for m in modules}
    partner: dict[str, str] = {}
    for m in modules:
        if m.kind.startswith("qk"):
            vo = m.name[: -len(".qk")] + ".vo"
            if vo in by_name and by_name[vo].full_width == m.full_width:
                partner[m.name], partner[vo] = vo, m.name
    groups, seen = [], set()
    for m in modules:
        if m.name not in seen:
            group = [m] + ([by_name[partner[m.name]]] if m.name in partner else [])
            seen.update(g.name for g in group)
            groups.append(group)
    return groups


def _common_widths(group: Sequence[ModuleScore], min_keep: float) -> list[int]:
    return sorted(set.intersection(*(set(allowed_widths(g, min_keep)) for g in group)))


def _latency_groups(modules: Sequence[ModuleScore], table: LatencyTable) -> list[tuple[list[ModuleScore], Any]]:
    by_name = {m.name: m for m in modules}
    out, covered = [], set()
    for curve in table.curves:
        group = [by_name[g] for g in curve.groups if g in by_name]
        if group:
            out.append((group, curve))
            covered.update(m.name for m in group)
    missing = [m.name for m in modules if m.name not in covered]
    if missing:
        raise LatencyTableError(f"the latency table has no curve for {missing[0]} (and {len(missing) - 1} more); "
                                "it was measured on another model: re-run the latency stage")
    return out


def _units(modules: Sequence[ModuleScore], sis: dict, min_keep: float, budget_kind: str, tie_qk_vo: bool,
           latency_table: LatencyTable | None = None) -> list[_Unit]:
    def make(group: Sequence[ModuleScore], allowed: list[int], cost: list[float]) -> _Unit:
        curve = [sum(float(sis[g.name][g.widths.index(w)]) for g in group) for w in allowed]
        return _Unit(tuple(g.name for g in group), allowed, cost, curve, group[0].name)

    if budget_kind == "latency":
        # adaLN modulations run once per sample and call, not per token: no latency to save, so they stay whole
        units = [make([m], [m.full_width], [0.0]) for m in modules if m.kind == "adaln"]
        for group, curve in _latency_groups([m for m in modules if m.kind != "adaln"], latency_table):
            # timed widths (and untimed ones inside the timed range where the unit's checks trust interpolation),
            # only those faster than every wider one: each step saves time
            interpolates = latency_table.interpolates(curve)
            widths = [w for w in _common_widths(group, min_keep)
                      if (curve.widths[0] <= w if interpolates else w in curve.widths)]
            allowed = pareto_widths(curve, widths)
            units.append(make(group, allowed, [curve.at(w) for w in allowed]))
        return units
    groups = _tied_groups(modules) if tie_qk_vo else [[m] for m in modules]
    return [make(group, allowed, [float(cost_at(group, w, budget_kind)) for w in allowed])
            for group in groups for allowed in [_common_widths(group, min_keep)]]


def latency_floor(scores: InfluenceScores, table: LatencyTable, min_keep: float = DEFAULT_MIN_KEEP) -> float:
    """The smallest fraction of the denoiser's latency a plan can keep: every unit at its fastest allowed width."""
    units = _units(scores.modules, {m.name: [0.0] * len(m.widths) for m in scores.modules}, min_keep, "latency", True, table)
    return 1 - sum(u.saved(0) for u in units) / table.denoiser_ms


def _check_latency_budget(scores: InfluenceScores, budget: Budget, min_keep: float, table: LatencyTable | None) -> float:
    if table is None:
        raise BudgetError("a latency budget needs a latency table measured on this job's device "
                          "(the latency stage, or slimdiff compress --latency)")
    keep = budget.value
    if not 0 < keep < 1:
        raise BudgetError(f"a latency budget is the fraction of the denoiser's latency to keep, 0 < F < 1; got {keep}")
    floor = latency_floor(scores, table, min_keep)
    target = (1 - keep) * table.denoiser_ms
    if keep < floor:
        raise BudgetError(f"--latency {keep} asks for {keep * table.denoiser_ms:.4g} ms of the measured {table.denoiser_ms:.4g} ms "
                          f"on {table.device}; with min_keep={min_keep} the fastest plan takes {floor:.1%} of it: valid F are in "
                          f"[{floor:.4f}, 1)")
    return target


def allocate(scores: InfluenceScores, budget: Budget | float, allocator: str = "slimdiff",
             min_keep: float = DEFAULT_MIN_KEEP, bucket_weights: Sequence[float] | None = None,
             temperature: float = DEFAULT_TEMPERATURE, budget_kind: str = "params", tie_qk_vo: bool | None = None,
             latency_table: LatencyTable | None = None) -> WidthPlan:
    """Choose every module's width so that the budget is met (to within one width step).

    ``budget_kind``: ``params`` (remove a fraction or count of the compressible parameters), ``macs``
    (keep at most a fraction of the compressible MACs at the capture's resolution) or ``latency`` (keep at
    most a fraction of the denoiser's latency measured in ``latency_table``). ``tie_qk_vo`` gives the
    query-key and value-output groups of an attention one per-head width; ``None`` ties them for a latency
    budget (its table times them so) and not otherwise. With a ``latency_table`` the plan also records its
    predicted latency, whatever the budget kind.
    """
    if tie_qk_vo is None:
        tie_qk_vo = budget_kind in TIED_BUDGETS
    if budget_kind in TIED_BUDGETS and not tie_qk_vo:
        raise BudgetError(TIED_BUDGETS[budget_kind])
    if allocator not in ALLOCATORS:
        raise ValueError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    value = budget.value if isinstance(budget, Budget) else budget
    if budget_kind in ("macs", "latency") and not (isinstance(value, (int, float)) and 0 < value < 1):
        what = "compressible MACs" if budget_kind == "macs" else "the denoiser's measured latency"
        raise BudgetError(f"a {budget_kind} budget is the fraction of {what} to keep, 0 < F < 1; got {value!r}")
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    if bucket_weights is not None and (any(not math.isfinite(float(w)) or w < 0 for w in bucket_weights)
                                       or not sum(bucket_weights) > 0):
        raise ValueError(f"bucket_weights must be finite numbers >= 0 with a positive sum, got {list(bucket_weights)}")
    if latency_table is not None:
        latency_table.check_matches(model_hash=scores.metadata.get("model_hash"), granularity=asdict(scores.granularity))
    target = check_budget(scores, budget, min_keep, budget_kind, latency_table)
    sis = {m.name: m.sis(bucket_weights) for m in scores.modules}
    units = _units(scores.modules, sis, min_keep, budget_kind, tie_qk_vo, latency_table)
    if tie_qk_vo and budget_kind != "latency" and sum(u.saved(0) for u in units) < target:
        raise BudgetError(f"with QK and VO tied to one width, at most {sum(u.saved(0) for u in units):,.0f} "
                          f"of the {target:,} to remove can go (their common widths are fewer); lower the budget or untie them")
    if allocator == "slimdiff":
        unit_widths = _greedy(units, target)
    elif allocator == "uniform":
        unit_widths = _proportional(units, {u.weight_key: 1.0 for u in units}, target)
    else:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        # a modulation shared by all blocks (PixArt's adaln_single, the final norm_out) is in no block: it gets the
        # mean share, 1 (the shares of the L blocks sum to L); recorded in the plan's settings
        outside = sorted({m.block for m in scores.modules if m.kind == "adaln"} - set(scores.block_influence))
        missing = sorted({m.block for m in scores.modules} - set(scores.block_influence) - set(outside))
        if missing:
            raise ValueError(f"modegpt needs block influence for every block; missing {missing[:3]} (measure gains first)")
        blocks = sorted({m.block for m in scores.modules} - set(outside))
        influence = torch.tensor([scores.block_influence[b] for b in blocks], dtype=torch.float64)
        share = len(blocks) * torch.softmax(-influence / temperature, dim=0)
        weight = {b: float(s) for b, s in zip(blocks, share)} | {b: 1.0 for b in outside}
        block_of = {m.name: m.block for m in scores.modules}
        unit_widths = _proportional(units, {u.weight_key: weight[block_of[u.weight_key]] for u in units}, target)
    widths = {name: unit_widths[u.weight_key] for u in units for name in u.names}
    entries = []
    for m in scores.modules:
        index = m.widths.index(widths[m.name])
        entries.append(PlanEntry(m.name, m.kind, m.block, m.full_width, widths[m.name], m.unit_params,
                                 float(sis[m.name][index]), m.unit_macs, m.method, m.full_params, m.full_macs,
                                 m.attention_pairs, m.attention_floor))
    settings = {
        "budget": budget.value, "budget_kind": budget_kind, "tie_qk_vo": tie_qk_vo, "min_keep": min_keep,
        "bucket_weights": list(bucket_weights) if bucket_weights else None,
        "granularity": asdict(scores.granularity), "temperature": temperature if allocator == "modegpt" else None,
        "modegpt_mean_share": sorted({m.block for m in scores.modules if m.kind == "adaln"} - set(scores.block_influence))
        if allocator == "modegpt" else None,
        "gains_measured": scores.metadata.get("gains_measured"),
        # lineage: the decompose stage refuses this plan for a capture or model with another hash
        "model_hash": scores.metadata.get("model_hash"), "prompts_digest": scores.metadata.get("prompts_digest"),
    }
    plan = WidthPlan(allocator, entries, target, settings, left_intact=dict(scores.metadata.get("left_intact", {})))
    if latency_table is not None:
        plan.latency = predicted_latency(plan, latency_table, budget.value if budget_kind == "latency" else None)
    return plan


def predicted_latency(plan: WidthPlan, table: LatencyTable, target_fraction: float | None = None) -> dict[str, Any]:
    """The plan's latency predicted from ``table``; ``upper_bound`` when some attention has unequal QK and VO widths."""
    predicted, bound = table.predict_ms(plan.widths)
    untimed = [curve for curve in table.curves
               if any(plan.widths.get(g, curve.full_width) not in curve.widths for g in curve.groups)]
    errors = table.interpolation_errors()
    # what interpolation may add to the prediction: the worst check of each unit priced by it (unknown without checks)
    checked = errors is not None and all((c.measured_as or c.unit) in errors for c in untimed)
    error = sum(errors[c.measured_as or c.unit] for c in untimed) if checked else None
    return {"device": table.device, "dtype": table.dtype, "sample_shape": table.sample_shape, "denoiser_ms": table.denoiser_ms,
            "target_fraction": target_fraction, "predicted_ms": predicted, "predicted_fraction": predicted / table.denoiser_ms,
            "upper_bound": bound, "interpolated_units": len(untimed),
            "interpolation_error_fraction": None if error is None else error / table.denoiser_ms}


def _hull(unit: _Unit) -> list[int]:
    """Indices of ``unit``'s allowed widths on the lower convex hull of (cost saved, SIS increase), from full width down.

    A width above the hull is never worth stopping at: some mix of its neighbours on the hull saves as much for less
    error. Walking the hull, every step costs more error per unit saved than the one before, so a greedy over all
    units' hull steps is the exact solution of the budget's continuous relaxation (the multiple-choice knapsack).
    """
    full = len(unit.widths) - 1
    hull = [full]
    for index in range(full - 1, -1, -1):
        if unit.saved(index) <= unit.saved(hull[-1]):
            continue  # saves no more than a wider width already on the hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is dropped when it does not lie below the chord from a to index
            if ((unit.sis[b] - unit.sis[a]) * (unit.saved(index) - unit.saved(a))
                    >= (unit.sis[index] - unit.sis[a]) * (unit.saved(b) - unit.saved(a))):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def _greedy(units: Sequence[_Unit], target: float) -> dict[str, int]:
    """Take the hull step with the least SIS increase per unit of cost until the next one would reach ``target``; then
    the one move (any unit, any narrower allowed width) that reaches it with the least SIS increase, among those that
    overshoot it by less than one width step.

    Stepping along each unit's convex hull rather than width by width lets the greedy pass a width whose own step buys
    little (a latency curve's flat stretch, where the next width is much faster) to reach the cheap ones beyond it.
    """
    by_key = {u.weight_key: u for u in units}
    hulls = {u.weight_key: _hull(u) for u in units}
    along = {key: 0 for key in by_key}  # position on the unit's hull (0 = full width)
    max_step = max((u.cost[i + 1] - u.cost[i] for u in units for i in range(len(u.widths) - 1)), default=0.0)
    heap: list[tuple[float, int, str]] = []

    def push(key: str, order: int) -> None:
        hull, unit = hulls[key], by_key[key]
        if along[key] + 1 < len(hull):
            here, there = hull[along[key]], hull[along[key] + 1]
            increase = unit.sis[there] - unit.sis[here]
            heapq.heappush(heap, (increase / (unit.saved(there) - unit.saved(here)), order, key))

    for order, u in enumerate(units):
        push(u.weight_key, order)
    removed = 0.0
    position = {key: hulls[key][0] for key in by_key}  # index into the unit's allowed widths (last = full)
    while removed < target and heap:  # an empty heap: only float rounding of a target equal to the most that can go
        _, order, key = heapq.heappop(heap)
        unit = by_key[key]
        there = hulls[key][along[key] + 1]
        step = unit.saved(there) - unit.saved(position[key])
        if removed + step >= target:
            moves = [(by_key[k].sis[i] - by_key[k].sis[p], removed + by_key[k].saved(i) - by_key[k].saved(p), k, i)
                     for k, p in position.items() for i in range(p)]
            finishing = [m for m in moves if target <= m[1] < target + max_step]
            _, removed, key, index = min(finishing, key=lambda m: (m[0], m[1]))
            position[key] = index
            break
        removed += step
        along[key] += 1
        position[key] = there
        push(key, order)
    return {key: by_key[key].widths[p] for key, p in position.items()}


def _proportional(units: Sequence[_Unit], weight: dict[str, float], target: float) -> dict[str, int]:
    """Remove fraction t * weight of every unit, t found by bisection, then single steps to meet the target."""

    def widths_at(t: float) -> dict[str, int]:
        out = {}
        for u in units:
            want = u.widths[-1] * (1 - min(1.0, t * weight[u.weight_key]))
            out[u.weight_key] = next((w for w in u.widths if w >= want - 1e-9), u.widths[-1])
        return out

    def removed(widths: dict[str, int]) -> float:
        return sum(u.saved(u.widths.index(widths[u.weight_key])) for u in units)

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
        total += u.cost[u.widths.index(widths[u.weight_key])] - u.cost[u.widths.index(smaller)]
        widths[u.weight_key] = smaller
    return widths
