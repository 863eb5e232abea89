"""Offline quality evaluator for the reference domain.

A small CNN reads, for each quadrant of a 32x32 image, whether an object is there and its shape,
colour and size, plus the background colour. From it:

- `alignment(images, captions)`: prompt-alignment accuracy per attribute (a GenEval-style score for
  this domain);
- `frechet_distance(a, b)`: "FD-shapes", the Fréchet distance in the evaluator's 128-d feature space
  computed with torchmetrics' FID machinery and a custom feature extractor. It is NOT Inception FID
  and its values are not comparable with published FIDs;
- `clip_score(...)` / `inception_fid(...)`: the standard metrics, only where real CLIP / Inception
  weights exist at a configured local path (nothing is downloaded).

    python -m slimdiff.reference.evaluator train --params data/reference/params.yaml --dataset DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from slimdiff.reference.data import BACKGROUNDS, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, SIZES, parse_scene, scene_labels

HEADS: dict[str, int] = {"present": 2, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
FD_NAME = "fd_shapes"
CLIP_PATH_ENV = "SLIMDIFF_CLIP_PATH"
INCEPTION_WEIGHTS_ENV = "SLIMDIFF_INCEPTION_WEIGHTS"


@dataclass
class EvaluatorConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])
    feature_dim: int = 128


@dataclass
class EvaluatorTrainConfig:
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    noise_std: float = 0.04
    blur_prob: float = 0.5


class ShapeEvaluatorNet(nn.Module):
    """Conv stack (32 -> 4 px) -> `feature_dim` features -> background head + per-quadrant heads."""

    def __init__(self, config: EvaluatorConfig):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for i, ch in enumerate(config.channels):
            layers += [nn.Conv2d(in_ch, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
            if i < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            in_ch = ch
        self.conv = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** (len(config.channels) - 1)
        self.fc = nn.Linear(in_ch * side * side, config.feature_dim)
        self.background = nn.Linear(config.feature_dim, len(BACKGROUNDS))
        self.quadrants = nn.Linear(config.feature_dim, len(POSITIONS) * sum(HEADS.values()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, feature_dim) features of images (N, 3, H, W) in [0, 1] (resized to 32x32 if needed)."""
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return self.fc(self.conv(images * 2 - 1).flatten(1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits: `background` (N, 3) and `present|shape|colour|size` (N, 4 quadrants, classes)."""
        h = F.relu(self.features(images))
        out = {"background": self.background(h)}
        per_quadrant = self.quadrants(h).view(len(h), len(POSITIONS), -1)
        start = 0
        for name, n in HEADS.items():
            out[name] = per_quadrant[..., start : start + n]
            start += n
        return out


class EvaluatorFeatures(nn.Module):
    """Feature extractor for torchmetrics' `FrechetInceptionDistance(feature=...)`."""

    def __init__(self, net: ShapeEvaluatorNet):
        super().__init__()
        self.net = net
        self.num_features = net.fc.out_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float())


def labels_tensor(captions: list[str]) -> dict[str, torch.Tensor]:
    """Targets from grammar captions: background (N,) and per-quadrant heads (N, 4), -1 = no object."""
    rows = [scene_labels(parse_scene(c)) for c in captions]
    out = {"background": torch.tensor([r["background"] for r in rows])}
    for name in HEADS:
        out[name] = torch.tensor([[r[f"q{q}/{name}"] for q in range(len(POSITIONS))] for r in rows])
    return out


def uint8_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def evaluator_loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of cross-entropies; shape/colour/size are ignored where the quadrant is empty."""
    loss = F.cross_entropy(logits["background"], targets["background"])
    for name in HEADS:
        loss = loss + F.cross_entropy(logits[name].flatten(0, 1), targets[name].flatten(), ignore_index=-1)
    return loss


def _augment(x: torch.Tensor, train: EvaluatorTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise so that slightly soft generated images read like real ones."""
    n = len(x)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = (torch.rand(n, 1, 1, 1, generator=gen) < train.blur_prob).float() * torch.rand(n, 1, 1, 1, generator=gen)
    x = x * (1 - mix) + blur * mix
    x = x + torch.randn(x.shape, generator=gen) * train.noise_std * torch.rand(n, 1, 1, 1, generator=gen)
    return x.clamp(0, 1)


def train_evaluator(
    images: np.ndarray,
    captions: list[str],
    config: EvaluatorConfig,
    train: EvaluatorTrainConfig,
    seed: int,
    device: str = "cpu",
) -> ShapeEvaluatorNet:
    """Train the evaluator on real images with their grammar labels."""
    torch.manual_seed(seed)
    net = ShapeEvaluatorNet(config).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.lr, total_steps=train.steps)
    data, targets = uint8_to_unit(images), labels_tensor(captions)
    net.train()
    bar = tqdm(range(train.steps), desc="evaluator")
    for step in bar:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(data), (train.batch_size,), generator=gen)
        x = _augment(data[idx], train, gen).to(device)
        loss = evaluator_loss(net(x), {k: v[idx].to(device) for k, v in targets.items()})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return net.eval()


