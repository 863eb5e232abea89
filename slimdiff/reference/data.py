"""Procedural captioned shapes: attribute sampling, caption grammar and parser, rendering, splits.

Every image holds one or two objects, each in its own quadrant of a 32x32 canvas, with a shape,
a colour and a size, on a black ("plain"), gray or brown background. Captions follow one grammar:

    "a small red circle at the top left and a large blue square at the bottom right on a gray background"

A black background is not mentioned. Everything is deterministic from a seed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS: tuple[str, ...] = ("black", "gray", "brown")
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 235),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "white": (245, 245, 245),
}
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (115, 115, 115),
    "brown": (105, 65, 30),
}
# (shape, colour) pairs that never occur in the training split: the compositional held-out set.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("circle", "purple"), ("square", "yellow"), ("triangle", "white"), ("cross", "red")}
)
IMAGE_SIZE = 32
BACKGROUND_PROBS = (0.5, 0.25, 0.25)
TWO_OBJECT_PROB = 0.6
# Split name -> (size, seed offset, whether held-out pairs are excluded (True), required (False)
# or both allowed (None)).
SPLITS: dict[str, tuple[int, int, bool | None]] = {
    "train": (50_000, 0, True),
    "validation": (2_000, 1, True),
    "test": (5_000, 2, True),
    "heldout": (2_000, 3, False),
    "evaluator_train": (30_000, 4, None),
}


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    position: str

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} at the {self.position}"

    def as_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "position": self.position}


@dataclass(frozen=True)
class Scene:
    """A whole image description: objects (ordered as in the caption) and background."""

    objects: tuple[ShapeObject, ...]
    background: str

    def caption(self) -> str:
        text = " and ".join(o.phrase() for o in self.objects)
        if self.background != "black":
            text += f" on a {self.background} background"
        return text

    def has_heldout_pair(self) -> bool:
        return any((o.shape, o.colour) in HELDOUT_PAIRS for o in self.objects)


def parse_caption(caption: str) -> list[dict[str, str]]:
    """Objects of a grammar caption as dicts with shape, colour, size, position (and background).

    Raises ValueError naming the offending part when the caption is not from the grammar.
    """
    scene = parse_scene(caption)
    return [dict(o.as_dict(), background=scene.background) for o in scene.objects]


def parse_scene(caption: str) -> Scene:
    """Inverse of `Scene.caption`."""
    text = " ".join(caption.strip().lower().split())
    background = "black"
    for bg in BACKGROUNDS:
        suffix = f" on a {bg} background"
        if text.endswith(suffix):
            background, text = bg, text[: -len(suffix)]
            break
    objects = []
    for phrase in text.split(" and "):
        words = phrase.split()
        if len(words) != 8 or words[0] != "a" or words[4:6] != ["at", "the"]:
            raise ValueError(f"caption part {phrase!r} of {caption!r} is not 'a SIZE COLOUR SHAPE at the POSITION'")
        size, colour, shape = words[1:4]
        position = " ".join(words[-2:])
        for value, allowed, name in (
            (size, SIZES, "size"),
            (colour, COLOURS, "colour"),
            (shape, SHAPES, "shape"),
            (position, POSITIONS, "position"),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r} in caption {caption!r}; expected one of {allowed}")
        objects.append(ShapeObject(shape, colour, size, position))
    if len({o.position for o in objects}) != len(objects):
        raise ValueError(f"caption {caption!r} places two objects at the same position")
    return Scene(tuple(objects), background)


def sample_scenes(n: int, seed: int, heldout: bool | None = True) -> list[Scene]:
    """`n` random scenes. heldout=True excludes held-out pairs, False requires one, None allows all."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        n_obj = 2 if rng.random() < TWO_OBJECT_PROB else 1
        positions = rng.choice(len(POSITIONS), size=n_obj, replace=False)
        objects = tuple(
            ShapeObject(
                SHAPES[rng.integers(len(SHAPES))],
                COLOURS[rng.integers(len(COLOURS))],
                SIZES[rng.integers(len(SIZES))],
                POSITIONS[p],
            )
            for p in positions
        )
        background = BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=BACKGROUND_PROBS)]
        scene = Scene(objects, background)
        if heldout is None or scene.has_heldout_pair() != heldout:
            scenes.append(scene)
    return scenes


