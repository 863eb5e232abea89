"""Is the influence score on one scale across group kinds? Measured on the Flux-style reference (learned weights).

The allocator adds each group's predicted error (its spectral influence score, method.md) and compares them across
kinds (VO of joint and single attention, double and single FFN, adaLN). For a plan, this script cuts one kind at a
time to the plan's widths and measures the noise-to-signal energy of the denoiser's output, teacher-forced on a few
evaluation captions, beside the kind's summed predicted error; then all kinds together. If the score is on one scale,
measured / predicted is about the same for every kind; the sum of the kinds against "all" checks additivity. Both
gain methods side by side on one capture: ``truncation`` (the job's default) and ``noise`` (isotropic noise at each
group's output); the plans are allocated with each method's scores. Same capture and truncation scores as
benchmarks/dit.py (the first 128 prompts of the Flux job's SlimSet). Prints a table; a benchmark reports, it does not
gate. No docs page: ``--out`` writes the figures with the command, the machine and the code version.

    .venv/bin/python benchmarks/kind_calibration.py [--threads 2] [--eval-prompts 8] [--out kind_calibration.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import run_record, write_results  # noqa: E402

# (allocator, budget kind, budget): uniform and slimdiff at about the same MACs (0.64 and 0.65 kept), and slimdiff at
# half the MACs and at 40 % of the parameters removed
PLANS = (("uniform", "params", 0.35), ("slimdiff", "macs", 0.65), ("slimdiff", "macs", 0.5), ("slimdiff", "params", 0.4))


def measure(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from benchmarks.dit import JOB, capture_and_score, job_params
    from benchmarks.quality import with_denoiser
    from slimdiff.compress import read_prompts
    from slimdiff.decomposition.apply import decompose
    from slimdiff.device import apply_threads
    from slimdiff.pipeline.evaluation import fidelity
    from slimdiff.pipeline.stages import sampler_settings
    from slimdiff.planning.allocation import Budget, allocate
    from slimdiff.reference import load_reference_flux_pipeline
    from slimdiff.scoring.gains import measure_gains

    apply_threads(args.threads)
    sampler = sampler_settings(job_params())
    calibration = read_prompts(args.calibration or JOB / "outputs" / "slimset" / "slimset.jsonl")[: args.calibration_prompts]
    prompts = read_prompts(ROOT / "data" / "reference" / "eval_prompts.jsonl")[: args.eval_prompts]
    pipe = load_reference_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    stats, scores = capture_and_score(pipe, calibration, sampler, batch_size=8)
    noise = measure_gains(pipe, calibration[:8], sampler, num_calls=4)  # the same prompts and calls, noise injected
    noise_scores = copy.deepcopy(scores)
    for module in noise_scores.modules:
        module.gain = noise.gains[module.name]
    gains = [{"module": m.name, "kind": m.kind, "truncation": m.gain, "noise": noise.gains[m.name]} for m in scores.modules]
    rows = []
    for (allocator, kind, budget), (method, method_scores) in itertools.product(
            PLANS, (("truncation", scores), ("noise", noise_scores))):
        if allocator == "uniform" and method == "noise":
            continue  # uniform reads no gains: one row
        plan = allocate(method_scores, Budget(budget), allocator, budget_kind=kind)
        for only in sorted({m.kind for m in plan.modules}) + ["all"]:
            cut = [m for m in plan.modules if (only == "all" or m.kind == only) and m.width < m.full_width]
            if not cut:
                continue
            denoiser = copy.deepcopy(pipe.transformer)
            decompose(denoiser, stats, {m.name: m.width for m in cut})
            sqnr = fidelity(pipe, with_denoiser(pipe, denoiser), prompts, sampler, batch_size=8)["noise_sqnr_db"]
            measured = 0.0 if sqnr is None else 10 ** (-sqnr / 10)
            predicted = sum(m.predicted_sis for m in cut)
            rows.append({"plan": f"{allocator} {kind} {budget:g}", "gains": method, "kind": only, "groups": len(cut),
                         "macs_kept": plan.macs_after / plan.macs_before, "removed_fraction": plan.removed / plan.params_before,
                         "predicted_error": predicted, "measured_noise_to_signal": measured, "sqnr_db": sqnr,
                         "measured_per_predicted": measured / predicted if predicted > 0 else None})
            print(f"{rows[-1]['plan']:<22} {method:<10} {only:<11} {len(cut):>3} groups  predicted {predicted:10.4g}  "
                  f"measured {measured:10.4g}  ratio {rows[-1]['measured_per_predicted'] or float('nan'):.3g}", flush=True)
    return {**run_record(__file__, argv), "threads": torch.get_num_threads(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows,
            "gains": gains}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration", type=Path, default=None, help="SlimSet JSONL (default: the Flux job's)")
    parser.add_argument("--calibration-prompts", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("threads", "calibration_prompts", "eval_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    from benchmarks.dit import JOB

    calibration = args.calibration or JOB / "outputs" / "slimset" / "slimset.jsonl"
    if not Path(calibration).is_file():
        raise SystemExit(f"{calibration}: no calibration prompts; run the Flux job first (README: Another model) "
                         "or pass --calibration FILE")
    results = measure(args, argv)
    if args.out:
        write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
