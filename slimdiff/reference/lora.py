"""The reference LoRAs: a small LoRA for each reference model (the UNet one and the Flux-style one) whose effect the
evaluator can read.

It is the yardstick for projecting a LoRA made for the original model onto a compressed one (issue 25).
The base model draws a black ("plain") background when a caption names none; the LoRA makes that default
background **brown**. It is trained on generated images of the training distribution in which every plain
background is painted brown while the captions stay as they were (no background phrase), so its effect is
the fraction of images the evaluator reads as brown for prompts without a background phrase (base model
about 0 %). Captions that name gray or brown keep their background in the training data.

    python -m slimdiff.reference.lora train --params data/reference/params.yaml --model data/reference/model \
        --out data/reference/lora
    python -m slimdiff.reference.lora evaluate --params data/reference/params.yaml --model data/reference/model \
        --lora data/reference/lora --out data/reference/lora_metrics.json

and the same with `data/reference-flux/...` for the Flux-style reference. The data, the training loop, the effect and
its evaluation are shared; what differs by family (`family_of`: the pipeline's denoiser) are small functions: the
modules a LoRA targets (`default_targets`), the latents and text conditioning (`encode_images`, `encode_text`) and the
training loss (`unet_loss`: the reference UNet's v-prediction with min-SNR weighting; `flux_loss`: rectified flow as
`slimdiff.reference.flux_train`). Sampling settings (steps, guidance scale and the call argument that takes it, a
Flux pipeline's `max_sequence_length` and size) come from the reference's `params.yaml` (`evaluate` section).

The weights are saved in diffusers' LoRA format (`pytorch_lora_weights.safetensors`), so plain
`StableDiffusionPipeline.from_pretrained("data/reference/model").load_lora_weights("data/reference/lora")` (or
`FluxPipeline` with `data/reference-flux/...`) loads them. `lora_effect` measures the effect on any pipeline
(original, compressed, with or without a LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
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
# The same in a Flux transformer (slimdiff/arch/flux.py): a double block's joint attention (image and text streams)
# and both feed-forwards; a single block's q/k/v, MLP up projection and fused output (attention and MLP columns). The
# adaLN modulations (`norm1.linear`, `norm.linear`, ...), which the compressor factorises too, are not targeted.
FLUX_TARGET_MODULES: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)
# Seed offset of the LoRA's training scenes (the dataset splits use 0-4, the caption pool 99).
LORA_DATA_OFFSET = 5


@dataclass
class LoraTrainConfig:
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] | None = None  # suffixes of the block linears to adapt (None: `default_targets`)
    plain_background: str = "brown"  # drawn where a caption names no background
    n_images: int = 4000
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0  # UNet loss only
    grad_clip: float = 1.0
    # Flux loss only: noise levels sigma = sigmoid(N(logit_mean, logit_std^2)), as the Flux reference was trained.
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass(frozen=True)
class Sampling:
    """How `lora_effect` samples: the reference metrics' settings (the pipeline's own scheduler, DPM-Solver++
    for the reference model). Batch b of the prompts uses generator seed `seed + b`. `guidance_argument` and
    `call_kwargs` as `slimdiff.reference.metrics.EvaluateConfig`'s (a Flux pipeline: `true_cfg_scale` with an
    empty negative prompt, its size and `max_sequence_length`)."""

    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 50
    seed: int = 1234
    guidance_argument: str = "guidance_scale"
    call_kwargs: dict = field(default_factory=dict)


# The sampler keys of a reference's `evaluate` params section, which `lora.evaluate` inherits.
SAMPLING_KEYS = tuple(f.name for f in fields(Sampling))


@dataclass
class LoraEvalConfig:
    n_prompts: int = 100  # evaluation prompts without a background phrase
    n_explicit: int = 50  # evaluation prompts that name gray or brown (does the LoRA keep them?)
    scales: list[float] = field(default_factory=lambda: [0.5])  # further LoRA scales, on the plain prompts
    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 50
    seed: int = 1234
    guidance_argument: str = "guidance_scale"
    call_kwargs: dict = field(default_factory=dict)

    def sampling(self) -> Sampling:
        return Sampling(**{k: getattr(self, k) for k in SAMPLING_KEYS})


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


def family_of(pipe) -> str:
    """"unet" (a Stable Diffusion pipeline) or "flux" (a pipeline whose denoiser is a transformer: FluxPipeline)."""
    from slimdiff.arch.pipelines import denoiser_of

    return "unet" if denoiser_of(pipe)[0] == "unet" else "flux"


def default_targets(family: str) -> tuple[str, ...]:
    return {"unet": TARGET_MODULES, "flux": FLUX_TARGET_MODULES}[family]


def lora_targets(denoiser, suffixes) -> list[str]:
    """Names of the linears inside the denoiser's blocks whose name ends with one of `suffixes` (a Flux
    transformer's top-level `proj_out` is not a block linear, so it is left out)."""
    ends = tuple("." + s for s in suffixes)
    return [name for name, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Linear) and "blocks." in name and name.endswith(ends)]


