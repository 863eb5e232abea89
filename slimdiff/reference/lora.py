"""The reference LoRA: a small UNet LoRA for the reference model whose effect the evaluator can read.

It is the yardstick for projecting a LoRA made for the original model onto a compressed one (issue 25).
The base model draws a black ("plain") background when a caption names none; the LoRA makes that default
background **brown**. It is trained on generated images of the training distribution in which every plain
background is painted brown while the captions stay as they were (no background phrase), so its effect is
the fraction of images the evaluator reads as brown for prompts without a background phrase (base model
about 0 %). Captions that name gray or brown keep their background in the training data.

    python -m slimdiff.reference.lora train --params data/reference/params.yaml --out data/reference/lora
    python -m slimdiff.reference.lora evaluate --params data/reference/params.yaml --lora data/reference/lora \
        --out data/reference/lora/metrics.json

The weights are saved in diffusers' LoRA format (`pytorch_lora_weights.safetensors`), so plain
`StableDiffusionPipeline.from_pretrained("data/reference/model").load_lora_weights("data/reference/lora")` loads
them. `lora_effect` measures the effect on any pipeline (original, compressed, with or without a LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimdiff.reference.data import BACKGROUND_RGB, BACKGROUNDS, Scene, parse_scene, render_scenes, sample_scenes
from slimdiff.reference.train import (
    encode_latents,
    lr_factor,
    min_snr_weight,
    step_generator,
    tokenize,
)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# Every module kind the compressor changes in a BasicTransformerBlock: attention projections and the GEGLU MLP.
TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
# Seed offset of the LoRA's training scenes (the dataset splits use 0-4, the caption pool 99).
LORA_DATA_OFFSET = 5


@dataclass
class LoraTrainConfig:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: list(TARGET_MODULES))
    plain_background: str = "brown"  # drawn where a caption names no background
    n_images: int = 4000
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    grad_clip: float = 1.0


@dataclass(frozen=True)
class Sampling:
    """How `lora_effect` samples: the reference metrics' settings (the pipeline's own scheduler, DPM-Solver++
    for the reference model). Batch b of the prompts uses generator seed `seed + b`."""

    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 50
    seed: int = 1234


@dataclass
class LoraEvalConfig:
    n_prompts: int = 100  # evaluation prompts without a background phrase
    n_explicit: int = 50  # evaluation prompts that name gray or brown (does the LoRA keep them?)
    scales: list[float] = field(default_factory=lambda: [0.5])  # further LoRA scales, on the plain prompts
    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 50
    seed: int = 1234

    def sampling(self) -> Sampling:
        return Sampling(self.steps, self.guidance_scale, self.batch_size, self.seed)


# ------------------------------------------------------------------------------------------ data


def restyled_scenes(scenes: list[Scene], plain_background: str) -> list[Scene]:
    """The scenes as the LoRA draws them: a plain (black) background becomes `plain_background`."""
    if plain_background not in BACKGROUNDS:
        raise ValueError(f"plain_background must be one of {BACKGROUNDS}, got {plain_background!r}")
    return [Scene(s.objects, plain_background if s.background == "black" else s.background) for s in scenes]


def lora_training_set(n: int, seed: int, plain_background: str = "brown") -> tuple[np.ndarray, list[str]]:
    """Images (n, 32, 32, 3) uint8 and captions of the LoRA's data: scenes of the training distribution
    (no held-out pairs) with their own captions, rendered with plain backgrounds painted `plain_background`."""
    data_seed = seed * 1000 + LORA_DATA_OFFSET
    scenes = sample_scenes(n, data_seed, heldout=True)
    return render_scenes(restyled_scenes(scenes, plain_background), data_seed), [s.caption() for s in scenes]


# -------------------------------------------------------------------------------------- training


def add_lora(unet, config: LoraTrainConfig, seed: int) -> list[torch.nn.Parameter]:
    """Freeze `unet` and add a PEFT LoRA adapter ("default") to its target modules; returns the trainable
    parameters. The adapter's initial A matrices come from `seed`."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            init_lora_weights="gaussian",
            target_modules=list(config.target_modules),
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"no module of the UNet matches target_modules {config.target_modules}")
    return params


@torch.no_grad()
def text_contexts(text_encoder, tokenizer, captions: list[str], batch: int = 512) -> torch.Tensor:
    """Frozen text-encoder hidden states (N, tokens, dim) of captions, tokenised as the pipeline does."""
    ids = tokenize(tokenizer, captions)
    return torch.cat([text_encoder(ids[s : s + batch])[0] for s in range(0, len(ids), batch)])


