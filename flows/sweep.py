"""Compress at several budgets and log each run, so the registry shows the trade-off.

    python -m flows.sweep --budgets 0.2 0.3 0.4 0.5 [--workspace .]

Capture, curation and scores are shared (DVC re-runs only allocate onwards); params.yaml is
restored afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml
from prefect import flow

from flows.compress import compress_flow


def set_budget(params_file: Path, budget: float) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["allocate"]["budget"] = float(budget)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@flow(name="slimdiff-sweep", log_prints=True)
def sweep_flow(budgets: Sequence[float], workspace: str = ".") -> list[dict[str, Any]]:
    from slimdiff.planning.allocation import Budget

    for budget in budgets:
        Budget.parse(budget)  # every budget is checked before the first run
    root = Path(workspace).resolve()
    params_file = root / "params.yaml"
    original = params_file.read_text()
    results = []
    try:
        for budget in budgets:
            set_budget(params_file, budget)
            result = compress_flow(str(root))
            results.append({"budget": budget, **result})
            print(f"budget {budget}: version {result['version']} ({result['reason']})")
    finally:
        params_file.write_text(original)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", required=True)
    parser.add_argument("--workspace", default=".")
    args = parser.parse_args(argv)
    try:
        sweep_flow(args.budgets, args.workspace)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as error:
        print(f"sweep: error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
