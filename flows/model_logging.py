"""The compressed pipeline logged as an MLflow pyfunc: code (the runtime only), weights, serving settings, signature and requirements."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")


# what the pyfunc imports (flows/pyfunc_model.py, slimdiff.load), pinned to this environment's versions in the model's
# requirements.txt; slimdiff itself travels as code with the model (code_paths), so no unpublished "slimdiff" is named
SERVING_PACKAGES = ("mlflow", "torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pandas", "scipy",
                    "huggingface_hub", "pyyaml", "matplotlib", "tqdm")


def serving_requirements() -> list[str]:
    """``package==version`` for :data:`SERVING_PACKAGES` as installed here (torch without its local build tag, so that
    a serving machine's pip picks its own CPU or CUDA build of the same version)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            raise RuntimeError(f"{package} is not installed; the registered model's requirements name it") from None
    return pins


def pyfunc_signature(sampler: dict[str, Any]):
    """Prompts in (a ``prompt`` string column), images out (uint8, N x H x W x 3), with the sampler as a params
    schema whose defaults are the job's deployment sampler (``params.yaml: sampler``)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    def optional_int(value):
        return None if value is None else int(value)

    params = ParamSchema([
        ParamSpec("steps", "long", int(sampler["steps"])),
        ParamSpec("guidance", "double", float(sampler["guidance"])),
        ParamSpec("seed", "long", int(sampler.get("seed", 0))),
        ParamSpec("height", "long", optional_int(sampler.get("height"))),
        ParamSpec("width", "long", optional_int(sampler.get("width"))),
    ])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]),
                          outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))]), params=params)


# what the served model needs of slimdiff: the runtime (load, slim processors, resizing, sampling, requests) and the
# modules it stands on; the compressor (statistics, scoring, planning, decomposition, the pipeline) stays behind
RUNTIME_PACKAGE = ("__init__.py", "device.py", "files.py", "failpoints.py", "environment.py", "arch", "runtime")


def slimdiff_package(workspace: Path | None = None) -> Path:
    """The ``slimdiff`` package the served runtime is copied from: the workspace's copy when it has one (the code its
    stages ran), else the installed package."""
    import slimdiff

    local = workspace / "slimdiff" if workspace is not None else None
    return local if local is not None and (local / "__init__.py").is_file() else Path(slimdiff.__file__).parent


def copy_runtime_package(source: Path, destination: Path) -> list[str]:
    """Copy the runtime part of the ``slimdiff`` package at ``source`` to ``destination`` (no ``__pycache__``); returns
    the copied files, relative to ``destination``. Raises ``FileNotFoundError`` naming a missing runtime module."""
    import shutil

    destination.mkdir(parents=True, exist_ok=True)
    for name in RUNTIME_PACKAGE:
        entry = source / name
        if not entry.exists():
            raise FileNotFoundError(f"{entry} is missing: the served model ships slimdiff's runtime "
                                    f"({', '.join(RUNTIME_PACKAGE)})")
        if entry.is_dir():
            shutil.copytree(entry, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(entry, destination / name)
    return sorted(str(p.relative_to(destination)) for p in destination.rglob("*.py"))


def deployment_sampler(params: dict[str, Any]) -> dict[str, Any]:
    """The served defaults: ``params.yaml: sampler`` (the capture's and the evaluation's sampler). Required: a model
    served with made-up defaults would answer with another sampler than the one it was compressed and measured with."""
    sampler = params.get("sampler")
    missing = [k for k in ("steps", "guidance") if not isinstance(sampler, dict) or sampler.get(k) is None]
    if missing:
        raise ValueError(f"params.yaml has no sampler {missing}: the served model's defaults are the capture's sampler "
                         "(sampler.steps, sampler.guidance, sampler.seed, sampler.height, sampler.width)")
    # how the guidance is passed and the text length are the model's, not a request's: served as captured
    return {"steps": int(sampler["steps"]), "guidance": float(sampler["guidance"]), "seed": int(sampler.get("seed") or 0),
            "height": sampler.get("height"), "width": sampler.get("width"),
            "guidance_argument": sampler.get("guidance_argument") or "guidance_scale",
            "max_sequence_length": sampler.get("max_sequence_length")}


def validated_samplers(params: dict[str, Any]) -> list[dict[str, Any]]:
    """The sampler settings the evaluate stage measured the model under: the calibration (deployment) sampler, then
    each held-out one of ``evaluate.samplers`` as written (keys it leaves out are the calibration sampler's). The
    served model names them in ``serving.json``: a request under other settings was not measured."""
    calibration = {"name": "calibration", **deployment_sampler(params), "scheduler": "the pipeline's own"}
    held_out = (params.get("evaluate") or {}).get("samplers") or []
    return [calibration, *(dict(entry) for entry in held_out if isinstance(entry, dict))]


def log_pipeline_model(pipeline: Path, params: dict[str, Any], workspace: Path | None = None):
    """Log the compressed pipeline folder as the ``model`` pyfunc of the active run: code (no pickle), weights as an
    artifact read with safetensors, ``serving.json`` (the deployment sampler, the dtype it was compressed in, the
    device setting, the request limits derived from the model, with ``params.yaml: serve`` overrides, and the sampler
    settings it was validated under, ``validated_samplers``), a signature
    with the sampler's params schema, pinned requirements and the ``slimdiff`` package as code. Returns MLflow's
    ``ModelInfo``.

    The serving settings travel as an artifact, not as MLflow's ``model_config``: MLflow logs a model config as run
    params (``sampler/steps`` beside the job's ``sampler.steps``). ``mlflow.pyfunc.load_model(..., model_config=...)``
    still overrides them at load time."""
    import tempfile

    import mlflow

    from slimdiff.runtime.requests import SERVING_FILE, model_shape, serving_document

    sampler = deployment_sampler(params)
    serve = dict(params.get("serve") or {})
    device = str(serve.pop("device", "auto"))
    dtype = (params.get("model") or {}).get("dtype")
    document = serving_document(model_shape(pipeline), sampler, None if dtype in (None, "auto") else str(dtype), device, serve)
    document["validated_samplers"] = validated_samplers(params)
    with tempfile.TemporaryDirectory(prefix="slimdiff-code-") as staging:
        code = Path(staging) / "slimdiff"  # the runtime only, without its __pycache__ folders
        copy_runtime_package(slimdiff_package(workspace), code)
        serving = Path(staging) / SERVING_FILE
        serving.write_text(json.dumps(document, indent=2) + "\n")
        with warnings.catch_warnings():
            # the signature is explicit; an input example would make MLflow load the pipeline and generate images
            # while logging (its serving-input check), so there is none, and MLflow's advice to add one is not shown
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            return mlflow.pyfunc.log_model(
                name="model", python_model=str(PYFUNC_CODE), artifacts={"pipeline": str(pipeline), "serving": str(serving)},
                signature=pyfunc_signature(sampler), code_paths=[str(code)], pip_requirements=serving_requirements(),
            )
