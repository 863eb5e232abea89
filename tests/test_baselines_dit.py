"""Baselines on DiT groups (issue 26 item 5): SVD, SVD-LLM, ASVD, Wanda-sp and FLAP cut the joint attention, the Flux
single blocks (fused ``proj_out``) and the MLPs of tiny SD3 and Flux transformers through the code path and the
parameter accounting they use on UNets; each structured choice against a hand-written statement of its metric."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

import slimdiff.baselines as baselines
from slimdiff.arch import adapter_for, compressible_groups
from slimdiff.arch.sites import site_width, sites_for
from slimdiff.baselines import (
    BASELINE_KINDS,
    FactorizedLinear,
    baseline_groups,
    baseline_sites,
    compress_with,
    factorize,
    matrices,
)
from slimdiff.cost import count_params
from slimdiff.scoring.influence import Granularity
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from tests.helpers import TINY_DIT_DENOISERS, TinyDenoiser, rel_err

FAMILIES = ("sd3", "flux")
FACTORISED = ("svd", "svd_llm", "asvd")
STRUCTURED = ("wanda_sp", "flap")
BUDGET = 0.3
TIMESTEPS = (100, 400, 700, 950)
TEXT_TOKENS = 5  # image tokens: 16 (8x8 latents in 2x2 patches)


@dataclass(frozen=True)
class Setup:
    """A tiny seeded DiT, its capture with the baselines' sites, a held-out call and its output."""

    tiny: TinyDenoiser
    model: nn.Module
    capture: Capture
    inputs: dict
    reference: torch.Tensor


def inputs(tiny: TinyDenoiser, model: nn.Module, batch: int, timestep: int, seed: int) -> dict:
    """``tiny``'s random inputs with ``TEXT_TOKENS`` text tokens: fewer than the 16 image tokens, so that a joint
    attention's streams have unequal token shares (equal shares would hide how the streams are weighted)."""
    args = tiny.inputs(model, batch, timestep, seed)
    args["encoder_hidden_states"] = args["encoder_hidden_states"][:, :TEXT_TOKENS]
    if "txt_ids" in args:
        args["txt_ids"] = args["txt_ids"][:TEXT_TOKENS]
    return args


def record(model: nn.Module, tiny: TinyDenoiser, sites: list[str]) -> Capture:
    """Statistics of ``sites`` over one call of 2 samples at each of ``TIMESTEPS``."""
    with ActivationRecorder(model, sites, 4, 1000, timestep_scale=adapter_for(model).TIMESTEP_SCALE) as recorder, \
            torch.no_grad():
        for i, t in enumerate(TIMESTEPS):
            tiny.output(model, inputs(tiny, model, 2, t, i))
    return Capture(recorder.stats, {})


@functools.cache
def setup(name: str) -> Setup:
    tiny = TINY_DIT_DENOISERS[name]
    model = tiny.build(0)
    stats = record(model, tiny, list(dict.fromkeys(sites_for(compressible_groups(model)) + baseline_sites(model))))
    held_out = inputs(tiny, model, 2, 500, 11)
    with torch.no_grad():
        reference = tiny.output(model, held_out)
    return Setup(tiny, model, stats, held_out, reference)


@functools.cache
def compressed(name: str, method: str) -> tuple[nn.Module, dict]:
    """``method`` at the 30% budget on its own copy of the family's model (shared by the tests: do not modify)."""
    s = setup(name)
    model = copy.deepcopy(s.model)
    return model, compress_with(method, model, s.capture, None, BUDGET)


def max_step(model: nn.Module) -> int:
    """The most parameters one width step (structured) or one rank step (factorised) can remove."""
    granularity = Granularity()
    structured = max(g.unit_params * granularity.step(g.kind) for g in baseline_groups(model))
    return max(structured, max(m.d_in + m.d_out for m in matrices(model)))


# ---- which linears, which statistics -----------------------------------------------------------------

