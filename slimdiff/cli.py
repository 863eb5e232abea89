"""Command line: ``slimdiff compress``, ``slimdiff info``, ``slimdiff allocate``.

Errors a user can fix (bad paths, bad budgets, unreadable prompts) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slimdiff.environment import quiet_libraries


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimdiff", description="Training-free structural compression of diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="capture, score, allocate and decompose; save the compressed pipeline")
    c.add_argument("model", help="local diffusers pipeline folder or hub id")
    c.add_argument("--prompts", required=True, help="calibration prompts: .txt (one per line), .json or .jsonl")
    _add_budget_arguments(c, latency_from="measured on --device at the capture's batch and resolution")
    c.add_argument("--out", required=True, help="output folder (diffusers layout)")
    c.add_argument("--allocator", default="slimdiff", choices=["slimdiff", "uniform", "modegpt"])
    c.add_argument("--min-keep", type=float, default=0.1, help="minimum kept fraction per module")
    c.add_argument("--steps", type=int, default=25, help="sampler steps during capture")
    c.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale during capture")
    c.add_argument("--guidance-argument", default="guidance_scale", choices=["guidance_scale", "true_cfg_scale"],
                   help="the pipeline argument that takes --guidance: guidance_scale, or true_cfg_scale (FluxPipeline's "
                   "classifier-free guidance with an empty negative prompt)")
    c.add_argument("--max-sequence-length", type=int, default=None, help="text tokens (pipelines that take it: SD3, Flux)")
    c.add_argument("--height", type=int, default=None)
    c.add_argument("--width", type=int, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--buckets", type=int, default=4, help="timestep buckets")
    c.add_argument("--timestep-grid", type=int, default=64, help="adaLN inputs recorded at this many timesteps over the "
                   "scheduler's whole range (0: at the sampler's timesteps only)")
    c.add_argument("--reg", type=float, default=1e-3, help="covariance regularisation lambda")
    c.add_argument("--ffn-step", type=int, default=8)
    c.add_argument("--rank-step", default="auto", help="per-head width step: a whole number, or auto = 8 on CUDA, 1 elsewhere")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.add_argument("--save-capture", default=None, help="also write the capture (safetensors) here")
    c.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the model's dtype during capture, gains and in the saved model (auto: as the checkpoint's "
                        "denoiser is stored)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")

    i = sub.add_parser("info", help="parameter counts and widths of a compressed folder (from the safetensors headers; "
                       "the files are checked against the sizes and hashes recorded when it was saved)")
    i.add_argument("folder")
    i.add_argument("--json", action="store_true", help="print JSON")

    lo = sub.add_parser("lora", help="project a LoRA made for the original model onto a compressed folder (docs/lora.md); "
                        "the result loads with pipe.load_lora_weights")
    lo.add_argument("lora", help="the LoRA (.safetensors: diffusers, PEFT or kohya layout)")
    lo.add_argument("--model", required=True, help="the compressed model folder (slimdiff.save / the decompose stage)")
    lo.add_argument("--out", required=True, help="where to write the projected LoRA (.safetensors)")
    lo.add_argument("--overwrite", action="store_true")
    lo.add_argument("--table", action="store_true", help="print one row per LoRA module")

    a = sub.add_parser("allocate", help="a width plan from saved influence scores (no model needed)")
    a.add_argument("scores", help="scores JSON written by the score stage")
    _add_budget_arguments(a, latency_from="from --latency-table")
    a.add_argument("--latency-table", default=None, help="latency table JSON (the latency stage's output); with any budget "
                   "kind the plan then records its predicted latency")
    a.add_argument("--device", default=None, help="the deployment device; when given, the latency table must come from it")
    a.add_argument("--allocator", default="slimdiff", choices=["slimdiff", "uniform", "modegpt"])
    a.add_argument("--min-keep", type=float, default=0.1)
    a.add_argument("--out", required=True, help="plan JSON")
    a.add_argument("--plot", default=None, help="PNG of kept fraction per block")
    return parser


def _add_budget_arguments(parser: argparse.ArgumentParser, latency_from: str) -> None:
    """The three budget kinds (exactly one is given; ``_budget_of`` reads them) and ``--tie-qk-vo``."""
    parser.add_argument("--budget", default=None, help="fraction of compressible parameters to remove (0<b<1) or a whole count")
    parser.add_argument("--macs", default=None, help="instead of --budget: keep at most this fraction F of the compressible "
                        "MACs at the capture's resolution (0<F<1)")
    parser.add_argument("--latency", default=None, help="instead of --budget: keep at most this fraction F of the denoiser's "
                        f"latency, {latency_from} (0<F<1)")
    parser.add_argument("--tie-qk-vo", action="store_true", default=None, help="one per-head width for QK and VO of each "
                        "attention (default: tied for --latency, untied otherwise)")


def _budget_of(args: argparse.Namespace):
    """(Budget, kind) from exactly one of --budget (parameters removed), --macs (MACs kept), --latency (latency kept)."""
    from slimdiff.planning.allocation import Budget, BudgetError

    given = [flag for flag in ("budget", "macs", "latency") if getattr(args, flag) is not None]
    if len(given) != 1:
        raise BudgetError("give exactly one budget: --budget B (parameters to remove), --macs F (fraction of MACs to keep) "
                          f"or --latency F (fraction of latency to keep); got {', '.join('--' + g for g in given) or 'none'}")
    kind = given[0]
    if kind == "budget":
        return Budget.parse(args.budget), "params"
    text = getattr(args, kind)
    try:
        keep = float(text)
    except ValueError:
        keep = float("nan")
    if not 0 < keep < 1:
        what = "compressible MACs" if kind == "macs" else "the denoiser's measured latency"
        raise BudgetError(f"--{kind} is the fraction of {what} to keep, 0 < F < 1; got {text}")
    return Budget(keep), kind


def _compress(args: argparse.Namespace) -> int:
    from slimdiff.runtime.sampling import SamplerSettings
    from slimdiff.compress import SlimDiffConfig, compress_pipeline, load_pipeline, read_prompts
    from slimdiff.compress import resolve_model_dtype
    from slimdiff.device import check_dtype_runs, resolve_device, resolve_rank_step
    from slimdiff.runtime.folder import save

    device = resolve_device(args.device)
    dtype = resolve_model_dtype(args.dtype, args.model) if args.dtype != "auto" or Path(args.model).exists() else None
    if dtype is not None:
        check_dtype_runs(device, dtype)
    budget, budget_kind = _budget_of(args)
    config = SlimDiffConfig(budget=budget.value, budget_kind=budget_kind, tie_qk_vo=args.tie_qk_vo, allocator=args.allocator,
                            min_keep=args.min_keep, reg=args.reg, num_buckets=args.buckets, ffn_step=args.ffn_step,
                            rank_step=resolve_rank_step(args.rank_step, device),
                            batch_size=args.batch_size, timestep_grid=args.timestep_grid)
    sampler = SamplerSettings(args.steps, args.guidance, args.height, args.width, args.seed, args.guidance_argument,
                              args.max_sequence_length)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    prompts = read_prompts(args.prompts)
    pipe = load_pipeline(args.model, device, dtype)
    result = compress_pipeline(pipe, prompts, config, sampler, model_id=args.model, progress=not args.quiet)
    if args.save_capture:
        result.capture.save(args.save_capture)
    full_widths = {m.name: m.full_width for m in result.plan.modules}
    save(pipe, out, result.info(args.model), full_widths=full_widths, overwrite=args.overwrite,
         methods={g.name: g.method for g in result.groups}, lora_maps=result.lora_maps)
    result.plan.save(out / "width_plan.json")
    result.plan.plot(out / "width_plan.png")
    print(result.plan.table().splitlines()[-1])
    print(f"saved {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from slimdiff.cost import folder_macs
    from slimdiff.runtime.folder import describe

    info = describe(args.folder)
    macs = folder_macs(args.folder)  # at the capture's call shape, counted on the meta device
    info["macs"] = macs
    info["macs_fraction"] = macs["fraction"] if macs else None
    for key in ("compressible_before", "compressible_after"):
        info[key] = info["params"][key]
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    p = info["params"]
    print(f"{info['model']}: {info['denoiser']}, {p['total']:,} parameters ({info['dtype']}, {info['bytes'] / 2**20:,.1f} MiB); "
          f"compressible {p['compressible_before']:,} -> {p['compressible_after']:,} ({p['removed_fraction']:.1%} removed)")
    if macs:
        print(f"  denoiser MACs per sample and call at the capture's shape: {macs['original_per_call']:,} -> "
              f"{macs['compressed_per_call']:,} ({macs['fraction']:.1%} kept)")
    for name, m in info["modules"].items():
        # an adaLN modulation's width is a rank: below full it is two linears (factorised), at full the original one
        shape = " factorised" if m["kind"] == "adaln" and m["width"] < m["full_width"] else ""
        print(f"  {name:<72} {m['kind']:<10} {m['width']:>5}/{m['full_width']:<5} {m['method']}{shape}")
    for name, m in info["left_intact"].items():
        print(f"  {name:<72} {m['kind']:<10} left intact: {m['note']}")
    return 0


def _allocate(args: argparse.Namespace) -> int:
    from slimdiff.planning.allocation import allocate
    from slimdiff.device import describe_device, resolve_device
    from slimdiff.scoring.influence import InfluenceScores
    from slimdiff.planning.latency import read_latency_table

    budget, budget_kind = _budget_of(args)
    if budget_kind == "latency" and not args.latency_table:
        raise ValueError("--latency needs --latency-table (measured on the deployment device: the latency stage's output)")
    table = read_latency_table(args.latency_table) if args.latency_table else None
    if args.latency_table and table is None and budget_kind == "latency":
        raise ValueError(f"{args.latency_table} records that no latency table was measured (the job's budget was not a "
                         "latency budget); re-run the latency stage with allocate.budget_kind: latency")
    if table is not None and args.device:
        table.check_matches(device=describe_device(resolve_device(args.device)), source=args.latency_table)
    plan = allocate(InfluenceScores.load(args.scores), budget, args.allocator, args.min_keep, budget_kind=budget_kind,
                    tie_qk_vo=args.tie_qk_vo, latency_table=table)
    plan.save(args.out)
    if args.plot:
        plan.plot(args.plot)
    print(plan.table().splitlines()[-1])
    return 0


def _lora(args: argparse.Namespace) -> int:
    from slimdiff.runtime.lora import project_lora

    projection = project_lora(args.lora, args.model, args.out, overwrite=args.overwrite)
    if args.table:
        for row in projection.modules:
            target = "" if row.target == row.module else f" -> {row.target}"
            error = "" if row.predicted_error is None else f"  predicted relative error {row.predicted_error:.3g}"
            print(f"{row.component}.{row.module}{target}  rank {row.rank}  {row.how}{error}")
    print(projection.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    args = _parser().parse_args(argv)
    handlers = {"compress": _compress, "info": _info, "allocate": _allocate, "lora": _lora}
    import torch

    previous_threads = torch.get_num_threads()
    try:
        if args.command == "compress":
            from slimdiff.device import apply_threads

            apply_threads()  # SLIMDIFF_THREADS, else auto: the cores not busy elsewhere
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"slimdiff {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous_threads)  # main() also runs in-process (tests, notebooks)


if __name__ == "__main__":
    raise SystemExit(main())
