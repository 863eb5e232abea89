"""How much of a LoRA's effect survives compression (issue 25): the reference LoRA (brown plain backgrounds, rank 4 on
every attention projection and FFN linear of the reference UNet) on the original model, projected onto the model
compressed at each budget (``slimdiff lora``), and cut to the slim shapes (its first rows and columns: the naive way
to make it load), side by side in one run.

The effect is read by the reference evaluator (``slimdiff.reference.lora.lora_effect``): the fraction of images for
prompts without a background phrase drawn with a brown background, the graded shift of the median colour from black
(0) to brown (1), and the object alignment against the prompts as the LoRA should draw them. Writes
benchmarks/results/lora_projection.json and renders its section of docs/lora.md.

    .venv/bin/python benchmarks/lora_projection.py                 # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/lora_projection.py --render-only
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_results, write_sections  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lora_projection.json"
DOC = ROOT / "docs" / "lora.md"
HEADING = "## Measured on the reference LoRA"
LORA_DIR = ROOT / "data" / "reference" / "lora"


def cut_lora(state: dict, key: str, maps: dict, slim_denoiser) -> dict:
    """The LoRA cut to the slim model's shapes: A's first input columns, B's first output rows, on the slim module."""
    from torch import nn

    shapes = {n: m.weight.shape for n, m in slim_denoiser.named_modules() if isinstance(m, nn.Linear)}
    out = {}
    for name, tensor in state.items():
        module, side = name[len(key) + 1: name.index(".lora_")], "lora_A" if ".lora_A." in name else "lora_B"
        target = maps[module].target if module in maps else module
        out_features, in_features = shapes[target]
        part = tensor[:, :in_features] if side == "lora_A" else tensor[:out_features]
        out[f"{key}.{target}.{side}.weight"] = part.contiguous()
    return out


KINDS = {"query-key": ("to_q", "to_k"), "value-output": ("to_v", "to_out.0"), "FFN": ("ff.net.0.proj", "ff.net.2")}


def denoiser_inputs(pipe, prompts: list[str], seed: int = 0) -> list[tuple]:
    """(latents, timestep, text embeddings) at three timesteps of the sampler's range, for comparing output changes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        text = pipe.text_encoder(tokens.input_ids)[0]
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(prompts), pipe.unet.config.in_channels, size, size, generator=generator)
    return [(latents * float(pipe.scheduler.init_noise_sigma), torch.full((len(prompts),), t), text) for t in (900, 500, 100)]


def output_change(pipe, lora: Path | None, inputs: list[tuple]):
    """The UNet's output with ``lora`` loaded minus without, over ``inputs`` (concatenated)."""
    import torch

    def outputs():
        with torch.no_grad():
            return torch.cat([pipe.unet(x, t, text).sample for x, t, text in inputs])

    base = outputs()
    pipe.load_lora_weights(str(lora))
    try:
        return outputs() - base
    finally:
        pipe.unload_lora_weights()


