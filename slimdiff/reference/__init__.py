"""slimdiff's embedded reference model: a small trained text-to-image `StableDiffusionPipeline`.

Built from the classes users compress (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel with cross-attention transformer blocks, a diffusers scheduler) and trained on a
procedural captioned-shapes dataset (`slimdiff.reference.data`). See docs/reference-model.md.
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "data" / "reference"
REFERENCE_MODEL_DIR = REFERENCE_DIR / "model"
REFERENCE_EVALUATOR_DIR = REFERENCE_DIR / "evaluator"
REFERENCE_CAPTIONS = REFERENCE_DIR / "captions.jsonl"
IMAGE_SIZE = 32


def load_reference_pipeline(device: str = "cpu", path: str | Path | None = None):
    """The committed reference `StableDiffusionPipeline` (offline, safetensors), on `device`.

    Generate at height=width=32 (the default sample size of the UNet and VAE gives exactly that).
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(path) if path is not None else REFERENCE_MODEL_DIR
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no diffusers pipeline (model_index.json) in {folder}")
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    return pipe.to(device)