EXPECTED_MATRICES = {
    # SD3: QK and VO of the joint attention (both streams; the last block is context_pre_only: no to_add_out and no
    # ff_context), the FFNs
    "sd3": [f"transformer_blocks.{b}.{n}" for b in (0, 1) for n in (
        "attn.to_q", "attn.add_q_proj", "attn.to_k", "attn.add_k_proj", "attn.to_v", "attn.add_v_proj", "attn.to_out.0",
        *(["attn.to_add_out"] if b == 0 else []), "ff.net.0.proj", "ff.net.2",
        *(["ff_context.net.0.proj", "ff_context.net.2"] if b == 0 else []))],
    # Flux: QK intact (RMSNorm + RoPE); double block VO and FFNs, single blocks' to_v, proj_mlp and the fused proj_out
    "flux": [f"transformer_blocks.0.{n}" for n in (
        "attn.to_v", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
        "ff_context.net.0.proj", "ff_context.net.2")]
    + [f"single_transformer_blocks.{b}.{n}" for b in (0, 1) for n in ("attn.to_v", "proj_out", "proj_mlp")],
}


@pytest.mark.parametrize("name", FAMILIES)
def test_every_dit_linear_is_a_matrix_read_from_its_own_input(name):
    """Every linear of every compressible non-adaLN group is listed once; the site each is factorised with is a
    captured site holding exactly that linear's input (checked against hooks on the linear itself)."""
    s = setup(name)
    mats = matrices(s.model)
    assert sorted(m.path for m in mats) == sorted(EXPECTED_MATRICES[name])
    assert {g.kind for g in baseline_groups(s.model)} <= set(BASELINE_KINDS) and "adaln" not in BASELINE_KINDS
    own = set(sites_for(compressible_groups(s.model)))
    assert all(m.site in own or m.site in baseline_sites(s.model) for m in mats)
    if name == "flux":  # the whole input of the fused proj_out: SlimDiff's capture holds its MLP columns only
        assert "single_transformer_blocks.0.proj_out" in baseline_sites(s.model)
        assert "single_transformer_blocks.0.proj_out[16:80]" in own
    by_own_input = record(s.model, s.tiny, list(dict.fromkeys([m.path for m in mats] + [m.site for m in mats])))
    for m in mats:
        assert site_width(s.model, m.site) == m.d_in
        torch.testing.assert_close(by_own_input.second_moment(m.site, augment=True),
                                   by_own_input.second_moment(m.path, augment=True), rtol=0, atol=0, msg=m.path)


# ---- budget, accounting, the model still runs ----------------------------------------------------------

@pytest.mark.parametrize("method", FACTORISED + STRUCTURED)
@pytest.mark.parametrize("name", FAMILIES)
def test_meets_budget_within_one_step_and_still_runs(name, method):
    s = setup(name)
    model, report = compressed(name, method)
    assert report["target_removed"] <= report["removed"] < report["target_removed"] + max_step(s.model)
    assert report["total_before"] - report["total_after"] == report["removed"]  # the accounting sees every cut
    before, after = count_params(s.model)["groups"], count_params(model)["groups"]
    assert before.keys() == after.keys() and all(after[g] <= before[g] for g in before)
    groups = {g.name: g for g in compressible_groups(s.model)}
    kinds = {name: g.kind for name, g in groups.items()}
    assert before == {name: g.params_at(g.width) for name, g in groups.items()}  # counted = the groups' arithmetic
    assert all(after[g] == before[g] for g in before if kinds[g] == "adaln")  # modulations stay whole
    if method in STRUCTURED:
        widths = report["settings"]["widths"]
        assert set(widths) == {g.name for g in baseline_groups(s.model)}
        assert all(after[name] == groups[name].params_at(width) for name, width in widths.items())
    # the DiT groups are cut, not only the FFNs
    cut = {kinds[g] for g in before if after[g] < before[g]}
    assert {"vo_joint", "ffn"} <= cut and ({"vo_single", "ffn_single"} <= cut if name == "flux" else "qk_joint" in cut)
    if method in FACTORISED:
        joint = {"sd3": ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.to_add_out"],
                 "flux": ["transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.attn.to_add_out",
                          "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp"]}[name]
        assert all(isinstance(model.get_submodule(p), FactorizedLinear) for p in joint)
        assert all(isinstance(model.get_submodule(p), FactorizedLinear) for p in report["settings"]["ranks"])
    if name == "flux":  # a single block's two groups share proj_out: between them they count all of its weights
        block = model.get_submodule("single_transformer_blocks.0")
        weights = sum(p.numel() for p in block.proj_out.parameters()) - block.proj_out.bias.numel()
        shares = after["single_transformer_blocks.0.attn.vo"] + after["single_transformer_blocks.0.mlp"]
        assert shares == weights + sum(p.numel() for p in [*block.attn.to_v.parameters(), *block.proj_mlp.parameters()])
    with torch.no_grad():
        out = s.tiny.output(model, s.inputs)
    assert out.shape == s.reference.shape and torch.isfinite(out).all()
    assert rel_err(s.reference, out) < 0.5