def save_evaluator(net: ShapeEvaluatorNet, config: EvaluatorConfig, out_dir: Path, extra: dict | None = None) -> None:
    """Write `model.safetensors` + `config.json` into `out_dir` atomically (temp folder, rename)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {
        "config": asdict(config),
        "labels": {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS, "background": BACKGROUNDS},
    }
    (tmp / "config.json").write_text(json.dumps(dict(meta, **(extra or {})), indent=2))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


@dataclass
class Predictions:
    """Decoded evaluator outputs: class indices, background (N,), others (N, 4 quadrants)."""

    background: torch.Tensor
    present: torch.Tensor
    shape: torch.Tensor
    colour: torch.Tensor
    size: torch.Tensor


def alignment_scores(pred: Predictions, captions: list[str]) -> dict[str, float]:
    """Per-attribute prompt alignment of predictions against grammar captions.

    For each object of a caption: `position` = an object is seen in its quadrant; `shape`, `colour`,
    `size` = the quadrant's prediction equals the caption's; `object` = all four. Per image:
    `background`, `count` (no object in a quadrant the caption leaves empty) and `overall` (every
    object right, background right, nothing extra; GenEval's strict image-level score).
    """
    hits: dict[str, list[float]] = {k: [] for k in ("shape", "colour", "size", "position", "object")}
    per_image: dict[str, list[float]] = {"background": [], "count": [], "overall": []}
    for i, caption in enumerate(captions):
        scene = parse_scene(caption)
        ok_all = True
        named = set()
        for obj in scene.objects:
            q = POSITIONS.index(obj.position)
            named.add(q)
            checks = {
                "position": bool(pred.present[i, q] == 1),
                "shape": bool(pred.shape[i, q] == SHAPES.index(obj.shape)),
                "colour": bool(pred.colour[i, q] == COLOURS.index(obj.colour)),
                "size": bool(pred.size[i, q] == SIZES.index(obj.size)),
            }
            checks["object"] = all(checks.values())
            ok_all &= checks["object"]
            for k, v in checks.items():
                hits[k].append(float(v))
        bg_ok = bool(pred.background[i] == BACKGROUNDS.index(scene.background))
        count_ok = all(pred.present[i, q] == 0 for q in range(len(POSITIONS)) if q not in named)
        per_image["background"].append(float(bg_ok))
        per_image["count"].append(float(count_ok))
        per_image["overall"].append(float(ok_all and bg_ok and count_ok))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in {**hits, **per_image}.items()}


class ReferenceEvaluator:
    """Alignment, FD-shapes and (with local weights) CLIPScore / Inception FID for reference-domain images."""

    def __init__(
        self,
        net: ShapeEvaluatorNet,
        clip_path: str | Path | None = None,
        inception_weights: str | Path | None = None,
        batch_size: int = 256,
    ):
        self.net = net.eval()
        self.clip_path = clip_path if clip_path is not None else os.environ.get(CLIP_PATH_ENV)
        self.inception_weights = (
            inception_weights if inception_weights is not None else os.environ.get(INCEPTION_WEIGHTS_ENV)
        )
        self.batch_size = batch_size

    @staticmethod
    def _check_images(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            raise ValueError("images must be float in [0, 1], got uint8; divide by 255")
        return images.float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Predictions:
        """Class predictions for images (N, 3, H, W) in [0, 1]."""
        images = self._check_images(images)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("background", *HEADS)}
        for start in range(0, len(images), self.batch_size):
            logits = self.net(images[start : start + self.batch_size])
            for k in parts:
                parts[k].append(logits[k].argmax(-1))
        return Predictions(**{k: torch.cat(v) for k, v in parts.items()})

    def alignment(self, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
        """Per-attribute accuracy of images against their grammar captions, plus `overall`."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        return alignment_scores(self.predict(images), captions)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        images = self._check_images(images)
        return torch.cat([self.net.features(images[s : s + self.batch_size]) for s in range(0, len(images), self.batch_size)])

    @torch.no_grad()
    def frechet_distance(self, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
        """FD-shapes: Fréchet distance between two image sets in the evaluator's feature space
        (torchmetrics FID with a custom feature extractor; not Inception FID)."""
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=EvaluatorFeatures(self.net), normalize=True).eval()
        for images, real in ((images_a, True), (images_b, False)):
            images = self._check_images(images)
            for start in range(0, len(images), self.batch_size):
                metric.update(images[start : start + self.batch_size], real=real)
        return float(metric.compute())

    def clip_score(self, images: torch.Tensor, captions: list[str], clip_path: str | Path | None = None) -> float:
        """torchmetrics CLIPScore with CLIP weights from a local folder (`clip_path` or $SLIMDIFF_CLIP_PATH)."""
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        path = clip_path if clip_path is not None else self.clip_path
        if path is None or not Path(path).is_dir():
            raise FileNotFoundError(f"CLIPScore needs a local CLIP folder (set {CLIP_PATH_ENV}); got {path!r}")

        class TensorFeaturesCLIP(CLIPModel):
            """transformers 5 returns output objects from get_*_features; torchmetrics expects tensors."""

            def get_image_features(self, *args, **kwargs):
                out = super().get_image_features(*args, **kwargs)
                return out if isinstance(out, torch.Tensor) else out.pooler_output

            def get_text_features(self, *args, **kwargs):
                out = super().get_text_features(*args, **kwargs)
                return out if isinstance(out, torch.Tensor) else out.pooler_output

        def load() -> tuple[CLIPModel, CLIPProcessor]:
            return (
                TensorFeaturesCLIP.from_pretrained(path, local_files_only=True, use_safetensors=True),
                CLIPProcessor.from_pretrained(path, local_files_only=True),
            )

        metric = CLIPScore(model_name_or_path=load)
        images = self._check_images(images)
        metric.update(list(images * 255.0), list(captions))  # the CLIP processor rescales by 1/255
        return float(metric.compute())

    def inception_fid(
        self, images_a: torch.Tensor, images_b: torch.Tensor, weights_path: str | Path | None = None
    ) -> float:
        """Inception FID (torchmetrics, feature 2048) from local Inception weights
        (`weights_path` or $SLIMDIFF_INCEPTION_WEIGHTS; needs torch-fidelity installed)."""
        path = weights_path if weights_path is not None else self.inception_weights
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"Inception FID needs local weights (set {INCEPTION_WEIGHTS_ENV}); got {path!r}")
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(path))
        for images, real in ((images_a, True), (images_b, False)):
            metric.update(self._check_images(images), real=real)
        return float(metric.compute())


