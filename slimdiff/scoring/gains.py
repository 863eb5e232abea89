"""Propagation gains (method.md §4): how much error of the denoiser's output one unit of a module's predicted error
causes, measured without gradients.

Two ways, one per call: with a ``TruncationReference`` (the default of the pipeline) each module is truncated to a
reference width by its own closed-form decomposition, and the gain is the measured change of the denoiser's output
divided by the predicted error at that width; without one, noise of known energy is added at the module's output
(isotropic, so it misses where the truncation error lies and what attention's mixing does to it: docs/method.md §4).
A guided reference (``score.gain_target: guided``) measures the change of what the sampler steps with, the
classifier-free-guided prediction ``u + s (c - u)``, instead of each call's output (``GuidedOutput``).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup, adapter_for, compressible_groups
from slimdiff.arch.pipelines import denoiser_of
from slimdiff.arch.sites import group_sites
from slimdiff.calls import DenoiserCall, record_calls
from slimdiff.decomposition.apply import apply_group
from slimdiff.decomposition.errors import bucket_errors, mean_bucket_error
from slimdiff.decomposition.factorisations import capture_identity
from slimdiff.decomposition.groups import Decomposition, decompose_group
from slimdiff.device import linalg_device, module_device
from slimdiff.files import complete_artifact, read_json_artifact, write_json
from slimdiff.runtime.attention import original_attention_scale, slim_processor_for
from slimdiff.runtime.sampling import SamplerSettings, prompt_hash, prompts_digest
from slimdiff.statistics.recording import model_content_hash
from slimdiff.statistics.sums import Capture

GAINS_FORMAT = "slimdiff-gains/1"
GAIN_METHODS = ("truncation", "noise")
GAIN_TARGETS = ("call", "guided")  # what a truncation gain compares: each call's output, or the guided prediction
DEFAULT_REFERENCE_KEEP = 0.5

# Largest logit-noise block drawn at once (elements): attention with injected logit noise runs in
# query chunks of at most this many (batch x heads x queries x keys) logits, whatever the resolution.
DEFAULT_NOISE_CHUNK = 2**26

# told each group's decomposition as a truncation gain computes it (what a later stage would otherwise recompute)
RecordDecomposition = Callable[[ModuleGroup, Decomposition], object]


@dataclass
class Gains:
    """Propagation gain of every module and block influence, with what they were measured on.

    Their own artifact (not part of the capture): a new gain setting re-measures gains, never the capture.
    """

    gains: dict[str, float]
    block_influence: dict[str, float]
    metadata: dict[str, Any] = field(default_factory=dict)

    def check_matches(self, capture: Capture) -> None:
        """Fail when the gains were measured on another model than the capture's."""
        mine, theirs = self.metadata.get("model_hash"), capture.metadata.get("model_hash")
        if mine and theirs and mine != theirs:
            raise ValueError(f"propagation gains were measured on model {mine[:12]}, the capture on {theirs[:12]}; "
                             "re-measure gains for this model")

    def save(self, path: str | Path) -> Path:
        return write_json(path, {"format": GAINS_FORMAT, "gains": self.gains, "block_influence": self.block_influence,
                                 "metadata": self.metadata})

    @classmethod
    def load(cls, path: str | Path) -> "Gains":
        data = read_json_artifact(path, GAINS_FORMAT, "propagation gains")
        with complete_artifact(path, "propagation gains file"):
            return cls({k: float(v) for k, v in data["gains"].items()}, {k: float(v) for k, v in data["block_influence"].items()},
                       data.get("metadata", {}))


@dataclass(frozen=True)
class TruncationReference:
    """What a truncation gain truncates with: the capture of the uncompressed model, the decompositions' ridge ``reg``
    and ``keep``, the fraction of each group's width kept at the reference width; ``guided``: the change measured is
    the sampler's classifier-free-guided prediction's (``GuidedOutput``), not each call's output."""

    capture: Capture
    reg: float
    keep: float = DEFAULT_REFERENCE_KEEP
    guided: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, (int, float)) and 0 < self.keep < 1):
            raise ValueError(f"the reference width keeps a fraction of each group's width, 0 < keep < 1; got {self.keep!r}")
        if not self.reg >= 0:
            raise ValueError(f"reg must be >= 0, got {self.reg!r}")

    def width(self, group: ModuleGroup) -> int:
        """The reference width of ``group``: ``keep`` of its width, at least 1 and below the full width."""
        return min(max(1, round(self.keep * group.width)), group.width - 1)

    def fingerprint(self) -> dict[str, Any]:
        fingerprint = {"capture": capture_identity(self.capture), "reg": float(self.reg), "keep": float(self.keep)}
        return {**fingerprint, "guided": True} if self.guided else fingerprint  # call gains keep their fingerprint


