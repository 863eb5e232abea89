"""MLflow "model from code" for a compressed slimdiff pipeline: prompts in, images out.

Logged as code (no pickled Python objects); the pipeline folder travels as an artifact and is read
with ``slimdiff.load`` (safetensors only).
"""

from __future__ import annotations

import mlflow
import numpy as np


class SlimDiffPyfunc(mlflow.pyfunc.PythonModel):
    """predict(DataFrame with a 'prompt' column, or a list of prompts) -> uint8 images (N, H, W, 3)."""

    def load_context(self, context) -> None:
        import slimdiff

        self.pipe = slimdiff.load(context.artifacts["pipeline"])
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input, params=None):
        from slimdiff.capture import SamplerSettings

        if hasattr(model_input, "columns"):
            if "prompt" not in model_input.columns:
                raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
            prompts = [str(p) for p in model_input["prompt"]]
        else:
            prompts = [str(p) for p in model_input]
        params = params or {}
        sampler = SamplerSettings(int(params.get("steps", 25)), float(params.get("guidance", 4.0)), seed=int(params.get("seed", 0)))
        images = self.pipe(**sampler.pipe_kwargs(self.pipe, prompts), output_type="np").images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


mlflow.models.set_model(SlimDiffPyfunc())
