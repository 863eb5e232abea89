"""How a pipeline is sampled: the sampler settings, each prompt's seeded noise, and the prompts' identities (hashes, an
order-free digest).
"""

from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Sequence

import torch


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def prompts_digest_from_hashes(hashes: Sequence[str]) -> str:
    """Order-independent digest of a prompt multiset (so shards merge to the same digest)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def prompts_digest(prompts: Sequence[str]) -> str:
    return prompts_digest_from_hashes([prompt_hash(p) for p in prompts])


def prompt_generator(prompt: str, seed: int) -> torch.Generator:
    """A CPU generator seeded from (seed, prompt): each prompt gets the same initial noise in any batch,
    shard or device (diffusers draws CPU-generated latents and moves them to the model's device)."""
    value = int.from_bytes(hashlib.sha256(f"{seed}:{prompt}".encode()).digest()[:8], "little") % (2**63)
    return torch.Generator().manual_seed(value)


# How a pipeline call takes its guidance scale: ``guidance_scale`` (Stable Diffusion's classifier-free guidance, one
# doubled batch a step; FLUX.1-dev's embedded guidance) or ``true_cfg_scale`` (FluxPipeline's classifier-free guidance:
# an empty negative prompt, two denoiser calls a step, conditional first).
GUIDANCE_ARGUMENTS = ("guidance_scale", "true_cfg_scale")


def guidance_kwargs(guidance_argument: str, guidance_scale: float, n_prompts: int) -> dict:
    """The call arguments that set the guidance of a call with ``n_prompts`` prompts."""
    if guidance_argument == "guidance_scale":
        return {"guidance_scale": guidance_scale}
    if guidance_argument == "true_cfg_scale":
        return {"true_cfg_scale": guidance_scale, "negative_prompt": [""] * n_prompts}
    raise ValueError(f"guidance_argument must be one of {', '.join(GUIDANCE_ARGUMENTS)}, got {guidance_argument!r}")


@dataclass(frozen=True)
class SamplerSettings:
    """The deployment sampler a capture (and an evaluation) runs.

    ``guidance_argument`` names the call argument that takes ``guidance_scale`` (``GUIDANCE_ARGUMENTS``);
    ``max_sequence_length`` is the text encoder's token count for pipelines that take it (SD3, Flux; None: the
    pipeline's default).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0
    guidance_argument: str = "guidance_scale"
    max_sequence_length: int | None = None

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.guidance_argument not in GUIDANCE_ARGUMENTS:
            raise ValueError(f"guidance_argument must be one of {', '.join(GUIDANCE_ARGUMENTS)}, got {self.guidance_argument!r}")
        length = self.max_sequence_length
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"max_sequence_length must be a whole number >= 1 or None, got {length!r}")

    @property
    def calls_per_step(self) -> int:
        """Denoiser calls a sampling step makes: two with true classifier-free guidance, else one (a doubled batch
        for ``guidance_scale`` CFG is still one call)."""
        return 2 if self.guidance_argument == "true_cfg_scale" and self.guidance_scale > 1 else 1

    def check_pipeline(self, pipeline_class: type) -> None:
        """Fail in one line when ``pipeline_class``'s call does not name an argument these settings pass (instead of
        diffusers' TypeError deep in a stage, or, where the call takes ``**kwargs`` as Stable Diffusion's does, the
        setting silently ignored)."""
        names = ["prompt", "num_inference_steps", "generator", *guidance_kwargs(self.guidance_argument, 1.0, 1)]
        names += [k for k in ("height", "width", "max_sequence_length") if getattr(self, k) is not None]
        parameters = inspect.signature(pipeline_class.__call__).parameters
        unknown = [k for k in names if k not in parameters]
        if unknown:
            raise ValueError(f"{pipeline_class.__name__} takes no {unknown[0]!r} argument (sampler settings "
                             f"{', '.join(unknown)}); use sampler settings this pipeline takes")

    def pipe_kwargs(self, pipe, prompts: Sequence[str]) -> dict:
        kwargs = dict(
            prompt=list(prompts),
            num_inference_steps=self.num_inference_steps,
            **guidance_kwargs(self.guidance_argument, self.guidance_scale, len(prompts)),
            generator=[prompt_generator(p, self.seed) for p in prompts],
        )
        if self.height is not None:
            kwargs["height"] = self.height
        if self.width is not None:
            kwargs["width"] = self.width
        if self.max_sequence_length is not None:
            kwargs["max_sequence_length"] = self.max_sequence_length
        self.check_pipeline(type(pipe))
        return kwargs

    def to_dict(self) -> dict:
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "height": self.height, "width": self.width, "seed": self.seed,
                "guidance_argument": self.guidance_argument, "max_sequence_length": self.max_sequence_length}


# What a capture written before these settings existed was taken with (its metadata lacks the key).
SAMPLER_DEFAULTS = {"guidance_argument": "guidance_scale", "max_sequence_length": None}
