"""Training of the reference model: VAE first, then UNet + text encoder on frozen VAE latents.

Entry points (thin; settings come from params.yaml):

    python -m slimdiff.reference.train vae  --params data/reference/params.yaml --dataset DIR --out VAE_DIR
    python -m slimdiff.reference.train unet --params ... --dataset DIR --vae VAE_DIR --out MODEL_DIR
    python -m slimdiff.reference.train all  --params ... --out MODEL_DIR          # generates the data itself

Every random draw of step k comes from a generator seeded with (seed, k), so a run resumed from a
checkpoint continues exactly as an uninterrupted one would on the same device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from slimdiff.reference.data import load_split, make_split
from slimdiff.reference.model import (
    ReferenceConfig,
    assemble_pipeline,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
)
from slimdiff.reference.tokenizer import build_tokenizer


@dataclass
class VaeTrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    kl_weight: float = 1e-6
    checkpoint_every: int = 500


@dataclass
class UnetTrainConfig:
    steps: int = 4000
    batch_size: int = 128
    lr: float = 5e-4
    text_lr: float = 5e-4
    warmup_steps: int = 200
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0
    checkpoint_every: int = 250


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator for every random draw of one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def lr_factor(step: int, total: int, warmup: int, final_fraction: float) -> float:
    """Linear warm-up, then cosine decay to `final_fraction` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for epsilon or v targets."""
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


# ----------------------------------------------------------------------------------------- files


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Safetensors written atomically; a tensor sharing memory with an earlier one (tied weights, e.g. T5's
    `shared` and `encoder.embed_tokens`) is stored as its own copy, so a strict load restores every key."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        out[k] = v.clone() if v.untyped_storage().data_ptr() in seen else v
        seen.add(v.untyped_storage().data_ptr())
    save_file(out, tmp)
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_json(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _save_checkpoint(ckpt_dir: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, extra: dict) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    _atomic_save_file(tensors, ckpt_dir / "weights.safetensors")
    _atomic_torch_save(optimizer.state_dict(), ckpt_dir / "optimizer.pt")
    _atomic_json(dict(extra, step=step), ckpt_dir / "progress.json")


def _load_checkpoint(
    ckpt_dir: Path, modules: dict[str, torch.nn.Module], optimizer, device: str, run_key: dict
) -> dict | None:
    """Restore a checkpoint written by a run with the same `run_key` (config, seed); None if there is none."""
    if not (ckpt_dir / "progress.json").exists():
        return None
    progress = json.loads((ckpt_dir / "progress.json").read_text())
    if progress.get("run_key") != json.loads(json.dumps(run_key)):
        raise ValueError(
            f"checkpoint in {ckpt_dir} was written by a run with other settings "
            f"({progress.get('run_key')} != {run_key}); delete it or pass another --checkpoint-dir"
        )
    tensors = load_file(str(ckpt_dir / "weights.safetensors"), device=device)
    for name, m in modules.items():
        prefix = f"{name}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location=device, weights_only=True))
    return progress


def _replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a finished folder into place (the old one, if any, is removed first)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


# ------------------------------------------------------------------------------------------- VAE


def train_vae(
    config: ReferenceConfig,
    train: VaeTrainConfig,
    images: np.ndarray,
    seed: int,
    device: str,
    checkpoint_dir: Path | None = None,
):
    """Train an `AutoencoderKL` to reconstruct the images; sets `scaling_factor` from the latent std."""
    torch.manual_seed(seed)
    vae = build_vae(config).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=train.lr, weight_decay=0.0)
    start = 0
    if checkpoint_dir is not None:
        run_key = {"model": config.to_dict(), "train": asdict(train), "seed": seed, "n_images": len(images)}
        progress = _load_checkpoint(checkpoint_dir, {"vae": vae}, optimizer, device, run_key)
        start = progress["step"] if progress else 0
    data = images_to_tensor(images)
    bar = tqdm(range(start, train.steps), desc="vae", initial=start, total=train.steps)
    for step in bar:
        gen = step_generator(seed, step)
        idx = torch.randint(len(data), (train.batch_size,), generator=gen)
        x = data[idx].to(device)
        for group in optimizer.param_groups:
            group["lr"] = train.lr * lr_factor(step, train.steps, 100, 0.05)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        rec_loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x)
        loss = rec_loss + train.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.4f}")
        if checkpoint_dir is not None and (step + 1) % train.checkpoint_every == 0:
            _save_checkpoint(checkpoint_dir, step + 1, {"vae": vae}, optimizer, {"kind": "vae", "run_key": run_key})
    vae.eval()
    latents = encode_latents(vae, images[:4096], device, scaling_factor=1.0)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, device: str, scaling_factor: float | None = None, batch: int = 512):
    """Posterior means of the images, times the VAE's scaling factor, on CPU."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    out = []
    for start in range(0, len(images), batch):
        x = images_to_tensor(images[start : start + batch]).to(device)
        out.append(vae.encode(x).latent_dist.mean.mul(scale).cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_error(vae, images: np.ndarray, device: str) -> float:
    """Mean absolute error in [0, 255] units of encode(mean) -> decode."""
    x = images_to_tensor(images).to(device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((recon - x).abs().mean() * 127.5)


# ------------------------------------------------------------------------------------------ UNet


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as `StableDiffusionPipeline` builds them (max-length padding, truncation)."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_unet(
    config: ReferenceConfig,
    train: UnetTrainConfig,
    latents: torch.Tensor,
    captions: list[str],
    seed: int,
    device: str,
    checkpoint_dir: Path | None = None,
):
    """Train UNet and CLIP text encoder jointly with v-prediction + min-SNR weighting.

    Returns (EMA text encoder, EMA unet, tokenizer, log of (step, loss)).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(config.text.model_max_length)
    text_encoder = build_text_encoder(config, tokenizer).to(device)
    unet = build_unet(config).to(device)
    ema_text = build_text_encoder(config, tokenizer).to(device).requires_grad_(False)
    ema_unet = build_unet(config).to(device).requires_grad_(False)
    ema_text.load_state_dict(text_encoder.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": train.lr, "peak": train.lr},
            {"params": list(text_encoder.parameters()), "lr": train.text_lr, "peak": train.text_lr},
        ],
        weight_decay=train.weight_decay,
    )
    modules = {"unet": unet, "text_encoder": text_encoder, "ema_unet": ema_unet, "ema_text_encoder": ema_text}
    start, log = 0, []
    run_key = {"model": config.to_dict(), "train": asdict(train), "seed": seed, "n_latents": len(latents)}
    if checkpoint_dir is not None:
        progress = _load_checkpoint(checkpoint_dir, modules, optimizer, device, run_key)
        if progress:
            start, log = progress["step"], progress.get("log", [])
    noise_scheduler = build_scheduler(config)  # only its training betas are used here
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema_pairs = list(zip(list(ema_unet.parameters()) + list(ema_text.parameters()), params))
    prediction_type = config.scheduler.prediction_type
    bar = tqdm(range(start, train.steps), desc="unet", initial=start, total=train.steps)
    running = None
    for step in bar:
        gen = step_generator(seed, step)
        idx = torch.randint(len(latents), (train.batch_size,), generator=gen)
        x0 = latents[idx]
        tokens = ids[idx].clone()
        drop = torch.rand(train.batch_size, generator=gen) < train.caption_dropout
        tokens[drop] = empty_ids
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (train.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        x0, tokens, t, noise = x0.to(device), tokens.to(device), t.to(device), noise.to(device)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        noisy = a * x0 + s * noise
        target = a * noise - s * x0 if prediction_type == "v_prediction" else noise
        factor = lr_factor(step, train.steps, train.warmup_steps, train.final_lr_fraction)
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * factor
        context = text_encoder(tokens)[0]
        pred = unet(noisy, t, context).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(snr, train.min_snr_gamma, prediction_type)).mean()
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
            _save_checkpoint(checkpoint_dir, step + 1, modules, optimizer, {"kind": "unet", "log": log, "run_key": run_key})
    return ema_text.eval(), ema_unet.eval(), tokenizer, log


def save_reference_pipeline(config: ReferenceConfig, vae, text_encoder, tokenizer, unet, out_dir: Path) -> None:
    """Write the diffusers folder (safetensors) atomically: a temp folder beside it, then a rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    pipe = assemble_pipeline(vae.cpu(), text_encoder.cpu(), tokenizer, unet.cpu(), build_scheduler(config))
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    pipe.save_pretrained(tmp, safe_serialization=True)
    _replace_dir(tmp, out_dir)


# ------------------------------------------------------------------------------------------- CLI


def load_params(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _split(params: dict, dataset: str | None, name: str) -> tuple[np.ndarray, list[str]]:
    if dataset:
        return load_split(dataset, name)
    size = params.get("data", {}).get("sizes", {}).get(name)
    return make_split(name, params["seed"], size)


def _device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    return requested


def run_vae(params: dict, dataset: str | None, out: Path, device: str, checkpoint_dir: Path | None):
    config = ReferenceConfig.from_dict(params["model"])
    train = VaeTrainConfig(**params["train_vae"])
    images, _ = _split(params, dataset, "train")
    start = time.time()
    vae = train_vae(config, train, images, params["seed"], device, checkpoint_dir)
    val, _ = _split(params, dataset, "validation")
    stats = {
        "vae_seconds": round(time.time() - start, 1),
        "vae_val_mae_255": round(reconstruction_error(vae, val[:512], device), 3),
        "vae_scaling_factor": vae.config.scaling_factor,
        "device": device,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    vae.cpu().save_pretrained(tmp, safe_serialization=True)
    _atomic_json(stats, tmp / "train_stats.json")
    _replace_dir(tmp, out)
    print(json.dumps(stats))
    return vae


def run_unet(params: dict, dataset: str | None, vae_dir: Path, out: Path, device: str, checkpoint_dir: Path | None):
    from diffusers import AutoencoderKL

    config = ReferenceConfig.from_dict(params["model"])
    train = UnetTrainConfig(**params["train_unet"])
    vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
    images, captions = _split(params, dataset, "train")
    latents = encode_latents(vae, images, device)
    start = time.time()
    text_encoder, unet, tokenizer, log = train_unet(config, train, latents, captions, params["seed"], device, checkpoint_dir)
    seconds = time.time() - start
    save_reference_pipeline(config, vae, text_encoder, tokenizer, unet, out)
    stats = json.loads((vae_dir / "train_stats.json").read_text()) if (vae_dir / "train_stats.json").exists() else {}
    stats.update(
        {
            "unet_seconds": round(seconds, 1),
            "unet_steps": train.steps,
            "unet_batch_size": train.batch_size,
            "device": device,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "loss_log": log,
        }
    )
    _atomic_json(stats, out / "train_stats.json")
    print(json.dumps({k: v for k, v in stats.items() if k != "loss_log"}))


def run_benchmark(params: dict, device: str, steps: int) -> dict:
    """Seconds per VAE / UNet training step at the configured batch sizes (after 2 warm-up steps),
    and the projected time of the configured step counts."""
    config = ReferenceConfig.from_dict(params["model"])
    vae_cfg = VaeTrainConfig(**params["train_vae"])
    unet_cfg = UnetTrainConfig(**params["train_unet"])
    images, captions = make_split("train", params["seed"], 1024)
    timings = {}
    for name in ("vae", "unet"):
        seconds = []
        for n in (2, 2 + steps):
            start = time.time()
            if name == "vae":
                vae = train_vae(config, VaeTrainConfig(**dict(vars(vae_cfg), steps=n)), images[:256], 0, device)
            else:
                latents = encode_latents(vae, images, device)
                train_unet(config, UnetTrainConfig(**dict(vars(unet_cfg), steps=n)), latents, captions, 0, device)
            seconds.append(time.time() - start)
        timings[f"{name}_seconds_per_step"] = round((seconds[1] - seconds[0]) / steps, 3)
    timings["projected_minutes"] = round(
        (timings["vae_seconds_per_step"] * vae_cfg.steps + timings["unet_seconds_per_step"] * unet_cfg.steps) / 60, 1
    )
    timings.update(device=device, threads=torch.get_num_threads(), load_average_1min=round(os.getloadavg()[0], 2))
    return timings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slimdiff.reference.train")
    parser.add_argument("what", choices=["vae", "unet", "all", "bench"])
    parser.add_argument("--params", default="data/reference/params.yaml")
    parser.add_argument("--dataset", default=None, help="datasets folder from the dataset stage; else generated")
    parser.add_argument("--vae", default=None, help="VAE folder (unet)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpoint-dir", default=None, help="resume from / save checkpoints here")
    parser.add_argument("--steps", type=int, default=None, help="override the step count (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    if args.steps is not None and args.what != "bench":
        params["train_vae"]["steps"] = params["train_unet"]["steps"] = args.steps
    device = _device(args.device)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else None
    out = Path(args.out)
    if args.what == "bench":
        result = run_benchmark(params, device, args.steps or 20)
        print(json.dumps(result))
        if args.out != "-":
            _atomic_json(result, out)
    elif args.what == "vae":
        run_vae(params, args.dataset, out, device, ckpt / "vae" if ckpt else None)
    elif args.what == "unet":
        if not args.vae:
            parser.error("unet needs --vae")
        run_unet(params, args.dataset, Path(args.vae), out, device, ckpt / "unet" if ckpt else None)
    else:
        vae_dir = out.parent / f"{out.name}_vae"
        run_vae(params, args.dataset, vae_dir, device, ckpt / "vae" if ckpt else None)
        run_unet(params, args.dataset, vae_dir, out, device, ckpt / "unet" if ckpt else None)


if __name__ == "__main__":
    main()
