"""How a pipeline is sampled: the sampler settings, each prompt's seeded noise, and the prompts' identities (hashes, an
order-free digest).
"""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class SamplerSettings:
    """The deployment sampler a capture (and an evaluation) runs."""

    num_inference_steps: int = 25
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")

    def pipe_kwargs(self, pipe, prompts: Sequence[str]) -> dict:
        kwargs = dict(
            prompt=list(prompts),
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=[prompt_generator(p, self.seed) for p in prompts],
        )
        if self.height is not None:
            kwargs["height"] = self.height
        if self.width is not None:
            kwargs["width"] = self.width
        return kwargs

    def to_dict(self) -> dict:
        return {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                "height": self.height, "width": self.width, "seed": self.seed}