def train_lora(pipe, latents: torch.Tensor, captions: list[str], config: LoraTrainConfig, seed: int) -> list:
    """Train a LoRA on `pipe.unet` (added in place, text encoder frozen) with the reference model's loss:
    v-prediction (or the scheduler's prediction type) with min-SNR-gamma weighting, caption dropout to the
    empty prompt. Every random draw of step k comes from `step_generator(seed, k)`. Returns the loss log
    [(step, running loss)]."""
    unet, scheduler = pipe.unet, pipe.scheduler
    params = add_lora(unet, config, seed)
    unet.train()
    contexts = text_contexts(pipe.text_encoder, pipe.tokenizer, captions)
    empty = text_contexts(pipe.text_encoder, pipe.tokenizer, [""])[0]
    alphas_cumprod = scheduler.alphas_cumprod.float()
    prediction_type = scheduler.config.prediction_type
    n_train_timesteps = scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    from tqdm.auto import tqdm

    log, running = [], None
    for step in tqdm(range(config.steps), desc="train LoRA", unit="step", mininterval=5):
        gen = step_generator(seed, step)
        idx = torch.randint(len(latents), (config.batch_size,), generator=gen)
        x0, context = latents[idx], contexts[idx].clone()
        drop = torch.rand(config.batch_size, generator=gen) < config.caption_dropout
        context[drop] = empty
        t = torch.randint(0, n_train_timesteps, (config.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].sqrt()[:, None, None, None]
        s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
        target = a * noise - s * x0 if prediction_type == "v_prediction" else noise
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup_steps, config.final_lr_fraction)
        pred = unet(a * x0 + s * noise, t, context).sample
        snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(snr, config.min_snr_gamma, prediction_type)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 25 == 0 or step == config.steps - 1:
            log.append((step, round(running, 5)))
    unet.eval()
    return log


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (what `save_lora_weights` expects for the UNet)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, out_dir: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers format, with the adapter config as metadata) and
    any `extra_files` (name -> JSON) into `out_dir`, each file atomically (temporary folder, then `os.replace`);
    other files in `out_dir` stay. Returns the weights' path."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".lora."))
    try:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=lora_state_dict(unet),
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        for path in sorted(tmp.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / LORA_WEIGHT_NAME


# ------------------------------------------------------------------------------------ evaluation


def lora_effect(
    pipe, prompts: list[str], evaluator, sampling: Sampling = Sampling(), target_background: str = "brown"
) -> dict:
    """The reference LoRA's effect on any pipeline (original or compressed, with or without a LoRA).

    Generates `prompts` (grammar captions) with `sampling` and reads the images with `evaluator`
    (a `ReferenceEvaluator`, or anything with its `predict` / `alignment`). Returns:

    - `effect`: fraction of the prompts without a background phrase whose image has the `target_background`
      (the LoRA's effect; NaN if every prompt names a background);
    - `shift`: a graded effect that does not saturate like `effect`: the images' median colour (the background
      colour on real images: objects cover under half of an image) projected on the line from black (0) to the
      `target_background` colour (1), averaged over the prompts without a background phrase;
    - `backgrounds`: fraction of all images read as each background;
    - `alignment`: the evaluator's alignment against the prompts as the LoRA should draw them (a plain
      background becomes `target_background`, a named one stays): `object`, `shape`, `colour`, `size`,
      `position` per object, `background`, `count`, and the strict image-level `overall`;
    - `n`, `n_plain`, `target_background`, and the sampling settings.
    """
    from slimdiff.reference.metrics import generate

    if not prompts:
        raise ValueError("lora_effect needs at least one prompt")
    scenes = [parse_scene(p) for p in prompts]
    expected = [s.caption() for s in restyled_scenes(scenes, target_background)]
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, list(prompts), sampling.steps, sampling.guidance_scale, sampling.batch_size, sampling.seed)
    background = evaluator.predict(images).background
    target = BACKGROUNDS.index(target_background)
    plain = torch.tensor([s.background == "black" for s in scenes])
    return {
        "n": len(prompts),
        "n_plain": int(plain.sum()),
        "target_background": target_background,
        "effect": float((background[plain] == target).float().mean()) if plain.any() else float("nan"),
        "shift": float(background_shift(images[plain], target_background).mean()) if plain.any() else float("nan"),
        "backgrounds": {name: float((background == i).float().mean()) for i, name in enumerate(BACKGROUNDS)},
        "alignment": evaluator.alignment(images, expected),
        "sampling": asdict(sampling),
    }


def background_shift(images: torch.Tensor, target_background: str = "brown") -> torch.Tensor:
    """Per image (N, 3, H, W in [0, 1]): the median colour's position on the line from the plain (black)
    background colour (0) to `target_background`'s colour (1)."""
    median = images.flatten(2).median(dim=2).values * 255.0  # (N, 3)
    plain = torch.tensor(BACKGROUND_RGB["black"], dtype=torch.float32)
    direction = torch.tensor(BACKGROUND_RGB[target_background], dtype=torch.float32) - plain
    return (median - plain) @ direction / direction.dot(direction)


