"""SD3 / SD3.5 / Flux and adaLN modulation (issue 12): groups per family, exact math on tiny seeded configs,
save/load, the CLI end to end on tiny pipelines built from config (local tokenizers, no hub)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from slimdiff.arch import UnsupportedModelError, compressible_groups, find_groups
from slimdiff.arch.sites import sites_for
from slimdiff.decomposition.apply import decompose
from slimdiff.decomposition.groups import decompose_group
from slimdiff.scoring.influence import Granularity, group_widths
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from tests.helpers import (
    TINY_DENOISERS,
    TINY_DIT_DENOISERS,
    TINY_PROMPTS,
    cast,
    record_capture,
    rel_err,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    xw,
)

TIMESTEPS = (5, 180, 420, 610, 820, 990)
FAMILIES = {**TINY_DIT_DENOISERS, "pixart": TINY_DENOISERS["pixart"]}


def record(model, tiny, timesteps=TIMESTEPS) -> Capture:
    return record_capture(model, tiny, timesteps)


def test_groups_per_family():
    kinds = {name: {(g.kind, g.compressible) for g in find_groups(tiny.build(0))} for name, tiny in FAMILIES.items()}
    assert kinds["sd3"] == {("adaln", True), ("qk_joint", True), ("vo_joint", True), ("ffn", True)}
    # SD3.5: q/k RMSNorm leaves both QKs intact; the second (image-only) attention is a plain self-attention
    assert kinds["sd35"] == {("adaln", True), ("qk_joint", False), ("vo_joint", True), ("qk_self", False), ("vo_self", True),
                             ("ffn", True)}
    assert kinds["flux"] == {("adaln", True), ("qk_joint", False), ("vo_joint", True), ("qk_self", False), ("vo_single", True),
                             ("ffn", True), ("ffn_single", True)}
    assert ("adaln", True) in kinds["pixart"]
    sd3 = {g.name: g for g in find_groups(FAMILIES["sd3"].build(0))}
    last = max(int(name.split(".")[1]) for name in sd3 if name.startswith("transformer_blocks."))
    # the last SD3 block is context_pre_only: no text output projection, no text FFN
    assert sd3[f"transformer_blocks.{last}.attn.vo"].out == ("to_out.0",)
    assert f"transformer_blocks.{last}.ff_context" not in sd3 and "transformer_blocks.0.ff_context" in sd3
    flux = find_groups(FAMILIES["flux"].build(0))
    assert all("rotary" in g.note for g in flux if g.kind.startswith("qk"))


def test_modulation_linears_share_one_input():
    """Every modulation linear of SD3 and Flux reads silu(temb): the adapters capture it once, at one site."""
    for name in ("sd3", "sd35", "flux"):
        tiny = FAMILIES[name]
        model = tiny.build(0).double()
        modulations = [g for g in find_groups(model) if g.kind == "adaln"]
        assert len({g.sites for g in modulations}) == 1 and len(modulations) > 2
        seen: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(g.path).register_forward_pre_hook(
            lambda module, args, path=g.path: seen.__setitem__(path, args[0].detach().clone())) for g in modulations]
        with torch.no_grad():
            tiny.output(model, cast(tiny.inputs(model, 2, 500, 0), torch.float64))
        for handle in handles:
            handle.remove()
        first = seen[modulations[0].path]
        assert all(torch.equal(first, x) for x in seen.values()), name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_full_width_reproduces_output(name, device):
    tiny = FAMILIES[name]
    model = tiny.build(0).double().to(device)
    capture = record(model, tiny)
    reference = copy.deepcopy(model)
    decompose(model, capture, {g.name: g.width for g in compressible_groups(model)})
    inputs = cast(tiny.inputs(model, 2, 333, 99), torch.float64, device)
    with torch.no_grad():
        assert rel_err(tiny.output(reference, inputs), tiny.output(model, inputs)) < 1e-10


def _measured_error(old, new, group, capture) -> float:
    """A group's output error on the calibration covariance, from the weights the slim model actually holds."""
    if group.kind == "adaln":
        cov = capture.second_moment(group.sites[0])
        full = old.weight.detach().double().T
        cut = new.down.weight.detach().double().T @ new.up.weight.detach().double().T
        return float(torch.trace((full - cut).T @ cov @ (full - cut)))
    if group.kind in ("qk_joint", "vo_joint", "vo_single"):
        names = group.query if group.kind == "qk_joint" else group.value
        cov = capture.stacked_second_moment(group.sites, [old.get_submodule(n).bias is not None for n in names])
        old_in = torch.cat([xw(old.get_submodule(n)) for n in names])
        new_in = torch.cat([xw(new.get_submodule(n)) for n in names])
        if group.kind == "qk_joint":
            cov_k = capture.stacked_second_moment(group.sites, [old.get_submodule(n).bias is not None for n in group.key])
            old_k = torch.cat([xw(old.get_submodule(n)) for n in group.key])
            new_k = torch.cat([xw(new.get_submodule(n)) for n in group.key])
        else:
            def out_w(module, width):
                if group.kind == "vo_single":
                    return module.proj_out.weight.detach().double().T[: group.heads * width]
                return torch.cat([module.get_submodule(n).weight.detach().double().T for n in group.out], dim=1)
        hd, width = group.width, new_in.shape[1] // group.heads
        measured = 0.0
        for h in range(group.heads):
            if group.kind == "qk_joint":
                delta = (old_in[:, h * hd:(h + 1) * hd] @ old_k[:, h * hd:(h + 1) * hd].T
                         - new_in[:, h * width:(h + 1) * width] @ new_k[:, h * width:(h + 1) * width].T)
                measured += float(torch.trace(delta.T @ cov @ delta @ cov_k))
            else:
                delta = (old_in[:, h * hd:(h + 1) * hd] @ out_w(old, hd)[h * hd:(h + 1) * hd]
                         - new_in[:, h * width:(h + 1) * width] @ out_w(new, width)[h * width:(h + 1) * width])
                measured += float(torch.trace(delta.T @ cov @ delta))
        return measured
    raise AssertionError(group.kind)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_measured_error_equals_predicted_tail(name, device):
    """QK/VO of joint and single-block layouts and adaLN factorisations: the error measured from the slim weights on
    the calibration statistics equals the predicted tail (reg=0); the Flux MLP error equals the Nyström residual."""
    tiny = FAMILIES[name]
    model = tiny.build(0).double().to(device)
    capture = record(model, tiny, TIMESTEPS * 3)
    reference = copy.deepcopy(model)
    groups = [g for g in compressible_groups(model) if g.kind in ("qk_joint", "vo_joint", "vo_single", "ffn_single", "adaln")]
    widths = {g.name: group_widths(g, Granularity())[len(group_widths(g, Granularity())) // 2] for g in groups}
    assert all(widths[g.name] < g.width for g in groups)
    predicted = {g.name: decompose_group(reference, g, capture, reg=0.0) for g in groups}
    decompose(model, capture, widths, reg=0.0)
    for group in groups:
        old, new = reference.get_submodule(group.path), model.get_submodule(group.path)
        width = widths[group.name]
        if group.kind == "ffn_single":
            site = group.sites[0]
            cov = capture.second_moment(site)
            attention = new.attn.to_v.out_features
            keep = predicted[group.name].channels(width)
            w_down = old.proj_out.weight.detach().double().T[old.attn.to_v.out_features:]
            w_new = new.proj_out.weight.detach().double().T[attention:]
            measured = float(torch.trace(w_down.T @ cov @ w_down) - 2 * torch.trace(w_down.T @ cov[:, keep] @ w_new)
                             + torch.trace(w_new.T @ cov[keep][:, keep] @ w_new))
            schur = cov - cov[:, keep] @ torch.linalg.solve(cov[keep][:, keep], cov[keep])
            tail = float(torch.trace(w_down.T @ schur @ w_down))
            assert torch.equal(new.proj_mlp.weight, old.proj_mlp.weight[keep])
        else:
            measured = _measured_error(old, new, group, capture)
            tail = float(predicted[group.name].tail[width])
        assert measured == pytest.approx(tail, rel=1e-8, abs=1e-12 * max(1.0, abs(tail))), group.name
        assert tail > 0, group.name


def test_flux_single_block_parts_keep_each_other():
    """VO and MLP of a Flux single block share proj_out: cutting one leaves the other's columns exactly as they were."""
    tiny = FAMILIES["flux"]
    model = tiny.build(0).double()
    capture = record(model, tiny)
    reference = copy.deepcopy(model)
    groups = {g.kind: g for g in compressible_groups(model) if g.block == "single_transformer_blocks.0"}
    decompose(model, capture, {groups["ffn_single"].name: 24})
    old, new = reference.single_transformer_blocks[0].proj_out.weight, model.single_transformer_blocks[0].proj_out.weight
    attention = reference.single_transformer_blocks[0].attn.to_v.out_features
    assert new.shape == (old.shape[0], attention + 24) and torch.equal(new[:, :attention], old[:, :attention])
    model = copy.deepcopy(reference)
    decompose(model, capture, {groups["vo_single"].name: 3})
    new = model.single_transformer_blocks[0].proj_out.weight
    heads = groups["vo_single"].heads
    assert new.shape == (old.shape[0], heads * 3 + old.shape[1] - attention)
    assert torch.equal(new[:, heads * 3:], old[:, attention:])


def test_adaln_widths_only_where_the_factorisation_saves():
    group = next(g for g in find_groups(FAMILIES["sd3"].build(0)) if g.kind == "adaln")
    widths = group_widths(group, Granularity())
    d_in, d_out = group.in_features, group.out_features
    assert widths[-1] == group.width == min(d_in, d_out) and group.params_at(group.width) == d_in * d_out
    assert all(w * (d_in + d_out) < d_in * d_out for w in widths[:-1])
    assert (widths[-2] + 1) * (d_in + d_out) >= d_in * d_out  # every saving rank is on the grid


def test_unrecognised_block_variant_is_left_intact():
    """A block whose modulation norm the adapter does not know is reported and left intact, never guessed."""
    from diffusers.models.normalization import AdaLayerNormZero

    class CustomNorm(AdaLayerNormZero):
        pass

    for name, attr in (("sd3", "norm1"), ("flux", "norm1")):
        model = FAMILIES[name].build(0)
        block = model.transformer_blocks[0]
        custom = CustomNorm(block.norm1.linear.in_features)
        custom.__class__.__name__ = "CustomNorm"
        setattr(block, attr, custom)
        groups = [g for g in find_groups(model) if g.block == "transformer_blocks.0"]
        if name == "sd3":
            assert all(not g.compressible and ("not recognised" in g.note or "unrecognised" in g.note) for g in groups), groups
        else:
            assert all(not g.compressible for g in groups), groups
        assert any(g.compressible for g in find_groups(model) if g.block != "transformer_blocks.0")


def test_unknown_denoiser_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match=r"Linear has no supported transformer block.*SD3Transformer2DModel.*FluxTransformer2DModel"):
        find_groups(torch.nn.Linear(3, 3))


def test_latency_table_times_joint_attention_and_both_parts_of_flux_single_blocks(device):
    from slimdiff.planning.latency import latency_units, measure_latency_table

    tiny = FAMILIES["sd3"]
    sd3 = tiny.build(0).to(device)
    units = latency_units(sd3)
    assert {g.kind for u in units for g in u.groups} == {"qk_joint", "vo_joint", "ffn"}  # adaLN: not per token, not timed
    # the joint attention is timed as one unit on the inputs it saw in a real call (QK and VO held at one width)
    table = measure_latency_table(sd3, ((), cast(tiny.inputs(sd3, 2, 500, 0), torch.float32, device)), Granularity(),
                                  points=2, repeats=1)
    joint = [c for c in table.curves if any(name.endswith("attn.qk") for name in c.groups)]
    assert joint and all(len(c.groups) == 2 and c.widths == [1, 8] for c in joint)
    # a Flux single block: attention and MLP timed apart as two units of the block (their fused proj_out), each at
    # the other's full width; the additive model is checked against the block timed with both narrowed
    flux_tiny = FAMILIES["flux"]
    flux = flux_tiny.build(0).to(device)
    single = [u for u in latency_units(flux) if u.path.startswith("single_transformer_blocks.0")]
    assert sorted(g.kind for u in single for g in u.groups) == ["ffn_single", "vo_single"]
    assert {u.path for u in single} == {"single_transformer_blocks.0"} and len({u.label for u in single}) == 2
    table = measure_latency_table(flux, ((), cast(flux_tiny.inputs(flux, 2, 500, 0), torch.float32, device)), Granularity(),
                                  points=3, repeats=1)
    names = {c.unit for c in table.curves}
    assert {"single_transformer_blocks.0.attn.vo", "single_transformer_blocks.0.mlp"} <= names
    checks = table.settings["additivity"]
    assert checks and all(c["module"] == "single_transformer_blocks.0" and c["measured_ms"] > 0 for c in checks)
    # the prediction is the additive model on the curves (timings decide its value, not whether it is checked: with
    # one repeat on a busy machine it can even come out negative)
    curves = {c.unit: c for c in table.curves}
    for check in checks:
        parts = [curves[name] for name in check["widths"]]
        full = sum(part.ms[-1] for part in parts) / len(parts)
        saved = sum(part.ms[-1] - part.at(width) for part, width in zip(parts, check["widths"].values()))
        assert check["predicted_ms"] == pytest.approx(full - saved, rel=1e-12), check


# family: (pipeline builder, image side, pipeline class, a group kind the plan must hold)
CLI_FAMILIES = {
    "sdxl": (tiny_sdxl_pipeline, 16, "StableDiffusionXLPipeline", "qk_cross"),
    "sd3": (tiny_sd3_pipeline, 32, "StableDiffusion3Pipeline", "qk_joint"),
    "flux": (tiny_flux_pipeline, 32, "FluxPipeline", "vo_single"),
}


@pytest.mark.parametrize("name", list(CLI_FAMILIES))
def test_cli_compresses_tiny_pipeline_and_the_saved_model_reloads(name, tmp_path, capsys):
    """`slimdiff compress` on a saved tiny SDXL / SD3 / Flux pipeline: capture, gains, scores, plan, decomposition,
    save; the saved model reloads as its pipeline class and generates, and `slimdiff info` lists compressed and
    left-intact groups."""
    from slimdiff.cli import main
    from slimdiff.runtime.folder import describe, load
    from slimdiff.runtime.sampling import SamplerSettings

    build, side, pipeline_class, kind = CLI_FAMILIES[name]
    source = tmp_path / name
    build().save_pretrained(source)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS[:6]) + "\n")
    out = tmp_path / "out"
    assert main(["compress", str(source), "--prompts", str(prompts), "--budget", "0.3", "--steps", "2", "--height", str(side),
                 "--width", str(side), "--batch-size", "3", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    plan = json.loads((out / "width_plan.json").read_text())
    assert 0.3 <= plan["params"]["removed_fraction"] < 0.4
    info = describe(out)
    assert info["params"]["removed_fraction"] >= 0.3
    assert all(m["method"] != "not recorded" for m in info["modules"].values())
    assert kind in {m["kind"] for m in info["modules"].values()}
    if name != "sdxl":  # the allocator reached the modulation
        assert any(m["kind"] == "adaln" and m["width"] < m["full_width"] for m in info["modules"].values())
    if name == "flux":
        assert info["left_intact"] and all(v["kind"].startswith("qk") and "rotary" in v["note"] for v in info["left_intact"].values())
    reloaded = load(out)
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded).__name__ == pipeline_class
    sampler = SamplerSettings(num_inference_steps=2, guidance_scale=4.0, height=side, width=side, seed=0)
    images = reloaded(**sampler.pipe_kwargs(reloaded, TINY_PROMPTS[:2]), output_type="pt").images
    assert images.shape == (2, 3, side, side) and torch.isfinite(images).all()
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    listing = capsys.readouterr().out
    assert info["denoiser"] in listing and ("left intact" in listing) == bool(info["left_intact"])


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_save_load_round_trip_reproduces_the_compressed_denoiser(name, tmp_path):
    """Joint attention, Flux single blocks and factorised modulations come back from disk with the same structure,
    processors and outputs (strict safetensors load: a wrong shape would fail, never load random weights)."""
    from slimdiff.runtime.folder import load, save

    tiny = FAMILIES[name]
    pipe = tiny_sd3_pipeline(qk_norm="rms_norm", dual_attention_layers=(0,)) if name == "sd35" else tiny_flux_pipeline()
    model = pipe.transformer.double()
    capture = record(model, tiny)
    widths = {g.name: group_widths(g, Granularity())[len(group_widths(g, Granularity())) // 3] for g in compressible_groups(model)}
    decompose(model, capture, widths)
    pipe.transformer = model.float()
    save(pipe, tmp_path / "slim")
    loaded = load(tmp_path / "slim").transformer
    assert {g.name: g.width for g in compressible_groups(loaded)} == widths
    inputs = tiny.inputs(model, 2, 400, 7)
    with torch.no_grad():
        assert torch.equal(tiny.output(pipe.transformer, inputs), tiny.output(loaded, inputs))
    assert [type(m.processor).__name__ for m in loaded.modules() if hasattr(m, "processor")] == \
        [type(m.processor).__name__ for m in pipe.transformer.modules() if hasattr(m, "processor")]


def test_dit_per_block_modulation_and_full_width():
    """DiT (``DiTTransformer2DModel``): each block's ``AdaLayerNormZero`` reads its own timestep/class embedding, so each
    modulation is its own group and site; every group reproduces the output at full width."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).double().eval()
    groups = find_groups(model)
    modulations = [g for g in groups if g.kind == "adaln"]
    assert len(modulations) == 2 and len({g.sites for g in modulations}) == 2
    assert {g.kind for g in groups} == {"adaln", "qk_self", "vo_self", "ffn"}

    def inputs(t, seed):
        generator = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(4, 4, 8, 8, generator=generator, dtype=torch.float64),
                    timestep=torch.full((4,), t), class_labels=torch.randint(0, 10, (4,), generator=generator))

    with ActivationRecorder(model, sites_for(compressible_groups(model)), 4, 1000) as recorder, torch.no_grad():
        for i, t in enumerate(TIMESTEPS * 2):
            model(**inputs(t, i))
    capture = Capture(recorder.stats, {})
    reference = copy.deepcopy(model)
    decompose(model, capture, {g.name: g.width for g in compressible_groups(model)})
    with torch.no_grad():
        a, b = reference(**inputs(333, 99)).sample, model(**inputs(333, 99)).sample
    assert rel_err(a, b) < 1e-10
    cut = {g.name: group_widths(g, Granularity())[0] for g in modulations}
    decompose(model, capture, cut)
    assert all(type(model.get_submodule(g.path)).__name__ == "LowRankLinear" for g in modulations)
