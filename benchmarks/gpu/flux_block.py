"""One real-width Flux block pair on one GPU: capture, scores, MACs plan, decomposition, latency (issue 12).

FLUX.1-dev's transformer configuration (3072 wide = 24 heads x 128, MLP 4x, T5 width 4096, guidance
embedding) with reduced depth (default one double and one single block) and seeded random weights (no
download), in bfloat16 on CUDA: denoiser calls at 1024 px (4096 image tokens, 512 text tokens) over
several timesteps are captured, scored with unit gains, allocated under a MACs budget (default keep
70 %), decomposed, and timed against the original, interleaved. Measuring writes --out (with the command, the machine
and the code version); its section of the GPU docs page (--doc) is rendered from that file alone.

    python benchmarks/gpu/flux_block.py --out benchmarks/results/flux_block.json      # on a CUDA machine (run.sh)
    python benchmarks/gpu/flux_block.py --smoke --out /tmp/flux_block.json           # tiny widths, any device (CI)
    python benchmarks/gpu/flux_block.py --render-only --doc docs/benchmarks-gpu.md   # re-render from --out
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sd15 import denoiser_latency  # noqa: E402

from slimdiff.planning.allocation import allocate
from slimdiff.arch import adapter_for  # noqa: E402
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import Capture
from slimdiff.arch.sites import sites_for
from slimdiff.device import describe_device, resolve_device, resolve_dtype, synchronize  # noqa: E402
from slimdiff.arch import compressible_groups, find_groups, left_intact
from slimdiff.scoring.influence import Granularity, score
from slimdiff.decomposition.apply import decompose
from benchmarks.pages import provenance, read_results, run_record, write_results, write_sections  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SMOKE = dict(FLUX_DEV, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
             axes_dims_rope=(2, 2, 4), in_channels=16)
MARK = "## Flux at real width on the GPU (benchmarks/gpu/flux_block.py, issue 12)"  # its section's heading
RESULTS = ROOT / "benchmarks" / "results" / "flux_block.json"
DOC = ROOT / "docs" / "benchmarks-gpu.md"


def build(config: dict, double: int, single: int, device: torch.device, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(**{**config, "num_layers": double, "num_single_layers": single})
    return model.to(dtype).eval()


def inputs(model, image_tokens: int, text_tokens: int, timestep: float, seed: int, device, dtype) -> dict:
    """A FluxPipeline-shaped call: packed latents, T5 states, pooled CLIP, RoPE ids of a square latent grid, guidance."""
    config = model.config
    generator = torch.Generator(device="cpu").manual_seed(seed)
    side = int(image_tokens ** 0.5)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    call = dict(hidden_states=randn(1, side * side, config.in_channels),
                encoder_hidden_states=randn(1, text_tokens, config.joint_attention_dim),
                pooled_projections=randn(1, config.pooled_projection_dim),
                timestep=torch.full((1,), timestep / 1000, device=device, dtype=dtype),
                img_ids=img_ids.reshape(-1, 3).to(device, dtype), txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=dtype))
    if config.guidance_embeds:
        call["guidance"] = torch.full((1,), 3.5, device=device, dtype=dtype)
    return call


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    config = SMOKE if args.smoke else FLUX_DEV
    image_tokens, text_tokens = (16, 8) if args.smoke else ((args.resolution // 16) ** 2, args.text_tokens)
    model = build(config, args.double, args.single, device, dtype)
    groups = find_groups(model)
    result: dict = {"device": describe_device(device), "dtype": str(dtype).replace("torch.", ""), "smoke": args.smoke,
                    "torch": torch.__version__, "python": platform.python_version(), "double_blocks": args.double,
                    "single_blocks": args.single, "image_tokens": image_tokens, "text_tokens": text_tokens,
                    "params": sum(p.numel() for p in model.parameters()), "groups": len(groups),
                    "left_intact": sorted({v["note"] for v in left_intact(groups).values()})}
    timesteps = [1000 * (i + 0.5) / args.calls for i in range(args.calls)]
    calls = [inputs(model, image_tokens, text_tokens, t, i, device, dtype) for i, t in enumerate(timesteps)]
    scale = adapter_for(model).TIMESTEP_SCALE
    synchronize(device)
    began = time.perf_counter()
    with ActivationRecorder(model, sites_for(compressible_groups(model)), 1, 1000, timestep_scale=scale) as recorder, \
            torch.inference_mode():
        for call in calls:
            model(**call)
    synchronize(device)
    result["capture_s"] = time.perf_counter() - began
    capture = Capture(recorder.stats, {"site_tokens": dict(recorder.site_tokens)})
    result["statistics_gib"] = capture.nbytes / 2**30
    began = time.perf_counter()
    scores = score(model, capture, None, Granularity(ffn_step=args.ffn_step, rank_step=args.rank_step), require_gains=False)
    result["score_s"] = time.perf_counter() - began
    plan = allocate(scores, args.macs, budget_kind="macs")
    result.update(macs_kept=plan.macs_after / plan.macs_before, params_removed=plan.removed / plan.params_before,
                  kinds_kept={k: sum(e.width for e in plan.modules if e.kind == k) / sum(e.full_width for e in plan.modules if e.kind == k)
                              for k in sorted({e.kind for e in plan.modules})})
    compressed = copy.deepcopy(model)
    synchronize(device)
    began = time.perf_counter()
    decompose(compressed, capture, plan.widths)
    synchronize(device)
    result["decompose_s"] = time.perf_counter() - began
    held_out = inputs(model, image_tokens, text_tokens, 500.0, 10_000, device, dtype)
    with torch.inference_mode():
        reference, output = model(**held_out).sample.float(), compressed(**held_out).sample.float()
    result["output_rel_error"] = float((reference - output).norm() / reference.norm())
    latency = denoiser_latency({"original": model, "compressed": compressed}, held_out, device, args.repeats)
    result.update(latency_ms=latency, speedup=latency["original"] / latency["compressed"])
    return result


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(r: dict, doc: Path = DOC) -> list[tuple[Path, str, str]]:
    return [(Path(doc), MARK, section(r))]


def section(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.0%} |" for k, v in r["kinds_kept"].items())
    run = "\n".join(provenance(r, f"{r['device']}; torch {r['torch']}"))
    return f"""{MARK}