def _output(denoiser: nn.Module, call: DenoiserCall) -> Tensor:
    args, kwargs = call
    kwargs = {**kwargs, "return_dict": False}
    return denoiser(*args, **kwargs)[0].to(torch.float64)


def guidance_layout(sampler: SamplerSettings, denoiser: nn.Module) -> str | None:
    """Where the sampler's denoiser calls hold the unconditional prediction: ``"pairs"`` (true classifier-free
    guidance: two calls a step, conditional first), ``"batch"`` (one call a step on [unconditional; conditional]),
    or None (no classifier-free guidance: a scale <= 1, or FLUX.1-dev's embedded guidance)."""
    if sampler.calls_per_step == 2:
        return "pairs"
    if (sampler.guidance_argument == "guidance_scale" and sampler.guidance_scale > 1
            and adapter_for(denoiser).GUIDANCE_SCALE_DOUBLES_BATCH):
        return "batch"
    return None


def check_guided(sampler: SamplerSettings, denoiser: nn.Module) -> str:
    """The guidance layout guided gains read (``guidance_layout``); one line naming the sampler when it has none."""
    layout = guidance_layout(sampler, denoiser)
    if layout is None:
        why = (f"{type(denoiser).__name__} takes guidance_scale as embedded guidance"
               if sampler.guidance_argument == "guidance_scale" and not adapter_for(denoiser).GUIDANCE_SCALE_DOUBLES_BATCH
               else f"{sampler.guidance_argument} = {sampler.guidance_scale:g} runs none (it needs a scale > 1)")
        raise ValueError(f"score.gain_target: guided measures gains on the classifier-free-guided prediction, and this "
                         f"sampler makes no unconditional prediction ({why}); use score.gain_target: call")
    return layout


@dataclass(frozen=True)
class GuidedOutput:
    """What the sampler steps with, ``u + scale (c - u)``, from one guided unit: a (conditional, unconditional) call
    pair (``paired``: true classifier-free guidance) or one call on the batch [unconditional; conditional]."""

    scale: float
    paired: bool

    def __call__(self, denoiser: nn.Module, unit) -> Tensor:
        if self.paired:
            conditional, unconditional = (_output(denoiser, call) for call in unit)
        else:
            unconditional, conditional = _output(denoiser, unit).chunk(2)
        return unconditional + self.scale * (conditional - unconditional)


def _sample_and_timestep(denoiser: nn.Module, call: DenoiserCall) -> tuple[Tensor, Tensor]:
    args, kwargs = call
    bound = inspect.signature(denoiser.forward).bind_partial(*args, **kwargs).arguments
    return next(iter(bound.values())), torch.as_tensor(bound.get("timestep", torch.zeros(()))).reshape(-1)


def guided_units(pipe, prompts: Sequence[str], sampler: SamplerSettings, count: int) -> tuple[list, GuidedOutput]:
    """``count`` guided units spread over the sampling steps of ``prompts`` and the output that combines each: call
    pairs (true classifier-free guidance) or single calls on a doubled batch (``guidance_layout``). Refused in one
    line when the calls are not laid out as the sampler settings say."""
    _, denoiser = denoiser_of(pipe)
    layout = check_guided(sampler, denoiser)
    if layout == "pairs":
        calls = record_calls(pipe, prompts, sampler, count, whole_steps=True)
        units = list(zip(calls[0::2], calls[1::2]))
        for conditional, unconditional in units:
            (sample_c, t_c), (sample_u, t_u) = (_sample_and_timestep(denoiser, c) for c in (conditional, unconditional))
            if sample_c.shape != sample_u.shape or not torch.equal(t_c.cpu(), t_u.cpu()):
                raise RuntimeError(f"true classifier-free guidance: a step's two denoiser calls disagree on the timestep "
                                   f"or the batch; {type(pipe).__name__} does not make one conditional and one "
                                   "unconditional call a step")
        return units, GuidedOutput(sampler.guidance_scale, paired=True)
    calls = record_calls(pipe, prompts, sampler, count)
    batch = _sample_and_timestep(denoiser, calls[0])[0].shape[0]
    if batch != 2 * len(prompts):
        raise RuntimeError(f"classifier-free guidance: {type(pipe).__name__} called its denoiser on a batch of {batch} "
                           f"for {len(prompts)} prompt(s), not the doubled batch [unconditional; conditional]")
    return calls, GuidedOutput(sampler.guidance_scale, paired=False)


