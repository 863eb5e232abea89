"""No silent fallback (issue 14): each one computes the right thing and is recorded, or fails with one line.

Decompositions record how they whitened and selected; a zero covariance is exact, not a unit-scale guess;
a rank-deficient FFN covariance selects channels that span it, not the first k by index; video denoisers
are refused at discovery; groups left intact are listed; the registry tells "no versions" from "cannot
tell"; the git tag says why a commit is unknown.
"""

from __future__ import annotations

import copy
import subprocess

import pytest
import torch

from slimdiff.arch import (
    UnsupportedModelError,
    compressible_groups,
    find_groups,
    left_intact,
)
from slimdiff.decomposition.closed_form import (
    decompose_ffn,
    decompose_qk,
    decompose_vo,
    regularize,
    whitening,
)


def gram(rows: torch.Tensor) -> torch.Tensor:
    return rows.T @ rows / rows.shape[0]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---- decompositions record their method -----------------------------------------------------------


def test_full_rank_statistics_record_cholesky_and_ridge_leverage():
    x, y = randn(80, 6, seed=1), randn(80, 5, seed=2)
    w_q, w_k, w_v, w_o = randn(6, 8, seed=3), randn(5, 8, seed=4), randn(5, 8, seed=5), randn(8, 4, seed=6)
    qk = decompose_qk(w_q, w_k, gram(x), gram(y), heads=2)
    vo = decompose_vo(w_v, w_o, gram(y), heads=2)
    ffn = decompose_ffn(randn(6, 4, seed=7), gram(x))
    assert (qk.method, vo.method, ffn.method) == ("cholesky", "cholesky", "ridge leverage")
    assert qk.method_at(2) == "cholesky" and ffn.rank == 6
    assert ffn.method_at(3) == "ridge leverage, cholesky solve" and ffn.method_at(6) == "all channels, cholesky solve"
    assert not qk.exact and float(qk.tail[0]) > 0


def test_eigh_fallback_is_recorded_with_the_clamped_count():
    x = randn(50, 3, seed=0) @ randn(3, 6, seed=1)  # rank 3 in 6 dims: Cholesky fails
    y = randn(50, 6, seed=2)
    white = whitening(gram(x))
    assert (white.method, white.clamped, white.description) == ("eigh", 3, "eigh (3 of 6 eigenvalues clamped)")
    qk = decompose_qk(randn(6, 8, seed=3), randn(6, 8, seed=4), gram(x), gram(y), heads=2, reg=0.0)
    assert qk.method == "query input eigh (3 of 6 eigenvalues clamped); key input cholesky"
    vo = decompose_vo(randn(6, 8, seed=5), randn(8, 4, seed=6), gram(x), heads=2, reg=0.0)
    assert vo.method == "eigh (3 of 6 eigenvalues clamped)"
    # regularised, the same statistics factor by Cholesky: the fallback is only for a singular matrix
    assert decompose_vo(randn(6, 8, seed=5), randn(8, 4, seed=6), gram(x), heads=2).method == "cholesky"


def test_zero_covariance_is_exact_and_recorded_not_a_unit_scale():
    """An input that is zero on every calibration token: regularising adds nothing (the old code put reg * I
    in its place), every width is exact (predicted error 0), and the weights are the plain SVD's."""
    zero = torch.zeros(6, 6, dtype=torch.float64)
    assert torch.equal(regularize(zero, 1e-3), zero)
    w_v, w_o = randn(6, 8, seed=1), randn(8, 5, seed=2)
    vo = decompose_vo(w_v, w_o, zero, heads=2)
    assert vo.exact and vo.method.startswith("zero covariance") and torch.equal(vo.tail, torch.zeros(5, dtype=torch.float64))
    v1, o1 = vo.weights(1)
    for h in range(2):  # per head: the best rank-1 approximation of W_v^h W_o^h in the plain (unweighted) norm
        u, s, vh = torch.linalg.svd(w_v[:, 4 * h:4 * h + 4] @ w_o[4 * h:4 * h + 4], full_matrices=False)
        assert torch.allclose(v1[:, h:h + 1] @ o1[h:h + 1], s[0] * u[:, :1] @ vh[:1], atol=1e-10)
    qk = decompose_qk(randn(6, 8, seed=3), randn(6, 8, seed=4), zero, gram(randn(40, 6, seed=5)), heads=2)
    assert qk.exact and qk.method.startswith("query input zero covariance") and float(qk.tail.abs().max()) == 0
    assert all(bool(torch.isfinite(w).all()) for w in (*qk.weights(1), v1, o1))
    ffn = decompose_ffn(randn(6, 3, seed=6), zero)
    assert ffn.rank == 0 and ffn.method.startswith("zero covariance") and ffn.error(2) == 0.0
    assert ffn.method_at(2).startswith("zero covariance (input never active: any selection is exact)")


