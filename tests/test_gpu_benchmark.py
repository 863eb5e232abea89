"""The GPU benchmark script in its --smoke mode: the same code path on whatever device there is (CI: the CPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_runs_every_step(tmp_path):
    spec = importlib.util.spec_from_file_location("sd15_bench", ROOT / "benchmarks" / "gpu" / "sd15.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, doc = tmp_path / "gpu.json", tmp_path / "page.md"
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(out), "--doc", str(doc)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] is True and result["mode"] == "smoke"
    for step in ("capture", "gains", "score", "allocate", "decompose", "save", "reload"):
        assert result["steps"][step]["seconds"] >= 0, step
    assert result["reload_bit_exact"] is True
    # the plan removes what it says, and the compressed UNet is that much smaller
    assert result["unet_params"] - result["compressed_unet_params"] == result["params_removed"]
    assert 0.35 < result["params_removed_fraction_of_compressible"] < 0.45
    # the same budget with per-head widths in multiples of 8 and QK tied to VO is built and timed beside it
    assert set(result["latency_ms"]) == {"original", "compressed", "compressed_rank8_tied", "compressed_latency"}
    # the --latency plan from a table timed on the run's device meets its predicted target
    plan = result["latency_plan"]
    assert plan["predicted_fraction"] <= plan["target"] and plan["measured_fraction"] > 0
    assert result["friendly_plan"]["params_removed"] >= 0.35 * result["compressible_params"]
    assert result["gram_precision"]["max"] < 1e-6  # float32 Gram matrices of float32 activations on the CPU
    # the page renders from the JSON alone
    assert bench.main(["--from-json", str(out), "--doc", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == doc.read_text()


def test_flux_block_benchmark_smoke(tmp_path):
    """benchmarks/gpu/flux_block.py (real-width Flux blocks on a GPU) on the CPU at tiny widths: every step runs, the
    MACs target is met, and its section replaces itself on the docs page instead of piling up."""
    spec = importlib.util.spec_from_file_location("flux_bench", ROOT / "benchmarks" / "gpu" / "flux_block.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, doc = tmp_path / "flux.json", tmp_path / "page.md"
    doc.write_text("# GPU page\n\nearlier sections\n")
    for _ in range(2):
        assert bench.main(["--smoke", "--device", "cpu", "--out", str(out), "--doc", str(doc), "--repeats", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["macs_kept"] <= 0.7 and result["params_removed"] > 0
    assert {"adaln", "vo_joint", "vo_single", "ffn", "ffn_single"} == set(result["kinds_kept"])
    assert all(value > 0 for value in result["latency_ms"].values())
    page = doc.read_text()
    assert page.startswith("# GPU page") and page.count(bench.MARK) == 1


def test_gpu_job_smoke_runs_every_stage(tmp_path):
    """benchmarks/gpu/job.py (the job's stages on a GPU, against the memory prediction) on a tiny Flux workspace."""
    spec = importlib.util.spec_from_file_location("gpu_job", ROOT / "benchmarks" / "gpu" / "job.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "job.json"
    assert bench.main(["--smoke", "--device", "cpu", "--out", str(out), "--workspace", str(tmp_path / "ws")]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and list(result["stages"]) == list(bench.STAGES)
    for stage, row in result["stages"].items():
        assert row["exit_code"] == 0 and row["peak_host_bytes"] > 0, stage
        if stage != "latency":  # not measured for a parameter budget: no prediction
            assert row["predicted_host_bytes"] > 0, stage
    assert result["metrics"]["params"]["removed_fraction_of_compressible"] > 0.25