def evaluation_prompt_sets(n_plain: int, n_explicit: int, seed: int = 0) -> dict[str, list[str]]:
    """The first `n_plain` evaluation prompts (test split) without a background phrase, and the first
    `n_explicit` that name one (gray or brown)."""
    from slimdiff.reference.prompts import evaluation_prompts

    captions = [row["caption"] for row in evaluation_prompts(5000, seed)]
    plain = [c for c in captions if parse_scene(c).background == "black"][:n_plain]
    explicit = [c for c in captions if parse_scene(c).background != "black"][:n_explicit]
    if len(plain) < n_plain or len(explicit) < n_explicit:
        raise ValueError(f"too few evaluation prompts for n_plain={n_plain}, n_explicit={n_explicit}")
    return {"plain": plain, "explicit": explicit}


def evaluate_lora(pipe, lora_dir: str | Path, evaluator, config: LoraEvalConfig, seed: int = 0) -> dict:
    """`lora_effect` of `pipe` without and with the LoRA in `lora_dir` on the plain and explicit prompt sets,
    and on the plain prompts at the LoRA scales `config.scales` (how the effect grows with the LoRA's size)."""
    prompts = evaluation_prompt_sets(config.n_prompts, config.n_explicit, seed)
    sampling = config.sampling()
    out: dict = {"base": {}, "lora": {}, "lora_scaled": {}}
    for name, group in prompts.items():
        out["base"][name] = lora_effect(pipe, group, evaluator, sampling)
    pipe.load_lora_weights(str(lora_dir), adapter_name="reference")
    try:
        for name, group in prompts.items():
            out["lora"][name] = lora_effect(pipe, group, evaluator, sampling)
        for scale in config.scales:
            pipe.set_adapters(["reference"], adapter_weights=[scale])
            out["lora_scaled"][str(scale)] = {"plain": lora_effect(pipe, prompts["plain"], evaluator, sampling)}
    finally:
        pipe.unload_lora_weights()
    return out


# ------------------------------------------------------------------------------------------- CLI


def _load_section(params_path: str | Path) -> tuple[dict, int]:
    import yaml

    params = yaml.safe_load(Path(params_path).read_text())
    return params.get("lora", {}), params["seed"]


def run_train(params_path: str | Path, model: str | Path | None, out: Path, steps: int | None = None) -> dict:
    from slimdiff.reference import load_reference_pipeline

    section, seed = _load_section(params_path)
    config = LoraTrainConfig(**section.get("train", {}))
    if steps is not None:
        config.steps = steps
    pipe = load_reference_pipeline("cpu", model)
    start = time.time()
    images, captions = lora_training_set(config.n_images, seed, config.plain_background)
    latents = encode_latents(pipe.vae, images, "cpu")
    data_seconds = time.time() - start
    start = time.time()
    log = train_lora(pipe, latents, captions, config, seed)
    seconds = time.time() - start
    stats = {
        "config": asdict(config),
        "seed": seed,
        "trainable_parameters": sum(p.numel() for p in pipe.unet.parameters() if p.requires_grad),
        "adapted_modules": sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A")),
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, config.steps), 3),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "first_loss": log[0][1] if log else None,
        "final_loss": log[-1][1] if log else None,
        "loss_log": log,
    }
    save_lora(pipe.unet, out, {"train_stats.json": stats})
    return stats


def run_evaluate(params_path: str | Path, model: str | Path | None, lora_dir: Path, evaluator_dir, out: Path) -> dict:
    from slimdiff.reference import load_reference_pipeline
    from slimdiff.reference.evaluator import load_evaluator

    section, seed = _load_section(params_path)
    config = LoraEvalConfig(**section.get("evaluate", {}))
    pipe = load_reference_pipeline("cpu", model)
    start = time.time()
    metrics = evaluate_lora(pipe, lora_dir, load_evaluator(evaluator_dir), config, seed)
    metrics["seconds"] = round(time.time() - start, 1)
    metrics["torch_threads"] = torch.get_num_threads()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    os.replace(tmp, out)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slimdiff.reference.lora")
    parser.add_argument("what", choices=["train", "evaluate"])
    parser.add_argument("--params", default="data/reference/params.yaml")
    parser.add_argument("--model", default=None, help="reference pipeline folder (default: data/reference/model)")
    parser.add_argument("--lora", default=None, help="LoRA folder to evaluate")
    parser.add_argument("--evaluator", default=None, help="evaluator folder (default: data/reference/evaluator)")
    parser.add_argument("--out", required=True, help="train: LoRA folder; evaluate: metrics JSON")
    parser.add_argument("--steps", type=int, default=None, help="override the training step count (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.what == "train":
        stats = run_train(args.params, args.model, Path(args.out), args.steps)
        print(json.dumps({k: v for k, v in stats.items() if k not in ("loss_log", "config")}))
    else:
        if not args.lora:
            parser.error("evaluate needs --lora")
        metrics = run_evaluate(args.params, args.model, Path(args.lora), args.evaluator, Path(args.out))
        print(json.dumps({k: {n: {"effect": v["effect"], "object": v["alignment"]["object"]} for n, v in metrics[k].items()}
                          for k in ("base", "lora")}, indent=1))


if __name__ == "__main__":
    main()
