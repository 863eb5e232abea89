"""How much of a LoRA's effect survives compression (issue 25): the reference LoRA (brown plain backgrounds, rank 4 on
every attention projection and FFN linear of the reference UNet, or of the Flux-style reference's transformer with
``--model flux``) on the original model, projected onto the model compressed at each budget (``slimdiff lora``), and
cut to the slim shapes (its first rows and columns: the naive way to make it load), side by side in one run.

The effect is read by the reference evaluator (``slimdiff.reference.lora.lora_effect``): the fraction of images for
prompts without a background phrase drawn with a brown background, the graded shift of the median colour from black
(0) to brown (1), and the object alignment against the prompts as the LoRA should draw them. Each model is sampled
with its reference's own evaluation settings (``evaluate`` in its params.yaml: the Flux one with ``true_cfg_scale``, an
empty negative prompt and 24 T5 tokens) and compressed with its job's sampler (``sampler`` in
data/reference-flux/job/params.yaml for Flux). Writes benchmarks/results/lora_projection.json (Flux:
lora_projection_flux.json) and renders its section of docs/lora.md.

    .venv/bin/python benchmarks/lora_projection.py                 # ~10 min on 2 CPU cores
    .venv/bin/python benchmarks/lora_projection.py --model flux --calibration-prompts 64 --n-plain 64
    .venv/bin/python benchmarks/lora_projection.py [--model flux] --render-only
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import markdown_table, provenance, read_results, run_record, write_results, write_sections  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "lora_projection.json"
DOC = ROOT / "docs" / "lora.md"
HEADING = "## Measured on the reference LoRA"
LORA_DIR = ROOT / "data" / "reference" / "lora"
FLUX_RESULTS = ROOT / "benchmarks" / "results" / "lora_projection_flux.json"
FLUX_HEADING = "## Measured on the Flux-style reference LoRA"
FLUX_DIR = ROOT / "data" / "reference-flux"


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
# Flux: a double block's text stream with its image stream; a single block's fused output linear reads the attention
# and the MLP at once (both maps), so it is a kind of its own.
FLUX_KINDS = {"query-key": ("to_q", "to_k", "add_q_proj", "add_k_proj"),
              "value-output": ("to_v", "to_out.0", "add_v_proj", "to_add_out"),
              "FFN": ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp"),
              "single-block proj_out": ("proj_out",)}


def denoiser_inputs(pipe, prompts: list[str], seed: int = 0, max_sequence_length: int | None = None) -> list[dict]:
    """The denoiser's keyword arguments at three timesteps of the sampler's range (UNet: 900, 500, 100; Flux: sigma
    0.9, 0.5, 0.1), on the prompts' text embeddings and Gaussian latents, for comparing output changes."""
    import torch

    from slimdiff.arch.pipelines import denoiser_of

    generator = torch.Generator().manual_seed(seed)
    key, denoiser = denoiser_of(pipe)
    with torch.no_grad():
        if key == "unet":
            tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            text = pipe.text_encoder(tokens.input_ids)[0]
            size = denoiser.config.sample_size
            latents = torch.randn(len(prompts), denoiser.config.in_channels, size, size, generator=generator)
            return [{"sample": latents * float(pipe.scheduler.init_noise_sigma), "timestep": torch.full((len(prompts),), t),
                     "encoder_hidden_states": text} for t in (900, 500, 100)]
        from slimdiff.reference.flux_model import latent_token_ids, pack_latents

        length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        t5, pooled, text_ids = pipe.encode_prompt(prompts, device="cpu", **length)
        size = pipe.default_sample_size  # latents per image side, 2 x 2 of them packed into a token
        latents = pack_latents(torch.randn(len(prompts), denoiser.config.in_channels // 4, size, size, generator=generator))
        return [{"hidden_states": latents, "timestep": torch.full((len(prompts),), sigma), "encoder_hidden_states": t5,
                 "pooled_projections": pooled, "img_ids": latent_token_ids(size), "txt_ids": text_ids}
                for sigma in (0.9, 0.5, 0.1)]


def output_change(pipe, lora: Path | None, inputs: list[dict]):
    """The denoiser's output with ``lora`` loaded minus without, over ``inputs`` (concatenated)."""
    import torch

    from slimdiff.arch.pipelines import denoiser_of

    def outputs():
        with torch.no_grad():
            return torch.cat([denoiser_of(pipe)[1](**kwargs).sample for kwargs in inputs])

    base = outputs()
    pipe.load_lora_weights(str(lora))
    try:
        return outputs() - base
    finally:
        pipe.unload_lora_weights()


def kind_errors(original, slim, state: dict, maps: dict, folder: Path, tmp: Path, budget: float, inputs: list[dict],
                kinds: dict = KINDS) -> list[dict]:
    """Per module kind: the relative error of the denoiser's output change with the LoRA's pairs of that kind only,
    projected and cut, against the original's output change with the same pairs."""
    from safetensors.torch import save_file

    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.runtime.lora import project_lora

    key, slim_denoiser = denoiser_of(slim)
    rows = []
    for kind, ends in kinds.items():
        only = {k: v for k, v in state.items() if k[: k.index(".lora_")].endswith(ends)}
        path = tmp / f"kind-{kind}.safetensors"
        save_file(only, str(path))
        wanted = output_change(original, path, inputs)
        projected = tmp / f"kind-{kind}-{budget}-projected.safetensors"
        project_lora(path, folder, projected, overwrite=True)
        cut = tmp / f"kind-{kind}-{budget}-cut.safetensors"
        save_file(cut_lora(only, key, maps, slim_denoiser), str(cut))
        row = {"budget": budget, "kind": kind, "modules": len(only) // 2}
        for variant, file in (("projected", projected), ("cut", cut)):
            change = output_change(slim, file, inputs)
            row[variant] = float((change - wanted).norm() / wanted.norm())
        rows.append(row)
        print(row, flush=True)
    return rows


@dataclass(frozen=True)
class Model:
    """What differs between the two reference models' runs."""

    results: Path
    heading: str
    folder: Path  # data/reference or data/reference-flux: model, lora, params.yaml
    kinds: dict

    def load(self):
        from slimdiff.reference import load_pipeline

        return load_pipeline("cpu", self.folder / "model")

    def sampler(self, steps: int | None):
        """The compression sampler: the UNet reference's 4.0 CFG at the evaluation's step count; the Flux reference's
        job sampler (data/reference-flux/job/params.yaml) at its own step count unless ``steps`` is given."""
        from slimdiff.pipeline.stages import load_params, sampler_settings
        from slimdiff.runtime.sampling import SamplerSettings

        if self is MODELS["unet"]:
            return SamplerSettings(steps or 25, 4.0, seed=0)
        sampler = sampler_settings(load_params(self.folder / "job" / "params.yaml"))
        return sampler if steps is None else replace(sampler, num_inference_steps=steps)

    def compression(self, budget: float):
        """The UNet run's SlimDiffConfig (budget, batch 50); the Flux job's settings (``config_from``) at ``budget``."""
        from slimdiff.compress import SlimDiffConfig
        from slimdiff.pipeline.stages import config_from, load_params

        if self is MODELS["unet"]:
            return SlimDiffConfig(budget=budget, batch_size=50)
        return replace(config_from(load_params(self.folder / "job" / "params.yaml")), budget=budget)


MODELS = {"unet": Model(RESULTS, HEADING, ROOT / "data" / "reference", KINDS),
          "flux": Model(FLUX_RESULTS, FLUX_HEADING, FLUX_DIR, FLUX_KINDS)}


def measure(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import save_file

    import slimdiff
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.compress import compress_pipeline, read_prompts
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.reference.lora import LORA_WEIGHT_NAME, evaluation_prompt_sets, load_lora_params, lora_effect
    from slimdiff.runtime.lora import LORA_MAPS_NAME, project_lora, read_lora, read_maps

    spec = MODELS[args.model]
    lora_dir = spec.folder / "lora"
    lora_file = lora_dir / LORA_WEIGHT_NAME
    if not lora_file.is_file():
        raise SystemExit(f"{lora_file}: missing; train it first (DVC_NO_ANALYTICS=1 dvc repro -s "
                         f"{spec.folder.relative_to(ROOT)}/dvc.yaml:train_lora)")
    torch.manual_seed(0)
    evaluator = load_evaluator(ROOT / "data" / "reference" / "evaluator")
    original = spec.load()
    key = denoiser_of(original)[0]
    prompts = evaluation_prompt_sets(args.n_plain, 0)["plain"]
    sampling = load_lora_params(spec.folder / "params.yaml")[1].sampling()
    if args.steps is not None:
        sampling = replace(sampling, steps=args.steps)
    calibration = read_prompts(ROOT / "data" / "reference" / "captions.jsonl")[: args.calibration_prompts]
    sampler = spec.sampler(args.steps)
    rows = []

    def effect(pipe, model: str, lora: str, budget: float) -> None:
        start = time.perf_counter()
        measured = lora_effect(pipe, prompts, evaluator, sampling)
        rows.append({"model": model, "budget": budget, "lora": lora, "effect": measured["effect"], "shift": measured["shift"],
                     "object": measured["alignment"]["object"], "overall": measured["alignment"]["overall"],
                     "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)

    effect(original, "original", "none", 0.0)
    original.load_lora_weights(str(lora_dir))
    effect(original, "original", "original", 0.0)
    original.unload_lora_weights()
    pairs, _ = read_lora(lora_file, type(original))
    state = {}
    for (component, module), entry in pairs.items():
        state[f"{key}.{module}.lora_A.weight"] = entry["A"]
        state[f"{key}.{module}.lora_B.weight"] = (entry["B"] * entry["scale"]).contiguous()
    projections, kinds, compression = [], [], {}
    inputs = denoiser_inputs(original, prompts[:16], max_sequence_length=sampler.max_sequence_length)
    with tempfile.TemporaryDirectory(prefix="slimdiff-lora-bench-") as tmp:
        tmp = Path(tmp)
        for budget in args.budgets:
            slim = copy.deepcopy(original)
            config = spec.compression(budget)
            start = time.perf_counter()
            result = compress_pipeline(slim, calibration, config, sampler, progress=True)
            compression[str(budget)] = round(time.perf_counter() - start, 1)
            folder = slimdiff.save(slim, tmp / f"slim-{budget}", result.info("reference"), lora_maps=result.lora_maps)
            start = time.perf_counter()
            projection = project_lora(lora_file, folder, tmp / f"projected-{budget}.safetensors")
            seconds = time.perf_counter() - start
            _, maps, _ = read_maps(folder)
            save_file(cut_lora(state, key, maps, denoiser_of(slim)[1]), str(tmp / f"cut-{budget}.safetensors"))
            weights = sum(p.stat().st_size for p in (folder / key).glob("diffusion_pytorch_model*.safetensors"))
            projections.append({"budget": budget, "counts": projection.counts(), "seconds": round(seconds, 2),
                                "maps_bytes": (folder / key / LORA_MAPS_NAME).stat().st_size, f"{key}_bytes": weights,
                                "removed": result.plan.removed})
            print(projections[-1], flush=True)
            loaded = slimdiff.load(folder)
            kinds += kind_errors(original, loaded, state, maps, folder, tmp, budget, inputs, spec.kinds)
            effect(loaded, "compressed", "none", budget)
            for variant in ("projected", "cut"):
                loaded.load_lora_weights(str(tmp / f"{variant}-{budget}.safetensors"))
                effect(loaded, "compressed", variant, budget)
                loaded.unload_lora_weights()
    out = {"n_plain": args.n_plain, "steps": sampling.steps, "calibration_prompts": len(calibration), "rows": rows,
           "projections": projections, "kinds": kinds}
    if args.model != "unet":  # the UNet results file keeps its keys
        train = json.loads((lora_dir / "train_stats.json").read_text())
        out.update(model=args.model, sampling=asdict(sampling), sampler=sampler.to_dict(), compression_seconds=compression,
                   config={k: v for k, v in asdict(config).items() if k != "budget"},
                   lora={"targets": train["config"]["target_modules"], "rank": train["config"]["rank"],
                         "modules": train["adapted_modules"], "steps": train["config"]["steps"],
                         "train_seconds": train["train_seconds"]})
    return out


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(results: dict) -> list[tuple[Path, str, str]]:
    """The section of the results' model (a results file without ``model`` is the UNet run's)."""
    return (render_flux if results.get("model") == "flux" else render_unet)(results)


def effect_rows(results: dict) -> list[list]:
    """The effect table's rows: each model and LoRA variant, and the shift kept against the original with its LoRA."""
    rows = results["rows"]
    base = next(r for r in rows if r["model"] == "original" and r["lora"] == "original")
    table = []
    for r in rows:
        model = "original" if r["model"] == "original" else f"compressed, {r['budget']:.0%} budget"
        lora = {"none": "none", "original": "the LoRA", "projected": "projected (`slimdiff lora`)",
                "cut": "cut to the slim shapes"}[r["lora"]]
        kept = "" if r["lora"] in ("none", "original") else f"{r['shift'] / base['shift']:.0%}" if base["shift"] else ""
        table.append([model, lora, f"{r['effect']:.0%}", f"{r['shift']:.3f}", kept, f"{r['object']:.3f}", f"{r['overall']:.3f}"])
    return table


def projection_rows(results: dict, key: str, name: str) -> list[list]:
    return [[f"{p['budget']:.0%}", p["counts"]["exact"], p["counts"]["least squares"], p["counts"]["unchanged"],
             f"{p['seconds']:.2f}", f"{p['maps_bytes'] / 2**20:.2f} MiB ({p['maps_bytes'] / p[f'{key}_bytes']:.0%} of the {name})"]
            for p in results["projections"]]


def kind_rows(results: dict) -> list[list]:
    return [[f"{k['budget']:.0%}", k["kind"], k["modules"], f"{k['projected']:.3f}", f"{k['cut']:.3f}"]
            for k in results.get("kinds", [])]


def render_unet(results: dict) -> list[tuple[Path, str, str]]:
    table = effect_rows(results)
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

{markdown_table(["budget", "module kind", "LoRA modules", "projected", "cut to the slim shapes"], kind_rows(results))}

How each LoRA module moved, the projection's time and the maps' size on disk:

{markdown_table(["budget", "exact", "least squares", "unchanged", "seconds", "maps file"], projection_rows(results, "unet", "UNet"))}

{chr(10).join(provenance(results))}

Raw figures: `benchmarks/results/lora_projection.json`; re-render: `.venv/bin/python benchmarks/lora_projection.py --render-only`.
"""
    return [(DOC, HEADING, text)]


def kept_sentence(results: dict) -> str:
    """One sentence with the shift kept (and the brown fraction) per budget, projected and cut, from the results."""
    rows = results["rows"]
    base = next(r for r in rows if r["model"] == "original" and r["lora"] == "original")
    budgets = sorted({r["budget"] for r in rows if r["model"] == "compressed"})

    def variant(name: str) -> str:
        found = [next(r for r in rows if r["budget"] == b and r["lora"] == name) for b in budgets]
        return ", ".join(f"{r['shift'] / base['shift']:.0%} at the {r['budget']:.0%} budget (brown on {r['effect']:.0%} of the "
                         f"images)" for r in found)

    return (f"With its LoRA the original model draws brown on {base['effect']:.0%} of the images. The share of its shift "
            f"kept, projected: {variant('projected')}; cut to the slim shapes: {variant('cut')}.")


def render_flux(results: dict) -> list[tuple[Path, str, str]]:
    sampler, sampling, lora, config = results["sampler"], results["sampling"], results["lora"], results["config"]
    targets = ", ".join(f"`{t}`" for t in lora["targets"])
    threads = results.get("system", {}).get("torch_threads")
    worst = max(results["kinds"], key=lambda k: k["projected"])
    text = f"""{FLUX_HEADING}

The Flux-style reference LoRA (`data/reference-flux/lora`, [reference-flux-model.md](reference-flux-model.md)): rank
{lora['rank']} on {targets} of every double and single block ({lora['modules']} linears; not the adaLN modulations),
trained {lora['steps']} steps in {lora['train_seconds'] / 60:.1f} min on one CPU thread by the `train_lora` stage of
`data/reference-flux/dvc.yaml`; it paints plain backgrounds brown. On the original Flux reference model, and on the model
compressed at each budget (parameters) from the first {results['calibration_prompts']} captions of
`data/reference/captions.jsonl`, with the Flux job's sampler ({sampler['num_inference_steps']} steps,
`{sampler['guidance_argument']}` {sampler['guidance_scale']} with an empty negative prompt,
{sampler['max_sequence_length']} T5 tokens, {sampler['height']} px) and compression settings
(`data/reference-flux/job/params.yaml`: {config['num_buckets']} timestep buckets, {config['gain_prompts']} gain prompts,
gains on `{config.get('gain_target', 'call')}` output, allocator `{config['allocator']}`, minimum kept {config['min_keep']}),
projected or cut to the slim shapes. Read by the
reference evaluator on {results['n_plain']} evaluation prompts without a background phrase, sampled as the reference's
metrics are ({sampling['steps']} steps, `{sampling['guidance_argument']}` {sampling['guidance_scale']}, batch
{sampling['batch_size']}, seed {sampling['seed']}); {threads} torch thread. Columns as in the UNet table above.

{markdown_table(["model", "LoRA", "brown", "shift", "kept", "object", "overall"], effect_rows(results))}

{kept_sentence(results)} *Kept* near 100 % means that the compressed model with the projected LoRA draws the LoRA's
effect as the original model with its LoRA does; the cut LoRA's row is what loading the LoRA into the slim shapes
without the compressor's maps does to it.

The relative error of the transformer's output change (the LoRA's pairs of one module kind only, on 16 evaluation
prompts' embeddings and Gaussian latents at sigma 0.9, 0.5 and 0.1), against the original model's output change with
the same pairs, as above. *Query-key* and *value-output* include a double block's text-stream projections
(`add_*_proj`, `to_add_out`); *FFN* both feed-forwards and a single block's `proj_mlp`; a single block's `proj_out`
reads the attention and the MLP at once and moves by both maps. A module the compression left unchanged (the counts'
*unchanged*) projects onto itself, so projected and cut agree there; its error is the rest of the compressed model's.
Value-output compression changes each head's basis (`J = blockdiag(Q_h)`), so a cut LoRA lands in the wrong
coordinates even where the shapes match. The largest projected error: {worst['kind']} at the {worst['budget']:.0%}
budget, {worst['projected']:.3f}.

{markdown_table(["budget", "module kind", "LoRA modules", "projected", "cut to the slim shapes"], kind_rows(results))}

How each LoRA module moved, the projection's time and the maps' size on disk:

{markdown_table(["budget", "exact", "least squares", "unchanged", "seconds", "maps file"], projection_rows(results, "transformer", "transformer"))}

{chr(10).join(provenance(results))}

Raw figures: `benchmarks/results/lora_projection_flux.json`; re-render:
`.venv/bin/python benchmarks/lora_projection.py --model flux --render-only`.
"""
    return [(DOC, FLUX_HEADING, text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="unet",
                        help="the UNet reference (default) or the Flux-style one (data/reference-flux)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--n-plain", type=int, default=100, help="evaluation prompts without a background phrase")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampler steps (default: the reference's evaluation steps: UNet 25, Flux 28)")
    parser.add_argument("--calibration-prompts", type=int, default=100)
    parser.add_argument("--render-only", action="store_true", help="only re-render the section from the results file")
    args = parser.parse_args(argv)
    path = MODELS[args.model].results
    if not args.render_only:
        write_results(path, {**run_record(__file__, argv), **measure(args)})
    results = load(path)
    if results is None:
        raise SystemExit(f"{path}: no results file; run the benchmark first")
    write_sections(render(results))
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