def _shape_mask(shape: str, dx: torch.Tensor, dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Boolean mask of a shape of half-size h at offsets (dx, dy) from its centre (y points down)."""
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "square":
        return (dx.abs() <= 0.82 * h) & (dy.abs() <= 0.82 * h)
    if shape == "triangle":
        return (dy <= 0.8 * h) & (dy >= -h) & (dx.abs() <= (dy + h) / 1.8)
    if shape == "cross":
        arm = 0.32 * h
        return ((dx.abs() <= arm) & (dy.abs() <= h)) | ((dy.abs() <= arm) & (dx.abs() <= h))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scenes(scenes: list[Scene], seed: int, supersample: int = 4, chunk: int = 2048) -> np.ndarray:
    """Render scenes as uint8 images (N, 32, 32, 3), antialiased by supersampling.

    Object centres jitter inside their quadrant and half-sizes vary slightly, from `seed`.
    """
    gen = torch.Generator().manual_seed(seed)
    res = IMAGE_SIZE * supersample
    coords = (torch.arange(res, dtype=torch.float32) + 0.5) / supersample
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    quadrant = IMAGE_SIZE / 2
    for start in range(0, len(scenes), chunk):
        batch = scenes[start : start + chunk]
        canvas = torch.tensor([BACKGROUND_RGB[s.background] for s in batch], dtype=torch.float32)
        canvas = canvas[:, :, None, None].expand(-1, -1, res, res).clone()
        for slot in range(2):
            jitter = torch.rand(len(batch), 3, generator=gen)
            for i, scene in enumerate(batch):
                if slot >= len(scene.objects):
                    continue
                obj = scene.objects[slot]
                row, col = POSITIONS.index(obj.position) // 2, POSITIONS.index(obj.position) % 2
                half = (4.5 if obj.size == "small" else 7.0) + (jitter[i, 2] - 0.5)
                spread = 3.0 if obj.size == "small" else 1.0
                cx = quadrant * (col + 0.5) + (jitter[i, 0] - 0.5) * spread
                cy = quadrant * (row + 0.5) + (jitter[i, 1] - 0.5) * spread
                mask = _shape_mask(obj.shape, xs - cx, ys - cy, half)
                rgb = torch.tensor(COLOUR_RGB[obj.colour], dtype=torch.float32)[:, None]
                canvas[i][:, mask] = rgb
        pooled = torch.nn.functional.avg_pool2d(canvas, supersample)
        out[start : start + len(batch)] = pooled.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def scene_labels(scene: Scene) -> dict[str, int]:
    """Per-quadrant class indices: for each position p, `{p}/present`, `{p}/shape`, `{p}/colour`,
    `{p}/size` (-1 where no object), plus `background`."""
    labels: dict[str, int] = {"background": BACKGROUNDS.index(scene.background)}
    by_position = {o.position: o for o in scene.objects}
    for p, position in enumerate(POSITIONS):
        obj = by_position.get(position)
        labels[f"q{p}/present"] = int(obj is not None)
        labels[f"q{p}/shape"] = SHAPES.index(obj.shape) if obj else -1
        labels[f"q{p}/colour"] = COLOURS.index(obj.colour) if obj else -1
        labels[f"q{p}/size"] = SIZES.index(obj.size) if obj else -1
    return labels


def make_split(name: str, seed: int, size: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Images (N, 32, 32, 3) uint8 and captions of one split, deterministic from `seed`."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {tuple(SPLITS)}")
    default_size, offset, heldout = SPLITS[name]
    split_seed = seed * 1000 + offset
    scenes = sample_scenes(size or default_size, split_seed, heldout)
    return render_scenes(scenes, split_seed), [s.caption() for s in scenes]


def build_dataset(seed: int, sizes: dict[str, int] | None = None):
    """A `datasets.DatasetDict` of all splits with image, caption, background and per-object fields."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Array3D(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8"),
            "caption": datasets.Value("string"),
            "background": datasets.Value("string"),
            "n_objects": datasets.Value("int32"),
            "objects": datasets.Value("string"),
        }
    )
    splits = {}
    for name in SPLITS:
        images, captions = make_split(name, seed, (sizes or {}).get(name))
        scenes = [parse_scene(c) for c in captions]
        splits[name] = datasets.Dataset.from_dict(
            {
                "image": images,
                "caption": captions,
                "background": [s.background for s in scenes],
                "n_objects": [len(s.objects) for s in scenes],
                "objects": [json.dumps([o.as_dict() for o in s.objects]) for s in scenes],
            },
            features=features,
        )
    return datasets.DatasetDict(splits)


def load_split(dataset_dir: str | Path, name: str) -> tuple[np.ndarray, list[str]]:
    """Images and captions of one split from a `build_dataset(...).save_to_disk` folder."""
    import datasets

    split = datasets.load_from_disk(str(Path(dataset_dir) / name)).with_format("numpy", columns=["image"])
    return np.asarray(split["image"], dtype=np.uint8), list(split.with_format(None)["caption"])


def caption_pool(n: int = 4000, seed: int = 0) -> list[str]:
    """`n` unique grammar captions from the training distribution (no held-out pairs), in a fixed order."""
    rng_seed, seen, pool = seed * 1000 + 99, set(), []
    while len(pool) < n:
        for scene in sample_scenes(n, rng_seed, heldout=True):
            caption = scene.caption()
            if caption not in seen:
                seen.add(caption)
                pool.append(caption)
                if len(pool) == n:
                    break
        rng_seed += 1
    return pool


def read_caption_pool(path: str | Path | None = None) -> list[dict]:
    """Rows {caption, objects} of the committed pool (`data/reference/captions.jsonl` by default)."""
    path = Path(path) if path is not None else Path(__file__).resolve().parents[2] / "data" / "reference" / "captions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grammar_words() -> list[str]:
    """Every word the grammar can emit."""
    words = {"a", "at", "the", "and", "on", "background"}
    for group in (SHAPES, COLOURS, SIZES, POSITIONS, BACKGROUNDS):
        for item in group:
            words.update(item.split())
    return sorted(words)


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSON lines through a temporary file and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    """DVC `dataset` stage: all splits as a `datasets.DatasetDict` on disk, plus the caption pool."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(prog="python -m slimdiff.reference.data")
    parser.add_argument("--params", default="data/reference/params.yaml")
    parser.add_argument("--out", required=True, help="folder for DatasetDict.save_to_disk")
    parser.add_argument("--captions", required=True, help="captions.jsonl to write")
    args = parser.parse_args(argv)
    params = yaml.safe_load(Path(args.params).read_text())
    seed, data = params["seed"], params.get("data", {})
    dataset = build_dataset(seed, data.get("sizes"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    dataset.save_to_disk(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    pool = caption_pool(data.get("caption_pool", 4000), seed)
    write_jsonl_atomic(args.captions, [{"caption": c, "objects": parse_caption(c)} for c in pool])
    print({name: len(split) for name, split in dataset.items()}, f"{len(pool)} captions")


if __name__ == "__main__":
    main()
