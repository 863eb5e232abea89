"""DVC `evaluate_reference` stage: quality of a reference model measured with the evaluator.

Any text-to-image pipeline of the reference domain: the UNet reference (`StableDiffusionPipeline`, classifier-free
guidance through `guidance_scale`) and the Flux-style one (`FluxPipeline`: true CFG through `true_cfg_scale` with an
empty negative prompt, plus the call arguments of `evaluate.call_kwargs`). The pipeline class is read from the
folder's `model_index.json`.

    python -m slimdiff.reference.metrics --params data/reference/params.yaml --dataset DIR \
        --model data/reference/model --evaluator data/reference/evaluator \
        --out data/reference/metrics.json --grid docs/img/reference_samples.png
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from slimdiff.reference.data import load_split, make_split, parse_scene
from slimdiff.reference.evaluator import FD_NAME, ReferenceEvaluator, load_evaluator, uint8_to_unit
from slimdiff.reference.model import transformer_share
from slimdiff.runtime.sampling import guidance_kwargs


@dataclass
class EvaluateConfig:
    n_single: int = 200
    n_two: int = 200
    n_heldout: int = 100
    n_fd: int = 400
    steps: int = 25
    guidance_scale: float = 4.0
    batch_size: int = 50
    seed: int = 1234
    grid_prompts: int = 16
    # The call argument that takes the guidance scale: "guidance_scale" (Stable Diffusion pipelines) or
    # "true_cfg_scale" (FluxPipeline's classifier-free guidance; an empty negative prompt is passed with it).
    guidance_argument: str = "guidance_scale"
    # Further keyword arguments of every pipeline call (a FluxPipeline's height, width, max_sequence_length).
    call_kwargs: dict = field(default_factory=dict)


def select_prompts(captions: list[str], n_objects: int, n: int) -> list[int]:
    """Indices of the first `n` captions with `n_objects` objects."""
    picked = [i for i, c in enumerate(captions) if len(parse_scene(c).objects) == n_objects][:n]
    if len(picked) < n:
        raise ValueError(f"only {len(picked)} captions with {n_objects} objects, {n} requested")
    return picked


@torch.no_grad()
def generate(
    pipe,
    captions: list[str],
    steps: int,
    guidance_scale: float,
    batch_size: int,
    seed: int,
    guidance_argument: str = "guidance_scale",
    call_kwargs: dict | None = None,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; batch b uses generator seed `seed + b`."""
    out = []
    for b, start in enumerate(range(0, len(captions), batch_size)):
        batch = captions[start : start + batch_size]
        result = pipe(
            batch,
            num_inference_steps=steps,
            **guidance_kwargs(guidance_argument, guidance_scale, len(batch)),
            output_type="pt",
            generator=torch.Generator().manual_seed(seed + b),
            **(call_kwargs or {}),
        )
        out.append(result.images.float().cpu())
    return torch.cat(out)


def parameter_counts(pipe) -> dict[str, float]:
    if getattr(pipe, "unet", None) is None:  # a FluxPipeline
        from slimdiff.reference.flux_model import parameter_counts as flux_parameter_counts

        return flux_parameter_counts(pipe)
    inside, total = transformer_share(pipe.unet)
    return {
        "unet": total,
        "unet_transformer_blocks": inside,
        "unet_transformer_share": round(inside / total, 4),
        "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "vae": sum(p.numel() for p in pipe.vae.parameters()),
    }