@pytest.mark.parametrize("bad,message", [(torch.full((3, 3), float("nan")), "trace nan"), (-torch.eye(3), r"trace -3\.0")])
def test_corrupt_covariance_is_refused_in_one_line(bad, message):
    with pytest.raises(ValueError, match=rf"{message}; a second moment has a finite trace >= 0"):
        regularize(bad, 1e-3)


def dead_channels_first() -> torch.Tensor:
    """5 channels never active, then 3 independent ones: rank 3 (the old code's leverage was all ones here)."""
    return torch.cat([torch.zeros(300, 5, dtype=torch.float64), randn(300, 3, seed=0)], dim=1)


def copies_first() -> torch.Tensor:
    """6 copies of one signal, a second signal, their sum: rank 2."""
    signal = randn(300, 2, seed=0)
    return torch.cat([signal[:, :1].repeat(1, 6), signal[:, 1:], signal.sum(1, keepdim=True)], dim=1)


@pytest.mark.parametrize("make_hidden,rank", [(dead_channels_first, 3), (copies_first, 2)])
def test_rank_deficient_ffn_selects_spanning_channels_not_the_first_by_index(make_hidden, rank):
    """reg=0, rank <= width: ridge leverage is undefined (the old code fell back to leverage 1 for all and kept
    channels 0..k-1: for dead channels first, an FFN cut to nothing). The pivoted selection spans the
    covariance's range, so the kept channels reproduce the down projection's output exactly."""
    hidden = make_hidden()
    w_down = randn(8, 4, seed=1)
    ffn = decompose_ffn(w_down, gram(hidden), reg=0.0)
    assert ffn.rank == rank and "pivoted Cholesky" in ffn.method
    for width in (rank, rank + 1, 7):
        keep, w_new = ffn.weights(width)
        assert keep.tolist() != list(range(width)), keep
        residual = float((hidden @ w_down - hidden[:, keep] @ w_new).pow(2).mean())
        assert residual < 1e-20 and ffn.error(width) < 1e-10, (width, residual)
        assert ffn.method_at(width).startswith(f"pivoted Cholesky (covariance rank {rank} <= width: exact)")
    assert "pinv" in ffn.method_at(rank + 1)  # C[S, S] has rank < width: the pseudo-inverse solve, recorded
    assert ffn.ridge_leverage(rank).sum() == pytest.approx(rank)  # the lam -> 0 limit: leverage of C's range
    assert ffn.method_at(1) == "ridge leverage, cholesky solve"  # below the rank the method's own selection


def test_zero_ffn_input_in_a_model_is_exact_and_recorded():
    """A denoiser whose first FFN never activates (its up projection is zero): the captured covariance is zero,
    the group is cut to width 1 with predicted error 0, and the model's output does not change."""
    from slimdiff.arch.sites import sites_for
    from slimdiff.decomposition.apply import decompose
    from slimdiff.decomposition.groups import decompose_group
    from slimdiff.statistics.recorder import ActivationRecorder
    from slimdiff.statistics.sums import Capture
    from tests.helpers import TINY_DENOISERS, cast

    tiny = TINY_DENOISERS["unet_sd1"]
    model = tiny.build(0).double()
    ffn = next(g for g in compressible_groups(model) if g.kind == "ffn")
    with torch.no_grad():
        model.get_submodule(ffn.path).net[0].proj.weight.zero_()
        model.get_submodule(ffn.path).net[0].proj.bias.zero_()
    with ActivationRecorder(model, sites_for([ffn]), 4, 1000) as recorder, torch.no_grad():
        tiny.output(model, cast(tiny.inputs(model, 2, 500, 0), torch.float64))
    capture = Capture(recorder.stats, {})
    decomposition = decompose_group(model, ffn, capture)
    assert decomposition.method.startswith("zero covariance") and decomposition.error(1) == 0.0
    reference = copy.deepcopy(model)
    decompose(model, capture, {ffn.name: 1})
    inputs = cast(tiny.inputs(model, 2, 700, 1), torch.float64)
    with torch.no_grad():
        assert torch.equal(tiny.output(reference, inputs), tiny.output(model, inputs))


# ---- discovery: video denoisers refused, groups left intact listed ----------------------------------


def tiny_unet_3d(seed: int = 0):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        cross_attention_dim=32, attention_head_dim=4, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    )


def tiny_unet_spatio_temporal(seed: int = 0):
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(seed)
    return UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
        num_attention_heads=(2, 4), down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=24,
    )