def _replace_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    holder = root.get_submodule(parent)
    if child.isdigit():
        holder[int(child)] = module
    else:
        setattr(holder, child, module)


@pytest.mark.parametrize("method", FACTORISED)
@pytest.mark.parametrize("name", FAMILIES)
def test_full_rank_factorisation_reproduces_outputs(name, method):
    """At full rank every factorisation is W T T^-1 = W (closed form): each factor product equals its weight, and the
    model with every DiT linear factorised (float64) gives the original output."""
    s = setup(name)
    original = copy.deepcopy(s.model).double()
    model = copy.deepcopy(original)
    for m in matrices(original):
        linear = original.get_submodule(m.path)
        stats = s.capture.sites[m.site]
        factor = factorize(linear, m.full_rank, method, cov=stats.sum_outer,
                           magnitude=stats.sum_abs / int(stats.count.sum()) if method == "asvd" else None)
        product = factor[1].weight @ factor[0].weight
        assert rel_err(linear.weight.detach(), product.detach()) < 1e-9, m.path
        assert (factor.bias is None) == (linear.bias is None)
        assert linear.bias is None or torch.equal(factor.bias, linear.bias)
        _replace_module(model, m.path, factor)
    inputs = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in s.inputs.items()}
    with torch.no_grad():
        assert rel_err(s.tiny.output(original, inputs), s.tiny.output(model, inputs)) < 1e-9


# ---- the structured baselines against their metrics, written out ------------------------------------------

def kept_rows(old: nn.Linear, new: nn.Linear) -> torch.Tensor:
    """The output rows of ``old`` that ``new`` kept, in order."""
    return torch.tensor([int(torch.nonzero((old.weight == new.weight[r]).all(1))[0]) for r in range(new.out_features)])


