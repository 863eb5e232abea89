"""Spectral influence scores (method.md §4): predicted error of every module at every candidate width, per
timestep bucket, and the MACs and parameters each width costs.

SIS_m(r) = g_m * sum_b w_b E_{m,b}(r). The error curves come from the capture (no forward passes); the propagation
gains g_m come from ``slimdiff.scoring.gains``, measured once, so a new budget needs neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup, compressible_groups, find_groups, left_intact
from slimdiff.arch.sites import group_input_sites, group_sites
from slimdiff.decomposition.closed_form import DEFAULT_REG, FFNDecomposition
from slimdiff.decomposition.apply import recorded_decomposition
from slimdiff.decomposition.errors import bucket_errors
from slimdiff.decomposition.groups import Decomposition, decompose_group
from slimdiff.device import linalg_device, module_device
from slimdiff.files import complete_artifact, read_json_artifact, write_json
from slimdiff.scoring.gains import Gains
from slimdiff.statistics.sums import Capture

SCORES_FORMAT = "slimdiff-scores/1"


@dataclass(frozen=True)
class Granularity:
    """Width steps: FFN channels in multiples of ``ffn_step``; QK/VO per-head rank in steps of ``rank_step``."""

    ffn_step: int = 8
    rank_step: int = 1

    def __post_init__(self) -> None:
        for name in ("ffn_step", "rank_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"granularity {name} must be a whole number >= 1, got {value!r}")

    def step(self, kind: str) -> int:
        return self.ffn_step if kind in ("ffn", "ffn_single") else self.rank_step


def candidate_widths(full_width: int, step: int) -> list[int]:
    """Widths on the grid (multiples of ``step``) plus the full width, ascending."""
    widths = sorted({w for w in range(step, full_width + 1, step)} | {full_width})
    return widths


def group_widths(group: ModuleGroup, granularity: Granularity) -> list[int]:
    """A group's candidate widths: the grid, less the widths that would hold more parameters than the full group
    (an adaLN factorisation above ``in * out / (in + out)``)."""
    return [w for w in candidate_widths(group.width, granularity.step(group.kind)) if group.saves_params_at(w)]


@dataclass
class ModuleScore:
    """One module's allocation inputs: its grid, error per bucket at each grid width, and gain."""

    name: str
    kind: str
    block: str
    heads: int
    full_width: int
    unit_params: int
    widths: list[int]
    errors: list[list[float] | None]  # [bucket][width index]; None where a bucket saw no tokens
    gain: float = 1.0
    unit_macs: int = 0  # projection MACs of one unit of width per sample and call at the capture's resolution (0: unknown)
    method: str = ""  # how the decomposition whitens or selects (fallbacks included), for the record
    # cost at full width where it is not unit x full width: an unfactorised adaLN modulation (0: unit x full width)
    full_params: int = 0
    full_macs: int = 0
    # attention groups: query-key pairs per sample and call summed over heads; the logits and the weighted values each
    # cost this many MACs per unit of the attention's run width, the wider of its QK and VO widths (slim.attend pads)
    attention_pairs: int = 0
    attention_floor: int = 0  # the width of this attention's other group when it is left intact (its run width floor)

    def params_at(self, width: int) -> int:
        """Parameters at ``width`` (an adaLN modulation at full width is the original linear)."""
        if self.full_params and width >= self.full_width:
            return self.full_params
        return self.unit_params * width

    def macs_at(self, width: int) -> int:
        """Projection MACs per sample and call at ``width`` (the attention products: ``slimdiff.planning.allocation.macs_of``)."""
        if self.full_macs and width >= self.full_width:
            return self.full_macs
        return self.unit_macs * width

    def error(self, bucket_weights: Sequence[float] | None = None) -> Tensor:
        """Bucket-weighted predicted error at each grid width (weights renormalised over seen buckets)."""
        seen = [b for b, e in enumerate(self.errors) if e is not None]
        weights = [1.0] * len(self.errors) if bucket_weights is None else list(bucket_weights)
        if len(weights) != len(self.errors):
            raise ValueError(f"{len(weights)} bucket weights for {len(self.errors)} buckets")
        total = sum(weights[b] for b in seen)
        if total <= 0:
            raise ValueError("bucket weights put no weight on any bucket that saw tokens")
        curve = torch.zeros(len(self.widths), dtype=torch.float64, device="cpu")
        for b in seen:
            curve += weights[b] / total * torch.tensor(self.errors[b], dtype=torch.float64, device="cpu")
        return curve

    def sis(self, bucket_weights: Sequence[float] | None = None) -> Tensor:
        """Spectral influence score at each grid width: gain times the weighted predicted error."""
        return self.gain * self.error(bucket_weights)


