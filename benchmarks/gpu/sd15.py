"""Whole SlimDiff compression of an SD 1.5-shaped pipeline on one GPU, every step timed.

The real SD 1.5 UNet configuration (and CLIP ViT-L text encoder, SD VAE) with seeded random weights
(no download), in fp16: capture over the prompts x steps x CFG at 512 px, gains, scores, allocation
at 40 %, decomposition, save and reload; then denoiser latency original vs compressed (batch 2,
64x64 latents, SDPA) and which SDPA backend the compressed attention can use. Writes a JSON of the
figures (with the command, the machine and the code version) and renders the title section of
docs/benchmarks-gpu.md from it alone (the page's later sections belong to job.py and flux_block.py).

    python benchmarks/gpu/sd15.py --out benchmarks/results/gpu.json      # on a CUDA machine (run.sh)
    python benchmarks/gpu/sd15.py --smoke --out /tmp/gpu.json            # tiny pipeline, any device (CI)
    python benchmarks/gpu/sd15.py --render-only                          # re-render the docs page from --out
    python benchmarks/gpu/sd15.py --from-json benchmarks/results/gpu.json --doc page.md  # the same, any JSON and page

If the whole prompt set does not fit ``--capture-budget`` seconds, the capture runs on the measured
fraction that fits and the full-set time is extrapolated; the JSON says so.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.pages import provenance, read_results, run_record, write_results, write_sections  # noqa: E402
from slimdiff.planning.allocation import allocate, latency_floor
from slimdiff.statistics.kernels import _MIXED_MM, gram
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.statistics.recording import capture, model_content_hash
from slimdiff.arch.sites import sites_for
from slimdiff.device import describe_device, linalg_device, resolve_device, resolve_dtype  # noqa: E402
from slimdiff.arch import compressible_groups
from slimdiff.scoring.influence import Granularity, score
from slimdiff.compress import SlimDiffConfig
from slimdiff.scoring.gains import measure_gains
from slimdiff.runtime.folder import load as load_folder, save
from slimdiff.planning.latency import measure_latency_table
from slimdiff.runtime.attention import SlimAttnProcessor
from slimdiff.decomposition.apply import decompose
from tests.helpers import SD15_UNET_CONFIG

DOC = ROOT / "docs" / "benchmarks-gpu.md"
RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
TITLE = "# Compression on one GPU: SD 1.5-shaped pipeline"

SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
)
CLIP_L_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu")

SUBJECTS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a vintage car", "a snowy mountain", "a robot",
            "a sunflower field", "a city street at night", "a cat on a sofa", "a sailing boat", "a castle", "a forest path",
            "a portrait of a woman", "a steaming cup of coffee", "a desert canyon", "a jellyfish")
STYLES = ("photograph", "oil painting", "watercolor", "3d render", "pencil sketch", "anime still", "studio lighting",
          "wide angle", "macro shot", "golden hour", "isometric illustration", "film grain", "low poly", "ukiyo-e",
          "cinematic", "minimalist poster")


def calibration_prompts(n: int) -> list[str]:
    """``n`` distinct, deterministic prompts (subject x style x index)."""
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[(i // len(SUBJECTS)) % len(STYLES)]}, variant {i}" for i in range(n)]


def sd15_pipeline(device: torch.device, dtype: torch.dtype, seed: int = 0):
    """SD 1.5's architecture with seeded random weights: UNet, CLIP ViT-L text encoder, VAE, DPM-Solver++."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.helpers import char_tokenizer

    tokenizer = char_tokenizer(77)
    torch.manual_seed(seed)
    with torch.device(device):  # random init on the GPU: seconds instead of a minute on the host
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        vae = AutoencoderKL(**SD_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            num_train_timesteps=1000, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(device: torch.device, dtype: torch.dtype):
    from tests.helpers import tiny_sd_pipeline

    return tiny_sd_pipeline().to(device, dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Step:
    """Times a step (device synchronised) and its peak GPU memory; records both into ``results``."""

    def __init__(self, results: dict, name: str, device: torch.device):
        self.results, self.name, self.device = results, name, device
        self.out = results.get("_out")

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        print(f"[{time.strftime('%H:%M:%S')}] {self.name} ...", flush=True)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        seconds = time.perf_counter() - self.start
        self.results["steps"][self.name] = {"seconds": seconds}
        if self.device.type == "cuda":
            self.results["steps"][self.name]["peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        print(f"[{time.strftime('%H:%M:%S')}] {self.name}: {seconds:.1f} s", flush=True)
        dump_partial(self.results)


def dump_partial(results: dict) -> None:
    """Write the figures so far: a run stopped by a time limit still leaves every finished step's."""
    if results.get("_out"):
        write_results(Path(results["_out"]), {**results, "complete": False}, sort_keys=True)


def plain_sampling(pipe, prompts: list[str], sampler: SamplerSettings, batch_size: int) -> None:
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            pipe(**sampler.pipe_kwargs(pipe, prompts[start:start + batch_size]), output_type="latent")


def gram_precision(pipe, prompt: str, sampler: SamplerSettings) -> dict:
    """Relative error of the engine's per-call Gram matrices against float64 sums of the same activations."""
    groups = compressible_groups(pipe.unet)
    sites = sorted({f"{g.path}.net.2" for g in groups if g.kind == "ffn"} | {f"{g.path}.to_q" for g in groups if g.kind == "qk_self"})
    chosen = [sites[0], sites[len(sites) // 2], sites[-1]]
    errors: dict[str, float] = {}
    handles = []

    def hook(name):
        def run(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            outer, _ = gram(rows)
            reference = rows.double().T @ rows.double()
            errors[name] = max(errors.get(name, 0.0), float((outer.double() - reference).norm() / reference.norm()))
        return run

    for name in chosen:
        handles.append(pipe.unet.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        with torch.inference_mode():
            pipe(**SamplerSettings(2, sampler.guidance_scale, sampler.height, sampler.width, sampler.seed).pipe_kwargs(pipe, [prompt]),
                 output_type="latent")
    finally:
        for h in handles:
            h.remove()
    return {"sites": errors, "max": max(errors.values())}


def denoiser_latency(models: dict, inputs: dict, device: torch.device, repeats: int) -> dict:
    """Median ms per call of each model, interleaved; CUDA events on GPU, host clock elsewhere."""
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(**inputs)
        for index in range(repeats):
            order = list(models) if index % 2 == 0 else list(reversed(list(models)))
            for name in order:
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    models[name](**inputs)
                    end.record()
                    torch.cuda.synchronize(device)
                    times[name].append(start.elapsed_time(end))
                else:
                    began = time.perf_counter()
                    models[name](**inputs)
                    times[name].append((time.perf_counter() - began) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def sdpa_backends(unet, device: torch.device, dtype: torch.dtype, tokens_of: dict[str, int], text_tokens: int) -> dict:
    """Which SDPA backends accept each compressed attention's shapes (query-key width vs value width)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    counts = {name: 0 for name in backends}
    modules = 0
    examples = []
    for path, module in unet.named_modules():
        if not isinstance(getattr(module, "processor", None), SlimAttnProcessor):
            continue
        modules += 1
        heads = module.heads
        qk, v = module.to_q.out_features // heads, module.to_v.out_features // heads
        width = max(qk, v)  # SlimAttnProcessor pads the narrower side with zeros to equal head widths (slimdiff.runtime.attention.attend)
        level = path.split(".attentions")[0]
        queries = tokens_of.get(level, 64)
        keys = queries if path.endswith("attn1") else text_tokens
        q = torch.randn(2, heads, queries, width, device=device, dtype=dtype)
        k = torch.randn(2, heads, keys, width, device=device, dtype=dtype)
        val = torch.randn(2, heads, keys, width, device=device, dtype=dtype)
        usable = []
        for name, backend in backends.items():
            try:
                with sdpa_kernel([backend]):
                    torch.nn.functional.scaled_dot_product_attention(q, k, val, scale=module.processor.scale)
                usable.append(name)
                counts[name] += 1
            except RuntimeError:
                pass
        if len(examples) < 6:
            examples.append({"module": path, "qk_head_width": qk, "v_head_width": v, "usable": usable})
    return {"attention_modules": modules, "usable_count": counts, "examples": examples}


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False
    results: dict = {
        "mode": "smoke" if args.smoke else "sd15",
        "device": describe_device(device),
        "linalg_device": str(linalg_device(device)),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "args": {k: v for k, v in vars(args).items() if k not in ("from_json", "render_only")},
        "steps": {},
        "_out": args.out,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    import diffusers

    results["diffusers"] = diffusers.__version__
    sampler = SamplerSettings(args.steps, args.guidance, args.resolution, args.resolution, seed=0)
    prompts = calibration_prompts(args.prompts)

    with Step(results, "build pipeline", device):
        pipe = tiny_pipeline(device, dtype) if args.smoke else sd15_pipeline(device, dtype)
    unet = pipe.unet
    results["unet_params"] = sum(p.numel() for p in unet.parameters())
    groups = compressible_groups(unet)
    results["compressible_params"] = sum(g.unit_params * g.width for g in groups)
    results["modules"] = len(groups)

    results["gram_precision"] = gram_precision(pipe, prompts[0], sampler)

    # capture overhead: the same prompts sampled with and without the capture's hooks
    probe = prompts[: args.overhead_prompts]
    plain_sampling(pipe, probe[: args.batch_size], sampler, args.batch_size)  # warm-up (kernels, allocator)
    with Step(results, "plain sampling (overhead probe)", device):
        plain_sampling(pipe, probe, sampler, args.batch_size)
    recorder = ActivationRecorder(unet, sites_for(groups), args.buckets, pipe.scheduler.config.num_train_timesteps)
    with Step(results, "capture (overhead probe)", device), recorder:
        plain_sampling(pipe, probe, sampler, args.batch_size)
    del recorder
    with Step(results, "model hash", device):
        model_content_hash(unet)
    plain_s = results["steps"]["plain sampling (overhead probe)"]["seconds"]
    probe_s = results["steps"]["capture (overhead probe)"]["seconds"]
    results["capture_overhead"] = probe_s / plain_s
    per_prompt = probe_s / len(probe)
    fits = int(args.capture_budget / per_prompt) // args.batch_size * args.batch_size
    measured = max(args.batch_size, min(len(prompts), fits))
    results["capture_prompts_measured"] = measured

    work = Path(tempfile.mkdtemp(prefix="slimdiff-gpu-"))
    try:
        with Step(results, "capture", device):
            stats = capture(pipe, prompts[:measured], sampler, num_buckets=args.buckets, batch_size=args.batch_size,
                            checkpoint=work / "capture.ckpt.safetensors", checkpoint_every=args.checkpoint_every, progress=True)
        capture_s = results["steps"]["capture"]["seconds"]
        results["capture_full_set_s"] = capture_s * len(prompts) / measured
        results["capture_extrapolated"] = measured < len(prompts)
        results["statistics_gib"] = stats.nbytes / 2**30
        with Step(results, "save capture", device):
            stats.save(work / "capture.safetensors")
        results["capture_file_gib"] = (work / "capture.safetensors").stat().st_size / 2**30

        with Step(results, "gains", device):
            gains = measure_gains(pipe, prompts[: args.gain_prompts], sampler, args.gain_calls, 0.05, seed=0, progress=True,
                                  checkpoint=work / "gains.ckpt.json", reference=SlimDiffConfig().gain_reference(stats))
        with Step(results, "score", device):
            scores = score(unet, stats, gains, max_ffn_points=args.ffn_points, progress=True)
        with Step(results, "allocate", device):
            plan = allocate(scores, args.budget)
        results["params_removed"] = plan.removed
        results["params_removed_fraction_of_compressible"] = plan.removed / plan.params_before
        original = copy.deepcopy(unet)
        with Step(results, "decompose", device):
            decompose(unet, stats, plan.widths, progress=True)
        # the same budget with hardware-friendly widths: per-head widths in multiples of 8, QK and VO tied
        friendly_scores = score(original, stats, gains, Granularity(8, 8), max_ffn_points=args.ffn_points)
        friendly_plan = allocate(friendly_scores, args.budget, tie_qk_vo=True)
        friendly = copy.deepcopy(original)
        decompose(friendly, stats, friendly_plan.widths)
        results["friendly_plan"] = {"rank_step": 8, "tie_qk_vo": True, "params_removed": friendly_plan.removed,
                                    "predicted_error": friendly_plan.predicted_error, "default_predicted_error": plan.predicted_error}
        latents = 64 if not args.smoke else 8
        generator = torch.Generator(device="cpu").manual_seed(0)
        cross_dim = unet.config.cross_attention_dim
        inputs = {"sample": torch.randn(2, 4, latents, latents, generator=generator).to(device, dtype),
                  "timestep": torch.tensor(500, device=device),
                  "encoder_hidden_states": torch.randn(2, 77, cross_dim, generator=generator).to(device, dtype)}
        # a latency budget: every unit timed on this GPU at the same call shape, then --latency F
        with Step(results, "latency table", device):
            table = measure_latency_table(original, ((), inputs), Granularity(8, 8), repeats=args.latency_repeats,
                                          model_hash=scores.metadata.get("model_hash") or "")
        if args.latency_target is None:  # smoke: the tiny UNet is mostly per-op overhead; halfway to its fastest plan
            args.latency_target = round((1 + latency_floor(friendly_scores, table)) / 2, 4)
        latency_plan = allocate(friendly_scores, args.latency_target, budget_kind="latency", latency_table=table)
        by_latency = copy.deepcopy(original)
        decompose(by_latency, stats, latency_plan.widths)
        friendly_plan = allocate(friendly_scores, args.budget, tie_qk_vo=True, latency_table=table)
        results["latency_plan"] = {"target": args.latency_target, "params_removed": latency_plan.removed,
                                   "params_removed_fraction": latency_plan.removed / latency_plan.params_before,
                                   "predicted_fraction": latency_plan.latency["predicted_fraction"],
                                   "rank8_tied_predicted_fraction": friendly_plan.latency["predicted_fraction"],
                                   "table_denoiser_ms": table.denoiser_ms, "table_compressible_ms": table.compressible_ms}
        del stats
        results["compressed_unet_params"] = sum(p.numel() for p in unet.parameters())
        models = {"original": original, "compressed": unet, "compressed_rank8_tied": friendly, "compressed_latency": by_latency}
        results["latency_ms"] = denoiser_latency(models, inputs, device, args.latency_repeats)
        results["denoiser_speedup"] = results["latency_ms"]["original"] / results["latency_ms"]["compressed"]
        results["denoiser_speedup_rank8_tied"] = results["latency_ms"]["original"] / results["latency_ms"]["compressed_rank8_tied"]
        results["denoiser_speedup_latency"] = results["latency_ms"]["original"] / results["latency_ms"]["compressed_latency"]
        results["latency_plan"]["measured_fraction"] = results["latency_ms"]["compressed_latency"] / results["latency_ms"]["original"]
        results["latency_plan"]["rank8_tied_measured_fraction"] = (results["latency_ms"]["compressed_rank8_tied"]
                                                                   / results["latency_ms"]["original"])
        dump_partial(results)
        if device.type == "cuda" and not args.no_compile:
            with Step(results, "torch.compile (original and latency plan)", device):
                compiled = {"original": torch.compile(original), "compressed_latency": torch.compile(by_latency)}
                results["compiled_latency_ms"] = denoiser_latency(compiled, inputs, device, args.latency_repeats)
            results["compiled_speedup_latency"] = (results["compiled_latency_ms"]["original"]
                                                   / results["compiled_latency_ms"]["compressed_latency"])
            del compiled
        if device.type == "cuda":
            tokens_of = {}
            side = latents
            for i in range(len(unet.config.block_out_channels)):
                tokens_of[f"down_blocks.{i}"] = side * side
                side //= 2 if i < len(unet.config.block_out_channels) - 1 else 1
            side = latents // 2 ** (len(unet.config.block_out_channels) - 1)
            tokens_of["mid_block"] = side * side
            for i in range(len(unet.config.block_out_channels)):
                tokens_of[f"up_blocks.{i}"] = side * side
                side *= 2
            results["sdpa_compressed"] = sdpa_backends(unet, device, dtype, tokens_of, 77)
            results["sdpa_compressed_rank8_tied"] = sdpa_backends(friendly, device, dtype, tokens_of, 77)
            results["sdpa_compressed_latency"] = sdpa_backends(by_latency, device, dtype, tokens_of, 77)
            results["peak_gpu_gib_job"] = max(s.get("peak_gpu_gib", 0.0) for s in results["steps"].values())
        dump_partial(results)
        with Step(results, "save", device):
            save(pipe, work / "model", {"benchmark": "sd15"}, full_widths={m.name: m.full_width for m in plan.modules})
        with Step(results, "reload", device):
            again = load_folder(work / "model", torch_dtype=dtype).to(device)
        with torch.inference_mode():
            reloaded_equal = torch.equal(unet(**inputs).sample, again.unet(**inputs).sample)
        results["reload_bit_exact"] = reloaded_equal
        del again

    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = ("capture", "gains", "score", "allocate", "decompose")
    results.pop("_out", None)
    results["complete"] = True
    results["mixed_precision_gram_mm"] = _MIXED_MM["available"]
    results["compression_s"] = sum(results["steps"][s]["seconds"] for s in timed)
    results["compression_full_set_s"] = results["compression_s"] - results["steps"]["capture"]["seconds"] + results["capture_full_set_s"]
    return results


def load(path: Path = RESULTS) -> dict | None:
    return read_results(path) if Path(path).is_file() else None


def render(r: dict, doc: Path = DOC) -> list[tuple[Path, str, str]]:
    """The page's title section (its later "## " sections are job.py's and flux_block.py's), from the results alone."""
    return [(Path(doc), TITLE, page(r))]


def page(r: dict) -> str:
    steps = r["steps"]
    gib = lambda s: f"{steps[s]['peak_gpu_gib']:.1f} GiB" if "peak_gpu_gib" in steps[s] else "-"  # noqa: E731
    a = r["args"]
    lines = [
        TITLE,
        "",
        "Stable Diffusion 1.5's exact UNet configuration (and CLIP ViT-L text encoder, SD VAE) with seeded random",
        "weights (no download), compressed end to end on the GPU by `benchmarks/gpu/sd15.py`:",
        f"{a['prompts']} prompts x {a['steps']} DPM-Solver++ steps x CFG at {a['resolution']} px, gains on {a['gain_prompts']} prompts,",
        f"scores, allocation at {a['budget']:.0%} of compressible parameters, decomposition, save and reload. Random weights",
        "give near-isotropic activations, so this page measures cost, not quality (quality: docs/benchmarks.md).",
        "",
    ]
    for note in r.get("notes", []):  # remarks on this run, kept with its figures in the results file
        lines += [note, ""]
    lines += [
        *provenance(r, f"host {r.get('host', '?')}", {k: v for k, v in a.items() if k not in ("out", "doc")}),
        f"Device: {r['device']}; torch {r['torch']} (CUDA {r['cuda']}), diffusers {r['diffusers']}, Python {r['python']}; "
        f"model dtype {r['dtype']}; float64 decompositions on {r['linalg_device']}.",
        "",
        "| step | wall time | peak GPU memory |",
        "|---|---|---|",
    ]
    for name in ("build pipeline", "plain sampling (overhead probe)", "capture (overhead probe)", "model hash", "capture", "save capture",
                 "gains", "score", "allocate", "decompose", "save", "reload"):
        if name in steps:
            lines.append(f"| {name} | {steps[name]['seconds']:.1f} s | {gib(name)} |")
    extrapolated = r["capture_extrapolated"]
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| UNet parameters | {r['unet_params'] / 1e6:.1f} M ({r['compressible_params'] / 1e6:.1f} M compressible in {r['modules']} modules) |",
        f"| capture, prompts measured | {r['capture_prompts_measured']} of {a['prompts']}"
        + (" (the rest extrapolated linearly)" if extrapolated else "") + " |",
        f"| capture of all {a['prompts']} prompts | {r['capture_full_set_s']:.0f} s" + (" (extrapolated)" if extrapolated else "") + " |",
        f"| whole compression (capture + gains + score + allocate + decompose), all {a['prompts']} prompts | "
        f"{r['compression_full_set_s'] / 60:.1f} min" + (" (capture extrapolated)" if extrapolated else "") + " |",
        f"| capture overhead vs plain sampling (same {a['overhead_prompts']} prompts) | x{r['capture_overhead']:.2f} |",
        f"| statistics in memory ({a['buckets']} buckets) | {r['statistics_gib']:.2f} GiB (file {r['capture_file_gib']:.2f} GiB) |",
        f"| per-call Gram matrix vs float64 sums of the same activations | {r['gram_precision']['max']:.1e} relative (worst of 3 sites) |",
        f"| peak GPU memory of the job | {r.get('peak_gpu_gib_job', float('nan')):.1f} GiB |",
        f"| parameters removed | {r['params_removed'] / 1e6:.1f} M ({r['params_removed_fraction_of_compressible']:.0%} of compressible) |",
        f"| denoiser latency original / compressed (batch 2, 64x64 latents) | {r['latency_ms']['original']:.1f} / "
        f"{r['latency_ms']['compressed']:.1f} ms: x{r['denoiser_speedup']:.2f} |",
        f"| reloaded model bit-exact | {r.get('reload_bit_exact', 'not measured')} |",
    ]
    friendly = r.get("friendly_plan")
    if friendly:
        lines += [
            f"| same budget, per-head widths in multiples of 8 and QK = VO width: latency | "
            f"{r['latency_ms']['compressed_rank8_tied']:.1f} ms: x{r['denoiser_speedup_rank8_tied']:.2f} "
            f"(predicted error {friendly['predicted_error']:.4g} vs {friendly['default_predicted_error']:.4g}) |",
        ]
    lat = r.get("latency_plan")
    if lat and "measured_fraction" in lat:
        lines += [
            f"| `--latency {lat['target']}` plan (table timed on this GPU, multiples of 8, tied): params removed | "
            f"{lat['params_removed_fraction']:.0%} of compressible |",
            f"| `--latency {lat['target']}`: predicted / measured latency | {lat['predicted_fraction']:.3f} / {lat['measured_fraction']:.3f} "
            f"of the original: x{r['denoiser_speedup_latency']:.2f} |",
            f"| `--budget {a['budget']}` multiples of 8, tied: predicted / measured latency | "
            f"{lat['rank8_tied_predicted_fraction']:.3f} / {lat['rank8_tied_measured_fraction']:.3f} |",
        ]
    if r.get("compiled_latency_ms"):
        c = r["compiled_latency_ms"]
        lines.append(f"| `torch.compile`: original / `--latency {lat['target']}` plan | {c['original']:.1f} / "
                     f"{c['compressed_latency']:.1f} ms: x{r['compiled_speedup_latency']:.2f} |")
    sdpa = r.get("sdpa_compressed")
    if sdpa:
        usable = ", ".join(f"{k} {v}/{sdpa['attention_modules']}" for k, v in sdpa["usable_count"].items())
        lines += [f"| SDPA backends usable by the compressed attention | {usable} |"]
        for key, label in (("sdpa_compressed_rank8_tied", "multiples of 8 and tied"), ("sdpa_compressed_latency", "the latency plan")):
            if r.get(key):
                tied = r[key]
                lines.append(f"| SDPA backends usable, {label} | "
                             + ", ".join(f"{k} {v}/{tied['attention_modules']}" for k, v in tied["usable_count"].items()) + " |")
        lines.append("")
        lines += ["A backend is usable when `torch.nn.attention.sdpa_kernel([backend])` accepts the shapes the compressed",
                  "attention hands to SDPA (batch 2, its level's tokens). Flash attention needs equal query-key and value",
                  "head widths, which the slim attention processor now gives it by zero-padding the narrower side (exact);",
                  "the fused kernels still want widths that are multiples of 8, which a rank step of 1 rarely gives.",
                  "Runs before that padding (gpu.json of 2026-11-27) saw the math kernel, which materialises the logits. Examples:", ""]
        lines += ["| module | QK head width | V head width | usable backends |", "|---|---|---|---|"]
        lines += [f"| {e['module']} | {e['qk_head_width']} | {e['v_head_width']} | {', '.join(e['usable'])} |" for e in sdpa["examples"]]
    notes = [
        f"- Capture includes hashing the model and {a['checkpoint_every']}-prompt checkpoints of the partial sums "
        f"({r['statistics_gib']:.1f} GiB each, written atomically); its overhead row compares the same prompts sampled "
        "with and without the capture's hooks.",
        f"- The Gram precision row: each call's x^T x from {r['dtype'].replace('torch.', '')} activations "
        "(tensor cores, float32 accumulation) against float64 sums of the very same activations, at three sites "
        "(two self-attention query inputs and one FFN hidden input; named in gpu.json). Calls are then summed in float64, so this "
        "per-call error does not compound over the capture.",
    ]
    if a["ffn_points"] != 64 or r["capture_extrapolated"]:
        notes.append(f"- This run was shortened to fit the session's device time: FFN error curves exact at "
                     f"{a['ffn_points']} widths (params.yaml: 64; more Nyström solves in the score step), capture timed on "
                     f"{r['capture_prompts_measured']} prompts and extrapolated. `bash benchmarks/gpu/run.sh` without flags "
                     "uses the defaults (180 s of capture, 64 points).")
    notes.append("- CUDA tests of the same tree on this device: `benchmarks/results/gpu_tests.log`.")
    lines += ["", "Notes:", "", *notes, "", f"Raw figures: `{r.get('_source', 'benchmarks/results/gpu.json')}`; re-render: "
              "`.venv/bin/python benchmarks/gpu/sd15.py --render-only`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny pipeline, 16 prompts, 3 steps (any device; CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="default float16 on CUDA, float32 elsewhere")
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--buckets", type=int, default=4)
    parser.add_argument("--overhead-prompts", type=int, default=32)
    parser.add_argument("--capture-budget", type=float, default=180.0, help="seconds the main capture may take")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--gain-prompts", type=int, default=8)
    parser.add_argument("--gain-calls", type=int, default=4)
    parser.add_argument("--ffn-points", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--latency-target", type=float, default=None,
                        help="the --latency plan's fraction of latency to keep (default 0.7; smoke: halfway between the "
                        "fastest reachable plan and 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile latency (CUDA only anyway)")
    parser.add_argument("--latency-repeats", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    parser.add_argument("--doc", default=str(DOC), help="markdown page to write ('' for none)")
    parser.add_argument("--from-json", default=None, help="only render the docs page from this JSON")
    parser.add_argument("--render-only", action="store_true", help="only render the docs page from --out")
    args = parser.parse_args(argv)
    if args.latency_target is None and not args.smoke:
        args.latency_target = 0.7
    if args.render_only and not args.from_json:
        args.from_json = args.out
    if args.from_json:
        results = load(Path(args.from_json))
        if results is None:
            raise SystemExit(f"{args.from_json}: no results file; run the benchmark first")
    else:
        if args.smoke:
            args.doc = "" if args.doc == str(DOC) else args.doc  # a smoke run never rewrites the committed page
            args.prompts, args.steps, args.resolution, args.batch_size = min(args.prompts, 16), 3, None, 4
            args.overhead_prompts, args.gain_prompts, args.gain_calls, args.latency_repeats = 8, 2, 2, 3
        if args.dtype is None:
            args.dtype = "float16" if resolve_device(args.device).type == "cuda" else "float32"
        record = run_record(__file__, argv)
        results = run(args)
        results.update(record)
        out = Path(args.out)
        write_results(out, results, sort_keys=True)
        print(json.dumps({k: v for k, v in results.items() if k not in ("args",)}, indent=1, default=str))
        results = read_results(out)
    if args.doc and not math.isnan(results.get("capture_overhead", float("nan"))):
        write_sections(render(results, Path(args.doc)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
