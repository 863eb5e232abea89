"""The main data path through the package: which modules ``compress_pipeline`` walks through, and every call that
climbs from a lower room of the house back into a higher one (issue 22).

A profiler hook follows ``slimdiff.compress.compress_pipeline`` on the tiny seeded SD pipeline of the tests (budget
0.4, 8 prompts, 2 steps): each call into a slimdiff module from another slimdiff module (the nearest slimdiff frame
up the stack) is a step; a step is a *climb* when the callee's room is above the caller's (the rooms of
``tests/test_layout.py``: base < family adapters < runtime < measurement < statistics < decomposition math <
applying decompositions < scoring < planning < compressor < pipeline < command line; "above" means later in that
list). Imports only go down (``tests/test_layout.py``), so a climb can only be a callback handed down. Writes
benchmarks/results/layout_walk.json and renders its section of docs/layout.md.

    .venv/bin/python benchmarks/layout_walk.py
    .venv/bin/python benchmarks/layout_walk.py --render-only
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_results, write_sections  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "layout_walk.json"
DOC = ROOT / "docs" / "layout.md"
HEADING = "## The main data path"


def measure() -> dict:
    import torch

    from slimdiff.compress import SlimDiffConfig, compress_pipeline
    from slimdiff.runtime.sampling import SamplerSettings
    from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline
    from tests.test_layout import ROOMS, room

    torch.set_num_threads(1)
    pipe = tiny_sd_pipeline()
    steps, climbs, modules = Counter(), Counter(), []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        if not callee.startswith("slimdiff"):
            return
        caller = frame.f_back
        while caller is not None and not caller.f_globals.get("__name__", "").startswith("slimdiff"):
            caller = caller.f_back
        if caller is None or caller.f_globals["__name__"] == callee:
            return
        source = caller.f_globals["__name__"]
        if callee not in modules:
            modules.append(callee)
        steps[(source, callee)] += 1
        if room(callee) > room(source):
            climbs[(source, callee, frame.f_code.co_name)] += 1

    sys.setprofile(profile)
    try:
        compress_pipeline(pipe, TINY_PROMPTS[:8], SlimDiffConfig(budget=0.4, batch_size=4), SamplerSettings(2), progress=False)
    finally:
        sys.setprofile(None)
    return {"modules": [{"module": m, "room": ROOMS[room(m)][0], "room_index": room(m)} for m in modules],
            "module_pairs": len(steps), "calls_between_modules": sum(steps.values()),
            "climbs": [{"from": a, "to": b, "function": f, "calls": n} for (a, b, f), n in sorted(climbs.items())]}


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(results: dict) -> list[tuple[Path, str, str]]:
    climbs = results["climbs"]
    rooms: dict[str, list[str]] = {}
    for entry in sorted(results["modules"], key=lambda e: e["room_index"]):  # stable: first-entry order in a room
        rooms.setdefault(entry["room"], []).append(f"`{entry['module'].removeprefix('slimdiff.')}`")
    walk = markdown_table(["room (lowest first)", "modules entered, in first-entry order"], [[r, ", ".join(m)] for r, m in rooms.items()])
    climb_rows = [[f"`{c['from']}`", f"`{c['to']}.{c['function']}`", c["calls"]] for c in climbs]
    climb_table = markdown_table(["from", "into", "calls"], climb_rows) if climb_rows else "None."
    distinct = sorted({(c["from"], c["to"]) for c in climbs})
    text = f"""{HEADING}

`slimdiff.compress.compress_pipeline` followed call by call on the tiny seeded SD pipeline of the tests (budget 0.4,
8 prompts, 2 sampler steps). It enters {len(results['modules'])} modules; {results['calls_between_modules']:,} calls
cross from one slimdiff module to another over {results['module_pairs']} module pairs. A *climb* is a call from a
lower room into a higher one (the rooms of the README's table; imports only go down, which `tests/test_layout.py`
checks, so a climb can only be a callback handed down): {len(climbs)} distinct climb(s) between {len(distinct)} module
pair(s).

{walk}

Climbs (caller's module, the function called in the higher room, number of calls):

{climb_table}

{chr(10).join(provenance(results))}

Raw figures: `{results.get('_source', 'benchmarks/results/layout_walk.json')}`; re-render:
`.venv/bin/python benchmarks/layout_walk.py --render-only`.
"""
    return [(DOC, HEADING, text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--render-only", action="store_true", help="only re-render the section from the results file")
    args = parser.parse_args(argv)
    if not args.render_only:
        write_results(RESULTS, {**run_record(__file__, argv), **measure()})
    results = load(RESULTS)
    if results is None:
        raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
    write_sections(render(results))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