@dataclass
class InfluenceScores:
    """Everything an allocator needs; JSON-serialisable so re-allocation reads no model."""

    modules: list[ModuleScore]
    granularity: Granularity = field(default_factory=Granularity)
    bucket_edges: list[float] = field(default_factory=list)
    block_influence: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def compressible_params(self) -> int:
        return sum(m.params_at(m.full_width) for m in self.modules)

    def save(self, path: str | Path) -> Path:
        data = {
            "format": SCORES_FORMAT,
            "granularity": asdict(self.granularity),
            "bucket_edges": self.bucket_edges,
            "block_influence": self.block_influence,
            "metadata": self.metadata,
            "modules": [asdict(m) for m in self.modules],
        }
        return write_json(path, data)

    @classmethod
    def load(cls, path: str | Path) -> "InfluenceScores":
        data = read_json_artifact(path, SCORES_FORMAT, "influence scores")
        with complete_artifact(path, "influence scores file"):
            return cls(
                [ModuleScore(**m) for m in data["modules"]], Granularity(**data["granularity"]),
                data["bucket_edges"], data["block_influence"], data["metadata"],
            )


def skeleton_scores(groups: Sequence[ModuleGroup], granularity: Granularity = Granularity()) -> InfluenceScores:
    """Scores with grids but no errors: enough to check a budget before any forward pass."""
    # no errors and unit gains: a skeleton only checks budgets against the width grids, it never allocates
    modules = [ModuleScore(g.name, g.kind, g.block, g.heads, g.width, g.unit_params, group_widths(g, granularity), [], 1.0,
                           full_params=_full_params(g)) for g in groups]
    return InfluenceScores(modules, granularity)


def _full_params(group: ModuleGroup) -> int:
    """The group's full-width parameters where they are not unit x width (adaLN), else 0."""
    return group.params_at(group.width) if group.kind == "adaln" else 0


def module_score(denoiser: nn.Module, group: ModuleGroup, capture: Capture, granularity: Granularity,
                 reg: float = DEFAULT_REG, max_ffn_points: int = 64, gain: float | None = None,
                 store=None, attention_floor: int = 0) -> ModuleScore:
    """Per-bucket predicted error of ``group`` at every grid width, from the capture alone.

    FFN curves are exact at up to ``max_ffn_points`` grid widths (always including the ends) and
    linearly interpolated in between, with one Nyström solve per width for all buckets; QK/VO/adaLN curves
    are exact everywhere. The math runs in float64 on ``linalg_device`` of the model. The group's sites are read
    from the capture once (a lazily opened capture holds one group's statistics at a time). With ``store`` (a
    ``slimdiff.decomposition.factorisations.FactorisationStore``) the factorisation is recorded for the decompose stage; an FFN's
    channels at every grid width are chosen once, here or by the truncation gains (``ffn_recorder``), and both the
    errors and the decomposition use them.
    """
    widths = group_widths(group, granularity)
    where = linalg_device(module_device(denoiser))
    sites = group_sites(group)
    capture = capture.subset(sites)
    decomposition = _recorded_ffn(store, denoiser, group, capture, widths) if store is not None else None
    if decomposition is None:
        decomposition = decompose_group(denoiser, group, capture, reg)
        if isinstance(decomposition, FFNDecomposition):
            decomposition = replace(decomposition, chosen=decomposition.channel_sets(widths))
        if store is not None:
            store.put(group, decomposition, widths)
    errors = bucket_errors(denoiser, group, capture, decomposition, widths, where, max_ffn_points)
    # gain None only when score() was told require_gains=False: the unit-gain ablation, recorded in the scores'
    # metadata as gains_measured: false (score() refuses a gains file that lacks a module)
    site_tokens = capture.metadata.get("site_tokens", {})
    return ModuleScore(group.name, group.kind, group.block, group.heads, group.width, group.unit_params, widths, errors,
                       1.0 if gain is None else gain, unit_macs_of(group, site_tokens), decomposition.method,
                       full_params=_full_params(group),
                       full_macs=group.in_features * group.out_features if group.kind == "adaln" else 0,
                       attention_pairs=attention_pairs_of(group, site_tokens), attention_floor=attention_floor)


