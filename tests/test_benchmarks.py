"""The statistics behind benchmark verdicts (no models run here)."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def repro():
    return load_benchmark("reference_repro")


def rows_for(name: str, values: list[float], n: int, column: str = "single_shape") -> list[dict]:
    return [{"model": name, "seed": i, column: v, f"{column}_n": n} for i, v in enumerate(values)]


def test_perfect_accuracy_still_has_binomial_noise(repro):
    mean, se = repro.summarise(rows_for("a", [1.0, 1.0, 1.0], n=200), "single_shape", "a")
    runs = 3 * 200
    p = 1 - 1 / runs
    assert mean == 1.0
    assert se == pytest.approx(math.sqrt(p * (1 - p) / runs), rel=1e-12)


def test_seed_spread_dominates_when_larger_than_binomial(repro):
    values = [0.5, 0.9, 0.7]
    mean, se = repro.summarise(rows_for("a", values, n=10_000), "single_shape", "a")
    assert mean == pytest.approx(0.7)
    assert se == pytest.approx(np.std(values, ddof=1) / math.sqrt(3), rel=1e-12)


def test_fd_uses_seed_spread_only(repro):
    values = [180.0, 184.0, 188.0]
    rows = [{"model": "a", "seed": i, repro.FD_COLUMN: v} for i, v in enumerate(values)]
    mean, se = repro.summarise(rows, repro.FD_COLUMN, "a")
    assert (mean, se) == pytest.approx((184.0, 4.0 / math.sqrt(3)))


def test_saved_rows_read_back_as_numbers(repro, tmp_path):
    path = tmp_path / "rows.csv"
    rows = [{"model": "cpu-rerun", "folder": "/x/model", "seed": 1234, "single_shape": 0.98, "single_shape_n": 200,
             repro.FD_COLUMN: 183.25, "seconds": 58.1, "threads": 2}]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert repro.read_rows(path) == rows


def test_model_spec_errors_name_the_bad_value(repro, tmp_path):
    with pytest.raises(Exception, match="NAME=FOLDER"):
        repro.parse_model("no-equals-sign")
    with pytest.raises(Exception, match="model_index.json"):
        repro.parse_model(f"x={tmp_path}")


def test_train_stats_spec_must_name_an_existing_file(repro, tmp_path):
    with pytest.raises(Exception, match="NAME=FILE"):
        repro.parse_stats(f"cpu-rerun={tmp_path / 'missing.json'}")
    stats = tmp_path / "train_stats.json"
    stats.write_text("{}")
    assert repro.parse_stats(f"cpu-rerun={stats}") == ("cpu-rerun", stats)