def add_lora(denoiser, config: LoraTrainConfig, seed: int) -> list[torch.nn.Parameter]:
    """Freeze `denoiser` (a UNet or a Flux transformer) and add a PEFT LoRA adapter ("default") to its block linears
    named by `config.target_modules`; returns the trainable parameters. The adapter's initial A matrices come from
    `seed`."""
    from peft import LoraConfig

    targets = lora_targets(denoiser, config.target_modules)
    if not targets:
        raise ValueError(f"no module of the denoiser matches target_modules {config.target_modules}")
    denoiser.requires_grad_(False)
    torch.manual_seed(seed)
    denoiser.add_adapter(
        LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian", target_modules=targets)
    )
    return [p for p in denoiser.parameters() if p.requires_grad]


@torch.no_grad()
def text_contexts(text_encoder, tokenizer, captions: list[str], batch: int = 512) -> torch.Tensor:
    """Frozen text-encoder hidden states (N, tokens, dim) of captions, tokenised as the pipeline does."""
    ids = tokenize(tokenizer, captions)
    return torch.cat([text_encoder(ids[s : s + batch])[0] for s in range(0, len(ids), batch)])


def encode_images(pipe, images: np.ndarray) -> torch.Tensor:
    """The training latents of uint8 images (N, H, W, 3), as the family's pipeline decodes them."""
    if family_of(pipe) == "unet":
        return encode_latents(pipe.vae, images, "cpu")
    from slimdiff.reference.flux_train import encode_flux_latents

    return encode_flux_latents(pipe.vae, images, "cpu")


@torch.no_grad()
def encode_text(pipe, captions: list[str], max_sequence_length: int | None = None, batch: int = 512) -> dict:
    """The frozen text conditioning of each caption as the pipeline computes it when sampling: the UNet's
    `context` (text-encoder hidden states); a Flux pipeline's `t5` hidden states (`max_sequence_length` tokens, the
    pipeline's default when None) and `pooled` CLIP vector (`FluxPipeline.encode_prompt`)."""
    if family_of(pipe) == "unet":
        return {"context": text_contexts(pipe.text_encoder, pipe.tokenizer, captions, batch)}
    length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    parts = [pipe.encode_prompt(captions[s : s + batch], device="cpu", **length)[:2] for s in range(0, len(captions), batch)]
    return {"t5": torch.cat([t5 for t5, _ in parts]), "pooled": torch.cat([pooled for _, pooled in parts])}


def unet_loss(pipe, x0: torch.Tensor, text: dict, gen: torch.Generator, config: LoraTrainConfig) -> torch.Tensor:
    """The reference UNet's loss: v-prediction (or the scheduler's prediction type) with min-SNR-gamma weighting."""
    scheduler = pipe.scheduler
    alphas_cumprod = scheduler.alphas_cumprod.float()
    prediction_type = scheduler.config.prediction_type
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    a = alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - alphas_cumprod[t]).sqrt()[:, None, None, None]
    target = a * noise - s * x0 if prediction_type == "v_prediction" else noise
    pred = pipe.unet(a * x0 + s * noise, t, text["context"]).sample
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weight(snr, config.min_snr_gamma, prediction_type)).mean()


def flux_loss(pipe, x0: torch.Tensor, text: dict, gen: torch.Generator, config: LoraTrainConfig) -> torch.Tensor:
    """The Flux reference's loss (`slimdiff.reference.flux_train.train_flux`): rectified flow, velocity target
    noise - x_0 at logit-normal noise levels, on 2x2-packed latent tokens."""
    import torch.nn.functional as F

    from slimdiff.reference.flux_model import flow_matching_pair, latent_token_ids, logit_normal_sigmas, pack_latents

    sigma = logit_normal_sigmas(len(x0), gen, config.logit_mean, config.logit_std)
    noise = torch.randn(x0.shape, generator=gen)
    noisy, target = flow_matching_pair(x0, noise, sigma)
    pred = pipe.transformer(
        hidden_states=pack_latents(noisy),
        encoder_hidden_states=text["t5"],
        pooled_projections=text["pooled"],
        timestep=sigma,  # the pipeline passes scheduler timesteps / 1000 = sigma
        img_ids=latent_token_ids(x0.shape[-1]),
        txt_ids=torch.zeros(text["t5"].shape[1], 3),
    ).sample
    return F.mse_loss(pred, pack_latents(target))