def kept_columns(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The columns of weight ``old`` that weight ``new`` kept, in order."""
    return torch.tensor([int(torch.nonzero((old == new[:, [c]]).all(0))[0]) for c in range(new.shape[1])])


def official_top(metric: torch.Tensor, width: int) -> torch.Tensor:
    """FLAP repo ``prune_wanda_sp``'s rule, per head: keep metric >= the width-th largest (flat unit indices)."""
    kept = []
    for h, row in enumerate(metric.reshape(-1, metric.shape[-1])):
        keep = torch.nonzero(row >= torch.sort(row)[0][row.numel() - width]).reshape(-1)
        assert keep.numel() == width, "tied scores at the threshold"
        kept.append(keep + h * row.numel())
    return torch.cat(kept)


def moments(capture: Capture, site: str, columns: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(E[x_j^2], E[x_j], tokens) of a site's channels ``columns``."""
    aug = capture.second_moment(site, augment=True)
    return torch.diagonal(aug)[:-1][columns], aug[:-1, -1][columns], int(capture.sites[site].count.sum())


def output_streams(s: Setup, group) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(W_s columns of the group's units, E[x^2], E[x], tokens) of every output linear reading the group, from the
    uncompressed model; a single block's MLP columns from SlimDiff's own site of them (the baselines slice the whole
    proj_out input)."""
    module = s.model.get_submodule(group.path)
    if group.kind == "vo_joint":
        return [(module.get_submodule(n).weight.detach().double(), *moments(s.capture, f"{group.path}.{n}"))
                for n in group.out]
    weight = module.proj_out.weight.detach().double()
    attention = module.attn.to_v.out_features
    if group.kind == "vo_single":
        return [(weight[:, :attention], *moments(s.capture, f"{group.path}.proj_out", slice(0, attention)))]
    return [(weight[:, attention:], *moments(s.capture, group.sites[0]))]


def official_metric(s: Setup, group, method: str) -> torch.Tensor:
    """Wanda-sp (FLAP repo ``prune_wanda_sp``: mean over output rows of |W| * ||x||) and FLAP (``prune_flap``, WIFV:
    Var(x_j) sum_i W[i, j]^2, squared for attention) with a joint attention's output linears stacked as one layer over
    all tokens: each weight's activation statistic over its own stream's tokens, p_s = n_s / n (||x|| / sqrt(n) =
    sqrt(p_s) rms_s; the summed fluctuation energy / n = sum_s p_s Var_s ||W_s[:, j]||^2). QK (ours): rms(q) rms(k)
    and E[q^2] Var(k) over every query and key token of both streams."""
    module = s.model.get_submodule(group.path)
    if group.kind == "qk_joint":
        tokens = [int(s.capture.sites[site].count.sum()) for site in group.sites]
        pooled = {}
        for role, names in (("q", group.query), ("k", group.key)):
            second = mean = 0
            for name, site, n in zip(names, group.sites, tokens):
                linear = module.get_submodule(name)
                w = torch.cat([linear.weight.detach().double(), linear.bias.detach().double()[:, None]], 1)
                aug = s.capture.second_moment(site, augment=True)
                second = second + n / sum(tokens) * torch.einsum("oi,ij,oj->o", w, aug, w)
                mean = mean + n / sum(tokens) * (w @ aug[:, -1])
            pooled[role] = (second, mean)
        (q2, _), (k2, k1) = pooled["q"], pooled["k"]
        metric = (q2 * k2).sqrt() if method == "wanda_sp" else (q2 * (k2 - k1**2)) ** 2
        return metric.reshape(group.heads, group.width)
    streams = output_streams(s, group)
    total = sum(n for *_, n in streams)
    if method == "wanda_sp":
        rows = torch.cat([w.abs() * ((n / total) ** 0.5 * second.sqrt())[None, :] for w, second, _, n in streams])
        metric = rows.mean(0)
    else:
        metric = sum(n / total * (second - mean**2) * w.pow(2).sum(0) for w, second, mean, n in streams)
    if group.kind == "ffn_single":
        return metric
    return (metric if method == "wanda_sp" else metric**2).reshape(group.heads, group.width)


# the DiT kinds written out above, and what each family must have cut (some of) at 30%: SD3's joint QK and VO (one
# block with both output streams, the context_pre_only one with the image output only), Flux's joint VO and its
# single blocks' attention and MLP (both reading the fused proj_out)
DIT_KINDS = ("qk_joint", "vo_joint", "vo_single", "ffn_single")
MUST_CHECK = {"sd3": {"qk_joint", "vo_joint"}, "flux": {"vo_joint", "vo_single", "ffn_single"}}


def kept_units(s: Setup, model: nn.Module, group) -> dict[str, torch.Tensor]:
    """The units the compressed ``model`` kept, read from each linear of the group: rows of every projection, columns
    of every output linear (the group's part of a fused proj_out)."""
    old, new = s.model.get_submodule(group.path), model.get_submodule(group.path)
    rows = {"qk_joint": group.query + group.key, "vo_joint": group.value, "vo_single": group.value,
            "ffn_single": (group.up,)}[group.kind]
    kept = {name: kept_rows(old.get_submodule(name), new.get_submodule(name)) for name in rows}
    if group.kind == "vo_joint":
        for name in group.out:
            kept[name] = kept_columns(old.get_submodule(name).weight, new.get_submodule(name).weight)
    elif group.kind in ("vo_single", "ffn_single"):
        attention, new_attention = old.attn.to_v.out_features, new.attn.to_v.out_features
        if group.kind == "vo_single":
            kept["proj_out"] = kept_columns(old.proj_out.weight[:, :attention], new.proj_out.weight[:, :new_attention])
        else:
            kept["proj_out"] = kept_columns(old.proj_out.weight[:, attention:], new.proj_out.weight[:, new_attention:])
    return kept


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("name", FAMILIES)
def test_structured_keeps_the_top_units_of_the_official_metric(name, method):
    """Every cut DiT group keeps, in each of its linears, the per-head top units of the metric written out above."""
    s = setup(name)
    model, report = compressed(name, method)
    checked = []
    for group in baseline_groups(s.model):
        width = report["settings"]["widths"][group.name]
        if group.kind not in DIT_KINDS or width == group.width:
            continue
        expected = official_top(official_metric(s, group, method), width)
        for linear, kept in kept_units(s, model, group).items():
            assert torch.equal(kept, expected), (group.name, linear)
        checked.append(group)
    assert MUST_CHECK[name] <= {g.kind for g in checked}
    assert "transformer_blocks.0.attn.vo" in {g.name for g in checked}  # both output streams


def compensated_bias(old: nn.Linear, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """b + W[:, removed] E[x_removed] summed over ``parts``: (a group's W columns, the kept ones, their E[x])."""
    bias = old.bias.detach().double()
    for weight, kept, mean in parts:
        removed = torch.ones(weight.shape[1], dtype=torch.bool)
        removed[kept] = False
        bias = bias + weight[:, removed] @ mean[removed]
    return bias


@pytest.mark.parametrize("name", FAMILIES)
def test_flap_bias_compensation_is_the_closed_form(name):
    """FLAP's ``compress``: b' = b + W[:, removed] E[x_removed] on every output linear, with its own stream's mean
    (joint attention: to_out.0 with the image tokens', to_add_out with the text tokens'); a fused proj_out gets the
    terms of both its groups (attention and MLP columns)."""
    s = setup(name)
    model, report = compressed(name, "flap")
    groups = {g.name: g for g in baseline_groups(s.model)}
    joint = groups["transformer_blocks.0.attn.vo"]
    kept = kept_units(s, model, joint)
    old, new = s.model.get_submodule(joint.path), model.get_submodule(joint.path)
    checks = [(new.get_submodule(n).bias, old.get_submodule(n),
               compensated_bias(old.get_submodule(n), [(old.get_submodule(n).weight.detach().double(), kept[n],
                                                        moments(s.capture, f"{joint.path}.{n}")[1])]))
              for n in joint.out]
    compensated = [joint]
    if name == "flux":
        vo, mlp = groups["single_transformer_blocks.0.attn.vo"], groups["single_transformer_blocks.0.mlp"]
        old, new = s.model.get_submodule(vo.path), model.get_submodule(vo.path)
        attention = old.attn.to_v.out_features
        weight = old.proj_out.weight.detach().double()
        parts = [(weight[:, :attention], kept_units(s, model, vo)["proj_out"],
                  moments(s.capture, f"{vo.path}.proj_out", slice(0, attention))[1]),
                 (weight[:, attention:], kept_units(s, model, mlp)["proj_out"], moments(s.capture, mlp.sites[0])[1])]
        checks.append((new.proj_out.bias, old.proj_out, compensated_bias(old.proj_out, parts)))
        compensated += [vo, mlp]
    assert {g.name for g in compensated} <= set(report["settings"]["bias_compensated"])
    for got, original, want in checks:
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-6, atol=1e-6)
        assert rel_err(original.bias.detach().double(), want) > 1e-3  # the compensation moved the bias


# ---- errors -------------------------------------------------------------------------------------------

def test_a_kind_no_baseline_cuts_is_refused_by_name(monkeypatch):
    s = setup("flux")
    groups = compressible_groups(s.model)
    odd = [replace(g, kind="vo_temporal") if g.kind == "vo_single" else g for g in groups]
    monkeypatch.setattr(baselines, "compressible_groups", lambda denoiser: odd)
    with pytest.raises(ValueError, match=r"baseline 'flap' cannot cut the vo_temporal groups of FluxTransformer2DModel"):
        compress_with("flap", copy.deepcopy(s.model), s.capture, None, BUDGET)
    with pytest.raises(ValueError, match=r"cannot cut 'vo_temporal' groups \(single_transformer_blocks.0.attn.vo\)"):
        baselines._group_linears(odd[[g.kind for g in odd].index("vo_temporal")])
