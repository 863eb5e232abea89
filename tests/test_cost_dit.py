"""benchmarks/cost_dit.py --quick (tiny widths): the JSON it writes holds every field the cost page reads, the block
shares sum to 1, and only its own section of a page is rewritten. Timings are never asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cost_dit():
    spec = importlib.util.spec_from_file_location("cost_dit", ROOT / "benchmarks" / "cost_dit.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cost_dit"] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("cost_dit", None)


@pytest.fixture(scope="module")
def quick_run(cost_dit, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cost_dit")
    page = folder / "page.md"
    page.write_text("# Cost page\n\nexisting text\n\n## Another engineer's section\n\ntheirs\n")
    out, image = folder / "cost_dit.json", folder / "spectrum.png"
    cost_dit.main(["--quick", "--n-pooled", "16", "--out", str(out), "--plot", str(image), "--doc", str(page)])
    return json.loads(out.read_text()), page, image


def test_quick_json_fields_and_shares(quick_run):
    results, _, image = quick_run
    assert image.is_file() and image.stat().st_size > 0
    assert {"machine", "command", "args", "families", "pixart_tiny", "total_s"} <= set(results)
    assert set(results["families"]) == {"flux-dev", "sd3.5-large"}
    for key, family in results["families"].items():
        assert {"block_kinds", "full_model", "capture_overhead", "decompose", "adaln_spectrum", "adaln_factorised",
                "shared_modulation_site"} <= set(family), key
        kinds = family["block_kinds"]
        assert set(kinds) == ({"double", "single"} if key == "flux-dev" else {"joint", "joint (last, context_pre_only)"})
        for kind, block in [*kinds.items(), ("whole model", family["full_model"])]:
            assert sum(block["shares"].values()) == pytest.approx(1.0), (key, kind)
            assert all(0 <= v <= 1 for v in block["shares"].values())
            assert 0 < block["reachable_share"] <= block["attention_mlp_adaln_share"] + 1e-12
        for block in kinds.values():
            assert block["covariance"]["bytes"] > 0 and block["groups"]
            assert block["decompose_s"] >= 0 and block["count_full"] > 0
            # QK is left intact in both families (q/k RMSNorm), with the reason
            assert all(not g["compressible"] and g["note"] for g in block["groups"] if g["kind"].startswith("qk"))
            assert any(g["kind"] == "adaln" and g["compressible"] for g in block["groups"])
        full = family["full_model"]
        assert full["covariance_bytes"] > full["covariance_bytes_one_bucket"] > 0
        assert full["decompose_s"] >= 0
        assert full["blocks"] == ({"double": 19, "single": 38} if key == "flux-dev"
                                  else {"joint": 37, "joint (last, context_pre_only)": 1})
        overhead = family["capture_overhead"]
        assert len(overhead["plain_s"]) == len(overhead["hooked_s"]) == 3 and overhead["ratio"] > 0
        spectrum = family["adaln_spectrum"]
        assert spectrum["recorder_vs_rows_max_rel_diff"] < 1e-5
        assert spectrum["eigenvalues_normalised"][0] == pytest.approx(1.0) and len(spectrum["timesteps"]) == 28
        rank = spectrum["effective_rank"]
        assert 1 <= rank["energy_99"] <= rank["energy_999"] <= rank["dim"] == spectrum["dim"]
        for group in family["adaln_factorised"]["groups"].values():
            errors = group["relative_error"]
            assert all(0 <= e <= 1 for e in errors) and errors == sorted(errors, reverse=True)
            assert all(saved > 0 for saved in group["params_saved"])
    assert results["pixart_tiny"]["effective_rank"]["dim"] == results["pixart_tiny"]["dim"]


def test_quick_writes_only_its_own_section(cost_dit, quick_run):
    _, page, _ = quick_run
    text = page.read_text()
    assert text.startswith("# Cost page\n\nexisting text\n\n## Another engineer's section\n\ntheirs\n")
    assert text.count(cost_dit.SECTION) == 1
    # rewriting replaces the section in place and keeps what follows it
    page.write_text(text + "\n## A later section\n\nkept\n")
    cost_dit.update_section(page, cost_dit.SECTION + "\n\nnew body\n")
    again = page.read_text()
    assert again.count(cost_dit.SECTION) == 1 and "new body" in again and "Flux" not in again.split(cost_dit.SECTION)[1].split("## A later")[0]
    assert again.endswith("## A later section\n\nkept\n") and "## Another engineer's section\n\ntheirs\n" in again
