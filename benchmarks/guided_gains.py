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
alignment). An experiment, reported, not a gate. ``--model unet`` runs the same comparison on the UNet reference and
the main job's sampler (CFG in one doubled batch [unconditional; conditional]), at a parameter budget by default.

    SLIMDIFF_THREADS=auto .venv/bin/python benchmarks/guided_gains.py --threads 2 [--macs 0.6] [--uniform 0.4]
        [--eval-prompts 192] [--out benchmarks/results/guided_gains.json]
    SLIMDIFF_THREADS=auto .venv/bin/python benchmarks/guided_gains.py --threads 2 --model unet [--params 0.4]
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


MODELS = ("flux", "unet")


def kind_key(module) -> str:
    """A plan entry's group kind, the Flux feed-forwards told apart (text stream, image stream, single-block MLP)."""
    if not module.kind.startswith("ffn"):
        return module.kind
    return "single mlp" if module.name.startswith("single") else "ff_context" if ".ff_context" in module.name else "ff"


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from benchmarks.dit import JOB, capture_and_score, job_params
    from benchmarks.quality import row_of, with_denoiser
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.baselines import compress_with
    from slimdiff.compress import SlimDiffConfig, read_prompts
    from slimdiff.cost import count_params
    from slimdiff.decomposition.apply import decompose
    from slimdiff.device import apply_threads
    from slimdiff.pipeline.evaluation import evaluate
    from slimdiff.pipeline.stages import load_params, sampler_settings
    from slimdiff.planning.allocation import Budget, allocate
    from slimdiff.reference import load_reference_flux_pipeline, load_reference_pipeline
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.scoring.gains import measure_gains

    apply_threads(args.threads)
    if args.model == "flux":
        params, slimset, model_id = job_params(), JOB / "outputs" / "slimset" / "slimset.jsonl", "reference-flux"
        pipe = load_reference_flux_pipeline()
    else:
        params, slimset, model_id = load_params(ROOT / "params.yaml"), ROOT / "outputs" / "slimset" / "slimset.jsonl", "reference"
        pipe = load_reference_pipeline()
    sampler = sampler_settings(params)
    calibration = read_prompts(slimset)[: args.calibration_prompts]
    eval_prompts = read_prompts(ROOT / "data" / "reference" / "eval_prompts.jsonl")[: args.eval_prompts]
    pipe.set_progress_bar_config(disable=True)
    _, original = denoiser_of(pipe)
    evaluator = load_evaluator()
    started = time.perf_counter()
    stats, scores = capture_and_score(pipe, calibration, sampler, 64, model_id=model_id)
    guided = measure_gains(pipe, calibration[:GAIN_PROMPTS], sampler, num_calls=GAIN_PAIRS, progress=True,
                           reference=SlimDiffConfig(gain_target="guided").gain_reference(stats)).gains
    guided_scores = copy.deepcopy(scores)
    for module in guided_scores.modules:
        module.gain = guided[module.name]
    print(f"capture, scores and guided gains: {time.perf_counter() - started:.0f} s", flush=True)
    results = {**run_record(__file__, argv), "settings": {k: v for k, v in vars(args).items()}, "sampler": sampler.to_dict(),
               "gains": [{"module": m.name, "kind": m.kind, "single_calls": m.gain, "guided": guided[m.name]}
                         for m in scores.modules], "rows": []}
    kind, point = ("macs", args.macs) if args.macs is not None else ("params", args.params)
    variants = (("slimdiff, single-call gains", scores, kind, point),
                ("slimdiff, guided gains", guided_scores, kind, point),
                ("uniform", scores, "uniform", args.uniform if args.uniform is not None else point))
    for label, which, kind, point in variants:
        denoiser = copy.deepcopy(original)
        if kind == "uniform":
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
                width, full = kept.get(kind_key(m), (0, 0))
                kept[kind_key(m)] = (width + m.width, full + m.full_width)
            kept = {k: w / f for k, (w, f) in kept.items()}
        metrics = evaluate(pipe, with_denoiser(pipe, denoiser), eval_prompts, sampler, evaluator,
                           batch_size=args.batch_size, measure_latency=False)
        row = {**row_of("slimdiff_uniform" if kind == "uniform" else "slimdiff", point, len(calibration), removed, metrics),
               "label": label, "budget_kind": "params" if kind == "uniform" else kind, "kept_by_kind": kept}
        results["rows"].append(row)
        print(f"{label:<28} {row['budget_kind']} {point:.2f} macs ratio {row['macs_ratio']:.2f} "
              f"removed {row['removed_fraction_compressible']:.3f} sqnr {row['noise_sqnr_db']:.2f} "
              f"gcos {row['guidance_cosine']:.3f} psnr {row['image_psnr_db']:.2f} fd {row['fd_to_original']:.2f} "
              f"align {row['alignment_overall']:.3f} kept {kept} ({time.perf_counter() - started:.0f} s)", flush=True)
    results["seconds"] = time.perf_counter() - started
    write_results(Path(args.out), results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="flux",
                        help="flux: the Flux-style reference and its job (true CFG); unet: the UNet reference and the "
                             "main job (CFG in one doubled batch)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--macs", type=float, default=None,
                        help="kept fraction of the compressible MACs (slimdiff; default 0.6 for --model flux)")
    budget.add_argument("--params", type=float, default=None,
                        help="removed fraction of the compressible parameters (slimdiff; default 0.4 for --model unet)")
    parser.add_argument("--uniform", type=float, default=None,
                        help="removed fraction of the parameters, uniform widths (default: 0.4 with --macs, else the "
                             "--params budget)")
    parser.add_argument("--calibration-prompts", type=int, default=None,
                        help="first prompts of the job's SlimSet (default: 128 for flux, as benchmarks/dit.py; all "
                             "for unet, as the main job)")
    parser.add_argument("--eval-prompts", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/guided_gains.json, "
                                                    "guided_gains_unet.json for --model unet)")
    args = parser.parse_args(argv)
    if args.macs is None and args.params is None:
        if args.model == "flux":
            args.macs = 0.6
        else:
            args.params = 0.4
    if args.macs is not None and args.uniform is None:
        args.uniform = 0.4
    if args.calibration_prompts is None and args.model == "flux":
        args.calibration_prompts = 128
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / ("guided_gains.json" if args.model == "flux"
                                                            else "guided_gains_unet.json"))
    for name, value in (("--macs", args.macs), ("--params", args.params), ("--uniform", args.uniform)):
        if value is not None and not 0 < value < 1:
            parser.error(f"{name} is a fraction in (0, 1), got {value}")
    measure(args, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
