"""Do chunked logit-noise gains agree with the previous (whole-tensor) estimator within sampling noise?

Propagation gains of query-key (QK) groups inject Gaussian noise on the attention logits. The
previous code drew it as one (batch, heads, queries, keys) tensor; ``LogitNoise`` now draws it in
query chunks of at most ``noise_chunk`` elements. With ``noise_chunk`` at least the whole logit
tensor the new code draws that single tensor (the previous estimator, "whole"); with a small
``noise_chunk`` every QK group is split into several chunks ("chunked": another random stream of
the same distribution). On the reference model this script captures statistics once, measures gains
for several seeds with both settings, and compares whole-vs-chunked differences of the gains and of
the resulting width plan against the seed-to-seed differences of the whole estimator. FFN and VO
gains do not change with ``noise_chunk`` (each module has its own generator), so the yardstick of a
same-seed comparison is the whole estimator with only its QK noise seed changed (whole gains of seed
s with the QK gains of seed u, re-allocated from the same error curves). Measuring writes
benchmarks/results/gains_agreement.json (with the command, the machine and the code version); rendering writes
docs/gains-agreement.md from it alone (``--render-only``, or ``--from-json`` for another JSON).

    .venv/bin/python benchmarks/gains_agreement.py
    .venv/bin/python benchmarks/gains_agreement.py --render-only
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import provenance, read_results, relative, run_record, write_results, write_sections  # noqa: E402
from slimdiff.device import apply_threads  # noqa: E402
from slimdiff.planning.allocation import allocate
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.statistics.recording import capture
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.compress import load_pipeline, read_prompts  # noqa: E402
from slimdiff.arch import compressible_groups
from slimdiff.scoring.gains import LogitNoise, measure_gains, spearman
from slimdiff.scoring.influence import score
from slimdiff.runtime.attention import SlimAttnProcessor, original_attention_scale
from slimdiff.calls import record_calls

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gains_agreement.json"
DEFAULT_DOC = ROOT / "docs" / "gains-agreement.md"
TITLE = "# Propagation gains: chunked logit noise vs the previous whole-tensor draw"
WHOLE = 2**62

# (key, label): the pair categories compared; the first is the question, the second its yardstick.
# Each comparison of whole and chunked is judged against its matched yardstick: the whole estimator with
# the same noise seeds changed (at the same seed only the QK noise changes; FFN/VO gains are identical).
CATEGORIES = [
    ("whole_vs_chunked_same_seed", "whole vs chunked, same seed"),
    ("whole_vs_whole_qk_seed", "yardstick: whole vs whole, other seed for the QK noise only"),
    ("whole_vs_chunked_other_seed", "whole vs chunked, other seed"),
    ("whole_vs_whole", "yardstick: whole vs whole, other seed"),
    ("chunked_vs_chunked", "chunked vs chunked, other seed"),
]
MATCHED = [("whole_vs_chunked_same_seed", "whole_vs_whole_qk_seed"), ("whole_vs_chunked_other_seed", "whole_vs_whole")]


# ---- measuring ----------------------------------------------------------------------------------

class _CountingNoise(LogitNoise):
    """LogitNoise that counts the chunks drawn per attention call (for the chunk report only)."""

    def __init__(self, *args, log: list, name: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.log, self.name, self.current = log, name, None

    def sigma(self, query, key):
        self.current = {"module": self.name, "shape": [query.shape[0], query.shape[1], query.shape[-2], key.shape[-2]],
                        "elements": query.shape[0] * query.shape[1] * query.shape[-2] * key.shape[-2],
                        "query_rows_per_chunk": self.query_chunk(query, key), "chunks": 0}
        self.log.append(self.current)
        return super().sigma(query, key)

    def draw(self, query_rows, key, std):
        self.current["chunks"] += 1
        return super().draw(query_rows, key, std)


def count_chunks(pipe, calls, chunk: int) -> list[dict]:
    """Run one recorded denoiser call with counting logit noise on every QK attention; one row per attention."""
    _, denoiser = denoiser_of(pipe)
    log: list[dict] = []
    saved = {}
    try:
        for group in compressible_groups(denoiser):
            if not group.kind.startswith("qk"):
                continue
            attn = denoiser.get_submodule(group.path)
            saved[group.path] = attn.processor
            noise = _CountingNoise(0.05, torch.Generator().manual_seed(0), [], chunk, log=log, name=group.name)
            attn.set_processor(SlimAttnProcessor(original_attention_scale(attn), logit_noise=noise))
        args, kwargs = calls[0]
        with torch.no_grad():
            denoiser(*args, **{**kwargs, "return_dict": False})
    finally:
        for path, processor in saved.items():
            denoiser.get_submodule(path).set_processor(processor)
    return log


def stream_check(log: list[dict]) -> dict:
    """For every distinct logit shape and chunking: with one seeded CPU generator, is the chunked draw the whole draw,
    or the same values in other positions?"""
    rows = []
    for shape, per_chunk in sorted({(tuple(r["shape"]), r["query_rows_per_chunk"]) for r in log}):
        b, h, nq, nk = shape
        whole = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        generator = torch.Generator().manual_seed(0)
        chunked = torch.cat([torch.randn((b, h, min(per_chunk, nq - q), nk), generator=generator)
                             for q in range(0, nq, per_chunk)], dim=2)
        rows.append({"shape": list(shape), "query_rows_per_chunk": per_chunk, "identical": bool(torch.equal(whole, chunked)),
                     "same_values_permuted": bool(torch.equal(whole.flatten().sort().values, chunked.flatten().sort().values)),
                     "correlation": float(torch.corrcoef(torch.stack([whole.flatten(), chunked.flatten()]))[0, 1])})
    return {"shapes": rows, "all_permutations": all(r["same_values_permuted"] and not r["identical"] for r in rows)}


def plan_summary(plan) -> dict:
    return {"params_before": plan.params_before, "removed": plan.removed, "target_removed": plan.target_removed,
            "predicted_error": plan.predicted_error,
            "modules": [{"name": m.name, "kind": m.kind, "full_width": m.full_width, "width": m.width,
                         "unit_params": m.unit_params} for m in plan.modules]}


def plan_with_gains(scores, gains: dict[str, float], budget: float):
    """Allocate with the error curves of ``scores`` and other gains (a score is gain x error curve)."""
    scores = copy.deepcopy(scores)
    for m in scores.modules:
        m.gain = gains[m.name]
    return allocate(scores, budget)


def run(args) -> dict:
    apply_threads(args.threads)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    pipe = load_pipeline(str(args.model))
    pipe.set_progress_bar_config(disable=True)
    prompts = read_prompts(args.prompts)[: args.num_prompts]
    sampler = SamplerSettings(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.sampler_seed)
    _, denoiser = denoiser_of(pipe)
    groups = compressible_groups(denoiser)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    stats = capture(pipe, prompts, sampler, num_buckets=args.num_buckets, batch_size=args.batch_size, progress=False)
    timings["capture"] = time.perf_counter() - t
    print(f"capture: {len(prompts)} prompts in {timings['capture']:.1f} s", file=sys.stderr)

    gain_prompts = prompts[: args.gain_prompts]
    t = time.perf_counter()
    calls = record_calls(pipe, gain_prompts, sampler, args.calls)
    chunk_log = {"whole": count_chunks(pipe, calls, WHOLE), "chunked": count_chunks(pipe, calls, args.chunk)}
    timings["chunk_count"] = time.perf_counter() - t
    largest = max(chunk_log["chunked"], key=lambda r: r["elements"])
    print(f"largest attention logits {largest['shape']} ({largest['elements']:,} elements, {largest['module']}): "
          f"{largest['chunks']} chunks at noise_chunk={args.chunk}; fewest chunks of any QK attention: "
          f"{min(r['chunks'] for r in chunk_log['chunked'])}; whole: max {max(r['chunks'] for r in chunk_log['whole'])} "
          f"draw per attention call", file=sys.stderr)

    stream = stream_check(chunk_log["chunked"])

    chunks = {"whole": WHOLE, "chunked": args.chunk}
    kind = {g.name: g.kind for g in groups}
    runs, plans, base_scores = [], {}, None
    for seed in args.seeds:
        for setting, noise_chunk in chunks.items():
            t = time.perf_counter()
            gains = measure_gains(pipe, gain_prompts, sampler, args.calls, args.rel_noise, seed=seed, noise_chunk=noise_chunk)
            t_gains = time.perf_counter() - t
            t = time.perf_counter()
            scores = score(denoiser, stats, gains)
            t_score = time.perf_counter() - t
            t = time.perf_counter()
            plan = allocate(scores, args.budget)
            t_alloc = time.perf_counter() - t
            print(f"seed {seed} {setting}: gains {t_gains:.1f} s, score {t_score:.1f} s, allocate {t_alloc:.2f} s; "
                  f"removed {plan.removed / plan.params_before:.3f}", file=sys.stderr)
            if base_scores is None:
                base_scores = scores
            runs.append({
                "seed": seed, "setting": setting, "noise_chunk": noise_chunk,
                "gains": gains.gains,
                "plan": plan_summary(plan),
                "seconds": {"gains": t_gains, "score": t_score, "allocate": t_alloc},
            })
            plans[setting, seed] = plan.widths

    # The matched yardstick for a same-seed comparison, where FFN/VO gains are identical: whole gains of seed s
    # with the QK gains of whole seed u (what a measurement whose QK noise alone had another seed gives, since
    # every module has its own generator), re-allocated from the same error curves.
    t = time.perf_counter()
    rescore_ok = all(plan_with_gains(base_scores, r["gains"], args.budget).widths == plans[r["setting"], r["seed"]]
                     for r in runs)
    by_key = {(r["setting"], r["seed"]): r["gains"] for r in runs}
    hybrids = []
    for s, u in itertools.permutations(args.seeds, 2):
        gains = {n: (by_key["whole", u][n] if kind[n].startswith("qk") else g) for n, g in by_key["whole", s].items()}
        hybrids.append({"seed": s, "qk_seed": u, "setting": "whole", "gains": gains,
                        "plan": plan_summary(plan_with_gains(base_scores, gains, args.budget))})
    timings["hybrid_plans"] = time.perf_counter() - t
    print(f"re-allocating from one set of error curves reproduces every directly scored plan: {rescore_ok}", file=sys.stderr)
    timings["total"] = time.perf_counter() - t_all

    import diffusers

    return {
        "format": "slimdiff-gains-agreement/1",
        **run_record(__file__, args.argv),
        "settings": {
            "model": str(args.model), "prompts_file": str(args.prompts), "calibration_prompts": len(prompts),
            "sampler": sampler.to_dict(), "num_buckets": args.num_buckets, "batch_size": args.batch_size,
            "gain_prompts": len(gain_prompts), "calls": args.calls, "rel_noise": args.rel_noise, "seeds": list(args.seeds),
            "noise_chunk": chunks, "budget": args.budget, "allocator": "slimdiff",
        },
        "modules": [{"name": g.name, "kind": g.kind, "heads": g.heads, "width": g.width, "unit_params": g.unit_params}
                    for g in groups],
        "chunk_log": chunk_log,
        "stream_check": stream,
        "runs": runs,
        "hybrids": hybrids,
        "rescore_check": rescore_ok,
        "timings_s": timings,
        "machine": {"arch": platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
                    "device": "cpu"},
    }


# ---- comparing ----------------------------------------------------------------------------------

def _quantile(values: list[float], q: float) -> float:
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _label(run: dict) -> str:
    return f"{run['setting']}/{run['seed']}" + (f" (QK: seed {run['qk_seed']})" if "qk_seed" in run else "")


def compare_pair(a: dict, b: dict, kinds: dict[str, str]) -> dict:
    names = list(a["gains"])
    qk = [n for n in names if kinds[n].startswith("qk")]
    other = [n for n in names if not kinds[n].startswith("qk")]
    dlog = {n: abs(math.log(a["gains"][n] / b["gains"][n])) for n in names}
    qk_dlog = [dlog[n] for n in qk]
    wa = {m["name"]: m for m in a["plan"]["modules"]}
    wb = {m["name"]: m for m in b["plan"]["modules"]}
    moved = sum(abs(wa[n]["width"] - wb[n]["width"]) * wa[n]["unit_params"] for n in wa)
    return {
        "a": _label(a), "b": _label(b),
        "qk_median_abs_log": statistics.median(qk_dlog),
        "qk_p90_abs_log": _quantile(qk_dlog, 0.9),
        "qk_max_abs_log": max(qk_dlog),
        "other_max_abs_log": max((dlog[n] for n in other), default=0.0),
        "all_median_abs_log": statistics.median(dlog.values()),
        "all_p90_abs_log": _quantile(list(dlog.values()), 0.9),
        "spearman_all": spearman([a["gains"][n] for n in names], [b["gains"][n] for n in names]),
        "spearman_qk": spearman([a["gains"][n] for n in qk], [b["gains"][n] for n in qk]),
        "plan_moved_fraction": moved / a["plan"]["params_before"],
        "plan_modules_differing": sum(wa[n]["width"] != wb[n]["width"] for n in wa),
    }


def compare(data: dict) -> dict:
    kinds = {m["name"]: m["kind"] for m in data["modules"]}
    runs = {(r["setting"], r["seed"]): r for r in data["runs"]}
    seeds = data["settings"]["seeds"]
    pairs: dict[str, list[dict]] = {key: [] for key, _ in CATEGORIES}
    for s in seeds:
        pairs["whole_vs_chunked_same_seed"].append(compare_pair(runs["whole", s], runs["chunked", s], kinds))
    for s, u in itertools.combinations(seeds, 2):
        pairs["whole_vs_whole"].append(compare_pair(runs["whole", s], runs["whole", u], kinds))
        pairs["chunked_vs_chunked"].append(compare_pair(runs["chunked", s], runs["chunked", u], kinds))
    for s, u in itertools.permutations(seeds, 2):
        pairs["whole_vs_chunked_other_seed"].append(compare_pair(runs["whole", s], runs["chunked", u], kinds))
    for h in data.get("hybrids", []):
        pairs["whole_vs_whole_qk_seed"].append(compare_pair(runs["whole", h["seed"]], h, kinds))
    summary = {}
    for key, items in pairs.items():
        if not items:
            continue
        summary[key] = {metric: {"mean": statistics.fmean(p[metric] for p in items),
                                 "min": min(p[metric] for p in items), "max": max(p[metric] for p in items)}
                        for metric in items[0] if metric not in ("a", "b")}
    # per-module spread: the whole-vs-chunked log difference in units of the whole estimator's seed std
    per_module = {}
    for name, kind in kinds.items():
        if not kind.startswith("qk"):
            continue
        whole_logs = [math.log(runs["whole", s]["gains"][name]) for s in seeds]
        chunked_logs = [math.log(runs["chunked", s]["gains"][name]) for s in seeds]
        sd = statistics.stdev(whole_logs) if len(whole_logs) > 1 else float("nan")
        per_module[name] = {"whole_log_mean": statistics.fmean(whole_logs), "whole_log_sd": sd,
                            "chunked_log_mean": statistics.fmean(chunked_logs),
                            "chunked_log_sd": statistics.stdev(chunked_logs) if len(chunked_logs) > 1 else float("nan")}
    return {"pairs": pairs, "summary": summary, "qk_modules": per_module}


METRICS = [  # (key, label, format); differences: |log ratio| medians and 90th percentiles, 1 - Spearman, plan difference
    ("qk_median_abs_log", "median \\|log ratio\\|, QK modules", ".3g"),
    ("qk_p90_abs_log", "90th pct \\|log ratio\\|, QK modules", ".3g"),
    ("spearman_all", "1 − Spearman, all modules", ".2g"),
    ("plan_moved_fraction", "plan: params allocated differently", ".3g"),
]
# "Same size" when the whole-vs-chunked mean difference is at most this many times the yardstick's mean.
SAME_SIZE = 1.5


def _difference(key: str, value: float) -> float:
    return 1 - value if key.startswith("spearman") else value


def judge(comparison: dict) -> list[dict]:
    """For each matched comparison and metric: the whole-vs-chunked mean difference against its yardstick's mean and
    largest pair. Within noise: at most SAME_SIZE x the yardstick's mean, or within the yardstick's range."""
    s = comparison["summary"]
    rows = []
    for test, yardstick in MATCHED:
        if test not in s or yardstick not in s:
            continue
        for key, label, fmt in METRICS:
            ref = s[yardstick][key]
            v = _difference(key, s[test][key]["mean"])
            mean = _difference(key, ref["mean"])
            largest = max(_difference(key, ref["min"]), _difference(key, ref["max"]))
            ratio = v / mean if mean > 0 else (0.0 if v == 0 else float("inf"))
            rows.append({"test": test, "yardstick": yardstick, "metric": key, "label": label, "format": fmt,
                         "value": v, "yardstick_mean": mean, "yardstick_largest": largest, "ratio": ratio,
                         "within": ratio <= SAME_SIZE or v <= largest})
    return rows


def verdict(data: dict, comparison: dict) -> tuple[bool | None, str]:
    rows = judge(comparison)
    if not rows:
        return None, "Only one seed was measured, so there is no seed-to-seed yardstick; no verdict."
    ok = all(r["within"] for r in rows)
    n_qk = len(comparison["qk_modules"])
    other_max = max(p["other_max_abs_log"] for p in comparison["pairs"]["whole_vs_chunked_same_seed"])
    stream = data.get("stream_check", {})

    failed = [f"{r['label']} ({r['test'].replace('_', ' ')})" for r in rows if not r["within"]]
    plan = {r["test"]: r for r in rows if r["metric"] == "plan_moved_fraction"}
    plan_same, plan_other = plan.get("whole_vs_chunked_same_seed"), plan["whole_vs_chunked_other_seed"]
    same_text = (f"at the same seed the plans differ in {plan_same['value']:.2%} of the compressible parameters (other QK "
                 f"seed: {plan_same['yardstick_mean']:.2%}), " if plan_same else "")
    text = (
        ("**Agrees within sampling noise.** " if ok else "**Does not agree within sampling noise on every measure.** ")
        + f"Only the {n_qk} QK groups see the change: FFN and VO gains are bit-identical between whole and chunked at the "
        f"same seed (largest |log ratio| {other_max:.1g}), so a same-seed comparison is judged against the previous "
        "estimator with only its QK noise seed changed, and a different-seed comparison against the previous estimator at "
        "another seed (table above). "
        + ("(On the CPU the chunked draw holds the very same normal values as the whole draw of the same seed, in other "
           "(batch, head, query, key) positions: at the same seed only the placement of the noise differs, not its "
           "values or its energy.) "
           if stream.get("all_permutations") else "")
        + (f"Whole-vs-chunked differences are of the same size as the previous estimator's own seed-to-seed differences, "
           f"not larger, for the gains and for the plan: {same_text}at different seeds the plans differ in "
           f"{plan_other['value']:.2%} (previous estimator, other seed: {plan_other['yardstick_mean']:.2%}). "
           "The chunked estimator is the previous one up to its sampling noise."
           if ok else f"Larger than the yardstick: {', '.join(failed)}.")
        + f" Caveat: with {len(data['settings']['seeds'])} seeds the yardstick rests on "
        f"{len(comparison['pairs']['whole_vs_whole'])} whole-vs-whole pairs and is itself rough."
    )
    return ok, text


# ---- the page -----------------------------------------------------------------------------------

def _fmt(stat: dict, digits: str = ".3f") -> str:
    if abs(stat["max"] - stat["min"]) < 1e-12:
        return format(stat["mean"], digits)
    return f"{format(stat['mean'], digits)} ({format(stat['min'], digits)}–{format(stat['max'], digits)})"


def load(path: Path = DEFAULT_JSON) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(data: dict, doc: Path = DEFAULT_DOC) -> list[tuple[Path, str, str]]:
    """The whole page (its "## " parts included), from the results alone."""
    return [(Path(doc), TITLE, page(data))]


def page(data: dict) -> str:
    comparison = compare(data)
    ok, text = verdict(data, comparison)
    st, m = data["settings"], data["machine"]
    log = data["chunk_log"]["chunked"]
    largest = max(log, key=lambda r: r["elements"])
    fewest = min(log, key=lambda r: r["chunks"])
    n_qk = sum(1 for x in data["modules"] if x["kind"].startswith("qk"))
    rel = data.get("_source", relative(DEFAULT_JSON))
    out = [
        TITLE,
        "",
        f"Generated by `benchmarks/gains_agreement.py`; do not edit by hand. Raw data: `{rel}`.",
        "",
        "QK gains inject Gaussian noise on the attention logits. The previous code drew it as one (batch, heads, queries, "
        "keys) tensor; `LogitNoise` now draws it in query chunks of at most `noise_chunk` elements. "
        f"**whole** = `noise_chunk={WHOLE}` (2**62: one draw per attention call, the previous estimator); "
        f"**chunked** = `noise_chunk={st['noise_chunk']['chunked']}` (every one of the {n_qk} QK attentions split: "
        f"the largest, {largest['module']} with logits {'×'.join(map(str, largest['shape']))} = {largest['elements']:,} "
        f"elements, into {largest['chunks']} chunks; the fewest, {fewest['chunks']}). Both use the same generator, seeded "
        "per module and gain seed; FFN and VO noise is drawn as before in both."
        + (" On the CPU a chunked draw holds exactly the values of the whole draw, in other positions (checked for every "
           "logit shape and chunking of this model)." if data.get("stream_check", {}).get("all_permutations") else ""),
        "",
        f"Reference model `{st['model']}`; statistics captured once on the first {st['calibration_prompts']} prompts of "
        f"`{st['prompts_file']}` ({st['num_buckets']} buckets); sampler {st['sampler']['num_inference_steps']} steps, "
        f"guidance {st['sampler']['guidance_scale']}, seed {st['sampler']['seed']}; gains on the first {st['gain_prompts']} "
        f"prompts, {st['calls']} denoiser calls, rel_noise {st['rel_noise']}, gain seeds {', '.join(map(str, st['seeds']))}; "
        f"plans by the `slimdiff` allocator at budget {st['budget']}.",
        "",
        "Per pair of gain sets: |log(g_a/g_b)| over the QK modules (median, 90th percentile, max), Spearman rank correlation "
        "of the gains over all modules and over the QK modules, and the fraction of compressible parameters the two plans "
        "allocate differently (sum over modules of |width_a − width_b| × unit_params / compressible parameters). "
        "Cells: mean over the pairs (min–max). Yardstick rows: the previous estimator at another seed; at the same seed only "
        "the QK noise of whole and chunked differs, so its yardstick takes the whole gains of seed s with the QK gains of "
        "whole seed u ≠ s (exactly what a measurement whose QK noise alone was seeded differently gives, since each module "
        "has its own generator), allocated from the same error curves.",
        "",
        "| pairs | n | median \\|log ratio\\| QK | p90 QK | max QK | Spearman all | Spearman QK | plan: params allocated differently | modules with other width |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, label in CATEGORIES:
        if key not in comparison["summary"]:
            continue
        s = comparison["summary"][key]
        out.append(f"| {label} | {len(comparison['pairs'][key])} | {_fmt(s['qk_median_abs_log'])} | {_fmt(s['qk_p90_abs_log'])} | "
                   f"{_fmt(s['qk_max_abs_log'])} | {_fmt(s['spearman_all'], '.4f')} | {_fmt(s['spearman_qk'], '.3f')} | "
                   f"{_fmt(s['plan_moved_fraction'], '.4f')} | {_fmt(s['plan_modules_differing'], '.1f')} |")
    out += ["", "## Verdict", "",
            f"Whole-vs-chunked mean difference against its yardstick (for Spearman: 1 − ρ). Within noise (✓) when it is at "
            f"most {SAME_SIZE}× the yardstick's mean or no larger than the yardstick's largest pair.", "",
            "| comparison | yardstick | measure | whole vs chunked | yardstick mean | ratio | yardstick largest | within noise |",
            "|---|---|---|---|---|---|---|---|"]
    names = dict(CATEGORIES)
    for r in judge(comparison):
        f = r["format"]
        out.append(f"| {names[r['test']]} | {names[r['yardstick']].removeprefix('yardstick: ')} | {r['label']} | "
                   f"{r['value']:{f}} | {r['yardstick_mean']:{f}} | {r['ratio']:.2f} | {r['yardstick_largest']:{f}} | "
                   f"{'✓' if r['within'] else '✗'} |")
    out += ["", text, ""]
    # per-seed pairs, for the record
    out += ["## Pairs", "", "| a | b | median \\|log ratio\\| QK | p90 QK | Spearman all | plan diff |", "|---|---|---|---|---|---|"]
    for key, _ in CATEGORIES:
        for p in comparison["pairs"].get(key, []):
            out.append(f"| {p['a']} | {p['b']} | {p['qk_median_abs_log']:.3f} | {p['qk_p90_abs_log']:.3f} | "
                       f"{p['spearman_all']:.4f} | {p['plan_moved_fraction']:.4f} |")
    t = data["timings_s"]
    gains_s = [r["seconds"]["gains"] for r in data["runs"]]
    score_s = [r["seconds"]["score"] for r in data["runs"]]
    alloc_s = [r["seconds"]["allocate"] for r in data["runs"]]
    out += [
        "",
        "## Run",
        "",
        *provenance(data, f"{m['arch']} CPU, {m['cpu_count']} cores, torch {m['torch']}, Python {m['python']}"),
        f"{m['torch_threads']} torch thread(s); diffusers {m['diffusers']}.",
        "",
        f"Wall time: load {t['load']:.1f} s, capture {t['capture']:.1f} s, chunk count {t['chunk_count']:.1f} s, "
        f"gains {sum(gains_s):.1f} s for {len(gains_s)} sets ({min(gains_s):.1f}–{max(gains_s):.1f} s each), "
        f"score {sum(score_s):.1f} s ({min(score_s):.1f}–{max(score_s):.1f} s each), allocate {sum(alloc_s):.1f} s, "
        f"yardstick plans (QK seed only) {t.get('hybrid_plans', 0.0):.1f} s; "
        f"total {t['total'] / 60:.1f} min.",
        "",
        "| seed | setting | gains s | score s | allocate s |",
        "|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        out.append(f"| {r['seed']} | {r['setting']} | {r['seconds']['gains']:.1f} | {r['seconds']['score']:.1f} | "
                   f"{r['seconds']['allocate']:.2f} |")
    out += ["", "Re-render this page from the results file without measuring:", "", "```bash",
            ".venv/bin/python benchmarks/gains_agreement.py --render-only"
            + ("" if rel == relative(DEFAULT_JSON) else f" --json {rel}"), "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from-json", type=Path, help="regenerate the page from this JSON without measuring")
    p.add_argument("--render-only", action="store_true", help="regenerate the page from --json without measuring")
    p.add_argument("--model", type=Path, default=Path("data/reference/model"))
    p.add_argument("--prompts", type=Path, default=Path("data/reference/captions.jsonl"))
    p.add_argument("--num-prompts", type=int, default=128, help="calibration prompts: the first N of --prompts")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--num-buckets", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--gain-prompts", type=int, default=8)
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--rel-noise", type=float, default=0.05)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--chunk", type=int, default=4096, help="noise_chunk of the chunked estimator (elements)")
    p.add_argument("--budget", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    args = p.parse_args(argv)
    args.argv = argv
    if args.render_only and args.from_json is None:
        args.from_json = args.json
    if args.from_json is not None:
        if not args.from_json.is_file():
            p.error(f"--from-json {args.from_json}: no such file")
        data = read_results(args.from_json)
    else:
        data = run(args)
        comparison = compare(data)
        data["derived"] = {"summary": comparison["summary"], "judgement": judge(comparison),
                           "agrees": verdict(data, comparison)[0]}
        write_results(args.json, data, sort_keys=True)
        data = read_results(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    write_sections(render(data, args.doc))
    print(f"wrote {args.doc}", file=sys.stderr)
    comparison = compare(data)
    for r in judge(comparison):
        print(f"{r['test']:<28} {r['metric']:<20} {r['value']:.4g} vs yardstick {r['yardstick_mean']:.4g} "
              f"(x{r['ratio']:.2f}) {'within noise' if r['within'] else 'LARGER'}")
    print("verdict:", {True: "agrees within sampling noise", False: "does not agree on every measure",
                       None: "no verdict"}[verdict(data, comparison)[0]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
