"""slimdiff's embedded reference models: small trained text-to-image pipelines.

- `load_reference_pipeline`: a `StableDiffusionPipeline` built from the classes users compress (AutoencoderKL,
  CLIPTextModel + CLIPTokenizer, UNet2DConditionModel with cross-attention transformer blocks, a diffusers
  scheduler). See docs/reference-model.md.
- `load_reference_flux_pipeline`: a `FluxPipeline` (FluxTransformer2DModel with double and single blocks, CLIP and
  T5 text encoders, FlowMatchEulerDiscreteScheduler). See docs/reference-flux-model.md.

Both are trained on the same procedural captioned-shapes dataset (`slimdiff.reference.data`) and scored by the same
evaluator (`slimdiff.reference.evaluator`).
"""

from __future__ import annotations

from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "data" / "reference"
REFERENCE_MODEL_DIR = REFERENCE_DIR / "model"
REFERENCE_EVALUATOR_DIR = REFERENCE_DIR / "evaluator"
REFERENCE_CAPTIONS = REFERENCE_DIR / "captions.jsonl"
REFERENCE_FLUX_DIR = REFERENCE_DIR.parent / "reference-flux"
REFERENCE_FLUX_MODEL_DIR = REFERENCE_FLUX_DIR / "model"
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


def load_reference_flux_pipeline(device: str = "cpu", path: str | Path | None = None):
    """The committed Flux-style reference `FluxPipeline` (offline, safetensors), on `device`.

    Call it with `**reference_flux_call_kwargs()` (height = width = 32 and the T5 length it was trained with;
    FluxPipeline's own defaults are 1024 px and 512 T5 tokens), e.g.
    `pipe(prompts, num_inference_steps=28, true_cfg_scale=4.0, negative_prompt=[""] * len(prompts),
    **reference_flux_call_kwargs())`. The returned instance also defaults to 32 px (`default_sample_size`).
    """
    from diffusers import FluxPipeline

    folder = _pipeline_folder(path, REFERENCE_FLUX_MODEL_DIR)
    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    pipe.default_sample_size = reference_flux_call_kwargs(folder)["height"] // pipe.vae_scale_factor
    return pipe.to(device)


def reference_flux_call_kwargs(path: str | Path | None = None) -> dict:
    """The call arguments the Flux reference needs (`sampling.json` in its folder: height, width,
    max_sequence_length)."""
    import json

    folder = Path(path) if path is not None else REFERENCE_FLUX_MODEL_DIR
    return json.loads((folder / "sampling.json").read_text())


def load_pipeline(device: str = "cpu", path: str | Path | None = None):
    """Either reference pipeline, by the class named in the folder's `model_index.json` (default: the UNet one)."""
    import json

    folder = _pipeline_folder(path, REFERENCE_MODEL_DIR)
    if json.loads((folder / "model_index.json").read_text()).get("_class_name") == "FluxPipeline":
        return load_reference_flux_pipeline(device, folder)
    return load_reference_pipeline(device, folder)


def _pipeline_folder(path: str | Path | None, default: Path) -> Path:
    folder = Path(path) if path is not None else default
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"no diffusers pipeline (model_index.json) in {folder}")
    return folder