@pytest.mark.parametrize("build,cls,layer", [
    (tiny_unet_3d, "UNet3DConditionModel", "TransformerTemporalModel"),
    (tiny_unet_spatio_temporal, "UNetSpatioTemporalConditionModel", "SpatioTemporal"),
])
def test_video_unets_are_refused_at_discovery(build, cls, layer):
    """Both hold BasicTransformerBlocks (they passed discovery before and failed in a hook): refused by name."""
    model = build()
    for discover in (find_groups, compressible_groups):
        with pytest.raises(UnsupportedModelError, match=rf"^{cls} is a video denoiser \(temporal layer \w*{layer}\w* at [\w.]+\); "
                                                        r"slimdiff compresses image denoisers: UNet2DConditionModel, "):
            discover(model)


def test_groups_left_intact_are_listed_with_the_reason():
    from diffusers.models.attention import BasicTransformerBlock

    from slimdiff.runtime.folder import structure_of

    class Swish(torch.nn.Module):  # an activation slimdiff does not know
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return torch.nn.functional.silu(self.proj(x))

    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 4, 8, cross_attention_dim=16)
    block.attn1.norm_q = torch.nn.LayerNorm(8)
    block.ff.net[0] = Swish(block.ff.net[0].proj)
    denoiser = torch.nn.ModuleDict({"b": block})
    intact = left_intact(find_groups(denoiser))
    assert intact == {
        "b.attn1.qk": {"kind": "qk_self", "note": "q/k normalisation between projection and dot product; QK left intact"},
        "b.ff": {"kind": "ffn", "note": "unknown feed-forward activation Swish; left intact"},
    }
    structure = structure_of(denoiser)
    assert structure["left_intact"] == intact and not set(intact) & set(structure["widths"])


def test_saved_model_records_methods_and_says_when_not_recorded(tmp_path):
    import slimdiff
    from tests.helpers import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    groups = compressible_groups(pipe.unet)
    folder = slimdiff.save(pipe, tmp_path / "model", methods={groups[0].name: "cholesky"})
    info = slimdiff.describe(folder)
    assert info["modules"][groups[0].name]["method"] == "cholesky"
    assert info["modules"][groups[1].name]["method"] == "not recorded"
    assert info["left_intact"] == {}
    with pytest.raises(ValueError, match=r"methods name groups that UNet2DConditionModel cannot compress or does not have: \['nope'\]"):
        slimdiff.save(pipe, tmp_path / "other", methods={"nope": "cholesky"})
    assert not (tmp_path / "other").exists()


# ---- tracking: registry errors, git commit ----------------------------------------------------------


@pytest.fixture
def unreachable_tracking():
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("http://127.0.0.1:9")
    yield
    mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("code,versions", [("RESOURCE_DOES_NOT_EXIST", []), ("INTERNAL_ERROR", None),
                                           ("TEMPORARILY_UNAVAILABLE", None), ("PERMISSION_DENIED", None)])
def test_only_does_not_exist_means_no_versions(unreachable_tracking, monkeypatch, code, versions):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    from flows.registry import registered_versions
    from flows.tracking_server import TrackingError

    def search(self, *args, **kwargs):
        raise MlflowException(f"{code} happened\nsecond line", error_code=getattr(databricks_pb2, code))

    monkeypatch.setattr(MlflowClient, "search_model_versions", search)
    if versions is not None:
        assert registered_versions("slimdiff-x") == versions
        return
    with pytest.raises(TrackingError) as error:
        registered_versions("slimdiff-x")
    # a refused permission names who was refused (no credentials set here: anonymous); other errors MLflow's first line
    reason = "anonymous access lacks the permission (HTTP 403)" if code == "PERMISSION_DENIED" else f"{code}: {code} happened"
    assert str(error.value) == (f"tracking server http://127.0.0.1:9: cannot list the versions of 'slimdiff-x' "
                                f"({reason}); the outputs are kept: re-run to retry")


def test_an_unregistered_model_has_no_versions(tmp_path):
    import mlflow

    from flows.registry import registered_versions

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        assert registered_versions("slimdiff-never-registered") == []
    finally:
        mlflow.set_tracking_uri(previous)


def test_git_commit_says_why_it_is_unknown(tmp_path, monkeypatch):
    from flows.tracking import git_commit

    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_commit(outside).startswith(f"unknown (git rev-parse HEAD failed in {outside}: fatal: not a git repository")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert git_commit(repo).startswith(f"unknown (git rev-parse HEAD failed in {repo}: fatal: ")  # no commit yet
    (repo / "a.txt").write_text("a\n")
    subprocess.run(["git", "add", "a.txt"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    assert git_commit(repo) == head
    (repo / "a.txt").write_text("b\n")
    assert git_commit(repo) == head + "-dirty"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert git_commit(repo) == "unknown (git is not installed)"
