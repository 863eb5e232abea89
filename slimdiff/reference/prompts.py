"""Evaluation prompts for the reference model: the first captions of the test split (never trained on).

    python -m slimdiff.reference.prompts --n 500 --out data/reference/eval_prompts.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from slimdiff.reference.data import SPLITS, sample_scenes, write_jsonl_atomic


def evaluation_prompts(n: int = 500, seed: int = 0) -> list[dict]:
    """The first ``n`` test-split scenes' captions (the same scenes ``make_split("test", seed)`` renders)."""
    size, offset, heldout = SPLITS["test"]
    if not 1 <= n <= size:
        raise ValueError(f"n must be in 1..{size}, got {n}")
    scenes = sample_scenes(n, seed * 1000 + offset, heldout)
    return [{"caption": s.caption(), "n_objects": len(s.objects), "split": "test"} for s in scenes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    write_jsonl_atomic(args.out, evaluation_prompts(args.n, args.seed))


if __name__ == "__main__":
    main()