def kind_errors(original, slim, state: dict, maps: dict, folder: Path, tmp: Path, budget: float, inputs: list[tuple]) -> list[dict]:
    """Per module kind: the relative error of the UNet's output change with the LoRA's pairs of that kind only, projected
    and cut, against the original's output change with the same pairs."""
    from safetensors.torch import save_file

    from slimdiff.runtime.lora import project_lora

    rows = []
    for kind, ends in KINDS.items():
        only = {k: v for k, v in state.items() if k[: k.index(".lora_")].endswith(ends)}
        path = tmp / f"kind-{kind}.safetensors"
        save_file(only, str(path))
        wanted = output_change(original, path, inputs)
        projected = tmp / f"kind-{kind}-{budget}-projected.safetensors"
        project_lora(path, folder, projected, overwrite=True)
        cut = tmp / f"kind-{kind}-{budget}-cut.safetensors"
        save_file(cut_lora(only, "unet", maps, slim.unet), str(cut))
        row = {"budget": budget, "kind": kind, "modules": len(only) // 2}
        for variant, file in (("projected", projected), ("cut", cut)):
            change = output_change(slim, file, inputs)
            row[variant] = float((change - wanted).norm() / wanted.norm())
        rows.append(row)
        print(row, flush=True)
    return rows


def measure(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    import slimdiff
    from slimdiff.compress import SlimDiffConfig, compress_pipeline, read_prompts
    from slimdiff.reference import load_reference_pipeline
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.reference.lora import LORA_WEIGHT_NAME, Sampling, evaluation_prompt_sets, lora_effect
    from slimdiff.runtime.lora import LORA_MAPS_NAME, project_lora, read_lora, read_maps
    from slimdiff.runtime.sampling import SamplerSettings

    lora_file = LORA_DIR / LORA_WEIGHT_NAME
    if not lora_file.is_file():
        raise SystemExit(f"{lora_file}: missing; train it first (DVC_NO_ANALYTICS=1 dvc repro data/reference/dvc.yaml:train_lora)")
    torch.manual_seed(0)
    evaluator = load_evaluator(ROOT / "data" / "reference" / "evaluator")
    original = load_reference_pipeline("cpu")
    prompts = evaluation_prompt_sets(args.n_plain, 0)["plain"]
    sampling = Sampling(steps=args.steps)
    calibration = read_prompts(ROOT / "data" / "reference" / "captions.jsonl")[: args.calibration_prompts]
    sampler = SamplerSettings(args.steps, 4.0, seed=0)
    rows = []

    def effect(pipe, model: str, lora: str, budget: float) -> None:
        start = time.perf_counter()
        measured = lora_effect(pipe, prompts, evaluator, sampling)
        rows.append({"model": model, "budget": budget, "lora": lora, "effect": measured["effect"], "shift": measured["shift"],
                     "object": measured["alignment"]["object"], "overall": measured["alignment"]["overall"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)

    effect(original, "original", "none", 0.0)
    original.load_lora_weights(str(LORA_DIR))
    effect(original, "original", "original", 0.0)
    original.unload_lora_weights()
    pairs, _ = read_lora(lora_file, type(original))
    state = {}
    for (component, module), entry in pairs.items():
        state[f"unet.{module}.lora_A.weight"] = entry["A"]
        state[f"unet.{module}.lora_B.weight"] = (entry["B"] * entry["scale"]).contiguous()
    projections, kinds = [], []
    inputs = denoiser_inputs(original, prompts[:16])
    with tempfile.TemporaryDirectory(prefix="slimdiff-lora-bench-") as tmp:
        tmp = Path(tmp)
        for budget in args.budgets:
            slim = copy.deepcopy(original)
            result = compress_pipeline(slim, calibration, SlimDiffConfig(budget=budget, batch_size=50), sampler, progress=True)
            folder = slimdiff.save(slim, tmp / f"slim-{budget}", result.info("reference"), lora_maps=result.lora_maps)
            start = time.perf_counter()
            projection = project_lora(lora_file, folder, tmp / f"projected-{budget}.safetensors")
            seconds = time.perf_counter() - start
            _, maps, _ = read_maps(folder)
            save_file(cut_lora(state, "unet", maps, slim.unet), str(tmp / f"cut-{budget}.safetensors"))
            weights = sum(p.stat().st_size for p in (folder / "unet").glob("diffusion_pytorch_model*.safetensors"))
            projections.append({"budget": budget, "counts": projection.counts(), "seconds": round(seconds, 2),
                                "maps_bytes": (folder / "unet" / LORA_MAPS_NAME).stat().st_size, "unet_bytes": weights,
                                "removed": result.plan.removed})
            print(projections[-1], flush=True)
            loaded = slimdiff.load(folder)
            kinds += kind_errors(original, loaded, state, maps, folder, tmp, budget, inputs)
            effect(loaded, "compressed", "none", budget)
            for variant in ("projected", "cut"):
                loaded.load_lora_weights(str(tmp / f"{variant}-{budget}.safetensors"))
                effect(loaded, "compressed", variant, budget)
                loaded.unload_lora_weights()
    return {"n_plain": args.n_plain, "steps": args.steps, "calibration_prompts": len(calibration), "rows": rows,
            "projections": projections, "kinds": kinds}


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(results: dict) -> list[tuple[Path, str, str]]:
    rows = results["rows"]
    base = next(r for r in rows if r["model"] == "original" and r["lora"] == "original")
    table = []
    for r in rows:
        model = "original" if r["model"] == "original" else f"compressed, {r['budget']:.0%} budget"
        lora = {"none": "none", "original": "the LoRA", "projected": "projected (`slimdiff lora`)",
                "cut": "cut to the slim shapes"}[r["lora"]]
        kept = "" if r["lora"] in ("none", "original") else f"{r['shift'] / base['shift']:.0%}" if base["shift"] else ""
        table.append([model, lora, f"{r['effect']:.0%}", f"{r['shift']:.3f}", kept, f"{r['object']:.3f}", f"{r['overall']:.3f}"])
    projection_rows = [[f"{p['budget']:.0%}", p["counts"]["exact"], p["counts"]["least squares"], p["counts"]["unchanged"],
                        f"{p['seconds']:.2f}", f"{p['maps_bytes'] / 2**20:.2f} MiB ({p['maps_bytes'] / p['unet_bytes']:.0%} of the UNet)"]
                       for p in results["projections"]]
    kind_rows = [[f"{k['budget']:.0%}", k["kind"], k["modules"], f"{k['projected']:.3f}", f"{k['cut']:.3f}"]
                 for k in results.get("kinds", [])]
    text = f"""{HEADING}

The reference LoRA (`data/reference/lora`, rank 4 on `to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`
of every transformer block: it paints plain backgrounds brown) on the original reference model, and on the model
compressed at each budget from {results['calibration_prompts']} calibration captions, projected or cut to the slim
shapes. {results['n_plain']} evaluation prompts without a background phrase, {results['steps']} sampler steps, read by the
reference evaluator. *Brown* is the fraction of images with a brown background, *shift* the median colour's position
from black (0) to brown (1), *kept* the shift as a fraction of the original model's with the LoRA; *object* and
*overall* the evaluator's alignment with the prompts as the LoRA should draw them.

{markdown_table(["model", "LoRA", "brown", "shift", "kept", "object", "overall"], table)}

The relative error of the UNet's output change (the LoRA's pairs of one module kind only, on 16 evaluation prompts'
embeddings and Gaussian latents at timesteps 900, 500 and 100), against the original model's output change with the
same pairs: `|d_slim - d_original| / |d_original|`, so 0 is the effect kept exactly and 1 is as far off as no LoRA.

{markdown_table(["budget", "module kind", "LoRA modules", "projected", "cut to the slim shapes"], kind_rows)}

How each LoRA module moved, the projection's time and the maps' size on disk:

{markdown_table(["budget", "exact", "least squares", "unchanged", "seconds", "maps file"], projection_rows)}

{chr(10).join(provenance(results))}

Raw figures: `benchmarks/results/lora_projection.json`; re-render: `.venv/bin/python benchmarks/lora_projection.py --render-only`.
"""
    return [(DOC, HEADING, text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--n-plain", type=int, default=100, help="evaluation prompts without a background phrase")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--calibration-prompts", type=int, default=100)
    parser.add_argument("--render-only", action="store_true", help="only re-render the section from the results file")
    args = parser.parse_args(argv)
    if not args.render_only:
        write_results(RESULTS, {**run_record(__file__, argv), **measure(args)})
    results = load(RESULTS)
    if results is None:
        raise SystemExit(f"{RESULTS}: no results file; run the benchmark first")
    write_sections(render(results))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