def ffn_recorder(store, granularity: Granularity) -> Callable[[ModuleGroup, Decomposition], None]:
    """``record`` for the truncation gains (``slimdiff.scoring.gains.measure_gains``): each FFN's decomposition goes
    into ``store`` with its channels at every width of ``granularity``, which ``module_score`` reads back instead of
    decomposing the FFN again (its eigendecomposition dominates both stages at real widths)."""
    def record(group: ModuleGroup, decomposition: Decomposition) -> None:
        if isinstance(decomposition, FFNDecomposition):
            store.put(group, decomposition, group_widths(group, granularity))
    return record


def _recorded_ffn(store, denoiser: nn.Module, group: ModuleGroup, capture: Capture,
                  widths: Sequence[int]) -> FFNDecomposition | None:
    """The FFN decomposition ``store`` holds for ``group`` with channels at every one of ``widths``, else None. Only
    FFNs: their errors come from the channel sets and the capture, the same numbers either way; a QK/VO entry holds
    factors in the model's dtype, while the errors read the float64 ones (and cost little to recompute)."""
    if group.kind not in ("ffn", "ffn_single") or group not in store:
        return None
    return recorded_decomposition(store, denoiser, group, capture, widths)


def attention_of(group: ModuleGroup) -> str:
    """The attention a QK or VO group belongs to (its name without ``.qk`` / ``.vo``), else ""."""
    return group.name.rsplit(".", 1)[0] if group.kind.startswith(("qk", "vo")) else ""


def attention_floors(groups: Sequence[ModuleGroup]) -> dict[str, int]:
    """For each compressible QK or VO group whose attention's other group is left intact: that group's width, below
    which the attention products never run (``slimdiff.runtime.attention.attend`` pads to the wider width)."""
    by_attention: dict[str, list[ModuleGroup]] = {}
    for group in groups:
        if attention_of(group):
            by_attention.setdefault(attention_of(group), []).append(group)
    floors = {}
    for members in by_attention.values():
        for group in members:
            intact = [g.width for g in members if g is not group and not g.compressible]
            if group.compressible and intact:
                floors[group.name] = max(intact)
    return floors


def attention_pairs_of(group: ModuleGroup, site_tokens: dict[str, int]) -> int:
    """Query-key pairs per sample and call summed over heads (attention groups; 0 otherwise or when the capture saw
    no single resolution): image and text tokens together in a joint attention."""
    if not group.kind.startswith(("qk", "vo")):
        return 0
    if group.kind in ("qk_joint", "vo_joint"):
        tokens = [site_tokens.get(site, 0) for site in group.sites]
        return group.heads * sum(tokens) ** 2 if all(t > 0 for t in tokens) else 0
    if group.kind == "vo_single":
        query_tokens = key_tokens = site_tokens.get(group.sites[0], 0)
    else:
        query_tokens, key_tokens = site_tokens.get(f"{group.path}.to_q", 0), site_tokens.get(group_input_sites(group)[1], 0)
    return group.heads * query_tokens * key_tokens if query_tokens > 0 and key_tokens > 0 else 0