def load_evaluator(
    path: str | Path | None = None,
    clip_path: str | Path | None = None,
    inception_weights: str | Path | None = None,
) -> ReferenceEvaluator:
    """The committed evaluator (`data/reference/evaluator`) or one saved by `save_evaluator`."""
    from slimdiff.reference import REFERENCE_EVALUATOR_DIR

    folder = Path(path) if path is not None else REFERENCE_EVALUATOR_DIR
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no evaluator (model.safetensors) in {folder}")
    meta = json.loads((folder / "config.json").read_text())
    net = ShapeEvaluatorNet(EvaluatorConfig(**meta["config"]))
    net.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return ReferenceEvaluator(net, clip_path=clip_path, inception_weights=inception_weights)


def main(argv: list[str] | None = None) -> None:
    import yaml

    from slimdiff.reference.data import load_split, make_split

    parser = argparse.ArgumentParser(prog="python -m slimdiff.reference.evaluator")
    parser.add_argument("what", choices=["train"])
    parser.add_argument("--params", default="data/reference/params.yaml")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    section = dict(params.get("evaluator", {}))
    config = EvaluatorConfig(**section.pop("model", {}))
    train = EvaluatorTrainConfig(**section)
    if args.steps is not None:
        train.steps = args.steps

    def split(name: str) -> tuple[np.ndarray, list[str]]:
        if args.dataset:
            return load_split(args.dataset, name)
        return make_split(name, params["seed"], params.get("data", {}).get("sizes", {}).get(name))

    images, captions = split("evaluator_train")
    start = time.time()
    net = train_evaluator(images, captions, config, train, params["seed"], args.device).cpu()
    seconds = time.time() - start
    evaluator = ReferenceEvaluator(net)
    real_accuracy = {}
    for name in ("test", "heldout"):
        imgs, caps = split(name)
        real_accuracy[name] = evaluator.alignment(uint8_to_unit(imgs), caps)
    save_evaluator(net, config, Path(args.out), {"train_seconds": round(seconds, 1), "real_accuracy": real_accuracy})
    print(json.dumps(real_accuracy, indent=1))


if __name__ == "__main__":
    main()
