"""Training of the Flux-style reference model: a two-level VAE first, then transformer + CLIP + T5 jointly by
rectified flow on frozen VAE latents (issue 26). Same data, seeding, checkpointing and lr schedule as the UNet
reference (`slimdiff.reference.train`, whose helpers this module reuses).

    python -m slimdiff.reference.flux_train vae         --params data/reference-flux/params.yaml --dataset DIR --out VAE_DIR
    python -m slimdiff.reference.flux_train transformer --params ... --dataset DIR --vae VAE_DIR --out BASE_DIR
    python -m slimdiff.reference.flux_train refine      --params ... --dataset DIR --base BASE_DIR --out MODEL_DIR
    python -m slimdiff.reference.flux_train bench       --params ... --out FILE.json   # step time, latency share
    python -m slimdiff.reference.flux_train latency     --params ... --model MODEL_DIR --out FILE.json
    python -m slimdiff.reference.flux_train sweep       --params ... --dataset DIR --model MODEL_DIR --out FILE.json

Every random draw of step k comes from a generator seeded with (seed, k), so a run resumed from a checkpoint
continues exactly as an uninterrupted one would on the same device and thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimdiff.reference.flux_model import (
    FluxReferenceConfig,
    assemble_pipeline,
    build_clip,
    build_clip_tokenizer,
    build_scheduler,
    build_t5,
    build_t5_tokenizer,
    build_transformer,
    compressible_latency,
    flow_matching_pair,
    latent_token_ids,
    logit_normal_sigmas,
    pack_latents,
)
from slimdiff.reference.train import (
    VaeTrainConfig,
    _atomic_json,
    _load_checkpoint,
    _replace_dir,
    _save_checkpoint,
    _split,
    encode_latents,
    load_params,
    lr_factor,
    reconstruction_error,
    step_generator,
    train_vae,
)
from slimdiff.statistics.recording import model_content_hash

SAMPLING_FILE = "sampling.json"


@dataclass
class FluxTrainConfig:
    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4
    text_lr: float = 5e-4
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    grad_clip: float = 1.0
    # Noise levels sigma = sigmoid(N(logit_mean, logit_std^2)) (SD3 / FLUX.1 training).
    logit_mean: float = 0.0
    logit_std: float = 1.0
    checkpoint_every: int = 250


# ------------------------------------------------------------------------------------------- VAE


def fit_vae(config: FluxReferenceConfig, train: VaeTrainConfig, images: np.ndarray, seed: int, device: str,
            checkpoint_dir: Path | None = None):
    """`train.train_vae` with this model's two-level VAE, then Flux's latent normalisation: `shift_factor` = the
    latent mean, `scaling_factor` = 1 / the latent std (train_vae's), so (z - shift) * scale has mean 0, std 1."""
    vae = train_vae(config.vae_reference_config(), train, images, seed, device, checkpoint_dir)
    raw = encode_latents(vae, images[:4096], device, scaling_factor=1.0)
    vae.register_to_config(shift_factor=float(raw.mean()))
    return vae


@torch.no_grad()
def encode_flux_latents(vae, images: np.ndarray, device: str) -> torch.Tensor:
    """(posterior mean - shift_factor) * scaling_factor, as `FluxPipeline` decodes them back, on CPU."""
    raw = encode_latents(vae, images, device, scaling_factor=1.0)
    return (raw - vae.config.shift_factor) * vae.config.scaling_factor


# ----------------------------------------------------------------------------------- transformer


def tokenize(tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """Token ids exactly as `FluxPipeline` builds them (max-length padding to `length`, truncation, no mask)."""
    return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def train_flux(
    config: FluxReferenceConfig,
    train: FluxTrainConfig,
    latents: torch.Tensor,
    captions: list[str],
    seed: int,
    device: str,
    checkpoint_dir: Path | None = None,
    init: tuple | None = None,
    step_offset: int = 0,
):
    """Train the transformer, the CLIP and the T5 encoder jointly by rectified flow (velocity target noise - x_0,
    logit-normal noise levels), with caption dropout to the empty prompt (for true CFG) and an EMA of all three.

    `init` = (CLIP, T5, transformer) to start from instead of fresh weights (the refinement phase, with a fresh
    optimizer and EMA); its step k draws from the generator of step `step_offset` + k, so no draw repeats one of
    the phase before. Returns (EMA CLIP, EMA T5, EMA transformer, CLIP tokenizer, T5 tokenizer, log of (step, loss))."""
    torch.manual_seed(seed)
    clip_tokenizer = build_clip_tokenizer(config.clip.model_max_length)
    t5_tokenizer = build_t5_tokenizer(config.t5.model_max_length)

    def build_all():
        return build_clip(config, clip_tokenizer), build_t5(config, t5_tokenizer), build_transformer(config)

    clip, t5, transformer = (m.to(device) for m in build_all())
    if init is not None:
        for target, source in zip((clip, t5, transformer), init):
            target.load_state_dict(source.state_dict())
    ema = [m.to(device).requires_grad_(False) for m in build_all()]
    for target, source in zip(ema, (clip, t5, transformer)):
        target.load_state_dict(source.state_dict())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(transformer.parameters()), "lr": train.lr, "peak": train.lr},
            {"params": list(clip.parameters()) + list(t5.parameters()), "lr": train.text_lr, "peak": train.text_lr},
        ],
        weight_decay=train.weight_decay,
    )
    modules = {"transformer": transformer, "clip": clip, "t5": t5,
               "ema_transformer": ema[2], "ema_clip": ema[0], "ema_t5": ema[1]}
    start, log = 0, []
    run_key = {"model": config.to_dict(), "train": asdict(train), "seed": seed, "n_latents": len(latents)}
    if init is not None:
        run_key.update(init=[model_content_hash(m) for m in init], step_offset=step_offset)
    if checkpoint_dir is not None:
        progress = _load_checkpoint(checkpoint_dir, modules, optimizer, device, run_key)
        if progress:
            start, log = progress["step"], progress.get("log", [])
    clip_ids = tokenize(clip_tokenizer, captions, config.clip.model_max_length)
    t5_ids = tokenize(t5_tokenizer, captions, config.t5.model_max_length)
    clip_empty = tokenize(clip_tokenizer, [""], config.clip.model_max_length)[0]
    t5_empty = tokenize(t5_tokenizer, [""], config.t5.model_max_length)[0]
    img_ids = latent_token_ids(config.latent_size, device)
    txt_ids = torch.zeros(config.t5.model_max_length, 3, device=device)
    params = [p for m in (transformer, clip, t5) for p in m.parameters()]
    ema_pairs = [(e, p) for em, m in zip(ema, (clip, t5, transformer)) for e, p in zip(em.parameters(), m.parameters())]
    for m in (clip, t5, transformer):
        m.train()
    bar = tqdm(range(start, train.steps), desc="flux", initial=start, total=train.steps, mininterval=30)
    running = None
    for step in bar:
        gen = step_generator(seed, step_offset + step)
        idx = torch.randint(len(latents), (train.batch_size,), generator=gen)
        drop = torch.rand(train.batch_size, generator=gen) < train.caption_dropout
        sigma = logit_normal_sigmas(train.batch_size, gen, train.logit_mean, train.logit_std)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        clip_tokens, t5_tokens = clip_ids[idx].clone(), t5_ids[idx].clone()
        clip_tokens[drop], t5_tokens[drop] = clip_empty, t5_empty
        noisy, target = flow_matching_pair(x0, noise, sigma)
        noisy, target, sigma = pack_latents(noisy).to(device), pack_latents(target).to(device), sigma.to(device)
        factor = lr_factor(step, train.steps, train.warmup_steps, train.final_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * factor
        pred = transformer(
            hidden_states=noisy,
            encoder_hidden_states=t5(t5_tokens.to(device))[0],
            pooled_projections=clip(clip_tokens.to(device)).pooler_output,
            timestep=sigma,  # the pipeline passes scheduler timesteps / 1000 = sigma
            img_ids=img_ids,
            txt_ids=txt_ids,
        ).sample
        loss = F.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train.grad_clip)
        optimizer.step()
        decay = min(train.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_([e for e, _ in ema_pairs], [p for _, p in ema_pairs], 1 - decay)
        value = loss.item() if (step % 25 == 0 or step == train.steps - 1) else None
        if value is not None:
            running = value if running is None else 0.9 * running + 0.1 * value
            bar.set_postfix(loss=f"{running:.4f}")
            if step % 100 == 0 or step == train.steps - 1:
                log.append((step, round(running, 5)))
        if checkpoint_dir is not None and (step + 1) % train.checkpoint_every == 0 and step + 1 < train.steps:
            _save_checkpoint(checkpoint_dir, step + 1, modules, optimizer, {"kind": "flux", "log": log, "run_key": run_key})
    ema_clip, ema_t5, ema_transformer = (m.eval() for m in ema)
    return ema_clip, ema_t5, ema_transformer, clip_tokenizer, t5_tokenizer, log


def save_flux_pipeline(config: FluxReferenceConfig, vae, clip, clip_tokenizer, t5, t5_tokenizer, transformer,
                       out_dir: Path, stats: dict | None = None) -> None:
    """Write the diffusers folder (safetensors, fp32) atomically, with `sampling.json` (the call arguments the
    model needs: its resolution and T5 length) and `train_stats.json`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pipe = assemble_pipeline(vae.cpu(), clip.cpu(), clip_tokenizer, t5.cpu(), t5_tokenizer, transformer.cpu(),
                             build_scheduler(config))
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    pipe.save_pretrained(tmp, safe_serialization=True)
    _atomic_json(config.sampler_defaults(), tmp / SAMPLING_FILE)
    if stats is not None:
        _atomic_json(stats, tmp / "train_stats.json")
    _replace_dir(tmp, out_dir)


# ------------------------------------------------------------------------------------------- CLI


def run_vae(params: dict, dataset: str | None, out: Path, device: str, checkpoint_dir: Path | None):
    config = FluxReferenceConfig.from_dict(params["model"])
    train = VaeTrainConfig(**params["train_vae"])
    images, _ = _split(params, dataset, "train")
    start, cpu_start = time.time(), time.process_time()
    vae = fit_vae(config, train, images, params["seed"], device, checkpoint_dir)
    val, _ = _split(params, dataset, "validation")
    stats = {
        "vae_seconds": round(time.time() - start, 1),
        "vae_cpu_seconds": round(time.process_time() - cpu_start, 1),
        "vae_steps": train.steps,
        "vae_val_mae_255": round(reconstruction_error(vae, val[:512], device), 3),
        "vae_scaling_factor": vae.config.scaling_factor,
        "vae_shift_factor": vae.config.shift_factor,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    vae.cpu().save_pretrained(tmp, safe_serialization=True)
    _atomic_json(stats, tmp / "train_stats.json")
    _replace_dir(tmp, out)
    print(json.dumps(stats))


def _read_stats(folder: Path) -> dict:
    """The `train_stats.json` of an earlier stage's folder (empty if it has none), extended by the next stage."""
    path = folder / "train_stats.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_transformer(params: dict, dataset: str | None, vae_dir: Path, out: Path, device: str,
                    checkpoint_dir: Path | None):
    from diffusers import AutoencoderKL

    config = FluxReferenceConfig.from_dict(params["model"])
    train = FluxTrainConfig(**params["train_transformer"])
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True, use_safetensors=True).to(device).eval()
    images, captions = _split(params, dataset, "train")
    latents = encode_flux_latents(vae, images, device)
    start, cpu_start = time.time(), time.process_time()
    clip, t5, transformer, clip_tok, t5_tok, log = train_flux(
        config, train, latents, captions, params["seed"], device, checkpoint_dir
    )
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    stats = _read_stats(vae_dir)
    stats.update(
        {
            "transformer_seconds": round(seconds, 1),
            "transformer_cpu_seconds": round(cpu_seconds, 1),
            "transformer_steps": train.steps,
            "transformer_batch_size": train.batch_size,
            "device": device,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "loss_log": log,
        }
    )
    save_flux_pipeline(config, vae, clip, clip_tok, t5, t5_tok, transformer, out, stats)
    print(json.dumps({k: v for k, v in stats.items() if k != "loss_log"}))