def unit_macs_of(group: ModuleGroup, site_tokens: dict[str, int]) -> int:
    """``group.unit_macs`` at the token counts the capture saw (0 when it saw none or several resolutions).

    Joint attention counts every stream: queries and keys are the image and text tokens together, each projection
    runs on its own stream's tokens and each output projection on its stream's rows.
    """
    if group.kind == "adaln":
        return group.unit_macs(1, 1)
    if group.kind in ("qk_joint", "vo_joint", "vo_single", "ffn_single"):
        tokens = [site_tokens.get(site, 0) for site in group.sites]
        if any(t <= 0 for t in tokens):
            return 0
        if group.kind == "ffn_single":
            return tokens[0] * (group.in_features + group.out_features)
        if group.kind == "qk_joint":  # per head: each stream's query and key rows
            return group.heads * sum(2 * t * d for t, d in zip(tokens, group.stream_in))
        # per head: each stream's value rows, each output projection on its stream's rows
        return group.heads * (sum(t * d for t, d in zip(tokens, group.stream_in))
                              + sum(t * d for t, d in zip(tokens, group.stream_out)))
    if group.kind == "ffn":
        query_site = key_site = f"{group.path}.net.2"
    else:
        query_site, key_site = f"{group.path}.to_q", group_input_sites(group)[1]
    query_tokens, key_tokens = site_tokens.get(query_site, 0), site_tokens.get(key_site, 0)
    if query_tokens <= 0 or key_tokens <= 0:
        return 0
    return group.unit_macs(query_tokens, key_tokens)


def score(denoiser: nn.Module, capture: Capture, gains: "Gains | None" = None, granularity: Granularity = Granularity(),
          reg: float = DEFAULT_REG, max_ffn_points: int = 64, require_gains: bool = True, progress: bool = False,
          store=None) -> InfluenceScores:
    """Influence scores for every compressible group of ``denoiser`` (the uncompressed model of the capture).

    Without measured ``gains`` this fails, unless ``require_gains=False`` asks for unit gains (an
    ablation; recorded as ``gains_measured: false`` in the scores). Groups are scored one at a time, each reading
    its own sites of the capture once; ``store`` records each group's factorisation for ``decompose``.
    """
    from tqdm.auto import tqdm

    groups = compressible_groups(denoiser)
    if gains is None and require_gains:
        raise ValueError("no propagation gains; run slimdiff.scoring.gains.measure_gains first "
                         "(or pass require_gains=False for unit gains)")
    if gains is not None:
        gains.check_matches(capture)
        missing = [g.name for g in groups if g.name not in gains.gains]
        if missing:
            raise ValueError(f"propagation gains hold none for {missing[:3]}; re-measure gains")
    values = gains.gains if gains is not None else {}
    floors = attention_floors(find_groups(denoiser))
    modules = [module_score(denoiser, g, capture, granularity, reg, max_ffn_points, values.get(g.name), store,
                            floors.get(g.name, 0))
               for g in tqdm(groups, desc="score", unit="module", disable=not progress)]
    metadata = {
        "reg": reg,
        "max_ffn_points": max_ffn_points,
        "gains_measured": gains is not None,
        "model_hash": capture.metadata.get("model_hash"),
        "prompts_digest": capture.metadata.get("prompts_digest"),
        "left_intact": left_intact(find_groups(denoiser)),
    }
    block_influence = dict(gains.block_influence) if gains is not None else {}
    return InfluenceScores(modules, granularity, list(capture.metadata.get("bucket_edges", [])), block_influence, metadata)