def train_lora(pipe, latents: torch.Tensor, captions: list[str], config: LoraTrainConfig, seed: int,
               max_sequence_length: int | None = None) -> list:
    """Train a LoRA on the pipeline's denoiser (added in place; text encoders frozen) with its reference model's loss
    (`unet_loss` or `flux_loss`), caption dropout to the empty prompt. Every random draw of step k comes from
    `step_generator(seed, k)`. `max_sequence_length`: a Flux pipeline's T5 length (as it is sampled). Returns the
    loss log [(step, running loss)]."""
    from slimdiff.arch.pipelines import denoiser_of

    family = family_of(pipe)
    if config.target_modules is None:
        config.target_modules = list(default_targets(family))
    denoiser = denoiser_of(pipe)[1]
    params = add_lora(denoiser, config, seed)
    denoiser.train()
    texts = encode_text(pipe, captions, max_sequence_length)
    empty = encode_text(pipe, [""], max_sequence_length)
    loss_of = {"unet": unet_loss, "flux": flux_loss}[family]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    from tqdm.auto import tqdm

    log, running = [], None
    for step in tqdm(range(config.steps), desc="train LoRA", unit="step", mininterval=5):
        gen = step_generator(seed, step)
        idx = torch.randint(len(latents), (config.batch_size,), generator=gen)
        text = {k: v[idx].clone() for k, v in texts.items()}
        drop = torch.rand(config.batch_size, generator=gen) < config.caption_dropout
        for k, v in text.items():
            v[drop] = empty[k][0]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.steps, config.warmup_steps, config.final_lr_fraction)
        loss = loss_of(pipe, latents[idx], text, gen, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if step % 25 == 0 or step == config.steps - 1:
            log.append((step, round(running, 5)))
    denoiser.eval()
    return log


def lora_state_dict(denoiser) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' key format (what `save_lora_weights` expects for the denoiser)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))


def save_lora(pipe, out_dir: str | Path, extra_files: dict[str, dict] | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (diffusers format through the pipeline class's `save_lora_weights`,
    with the adapter config as metadata) and any `extra_files` (name -> JSON) into `out_dir`, each file atomically
    (temporary folder, then `os.replace`); other files in `out_dir` stay. Returns the weights' path."""
    from slimdiff.arch.pipelines import denoiser_of

    key, denoiser = denoiser_of(pipe)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".lora."))
    try:
        type(pipe).save_lora_weights(
            tmp,
            **{f"{key}_lora_layers": lora_state_dict(denoiser),
               f"{key}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()},
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
    images = generate(pipe, list(prompts), sampling.steps, sampling.guidance_scale, sampling.batch_size, sampling.seed,
                      sampling.guidance_argument, sampling.call_kwargs)
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


def load_lora_params(params_path: str | Path) -> tuple[LoraTrainConfig, LoraEvalConfig, int]:
    """The `lora` section of a reference's params: its training and evaluation configs (the evaluation's sampler
    settings are the reference's `evaluate` section's unless `lora.evaluate` names them), and the seed."""
    import yaml

    params = yaml.safe_load(Path(params_path).read_text())
    section = params.get("lora", {})
    sampler = {k: v for k, v in params.get("evaluate", {}).items() if k in SAMPLING_KEYS}
    evaluate = LoraEvalConfig(**{**sampler, **section.get("evaluate", {})})
    return LoraTrainConfig(**section.get("train", {})), evaluate, params["seed"]


def run_train(params_path: str | Path, model: str | Path | None, out: Path, steps: int | None = None) -> dict:
    from slimdiff.arch.pipelines import denoiser_of
    from slimdiff.reference import load_pipeline

    config, evaluate, seed = load_lora_params(params_path)
    if steps is not None:
        config.steps = steps
    pipe = load_pipeline("cpu", model)
    start = time.time()
    images, captions = lora_training_set(config.n_images, seed, config.plain_background)
    latents = encode_images(pipe, images)
    data_seconds = time.time() - start
    start = time.time()
    log = train_lora(pipe, latents, captions, config, seed, evaluate.call_kwargs.get("max_sequence_length"))
    seconds = time.time() - start
    denoiser = denoiser_of(pipe)[1]
    stats = {
        "config": asdict(config),
        "seed": seed,
        "trainable_parameters": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "adapted_modules": sum(1 for n, _ in denoiser.named_modules() if n.endswith(".lora_A")),
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
    save_lora(pipe, out, {"train_stats.json": stats})
    return stats


def run_evaluate(params_path: str | Path, model: str | Path | None, lora_dir: Path, evaluator_dir, out: Path) -> dict:
    from slimdiff.reference import load_pipeline
    from slimdiff.reference.evaluator import load_evaluator

    _, config, seed = load_lora_params(params_path)
    pipe = load_pipeline("cpu", model)
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
    parser.add_argument("--model", default=None, help="reference pipeline folder, UNet or Flux (default: data/reference/model)")
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