def _noise_like(x: Tensor, rel_noise: float, generator: torch.Generator) -> tuple[Tensor, float]:
    """Gaussian noise on ``x``'s device with per-element std rel_noise * rms(x); returns it and its per-token energy."""
    sigma = rel_noise * float(x.detach().to(torch.float64).pow(2).mean().sqrt())
    noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device=x.device) * sigma
    return noise.to(x.dtype), sigma**2 * x.shape[-1]


class LogitNoise:
    """Gaussian noise on the unscaled attention logits (std ``rel_noise`` x their RMS), drawn on the logits'
    device one query chunk at a time, so no (batch, heads, queries, keys) tensor is ever whole."""

    def __init__(self, rel_noise: float, generator: torch.Generator, energy: list[float], chunk_elements: int = DEFAULT_NOISE_CHUNK):
        if chunk_elements < 1:
            raise ValueError(f"noise chunk must be >= 1 element, got {chunk_elements}")
        self.rel_noise, self.generator, self.energy, self.chunk_elements = rel_noise, generator, energy, chunk_elements

    def sigma(self, query: Tensor, key: Tensor) -> float:
        """Noise std for this attention call; records the injected energy per query-key pair summed over heads."""
        # mean square of the logits q.k over all pairs = tr(Q^T Q K^T K) / (Nq Nk), without the logits themselves
        gram_q = query.double().transpose(-1, -2) @ query.double()
        gram_k = key.double().transpose(-1, -2) @ key.double()
        pairs = query.shape[-2] * key.shape[-2] * query.shape[0] * query.shape[1]
        sigma = self.rel_noise * math.sqrt(float((gram_q * gram_k).sum()) / pairs)
        self.energy.append(query.shape[1] * sigma**2)
        return sigma

    def query_chunk(self, query: Tensor, key: Tensor) -> int:
        """Queries per chunk so that one chunk's noise holds at most ``chunk_elements`` logits (one query row,
        batch x heads x keys, is the smallest chunk)."""
        return max(1, self.chunk_elements // (query.shape[0] * query.shape[1] * key.shape[-2]))

    def draw(self, query_rows: Tensor, key: Tensor, std: float) -> Tensor:
        shape = (*query_rows.shape[:-1], key.shape[-2])
        noise = torch.randn(shape, generator=self.generator, dtype=torch.float32, device=query_rows.device) * std
        return noise.to(query_rows.dtype)


def propagation_gains(denoiser: nn.Module, calls: Sequence[DenoiserCall], groups: Sequence[ModuleGroup] | None = None,
                      rel_noise: float = 0.05, seed: int = 0, progress: bool = False, noise_chunk: int = DEFAULT_NOISE_CHUNK,
                      known: dict[str, float] | None = None, after_each=None,
                      only: Sequence[str] | None = None, reference: TruncationReference | None = None,
                      record: RecordDecomposition | None = None,
                      output: Callable[[nn.Module, Any], Tensor] = _output) -> tuple[dict[str, float], dict[str, float]]:
    """Gradient-free propagation gains and block influence.

    With ``reference``, each module is decomposed from the capture and truncated to its reference width (the rest
    of the model untouched, restored afterwards); the gain is the energy of the change in the denoiser output per
    sample and call divided by the decomposition's predicted error at that width, so gain x predicted error is the
    measured error there. Without, noise of known energy per token (per query-key pair and head for QK logits)
    is added at its output; the gain is the energy of the change in the denoiser output per sample
    divided by that injected energy, summed over ``calls``. Block influence (for the MoDeGPT
    allocator) is mean(1 - cos(x_in, x_out)) of each transformer block on the clean passes. Noise is
    drawn on the model's device from a generator seeded per module, so modules already in ``known``
    are skipped and the rest come out the same; ``after_each(gains)`` is called after every module.
    With ``only`` (module names), just those are measured, with the seeds they have in the whole run: the gains of
    disjoint module subsets, measured anywhere, together equal the one-process gains (``slimdiff.scoring.gain_shards``).
    ``record(group, decomposition)`` is called with each truncated group's decomposition (the pipeline records the
    FFNs' for the score stage, ``slimdiff.scoring.influence.ffn_recorder``, so it does not decompose them again).
    ``output(denoiser, unit)`` is what truncation gains compare for each of ``calls``: a call's output (default), or
    a ``GuidedOutput`` of guided units (``guided_units``).
    """
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )
    from tqdm.auto import tqdm

    block_types = (BasicTransformerBlock, JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock)
    if not 0 < rel_noise < 1:
        raise ValueError(f"rel_noise must be in (0, 1), got {rel_noise}")
    groups = list(groups) if groups is not None else compressible_groups(denoiser)
    if only is not None:
        unknown = sorted(set(only) - {g.name for g in groups})
        if unknown:
            raise ValueError(f"gains: {len(unknown)} module(s) to measure are not compressible groups of this denoiser, "
                             f"e.g. {unknown[0]!r}")
    if output is not _output and reference is None:
        raise ValueError("noise gains compare each call's output; a guided output needs truncation gains")
    wanted = set(only) if only is not None else None
    device = module_device(denoiser)
    influence_sum: dict[str, float] = {}
    influence_count: dict[str, int] = {}

    def block_hook(name):
        def hook(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            # BasicTransformerBlock returns the image stream; SD3 and Flux blocks return (text, image)
            x_out = output[1] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            influence_sum[name] = influence_sum.get(name, 0.0) + float((1 - cos).sum())
            influence_count[name] = influence_count.get(name, 0) + cos.numel()
        return hook

    handles = [m.register_forward_hook(block_hook(n), with_kwargs=True)
               for n, m in denoiser.named_modules() if isinstance(m, block_types)]
    try:
        with torch.no_grad():
            clean = [output(denoiser, call) for call in calls]
    finally:
        for h in handles:
            h.remove()

    measured = [(index, g) for index, g in enumerate(groups) if wanted is None or g.name in wanted]
    gains: dict[str, float] = {g.name: known[g.name] for _, g in measured if known and g.name in known}
    with torch.no_grad():
        for index, group in tqdm(measured, desc="gains", unit="module", disable=not progress):
            if group.name in gains:
                continue
            if reference is not None:
                gains[group.name] = _truncation_gain(denoiser, group, calls, clean, reference, record, output)
                if after_each is not None:
                    after_each(dict(gains))
                continue
            generator = torch.Generator(device=device).manual_seed(seed * 100003 + index)
            injected = 0.0
            change = 0.0
            for call, before in zip(calls, clean):
                energy: list[float] = []
                with _perturbed(denoiser, group, rel_noise, generator, energy, noise_chunk):
                    out = _output(denoiser, call)
                if not energy:
                    raise RuntimeError(f"no noise reached {group.name} during a denoiser call; its gain cannot be measured")
                batch = out.shape[0]
                change += float((out - before).pow(2).sum()) / batch
                injected += sum(energy) / len(energy)
            if not injected > 0:
                raise RuntimeError(f"{group.name}: the module's output is zero on the gain prompts, so no noise of known "
                                   "energy could be injected; its gain cannot be measured")
            gains[group.name] = change / injected
            if after_each is not None:
                after_each(dict(gains))
    block_influence = {n: influence_sum[n] / influence_count[n] for n in influence_sum}
    return gains, block_influence


def _truncation_gain(denoiser: nn.Module, group: ModuleGroup, calls: Sequence, clean: Sequence[Tensor],
                     reference: TruncationReference, record: RecordDecomposition | None = None,
                     output: Callable[[nn.Module, Any], Tensor] = _output) -> float:
    """Measured output change per sample and call over predicted error, ``group`` truncated to its reference width.

    The predicted error is the score's own (the equal-weight mean over timestep buckets of the error under each
    bucket's covariance, ``slimdiff.decomposition.errors``), so gain x score is the measured error there. Where the
    decomposition is exact at that width (a rank-deficient input: predicted error 0), the width is halved until it
    is not; a group exact down to width 1 has no error to scale at any width, and gain 0. ``output(denoiser, call)``
    is what is compared with ``clean`` (default: the denoiser's output of one call; ``GuidedOutput``: the guided
    prediction of one guided unit)."""
    capture = reference.capture.subset(group_sites(group))
    decomposition = decompose_group(denoiser, group, capture, reference.reg)
    if record is not None:
        record(group, decomposition)
    where = linalg_device(module_device(denoiser))
    width = reference.width(group)
    while True:
        predicted = mean_bucket_error(bucket_errors(denoiser, group, capture, decomposition, [width], where))
        if predicted > 0:
            break
        if width == 1:
            return 0.0
        width //= 2
    original = denoiser.get_submodule(group.path)
    denoiser.set_submodule(group.path, copy.deepcopy(original))  # truncated on a copy; the original goes back
    try:
        apply_group(denoiser, group, capture, width, reference.reg, decomposition)
        change = 0.0
        for call, before in zip(calls, clean):
            out = output(denoiser, call)
            change += float((out - before).pow(2).sum()) / out.shape[0]
    finally:
        denoiser.set_submodule(group.path, original)
    return change / len(calls) / predicted


class _perturbed:
    """Context: add noise at one group's output (FFN/VO: module output; QK: the attention logits)."""

    def __init__(self, denoiser: nn.Module, group: ModuleGroup, rel_noise: float, generator: torch.Generator, energy: list[float],
                 noise_chunk: int = DEFAULT_NOISE_CHUNK):
        self.module = denoiser.get_submodule(group.path)
        self.group, self.rel_noise, self.generator, self.energy = group, rel_noise, generator, energy
        self.noise_chunk = noise_chunk
        self.handles: list = []
        self.saved_processor = None

    def _targets(self) -> list[nn.Module]:
        """Where the group's output leaves it: the FFN, each output projection (one per stream of a joint attention),
        a Flux single block's fused ``proj_out`` (its attention and MLP parts both end there), the modulation linear."""
        kind, module = self.group.kind, self.module
        if kind in ("ffn", "adaln"):
            return [module]
        if kind in ("vo_joint", "vo_single", "ffn_single"):
            return [module.get_submodule(name) for name in self.group.out]
        return [module.to_out[0]]

    def __enter__(self):
        if not self.group.kind.startswith("qk"):
            def add_noise(module, args, output):
                noise, per_token = _noise_like(output, self.rel_noise, self.generator)
                self.energy.append(per_token)
                return output + noise

            self.handles = [target.register_forward_hook(add_noise) for target in self._targets()]
        else:
            attn = self.module
            self.saved_processor = attn.processor
            noise = LogitNoise(self.rel_noise, self.generator, self.energy, self.noise_chunk)
            attn.set_processor(slim_processor_for(attn, original_attention_scale(attn), logit_noise=noise))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        if self.saved_processor is not None:
            self.module.set_processor(self.saved_processor)


def gains_fingerprint(denoiser: nn.Module, prompts: Sequence[str], sampler: SamplerSettings, num_calls: int, rel_noise: float,
                      seed: int, noise_chunk: int, model_hash: str,
                      reference: TruncationReference | None = None) -> dict[str, Any]:
    """Everything that decides the gains (what resumed gains must match)."""
    parameter = next(denoiser.parameters())
    return {
        "method": "noise" if reference is None else "truncation",
        "reference": None if reference is None else reference.fingerprint(),
        "model_hash": model_hash,
        "prompts_in_order": [prompt_hash(p) for p in prompts],
        "sampler": sampler.to_dict(),
        "calls": num_calls,
        "rel_noise": rel_noise,
        "seed": seed,
        "noise_chunk": noise_chunk,
        "device_type": parameter.device.type,
        "dtype": str(parameter.dtype),
    }


def measure_gains(pipe, prompts: Sequence[str], sampler: SamplerSettings, num_calls: int = 4, rel_noise: float = 0.05,
                  seed: int = 0, progress: bool = False, noise_chunk: int = DEFAULT_NOISE_CHUNK,
                  checkpoint: str | Path | None = None, only: Sequence[str] | None = None,
                  expect: dict[str, Any] | None = None, model_hash: str | None = None,
                  reference: TruncationReference | None = None, record: RecordDecomposition | None = None) -> Gains:
    """Measure propagation gains (and block influence) on a few prompts and timesteps, on the model's device.

    With ``reference`` (the capture of this model), truncation gains; without, noise gains (``propagation_gains``).

    With ``checkpoint``, the gains measured so far are written there after every module, and a
    checkpoint with the same model and settings is resumed (modules already measured are skipped).
    With ``only``, just those modules are measured (one shard of the gains, see ``slimdiff.scoring.gain_shards``), and
    with ``expect`` (a fingerprint) nothing is measured unless this model and these settings have that fingerprint.
    ``model_hash``: the denoiser's ``model_content_hash`` when the caller computed it for this loaded model.
    ``record``: called with each truncated group's decomposition (``propagation_gains``).
    """
    _, denoiser = denoiser_of(pipe)
    model_hash = model_hash or model_content_hash(denoiser)
    if reference is not None and reference.guided:
        check_guided(sampler, denoiser)  # before the model is hashed or any call made
    if reference is not None:
        captured_on = reference.capture.metadata.get("model_hash")
        if captured_on and captured_on != model_hash:
            raise ValueError(f"truncation gains: the capture was made on model {captured_on[:12]}, this model is "
                             f"{model_hash[:12]}; capture this model first")
    fingerprint = gains_fingerprint(denoiser, prompts, sampler, num_calls, rel_noise, seed, noise_chunk, model_hash, reference)
    if expect is not None and expect != fingerprint:
        differ = sorted(k for k in set(expect) | set(fingerprint) if expect.get(k) != fingerprint.get(k))
        raise ValueError(f"gains were planned for another {', '.join(differ)} than this model and these settings; "
                         "re-plan them")
    known: dict[str, float] = {}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        try:
            partial = json.loads(checkpoint.read_text())
        except json.JSONDecodeError:  # written atomically, so only a foreign or damaged file gets here: say so, start over
            partial = {}
            print(f"gains: not resuming {checkpoint}: not a readable gains checkpoint; starting over", file=sys.stderr)
        if partial.get("fingerprint") == fingerprint:
            known = {k: float(v) for k, v in partial["gains"].items()}
            print(f"gains: resuming {checkpoint} with {len(known)} modules measured", file=sys.stderr)
        elif partial:
            print(f"gains: not resuming {checkpoint}: it was written with other settings; starting over", file=sys.stderr)

    def save_partial(gains: dict[str, float]) -> None:
        if checkpoint is not None:
            write_json(checkpoint, {"fingerprint": fingerprint, "gains": gains})

    if reference is not None and reference.guided:
        calls, output = guided_units(pipe, prompts, sampler, num_calls)
    else:
        calls, output = record_calls(pipe, prompts, sampler, num_calls), _output
    gains, block_influence = propagation_gains(denoiser, calls, rel_noise=rel_noise, seed=seed, progress=progress,
                                               noise_chunk=noise_chunk, known=known, after_each=save_partial, only=only,
                                               reference=reference, record=record, output=output)
    metadata = {"method": fingerprint["method"], "reference": fingerprint["reference"],
                "target": "guided" if reference is not None and reference.guided else "call",
                "model_hash": model_hash, "prompts": len(prompts), "prompts_digest": prompts_digest(prompts),
                "calls": len(calls), "rel_noise": rel_noise, "seed": seed, "noise_chunk": noise_chunk,
                "sampler": sampler.to_dict(), "dtype": fingerprint["dtype"], "device_type": fingerprint["device_type"]}
    return Gains(gains, block_influence, metadata)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (no ties handling beyond average order)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of equal length >= 2")
    ra = torch.argsort(torch.argsort(torch.tensor(a, dtype=torch.float64))).double()
    rb = torch.argsort(torch.argsort(torch.tensor(b, dtype=torch.float64))).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / math.sqrt(float((ra * ra).sum() * (rb * rb).sum())))