def run_refine(params: dict, dataset: str | None, base_dir: Path, out: Path, device: str,
               checkpoint_dir: Path | None):
    """Phase 2: continue the trained pipeline at `base_dir` (phase 1's output) with `refine_transformer`'s
    settings (a fresh optimizer, lr schedule and EMA, its own step draws) and write the refined pipeline."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    if "refine_transformer" not in params:
        raise ValueError("refine needs a `refine_transformer` section in the params file (steps, batch_size, lr, ...)")
    config = FluxReferenceConfig.from_dict(params["model"])
    phase1 = FluxTrainConfig(**params["train_transformer"])
    refine = FluxTrainConfig(**params["refine_transformer"])
    load = {"local_files_only": True, "use_safetensors": True}
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", **load).to(device).eval()
    base = (
        CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder", **load),
        T5EncoderModel.from_pretrained(base_dir, subfolder="text_encoder_2", **load),
        FluxTransformer2DModel.from_pretrained(base_dir, subfolder="transformer", **load),
    )
    images, captions = _split(params, dataset, "train")
    latents = encode_flux_latents(vae, images, device)
    start, cpu_start = time.time(), time.process_time()
    clip, t5, transformer, clip_tok, t5_tok, log = train_flux(
        config, refine, latents, captions, params["seed"], device, checkpoint_dir, init=base, step_offset=phase1.steps
    )
    stats = _read_stats(base_dir)
    stats.update(
        {
            "refine_seconds": round(time.time() - start, 1),
            "refine_cpu_seconds": round(time.process_time() - cpu_start, 1),
            "refine_steps": refine.steps,
            "refine_batch_size": refine.batch_size,
            "refine_threads": torch.get_num_threads(),
            "refine_load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "refine_loss_log": log,
        }
    )
    save_flux_pipeline(config, vae, clip, clip_tok, t5, t5_tok, transformer, out, stats)
    print(json.dumps({k: v for k, v in stats.items() if not k.endswith("loss_log")}))


def run_benchmark(params: dict, device: str, steps: int) -> dict:
    """Seconds per VAE / transformer training step at the configured batch sizes (the difference of a 2-step and
    a (2 + steps)-step run), the projected time of the configured step counts (refinement included), and the compressible units' share
    of the transformer's forward latency at batch 1 and at the evaluation's batch (with CFG: 2x)."""
    config = FluxReferenceConfig.from_dict(params["model"])
    vae_cfg = VaeTrainConfig(**params["train_vae"])
    flux_cfg = FluxTrainConfig(**params["train_transformer"])
    from slimdiff.reference.data import make_split

    images, captions = make_split("train", params["seed"], 1024)
    result: dict = {}
    for name in ("vae", "transformer"):
        seconds = []
        for n in (2, 2 + steps):
            start = time.time()
            if name == "vae":
                vae = fit_vae(config, VaeTrainConfig(**dict(vars(vae_cfg), steps=n)), images[:256], 0, device)
            else:
                latents = encode_flux_latents(vae, images, device)
                *_, transformer, _, _, _ = train_flux(
                    config, FluxTrainConfig(**dict(vars(flux_cfg), steps=n)), latents, captions, 0, device
                )
            seconds.append(time.time() - start)
        result[f"{name}_seconds_per_step"] = round((seconds[1] - seconds[0]) / steps, 3)
    refine_cfg = FluxTrainConfig(**params["refine_transformer"]) if "refine_transformer" in params else None
    # a refinement step: the measured transformer step scaled by the batch ratio (its cost is linear in the batch)
    refine_step_seconds = (
        result["transformer_seconds_per_step"] * refine_cfg.batch_size / flux_cfg.batch_size if refine_cfg else 0.0
    )
    result["projected_minutes"] = round(
        (result["vae_seconds_per_step"] * vae_cfg.steps + result["transformer_seconds_per_step"] * flux_cfg.steps
         + refine_step_seconds * (refine_cfg.steps if refine_cfg else 0)) / 60, 1
    )
    evaluate_batch = 2 * params.get("evaluate", {}).get("batch_size", 50)
    result["latency"] = [compressible_latency(transformer, config, batch=b) for b in (1, evaluate_batch)]
    result.update(device=device, threads=torch.get_num_threads(), load_average_1min=round(os.getloadavg()[0], 2))
    return result


def run_latency(params: dict, model_dir: Path | None, batches: list[int]) -> dict:
    """The compressible units' share of the trained transformer's CPU forward latency (`compressible_latency`) at
    each batch size (the pipeline's batch: prompts x 2 with true CFG)."""
    from slimdiff.reference import load_reference_flux_pipeline

    config = FluxReferenceConfig.from_dict(params["model"])
    transformer = load_reference_flux_pipeline("cpu", model_dir).transformer
    return {
        "description": "share of FluxTransformer2DModel forward wall time inside attention (incl. projections, "
        "q/k RMSNorm, RoPE, SDPA), MLPs and adaLN linears; forward pre/post hooks with time.perf_counter",
        "torch": torch.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "runs": [compressible_latency(transformer, config, batch=b) for b in batches],
    }


def run_sampler_sweep(params: dict, dataset: str | None, model_dir: Path | None, evaluator_dir: str | None,
                      scales: list[float], steps: list[int], n: int) -> dict:
    """Alignment on the first `n` one-object and `n` two-object *validation* captions (never the test prompts
    the metrics stage reports) for each (steps, true_cfg_scale): how the evaluation's sampler settings were chosen."""
    from slimdiff.reference import load_reference_flux_pipeline, reference_flux_call_kwargs
    from slimdiff.reference.evaluator import load_evaluator
    from slimdiff.reference.metrics import generate, select_prompts

    pipe = load_reference_flux_pipeline("cpu", model_dir)
    pipe.set_progress_bar_config(disable=True)
    call_kwargs = reference_flux_call_kwargs(model_dir)
    evaluator = load_evaluator(evaluator_dir)
    _, captions = _split(params, dataset, "validation")
    prompts = {k: [captions[i] for i in select_prompts(captions, k, n)] for k in (1, 2)}
    runs = []
    for n_steps in steps:
        for scale in scales:
            start = time.time()
            row = {"steps": n_steps, "true_cfg_scale": scale}
            for k, group in prompts.items():
                images = generate(pipe, group, n_steps, scale, 50, 4321, "true_cfg_scale", call_kwargs)
                row[f"{'single' if k == 1 else 'two'}"] = evaluator.alignment(images, group)
            row["seconds"] = round(time.time() - start, 1)
            runs.append(row)
            print(json.dumps(row))
    return {"split": "validation", "n_per_group": n, "seed": 4321, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slimdiff.reference.flux_train")
    parser.add_argument("what", choices=["vae", "transformer", "refine", "bench", "latency", "sweep"])
    parser.add_argument("--params", default="data/reference-flux/params.yaml")
    parser.add_argument("--dataset", default=None, help="datasets folder from data/reference's dataset stage; else generated")
    parser.add_argument("--vae", default=None, help="VAE folder (transformer)")
    parser.add_argument("--model", default=None, help="trained pipeline folder (latency; default: the committed one)")
    parser.add_argument("--base", default=None, help="refine: phase 1's pipeline folder (the transformer stage's output)")
    parser.add_argument("--batches", default="1,100", help="latency: comma-separated batch sizes")
    parser.add_argument("--evaluator", default=None, help="sweep: evaluator folder (default: the committed one)")
    parser.add_argument("--scales", default="2,3,4,5", help="sweep: true_cfg_scale values")
    parser.add_argument("--sample-steps", default="28", help="sweep: sampling step counts")
    parser.add_argument("--n", type=int, default=50, help="sweep: validation prompts per group")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpoint-dir", default=None, help="resume from / save checkpoints here")
    parser.add_argument("--steps", type=int, default=None, help="override the step counts (smoke tests); bench: steps timed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    params = load_params(args.params)
    if args.steps is not None and args.what != "bench":
        params["train_vae"]["steps"] = params["train_transformer"]["steps"] = args.steps
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    out = Path(args.out)
    if args.what == "bench":
        result = run_benchmark(params, args.device, args.steps or 10)
        print(json.dumps(result))
        if args.out != "-":
            _atomic_json(result, out)
    elif args.what == "latency":
        result = run_latency(params, Path(args.model) if args.model else None, [int(b) for b in args.batches.split(",")])
        print(json.dumps(result, indent=1))
        _atomic_json(result, out)
    elif args.what == "sweep":
        result = run_sampler_sweep(
            params, args.dataset, Path(args.model) if args.model else None, args.evaluator,
            [float(x) for x in args.scales.split(",")], [int(x) for x in args.sample_steps.split(",")], args.n,
        )
        _atomic_json(result, out)
    elif args.what == "refine":
        if not args.base:
            parser.error("refine needs --base (the transformer stage's pipeline folder)")
        if args.steps is not None:
            params.setdefault("refine_transformer", {})["steps"] = args.steps
        run_refine(params, args.dataset, Path(args.base), out, args.device, ckpt / "refine" if ckpt else None)
    elif args.what == "vae":
        run_vae(params, args.dataset, out, args.device, ckpt / "vae" if ckpt else None)
    else:
        if not args.vae:
            parser.error("transformer needs --vae")
        run_transformer(params, args.dataset, Path(args.vae), out, args.device, ckpt / "transformer" if ckpt else None)


if __name__ == "__main__":
    main()
