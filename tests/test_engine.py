"""Compression engine on tiny seeded denoisers: one mixin, every architecture (issue 2), on every device.

The mixin's tests take the ``device`` fixture (tests/conftest.py): they run on the CPU, and on CUDA where
present, with the same assertions and tolerances; float64 tests stay float64 on CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimdiff.arch import UnsupportedModelError, compressible_groups, find_groups
from slimdiff.arch.sites import group_input_sites, sites_for
from slimdiff.decomposition.apply import decompose
from slimdiff.decomposition.groups import decompose_group
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture, SiteStats, merge_captures
from tests.helpers import TINY_DENOISERS, cast, record_capture, rel_err, xw

TIMESTEPS = (5, 180, 420, 610, 820, 990)


@pytest.fixture(autouse=True)
def no_tf32_convolutions():
    """CUDA convolutions default to TF32 (a 10-bit mantissa) in float32; the tolerances here are for the engine's own
    float32/float64 math, which never uses TF32, so the model's convolutions run in full float32 too."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


def record(model, tiny, timesteps=TIMESTEPS, batch=4, seed=0, num_buckets=4) -> Capture:
    return record_capture(model, tiny, timesteps, batch, seed, num_buckets)


class CompressionTesterMixin:
    """Checks every denoiser family the same way: groups, exactness at full width, predicted errors."""

    tiny_name: str

    @property
    def tiny(self):
        return TINY_DENOISERS[self.tiny_name]

    def built(self, dtype=torch.float64, device: torch.device | str = "cpu"):
        return self.tiny.build(0).to(device, dtype)

    def test_groups_cover_every_block(self, device):
        groups = find_groups(self.built(device=device))
        # adaLN modulations (PixArt's shared adaln_single): tests/test_families.py
        groups = [g for g in groups if g.kind != "adaln"]
        blocks = {g.block for g in groups}
        for block in blocks:
            kinds = sorted(g.kind for g in groups if g.block == block)
            assert kinds == sorted(["qk_self", "vo_self", "qk_cross", "vo_cross", "ffn"]), block
        assert all(g.compressible for g in groups)

    @pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
    def test_full_width_reproduces_output(self, dtype, tol, device):
        model = self.built(dtype, device)
        capture = record(model, self.tiny)
        reference = copy.deepcopy(model)
        decompose(model, capture, {g.name: g.width for g in compressible_groups(model)})
        assert all(p.device.type == device.type and p.dtype == dtype for p in model.parameters())
        inputs = cast(self.tiny.inputs(model, 2, 333, 99), dtype, device)
        with torch.no_grad():
            err = rel_err(self.tiny.output(reference, inputs), self.tiny.output(model, inputs))
        assert err < tol, f"full-width relative error {err:.2e} >= {tol:.0e}"

    def test_measured_error_equals_predicted_tail(self, device):
        model = self.built(device=device)
        capture = record(model, self.tiny, timesteps=TIMESTEPS * 3)
        reference = copy.deepcopy(model)
        groups = compressible_groups(model)
        widths = {g.name: max(1, g.width // 2) for g in groups}
        predicted = {g.name: decompose_group(reference, g, capture, reg=0.0) for g in groups}
        decompose(model, capture, widths, reg=0.0)
        for group in groups:
            old, new = reference.get_submodule(group.path), model.get_submodule(group.path)
            width, heads = widths[group.name], group.heads
            if group.kind == "adaln":
                cov = capture.second_moment(group.sites[0])
                full = old.weight.detach().double().T
                cut = new.down.weight.detach().double().T @ new.up.weight.detach().double().T
                measured = float(torch.trace((full - cut).T @ cov @ (full - cut)))
                assert measured == pytest.approx(float(predicted[group.name].tail[width]), rel=1e-8), group.name
                continue
            x_site, y_site = group_input_sites(group)
            if group.kind.startswith("qk"):
                cov_x = capture.second_moment(x_site, augment=old.to_q.bias is not None)
                cov_y = capture.second_moment(y_site, augment=old.to_k.bias is not None)
                measured = 0.0
                hd = group.width
                for h in range(heads):
                    full = xw(old.to_q)[:, h * hd:(h + 1) * hd] @ xw(old.to_k)[:, h * hd:(h + 1) * hd].T
                    cut = xw(new.to_q)[:, h * width:(h + 1) * width] @ xw(new.to_k)[:, h * width:(h + 1) * width].T
                    delta = full - cut
                    measured += float(torch.trace(delta.T @ cov_x @ delta @ cov_y))
                tail = float(predicted[group.name].tail[width])
            elif group.kind.startswith("vo"):
                cov_y = capture.second_moment(y_site, augment=old.to_v.bias is not None)
                hd = group.width
                w_o, w_o_new = old.to_out[0].weight.detach().double().T, new.to_out[0].weight.detach().double().T
                measured = 0.0
                for h in range(heads):
                    full = xw(old.to_v)[:, h * hd:(h + 1) * hd] @ w_o[h * hd:(h + 1) * hd]
                    cut = xw(new.to_v)[:, h * width:(h + 1) * width] @ w_o_new[h * width:(h + 1) * width]
                    measured += float(torch.trace((full - cut).T @ cov_y @ (full - cut)))
                tail = float(predicted[group.name].tail[width])
            else:
                cov = capture.second_moment(x_site)
                keep = predicted[group.name].channels(width).to(cov.device)
                w_down, w_new = old.net[2].weight.detach().double().T, new.net[2].weight.detach().double().T
                # the slim module's error, from its actual weights
                measured = float(torch.trace(w_down.T @ cov @ w_down) - 2 * torch.trace(w_down.T @ cov[:, keep] @ w_new)
                                 + torch.trace(w_new.T @ cov[keep][:, keep] @ w_new))
                # the Nyström residual formula
                schur = cov - cov[:, keep] @ torch.linalg.solve(cov[keep][:, keep], cov[keep])
                tail = float(torch.trace(w_down.T @ schur @ w_down))
                rows = torch.cat([keep, keep + group.width]) if group.gated else keep
                assert torch.equal(new.net[0].proj.weight, old.net[0].proj.weight[rows])
            assert measured == pytest.approx(tail, rel=1e-8, abs=1e-12 * max(1.0, abs(tail))), group.name

    def test_decompositions_record_their_method(self, device):
        """Regularised statistics factor by Cholesky and select by ridge leverage; with reg=0 the LayerNorm'd attention
        inputs (an exact null vector) need the eigh fallback, and every decomposition says which it took."""
        import re

        model = self.built(device=device)
        capture = record(model, self.tiny)
        groups = compressible_groups(model)
        regularised = {g.name: decompose_group(model, g, capture).method for g in groups}
        assert set(regularised.values()) == {"cholesky", "ridge leverage"}, regularised
        whitening = r"(cholesky|eigh \(\d+ of \d+ eigenvalues clamped\))"
        known = re.compile(rf"{whitening}|query input {whitening}; key input {whitening}|ridge leverage"
                           r"|ridge leverage below width \d+, pivoted Cholesky \(exact\) from width \d+ = the covariance's rank")
        for group in groups:
            method = decompose_group(model, group, capture, reg=0.0).method
            assert known.fullmatch(method), (group.name, method)

    def test_shard_merge_equals_full_capture(self, device):
        model = self.built(device=device)
        full = record(model, self.tiny, TIMESTEPS)
        shard_a = record(model, self.tiny, TIMESTEPS[:3], seed=0)
        shard_b = record(model, self.tiny, TIMESTEPS[3:], seed=3)
        merged = merge_captures([shard_a, shard_b])
        for site, stats in full.sites.items():
            other = merged.sites[site]
            assert stats.sum_outer.device.type == device.type and stats.sum_outer.dtype == torch.float64
            assert torch.equal(stats.count, other.count)
            assert rel_err(stats.sum_outer, other.sum_outer) < 1e-10
            assert rel_err(stats.sum, other.sum) < 1e-10

    def test_buckets_split_timesteps(self, device):
        capture = record(self.built(device=device), self.tiny, timesteps=(10, 20), num_buckets=4)
        counts = next(iter(capture.sites.values())).count
        assert counts[0] > 0 and int(counts[1:].sum()) == 0

    def test_hooks_removed_on_error(self, device):
        model = self.built(device=device)
        sites = sites_for(compressible_groups(model))
        with pytest.raises(RuntimeError, match="boom"):
            with ActivationRecorder(model, sites):
                raise RuntimeError("boom")
        assert all(not m._forward_pre_hooks for m in model.modules())

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_precision_runs(self, dtype, device):
        model = self.built(torch.float32, device)
        capture = record(model, self.tiny)
        decompose(model, capture, {g.name: max(1, g.width // 2) for g in compressible_groups(model)})
        model = model.to(dtype)
        assert all(p.dtype == dtype and p.device.type == device.type for p in model.parameters())
        with torch.no_grad():
            out = self.tiny.output(model, cast(self.tiny.inputs(model, 2, 500, 1), dtype, device))
        assert out.dtype == dtype and out.device.type == device.type and torch.isfinite(out).all()


class TestUNetSD1(CompressionTesterMixin):
    tiny_name = "unet_sd1"


class TestUNetSD2(CompressionTesterMixin):
    tiny_name = "unet_sd2"


class TestPixArt(CompressionTesterMixin):
    tiny_name = "pixart"


def test_unsupported_model_names_class_and_supported():
    with pytest.raises(UnsupportedModelError, match=r"Linear has no supported.*UNet2DConditionModel"):
        find_groups(torch.nn.Linear(3, 3))


def test_qk_norm_reported_and_left_intact():
    from diffusers.models.attention import BasicTransformerBlock

    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=16)
    block.attn1.norm_q = torch.nn.LayerNorm(8)
    groups = {g.kind: g for g in find_groups(torch.nn.ModuleDict({"b": block}))}
    assert not groups["qk_self"].compressible and "normalisation" in groups["qk_self"].note
    assert groups["vo_self"].compressible and groups["qk_cross"].compressible


def test_whitening_fallback_when_cholesky_fails():
    from slimdiff.decomposition.closed_form import decompose_qk, whitening

    torch.manual_seed(0)
    x = torch.randn(50, 3, dtype=torch.float64) @ torch.randn(3, 6, dtype=torch.float64)  # rank 3 in 6 dims
    cov = x.T @ x / 50
    white = whitening(cov)
    assert white.method == "eigh" and white.clamped == 3
    w_q, w_k = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    dec = decompose_qk(w_q, w_k, cov, cov, heads=2, reg=0.0)
    assert dec.method == "eigh (3 of 6 eigenvalues clamped)"  # the fallback is recorded, not silent
    q, k = dec.weights(4)
    # on the data's own subspace the full-rank factors still reproduce the logits
    full, cut = x @ w_q[:, :4] @ (x @ w_k[:, :4]).T, x @ q[:, :4] @ (x @ k[:, :4]).T
    assert rel_err(full, cut) < 1e-8


def test_whitening_svd_beats_plain_svd_on_denoiser_output():
    """Same widths, same products: whitening by the activation covariance gives lower output error."""
    tiny = TINY_DENOISERS["unet_sd1"]
    model = tiny.build(0).double()
    capture = record(model, tiny, timesteps=TIMESTEPS * 2)
    identity = Capture({
        site: SiteStats(torch.eye(s.dim, dtype=torch.float64) * s.count.sum().double(), torch.zeros_like(s.sum), s.count,
                        None if s.bucket_sum_outer is None else torch.eye(s.dim, dtype=s.bucket_sum_outer.dtype) * s.count[:, None, None],
                        None if s.bucket_sum is None else torch.zeros_like(s.bucket_sum))
        for site, s in capture.sites.items()
    })
    widths = {g.name: max(1, g.width // 4) for g in compressible_groups(model) if g.kind != "ffn"}
    whitened, plain = copy.deepcopy(model), copy.deepcopy(model)
    decompose(whitened, capture, widths)
    decompose(plain, identity, widths)
    errors = {"whitened": 0.0, "plain": 0.0}
    with torch.no_grad():
        for i, t in enumerate((50, 400, 750, 950)):
            inputs = cast(tiny.inputs(model, 4, t, 1000 + i), torch.float64)
            ref = tiny.output(model, inputs)
            errors["whitened"] += rel_err(ref, tiny.output(whitened, inputs))
            errors["plain"] += rel_err(ref, tiny.output(plain, inputs))
    print(errors)
    assert errors["whitened"] < errors["plain"], errors
