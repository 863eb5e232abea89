"""Experiment (issue 26): truncation gains measured on the guided output instead of on single denoiser calls.

On the Flux-style reference, sampled with true classifier-free guidance 4 (``eps_u + 4 (eps_c - eps_u)``, two
denoiser calls a step), slimdiff's ``--macs`` plans predict each call better than uniform widths but keep the
conditional-minus-unconditional direction worse, and lose to them on FD at equal MACs (docs/reference-flux-model.md).
The pipeline's truncation gains price a group by the change of each call's output (``score.gain_target: call``). This
script measures them on the guided combination of each step's (conditional, unconditional) call pair instead
(``score.gain_target: guided``, the pipeline's ``measure_gains`` with a guided reference), so that a group whose error
moves the guidance direction is priced by what the sampler makes of it, and compares, on one capture and one set of
evaluation prompts (quality at equal MACs; no speed is timed):

- slimdiff at ``--macs P`` with the pipeline's gains (single calls),
- slimdiff at ``--macs P`` with guided gains,
- uniform widths at the same MACs (``--uniform``, a params budget).

Same capture as benchmarks/dit.py (first 128 prompts of the Flux job's SlimSet, batch 64) and the same gain prompts
and reference width; the evaluation is dit.py's (teacher-forced SQNR, guidance cosine, PSNR, FD to the original,
alignment). An experiment, reported, not a gate.

    SLIMDIFF_THREADS=auto .venv/bin/python benchmarks/guided_gains.py --threads 2 [--macs 0.6] [--uniform 0.4]
        [--eval-prompts 192] [--out benchmarks/results/guided_gains.json]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import run_record, write_results  # noqa: E402

GAIN_PROMPTS = 8  # as capture_and_score's gains
GAIN_PAIRS = 4  # steps' call pairs spread over the schedule (the pipeline's gains use 4 calls)


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from benchmarks.dit import JOB, capture_and_score, job_params
    from benchmarks.quality import row_of, with_denoiser
    from slimdiff.baselines import compress_with
    from slimdiff.compress import SlimDiffConfig, read_prompts
    from slimdiff.cost import count_params
    from slimdiff.decomposition.apply import decompose
    from slimdiff.device import apply_threads
    from slimdiff.pipeline.evaluation import evaluate
    from slimdiff.pipeline.stages import sampler_settings
    from slimdiff.planning.allocation import Budget, allocate
    from slimdiff.reference import load_reference_flux_pipeline
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.scoring.gains import measure_gains

    apply_threads(args.threads)
    sampler = sampler_settings(job_params())
    if sampler.guidance_argument != "true_cfg_scale":
        raise SystemExit(f"the Flux job samples with {sampler.guidance_argument}; this experiment needs true CFG")
    calibration = read_prompts(JOB / "outputs" / "slimset" / "slimset.jsonl")[:128]
    eval_prompts = read_prompts(ROOT / "data" / "reference" / "eval_prompts.jsonl")[: args.eval_prompts]
    pipe = load_reference_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    evaluator = load_evaluator()
    started = time.perf_counter()
    stats, scores = capture_and_score(pipe, calibration, sampler, 64)
    guided = measure_gains(pipe, calibration[:GAIN_PROMPTS], sampler, num_calls=GAIN_PAIRS, progress=True,
                           reference=SlimDiffConfig(gain_target="guided").gain_reference(stats)).gains
    guided_scores = copy.deepcopy(scores)
    for module in guided_scores.modules:
        module.gain = guided[module.name]
    print(f"capture, scores and guided gains: {time.perf_counter() - started:.0f} s", flush=True)
    results = {**run_record(__file__, argv), "settings": {k: v for k, v in vars(args).items()}, "sampler": sampler.to_dict(),
               "gains": [{"module": m.name, "kind": m.kind, "single_calls": m.gain, "guided": guided[m.name]}
                         for m in scores.modules], "rows": []}
    variants = (("slimdiff, single-call gains", scores, "macs", args.macs),
                ("slimdiff, guided gains", guided_scores, "macs", args.macs),
                ("uniform", scores, "params", args.uniform))
    for label, which, kind, point in variants:
        denoiser = copy.deepcopy(pipe.transformer)
        if kind == "params":
            removed = compress_with("slimdiff_uniform", denoiser, stats, which, point)
            kept = None
        else:
            before = count_params(denoiser)
            plan = allocate(which, Budget(point), "slimdiff", budget_kind=kind)
            decompose(denoiser, stats, plan.widths)
            after = count_params(denoiser)
            removed = {"removed_fraction": (before["compressible"] - after["compressible"]) / before["compressible"],
                       "total_after": after["total"], "settings": {"allocator": "slimdiff", "budget_kind": kind}}
            kept = {}
            for m in plan.modules:
                key = (("single mlp" if m.name.startswith("single") else "ff_context" if ".ff_context" in m.name
                        else "ff") if m.kind.startswith("ffn") else m.kind)
                width, full = kept.get(key, (0, 0))
                kept[key] = (width + m.width, full + m.full_width)
            kept = {k: w / f for k, (w, f) in kept.items()}
        metrics = evaluate(pipe, with_denoiser(pipe, denoiser), eval_prompts, sampler, evaluator,
                           batch_size=args.batch_size, measure_latency=False)
        row = {**row_of("slimdiff" if kind == "macs" else "slimdiff_uniform", point, len(calibration), removed, metrics),
               "label": label, "budget_kind": kind, "kept_by_kind": kept}
        results["rows"].append(row)
        print(f"{label:<28} {kind} {point:.2f} macs ratio {row['macs_ratio']:.2f} sqnr {row['noise_sqnr_db']:.2f} "
              f"gcos {row['guidance_cosine']:.3f} psnr {row['image_psnr_db']:.2f} fd {row['fd_to_original']:.1f} "
              f"align {row['alignment_overall']:.3f} kept {kept} ({time.perf_counter() - started:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - started
    write_results(Path(args.out), results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--macs", type=float, default=0.6, help="kept fraction of the compressible MACs (slimdiff)")
    parser.add_argument("--uniform", type=float, default=0.4, help="removed fraction of the parameters, uniform widths")
    parser.add_argument("--eval-prompts", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "guided_gains.json"))
    args = parser.parse_args(argv)
    for name, value in (("--macs", args.macs), ("--uniform", args.uniform)):
        if not 0 < value < 1:
            parser.error(f"{name} is a fraction in (0, 1), got {value}")
    measure(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