{r['double_blocks']} double + {r['single_blocks']} single block(s) ({'smoke, tiny widths' if r['smoke'] else 'FLUX.1-dev widths'})
on {r['device']}, {r['dtype']}: {r['params']:,} parameters, seeded random weights, {r['image_tokens']} image +
{r['text_tokens']} text tokens, batch 1. Unit gains, MACs budget.

{run}

| step | value |
|---|---|
| capture of {r.get('calls', '')} calls | {r['capture_s']:.1f} s ({r['statistics_gib']:.2f} GiB of statistics) |
| scores | {r['score_s']:.1f} s |
| decomposition | {r['decompose_s']:.1f} s |
| MACs kept / parameters removed | {r['macs_kept']:.1%} / {r['params_removed']:.1%} |
| denoiser call, original | {r['latency_ms']['original']:.1f} ms |
| denoiser call, compressed | {r['latency_ms']['compressed']:.1f} ms |
| **speed-up** | **x{r['speedup']:.2f}** |
| output relative error (held-out call, random weights) | {r['output_rel_error']:.3f} |

Width kept per group kind:

| kind | width kept |
|---|---|
{rows}

Left intact: {'; '.join(r['left_intact']) or 'nothing'}.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths, any device (CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--double", type=int, default=1, help="double blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=1, help="single blocks (FLUX.1-dev: 38)")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=8, help="captured denoiser calls (timesteps spread over the schedule)")
    parser.add_argument("--macs", type=float, default=0.7, help="fraction of compressible MACs to keep")
    parser.add_argument("--ffn-step", type=int, default=128)
    parser.add_argument("--rank-step", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flux_block.json"))
    parser.add_argument("--doc", default="", help="markdown page to write this section into ('' for none)")
    parser.add_argument("--render-only", action="store_true", help="only render the section from --out into --doc")
    args = parser.parse_args(argv)
    if args.render_only:
        result = load(Path(args.out))
        if result is None:
            raise SystemExit(f"{args.out}: no results file; run the benchmark first")
        write_sections(render(result, Path(args.doc or DOC)))
        return 0
    if args.smoke:
        args.ffn_step, args.rank_step = 8, 1
    record = run_record(__file__, argv)
    result = {**record, **run(args), "calls": args.calls}
    write_results(Path(args.out), result)
    result = read_results(Path(args.out))
    if args.doc:
        write_sections(render(result, Path(args.doc)))
    print(section(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
