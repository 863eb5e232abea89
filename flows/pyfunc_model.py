"""MLflow "model from code" for a compressed slimdiff pipeline: prompts in, images out.

Logged as code (no pickled Python objects) with the ``slimdiff`` package as code beside it; the pipeline folder
travels as an artifact and is read with ``slimdiff.load`` (safetensors only). Request params (the signature's params
schema): ``steps``, ``guidance``, ``seed``, ``height``, ``width``; their defaults are the job's deployment sampler.
"""

from __future__ import annotations

import math

import mlflow
import numpy as np

PARAMS = ("steps", "guidance", "seed", "height", "width")


class SlimDiffPyfunc(mlflow.pyfunc.PythonModel):
    """predict(a 'prompt' column: DataFrame, ``{"prompt": [...]}`` or a served request's ``dataframe_split``)
    -> uint8 images (N, H, W, 3). The signature checks the input before ``predict`` sees it."""

    def load_context(self, context) -> None:
        import slimdiff
        from slimdiff.device import apply_threads

        # threads before any work: more threads than free cores makes every denoiser call wait (SLIMDIFF_THREADS)
        self.threads, self.threads_reason = apply_threads()
        self.defaults = dict((context.model_config or {}).get("sampler") or {})
        self.pipe = slimdiff.load(context.artifacts["pipeline"])
        self.pipe.set_progress_bar_config(disable=True)

    def sampler(self, params: dict | None):
        """The request's sampler: its params over the logged defaults, each checked (a bad value names itself)."""
        from slimdiff.capture import SamplerSettings

        unknown = sorted(set(params or {}) - set(PARAMS))
        if unknown:
            raise ValueError(f"unknown params {unknown}; valid: {', '.join(PARAMS)}")
        merged = {"steps": 25, "guidance": 4.0, "seed": 0, "height": None, "width": None, **self.defaults}
        merged.update({k: v for k, v in (params or {}).items() if v is not None})

        def whole(name: str, minimum: int, value):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or float(value) != int(value) \
                    or int(value) < minimum:
                raise ValueError(f"param {name} must be a whole number >= {minimum}, got {value!r}")
            return int(value)

        guidance = merged["guidance"]
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float, np.number)) or not math.isfinite(guidance) \
                or guidance < 0:
            raise ValueError(f"param guidance must be a finite number >= 0, got {guidance!r}")
        size = {}
        for name in ("height", "width"):
            if merged[name] is not None:
                size[name] = whole(name, 8, merged[name])
                if size[name] % 8:
                    raise ValueError(f"param {name} must be a multiple of 8 (the VAE's downsampling), got {size[name]}")
        return SamplerSettings(whole("steps", 1, merged["steps"]), float(guidance), size.get("height"), size.get("width"),
                               whole("seed", 0, merged["seed"]))

    def predict(self, context, model_input, params=None):
        if hasattr(model_input, "columns"):
            if "prompt" not in model_input.columns:
                raise ValueError(f"input needs a 'prompt' column, got {list(model_input.columns)}")
            cells = list(model_input["prompt"])
        else:
            cells = list(model_input)
        prompts = []
        for cell in cells:  # MLflow turns {"prompt": [a, b]} into one row holding the list: its items are the prompts
            items = list(cell) if isinstance(cell, (list, tuple, np.ndarray)) else [cell]
            for item in items:
                if not isinstance(item, str):
                    raise ValueError(f"prompts must be strings, got {type(item).__name__} {item!r}")
                prompts.append(item)
        if not prompts:
            raise ValueError("no prompts in the input")
        sampler = self.sampler(params)
        images = self.pipe(**sampler.pipe_kwargs(self.pipe, prompts), output_type="np").images
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


mlflow.models.set_model(SlimDiffPyfunc())
