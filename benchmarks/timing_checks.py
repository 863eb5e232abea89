"""Timings that used to be test assertions (issue 14): on a loaded machine they flake, so they are measured here.

1. Re-allocation from saved scores: load the main job's scores (outputs/scores.json; run `bash scripts/run.sh`
   first, or pass --scores) and allocate at three budgets; the target is seconds (< 5 s), so that a new
   budget never needs a re-capture.
2. The latency helper's speed-up: `slimdiff.pipeline.evaluation.latency` on a 4 ms and a 1 ms call (time.sleep),
   interleaved; the medians' ratio should be near 4 (target > 1.5) unless the machine is badly overloaded.

Prints one line per check with the measurement, the target and "ok"/"SLOW"; exits 0 (a benchmark reports,
it does not gate). No docs page: ``--out`` also writes the figures, with the command, the machine and the code version.

    .venv/bin/python benchmarks/timing_checks.py [--scores outputs/scores.json] [--repeats 3] [--threads 1] [--out t.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = (0.2, 0.4, 0.6)
REALLOCATION_TARGET_S = 5.0
SPEEDUP_TARGET = 1.5


def reallocation_seconds(scores_path: Path, repeats: int) -> list[float]:
    """Wall seconds of load + allocate at ``BUDGETS``, ``repeats`` times."""
    from slimdiff.planning.allocation import allocate
    from slimdiff.scoring.influence import InfluenceScores

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loaded = InfluenceScores.load(scores_path)
        for budget in BUDGETS:
            allocate(loaded, budget)
        times.append(time.perf_counter() - start)
    return times


def sleep_speedup(repeats: int, threads: int) -> dict:
    """``latency`` of a 4 ms against a 1 ms call: its medians and speed-up."""
    from slimdiff.pipeline.evaluation import latency

    return latency(lambda x: time.sleep(0.004), lambda x: time.sleep(0.001), lambda: ((1,), {}),
                   repeats=max(4, 4 * repeats), warmup=1, threads=threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", type=Path, default=ROOT / "outputs" / "scores.json", help="saved influence scores")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    from slimdiff.device import apply_threads

    apply_threads(args.threads)
    if not args.scores.is_file():
        print(f"{args.scores}: not found; run `bash scripts/run.sh` first or pass --scores", file=sys.stderr)
        return 2
    times = reallocation_seconds(args.scores, args.repeats)
    median = statistics.median(times)
    print(f"re-allocation from {args.scores.name} at budgets {', '.join(map(str, BUDGETS))}: median {median:.3f} s "
          f"(runs {', '.join(f'{t:.3f}' for t in times)}; target < {REALLOCATION_TARGET_S:g} s) "
          f"{'ok' if median < REALLOCATION_TARGET_S else 'SLOW'}")
    result = sleep_speedup(args.repeats, args.threads)
    print(f"latency helper on 4 ms vs 1 ms calls: {result['original_ms']:.2f} ms / {result['compressed_ms']:.2f} ms = "
          f"speed-up {result['speedup']:.2f} (target > {SPEEDUP_TARGET:g}) {'ok' if result['speedup'] > SPEEDUP_TARGET else 'SLOW'}")
    if args.out:
        from benchmarks.pages import run_record, write_results

        write_results(args.out, {**run_record(__file__, argv), "reallocation_s": times, "reallocation_target_s": REALLOCATION_TARGET_S,
                                 "budgets": list(BUDGETS), "latency_helper": result, "speedup_target": SPEEDUP_TARGET})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
