"""LoRAs of the original model projected onto the compressed one (issue 25, docs/lora.md)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import slimdiff
from slimdiff.arch import compressible_groups
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.cli import main
from slimdiff.compress import SlimDiffConfig, compress_pipeline
from slimdiff.decomposition.apply import decompose
from slimdiff.decomposition.closed_form import DEFAULT_REG, regularize
from slimdiff.runtime.folder import CompressedModelError
from slimdiff.runtime.lora import EXACT, LEAST_SQUARES, LoraError, merge_maps, project_lora, read_maps
from slimdiff.runtime.sampling import SamplerSettings
from benchmarks.lora_projection import cut_lora
from tests.helpers import TINY_PROMPTS, tiny_flux_pipeline, tiny_sd_pipeline

BUILD = {"sd": tiny_sd_pipeline, "flux": tiny_flux_pipeline}
# every kind of linear the compressor changes, by family (Flux: double and single blocks, adaLN modulations)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "add_q_proj", "add_k_proj", "add_v_proj",
           "to_add_out", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out", "norm1.linear",
           "norm1_context.linear", "norm.linear")


@pytest.fixture(scope="module", params=["sd", "flux"])
def family(request, tmp_path_factory):
    """(name, original pipeline, the one compressed at 40 % and its folder, the one decomposed at full width and its
    folder, the capture)."""
    name = request.param
    original = BUILD[name]()
    slim = copy.deepcopy(original)
    result = compress_pipeline(slim, TINY_PROMPTS[:8], SlimDiffConfig(budget=0.4, batch_size=4), SamplerSettings(2),
                               progress=False)
    root = tmp_path_factory.mktemp(f"lora-{name}")
    folder = slimdiff.save(slim, root / "slim", result.info("tiny"), lora_maps=result.lora_maps)
    full = copy.deepcopy(original)
    _, denoiser = denoiser_of(full)
    groups = decompose(denoiser, result.capture, {g.name: g.width for g in compressible_groups(denoiser)})
    full_folder = slimdiff.save(full, root / "full", lora_maps=merge_maps(m for g in groups for m in g.maps))
    return name, original, slim, folder, full, full_folder, result.capture


def _random_lora(denoiser: nn.Module, prefix: str, rank: int = 3, seed: int = 0, scale: float = 0.3) -> dict:
    """A PEFT-layout LoRA on every target linear of ``denoiser``, its delta ``scale`` times the weight's RMS."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in denoiser.named_modules():
        if isinstance(module, nn.Linear) and name.endswith(TARGETS) and "blocks" in name:
            rms = float(module.weight.detach().pow(2).mean().sqrt())
            state[f"{prefix}.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
            state[f"{prefix}.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * scale * rms
    return state


def _denoise(pipe, seed: int = 1) -> torch.Tensor:
    key, denoiser = denoiser_of(pipe)
    generator = torch.Generator().manual_seed(seed)
    config = denoiser.config
    with torch.no_grad():
        if key == "unet":
            sample = torch.randn(2, config.in_channels, 8, 8, generator=generator)
            text = torch.randn(2, 16, config.cross_attention_dim, generator=generator)
            return denoiser(sample, torch.tensor([500, 500]), text).sample
        tokens = torch.randn(2, 16, config.in_channels, generator=generator)
        text = torch.randn(2, 8, config.joint_attention_dim, generator=generator)
        pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
        return denoiser(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=pooled,
                        timestep=torch.tensor([0.5, 0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
                        return_dict=False)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_map_is_the_transform_the_compressor_applied_to_the_weights(family):
    """J_out W J_in^T of each original weight is the slim weight: the LoRA delta moves as the base weights did."""
    name, original, slim, folder, *_ = family
    key, maps, config = read_maps(folder)
    assert config["version"] == 3
    hows = {m.how for m in maps.values()}
    assert hows == {EXACT, LEAST_SQUARES}, hows
    assert all(m.predicted_error is not None and 0 <= m.predicted_error <= 1 for m in maps.values())
    original_denoiser, slim_denoiser = denoiser_of(original)[1], denoiser_of(slim)[1]
    for module, item in maps.items():
        weight = original_denoiser.get_submodule(module).weight.detach()
        lora_a, lora_b = item.project(torch.eye(weight.shape[1]), weight)
        slim_weight = slim_denoiser.get_submodule(item.target).weight.detach()
        assert lora_b.shape[0] == item.slim_out_features and lora_a.shape[1] == item.slim_in_features
        assert _rel(lora_b @ lora_a, slim_weight) < 1e-5, (module, item.how)
    if name == "flux":  # the fused proj_out of a single block carries an attention and an MLP map at once
        assert any(len(m.inputs) == 2 for m in maps.values())


def test_at_full_width_the_projected_lora_reproduces_the_original_with_its_lora(family, tmp_path):
    name, original, _, _, full, full_folder, _ = family
    key = denoiser_of(original)[0]
    save_file(_random_lora(denoiser_of(original)[1], key), tmp_path / "lora.safetensors")
    projection = project_lora(tmp_path / "lora.safetensors", full_folder, tmp_path / "projected.safetensors")
    assert projection.counts()[EXACT] > 0  # query/key/value/out changed basis even at full width
    reference = copy.deepcopy(original)
    reference.load_lora_weights(str(tmp_path / "lora.safetensors"))
    loaded = slimdiff.load(full_folder)
    loaded.load_lora_weights(str(tmp_path / "projected.safetensors"))
    effect = _denoise(reference) - _denoise(original)
    assert float(effect.norm() / _denoise(original).norm()) > 1e-3  # the LoRA does something
    assert _rel(_denoise(loaded), _denoise(reference)) < 1e-5  # the goal (float32 weights)


def test_compressed_projection_keeps_more_of_the_effect_than_cutting_shapes(family, tmp_path):
    """At 40 % the projected LoRA's effect on the slim model is closer to the original LoRA's effect than a LoRA cut
    to the slim shapes (the first rows and columns), the naive way to make it load."""
    name, original, slim, folder, *_ = family
    key = denoiser_of(original)[0]
    state = _random_lora(denoiser_of(original)[1], key)
    save_file(state, tmp_path / "lora.safetensors")
    project_lora(tmp_path / "lora.safetensors", folder, tmp_path / "projected.safetensors")
    _, maps, _ = read_maps(folder)
    cut = cut_lora(state, key, maps, denoiser_of(slim)[1])  # the benchmark's naive baseline
    save_file(cut, tmp_path / "cut.safetensors")
    with_lora = copy.deepcopy(original)
    with_lora.load_lora_weights(str(tmp_path / "lora.safetensors"))
    wanted = _denoise(with_lora) - _denoise(original)
    effects = {}
    for variant in ("projected", "cut"):
        loaded = slimdiff.load(folder)
        base = _denoise(loaded)
        loaded.load_lora_weights(str(tmp_path / f"{variant}.safetensors"))
        effects[variant] = _rel(_denoise(loaded) - base, wanted)
    assert effects["projected"] < effects["cut"], effects


def test_ffn_down_delta_is_the_nystrom_least_squares_fit(family, tmp_path):
    """The projected delta of a down projection is argmin_D E|h dW - h_S D|^2 under the regularised hidden moment."""
    name, original, _, folder, _, _, capture = family
    _, maps, _ = read_maps(folder)
    key, denoiser = denoiser_of(original)
    groups = {g.path: g for g in compressible_groups(denoiser) if g.kind == "ffn"}
    module = next(m for m in maps if m.endswith(".net.2") and m[: -len(".net.2")] in groups
                  and maps[m].inputs[0].matrix is not None)  # an FFN narrowed at 40 %
    group = groups[module[: -len(".net.2")]]
    from slimdiff.decomposition.groups import group_statistics

    cov = regularize(group_statistics(denoiser, group, capture)[0], DEFAULT_REG)
    keep = maps[module].inputs[0].index
    lora_a, lora_b = torch.randn(3, group.width, dtype=torch.float64), torch.randn(group.out_features, 3, dtype=torch.float64)
    delta = (lora_b @ lora_a).T  # X W layout (hidden x out)
    expected = torch.linalg.solve(cov[keep][:, keep], cov[keep] @ delta)
    projected_a, projected_b = maps[module].project(lora_a, lora_b)
    assert maps[module].inputs[0].matrix.dtype == torch.float32  # the maps are stored in the model's dtype
    assert _rel((projected_b @ projected_a).T, expected) < 1e-4


def test_adaln_delta_is_the_whitened_least_squares_fit_onto_the_first_factor(tmp_path):
    """A factorised adaLN modulation takes the delta on its second factor: argmin_D E|x dW - x F D|^2."""
    pipe = tiny_flux_pipeline()
    original = copy.deepcopy(pipe.transformer)
    result = compress_pipeline(pipe, TINY_PROMPTS[:8], SlimDiffConfig(budget=0.3, batch_size=4), SamplerSettings(2),
                               progress=False)
    adaln = [g for g in compressible_groups(original) if g.kind == "adaln"]
    model = copy.deepcopy(original)
    groups = decompose(model, result.capture, {g.name: max(1, g.width // 4) for g in adaln})
    maps = merge_maps(m for g in groups for m in g.maps)
    assert maps and all(m.target.endswith(".up") and m.how == LEAST_SQUARES for m in maps.values())
    from slimdiff.decomposition.groups import group_statistics

    group = adaln[0]
    item = maps[group.path]
    cov = regularize(group_statistics(original, group, result.capture)[0], DEFAULT_REG)
    first = model.get_submodule(group.path).down.weight.detach().T.to(torch.float64)  # (d_in, k)
    lora_a = torch.randn(2, group.in_features, dtype=torch.float64)
    lora_b = torch.randn(original.get_submodule(group.path).out_features, 2, dtype=torch.float64)
    chol = torch.linalg.cholesky(cov)
    expected = torch.linalg.lstsq(chol.T @ first, chol.T @ (lora_b @ lora_a).T).solution  # (k, d_out)
    projected_a, projected_b = item.project(lora_a, lora_b)
    assert _rel((projected_b @ projected_a).T, expected) < 1e-4


def test_kohya_layout_with_alpha_projects_like_peft_with_the_scale_folded_in(family, tmp_path):
    name, original, _, folder, *_ = family
    if name != "sd":
        pytest.skip("the kohya layout is checked on the UNet")
    denoiser = denoiser_of(original)[1]
    module = next(n for n, m in denoiser.named_modules() if n.endswith("attn1.to_q"))
    linear = denoiser.get_submodule(module)
    lora_a, lora_b = torch.randn(4, linear.in_features), torch.randn(linear.out_features, 4)
    kohya = "lora_unet_" + module.replace(".", "_")
    save_file({f"{kohya}.lora_down.weight": lora_a, f"{kohya}.lora_up.weight": lora_b, f"{kohya}.alpha": torch.tensor(2.0)},
              tmp_path / "kohya.safetensors")
    save_file({f"unet.{module}.lora_A.weight": lora_a, f"unet.{module}.lora_B.weight": lora_b * 0.5},
              tmp_path / "peft.safetensors")
    project_lora(tmp_path / "kohya.safetensors", folder, tmp_path / "a.safetensors")
    project_lora(tmp_path / "peft.safetensors", folder, tmp_path / "b.safetensors")
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert sorted(a) == sorted(b) == [f"unet.{module}.lora_A.weight", f"unet.{module}.lora_B.weight"]
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-6, atol=1e-7), key


def test_bad_loras_and_folders_fail_in_one_line_and_write_nothing(family, tmp_path, capsys):
    name, original, slim, folder, *_ = family
    key, denoiser = denoiser_of(original)
    module = next(n for n, m in denoiser.named_modules() if n.endswith("to_q"))
    linear = denoiser.get_submodule(module)
    out = tmp_path / "out.safetensors"
    cases = {
        "another model": ({f"{key}.{module}.lora_A.weight": torch.randn(2, linear.in_features + 1),
                           f"{key}.{module}.lora_B.weight": torch.randn(linear.out_features, 2)}, "a LoRA of another model"),
        "missing module": ({f"{key}.nowhere.to_q.lora_A.weight": torch.randn(2, 4),
                            f"{key}.nowhere.to_q.lora_B.weight": torch.randn(4, 2)}, "does not have"),
        "half a pair": ({f"{key}.{module}.lora_A.weight": torch.randn(2, linear.in_features)}, "has only its A"),
        "dora": ({f"{key}.{module}.lora_A.weight": torch.randn(2, linear.in_features),
                  f"{key}.{module}.lora_B.weight": torch.randn(linear.out_features, 2),
                  f"{key}.{module}.lora_magnitude_vector": torch.randn(linear.out_features)}, "DoRA"),
    }
    for case, (state, expected) in cases.items():
        save_file(state, tmp_path / f"{case}.safetensors")
        with pytest.raises(LoraError, match=expected):
            project_lora(tmp_path / f"{case}.safetensors", folder, out)
        assert not out.exists(), case
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x04\x95 not a safetensors file")
    assert main(["lora", str(tmp_path / "pickle.bin"), "--model", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "never unpickles" in err
    old = slimdiff.save(copy.deepcopy(slim), tmp_path / "old")  # saved without maps, as before config version 3
    save_file(cases["another model"][0], tmp_path / "ok.safetensors")
    with pytest.raises(CompressedModelError, match="without LoRA maps"):
        project_lora(tmp_path / "ok.safetensors", old, out)
    assert not out.exists()


def test_cli_projects_and_reports(family, tmp_path, capsys):
    name, original, _, folder, *_ = family
    key, denoiser = denoiser_of(original)
    save_file(_random_lora(denoiser, key), tmp_path / "lora.safetensors")
    out = tmp_path / "projected.safetensors"
    assert main(["lora", str(tmp_path / "lora.safetensors"), "--model", str(folder), "--out", str(out), "--table"]) == 0
    printed = capsys.readouterr().out
    assert "exact" in printed and "least squares" in printed and str(out) in printed.splitlines()[-1]
    assert "predicted relative error" in printed and "0 dropped" in printed.splitlines()[-1]
    assert main(["lora", str(tmp_path / "lora.safetensors"), "--model", str(folder), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