def save_grid(images: torch.Tensor, captions: list[str], path: Path, cols: int = 4) -> None:
    """PNG grid of generated images with their prompts (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.0))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, image, caption in zip(np.atleast_1d(axes).ravel(), images, captions):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(caption, 30)), fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def evaluate_reference(
    pipe, evaluator: ReferenceEvaluator, splits: dict[str, tuple[np.ndarray, list[str]]], config: EvaluateConfig
) -> tuple[dict, torch.Tensor, list[str]]:
    """All metrics of the stage; returns (metrics, grid images, grid captions)."""
    test_images, test_captions = splits["test"]
    heldout_images, heldout_captions = splits["heldout"]
    metrics: dict = {
        "evaluator_real": {
            "test": evaluator.alignment(uint8_to_unit(test_images), test_captions),
            "heldout": evaluator.alignment(uint8_to_unit(heldout_images), heldout_captions),
        }
    }
    single = select_prompts(test_captions, 1, config.n_single)
    two = select_prompts(test_captions, 2, config.n_two)
    prompts = {
        "single": [test_captions[i] for i in single],
        "two": [test_captions[i] for i in two],
        "heldout": heldout_captions[: config.n_heldout],
    }
    all_prompts = [c for group in prompts.values() for c in group]
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    generated = generate(
        pipe, all_prompts, config.steps, config.guidance_scale, config.batch_size, config.seed,
        config.guidance_argument, config.call_kwargs,
    )
    seconds = time.time() - start
    metrics["generation"] = {
        "prompts": len(all_prompts),
        "steps": config.steps,
        "guidance_scale": config.guidance_scale,
        **({} if config.guidance_argument == "guidance_scale" else {"guidance_argument": config.guidance_argument}),
        **({"call_kwargs": config.call_kwargs} if config.call_kwargs else {}),
        "scheduler": type(pipe.scheduler).__name__,
        "batch_size": config.batch_size,
        "seconds": round(seconds, 1),
        "seconds_per_500_prompts": round(seconds * 500 / len(all_prompts), 1),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    offset, alignment = 0, {}
    for name, group in prompts.items():
        alignment[name] = evaluator.alignment(generated[offset : offset + len(group)], group)
        offset += len(group)
    metrics["reference_alignment"] = alignment
    # FD-shapes: generated images for the single+two test prompts vs real test images of other
    # captions (R2), beside two real sets of the same size (the prompts' own real images R1 vs R2).
    n = min(config.n_fd, len(single) + len(two))
    paired = (single + two)[:n]
    used = set(single + two)
    others = [i for i in range(len(test_captions)) if i not in used][:n]
    if len(others) < n:
        raise ValueError(f"test split too small for FD with n={n}")
    real_1 = uint8_to_unit(test_images[paired])
    real_2 = uint8_to_unit(test_images[others])
    metrics[FD_NAME] = {
        "description": "Fréchet distance in the slimdiff evaluator's 128-d feature space (not Inception FID)",
        "n": n,
        "model_vs_real": evaluator.frechet_distance(generated[:n], real_2),
        "real_vs_real": evaluator.frechet_distance(real_1, real_2),
    }
    metrics["parameters"] = parameter_counts(pipe)
    k = config.grid_prompts
    grid_idx = list(range(k // 2)) + list(range(len(single), len(single) + k // 2))
    return metrics, generated[grid_idx], [all_prompts[i] for i in grid_idx]


def main(argv: list[str] | None = None) -> None:
    import yaml

    from slimdiff.reference import REFERENCE_MODEL_DIR, load_pipeline

    parser = argparse.ArgumentParser(prog="python -m slimdiff.reference.metrics")
    parser.add_argument("--params", default="data/reference/params.yaml")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--evaluator", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--grid", default=None)
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    config = EvaluateConfig(**params.get("evaluate", {}))
    sizes = params.get("data", {}).get("sizes", {})
    splits = {
        name: load_split(args.dataset, name) if args.dataset else make_split(name, params["seed"], sizes.get(name))
        for name in ("test", "heldout")
    }
    torch.manual_seed(config.seed)
    pipe = load_pipeline("cpu", args.model)
    evaluator = load_evaluator(args.evaluator)
    metrics, grid_images, grid_captions = evaluate_reference(pipe, evaluator, splits, config)
    stats_path = (Path(args.model) if args.model else REFERENCE_MODEL_DIR) / "train_stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        metrics["training"] = {k: v for k, v in stats.items() if k != "loss_log"}
    out = Path(args.out)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, out)
    if args.grid:
        save_grid(grid_images, grid_captions, Path(args.grid))
    print(json.dumps({k: v for k, v in metrics.items() if k != "evaluator_real"}, indent=1))


if __name__ == "__main__":
    main()
