"""Sharded propagation gains (docs/distributed.md): module subsets, measured anywhere, merged exactly.

The gains inject noise one module at a time, so their shards are module subsets, not prompt subsets: every
shard records the same clean denoiser calls of the same gain prompts and measures its own modules, each with the
noise generator seeded by the module's index in the whole model (``propagation_gains(only=...)``). The union of
the shards' gains is therefore the one-process result (equal on one device type; across GPU models to the
rounding of their kernels).

A shard is named by its digest: sha256 of the gains fingerprint (model hash, prompt hashes in order, sampler,
calls, noise level, seed, noise chunk, device type, dtype) and its module names. It is written atomically to
``<folder>/<digest>.json`` and checkpoints after every module (``.<digest>.ckpt``), so a killed worker's retry
resumes; a re-run measures only missing shards. The merge checks each file against the plan: a shard of another
model or setting is rejected, naming the field that differs, and never merged.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from slimdiff.arch.pipelines import denoiser_of
from slimdiff.files import read_json_artifact, write_json
from slimdiff.runtime.sampling import SamplerSettings
from slimdiff.scoring.gains import (
    DEFAULT_NOISE_CHUNK,
    Gains,
    RecordDecomposition,
    TruncationReference,
    gains_fingerprint,
    measure_gains,
)
from slimdiff.statistics.recording import model_content_hash
from slimdiff.statistics.shards import ContentAddressedPlan, contiguous_runs

GAIN_SHARD_FORMAT = "slimdiff-gains-shard/1"

# block influence comes from the clean passes every shard repeats: equal on one device type; GPUs of different
# models may round their kernels differently, so shards must agree to this relative tolerance
INFLUENCE_RTOL = 1e-6


@dataclass(frozen=True)
class GainShard:
    """Shard ``index``: the gains of ``modules`` (contiguous in the model's group order)."""

    index: int
    modules: tuple[str, ...]
    digest: str

    def filename(self) -> str:
        return f"{self.digest}.json"


@dataclass
class GainShardPlan(ContentAddressedPlan):
    """Every gains shard of one measurement, and the fingerprint each must carry."""

    shards: list[GainShard]
    fingerprint: dict
    modules: list[str]

    def manifest(self) -> list[dict]:
        return [{"index": s.index, "digest": s.digest, "modules": len(s.modules)} for s in self.shards]


def split_modules(modules: Sequence[str], shards: int) -> list[list[str]]:
    """``modules`` in ``min(shards, len(modules))`` contiguous runs of near-equal length (each module costs the same:
    the gain calls once more)."""
    if shards < 1:
        raise ValueError(f"gain shards must be a whole number >= 1, got {shards!r}")
    return contiguous_runs(modules, min(shards, len(modules)))


def gain_shard_digest(fingerprint: dict, modules: Sequence[str]) -> str:
    payload = {"format": GAIN_SHARD_FORMAT, "fingerprint": fingerprint, "modules": list(modules)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_gain_shards(pipe, prompts: Sequence[str], sampler: SamplerSettings, *, shards: int, num_calls: int,
                     rel_noise: float, seed: int, noise_chunk: int = DEFAULT_NOISE_CHUNK,
                     model_hash: str | None = None, reference: TruncationReference | None = None) -> GainShardPlan:
    """The shards of a gains measurement on ``pipe`` (hashes the model once, unless given ``model_hash``; runs no
    denoiser call); with ``reference``, of truncation gains."""
    from slimdiff.arch import compressible_groups

    if not prompts:
        raise ValueError("gains need at least one prompt")
    _, denoiser = denoiser_of(pipe)
    modules = [g.name for g in compressible_groups(denoiser)]
    if not modules:
        raise ValueError(f"{type(denoiser).__name__} has no compressible groups to measure gains for")
    fingerprint = gains_fingerprint(denoiser, prompts, sampler, num_calls, rel_noise, seed, noise_chunk,
                                    model_hash or model_content_hash(denoiser), reference)
    runs = split_modules(modules, shards)
    planned = [GainShard(i, tuple(run), gain_shard_digest(fingerprint, run)) for i, run in enumerate(runs)]
    return GainShardPlan(planned, fingerprint, modules)


def measure_gain_shard(pipe, plan: GainShardPlan, shard: GainShard, prompts: Sequence[str], sampler: SamplerSettings,
                       folder: str | Path, *, progress: bool = False, model_hash: str | None = None,
                       reference: TruncationReference | None = None, record: RecordDecomposition | None = None) -> Path:
    """Measure one shard's modules into ``<folder>/<digest>.json`` (atomically; kept when already there), resuming
    from the shard's checkpoint; refused before any denoiser call when this model or these settings are not the
    plan's."""
    folder = Path(folder)
    target = plan.path(folder, shard)
    if target.is_file():
        return target
    f = plan.fingerprint
    checkpoint = folder / f".{shard.digest}.ckpt"
    gains = measure_gains(pipe, prompts, sampler, num_calls=f["calls"], rel_noise=f["rel_noise"], seed=f["seed"],
                          progress=progress, noise_chunk=f["noise_chunk"], checkpoint=checkpoint, only=shard.modules,
                          expect=plan.fingerprint, model_hash=model_hash, reference=reference, record=record)
    write_json(target, {"format": GAIN_SHARD_FORMAT, "digest": shard.digest, "index": shard.index,
                        "fingerprint": plan.fingerprint, "modules": list(shard.modules), "gains": gains.gains,
                        "block_influence": gains.block_influence, "metadata": gains.metadata})
    checkpoint.unlink(missing_ok=True)
    return target


def _check_fingerprint(found: dict, expected: dict, what: str, verb: str) -> None:
    differ = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if differ:
        raise ValueError(f"{what} {verb} {', '.join(differ)} than this model and params.yaml; rejected, not merged")


def merge_gain_shards(plan: GainShardPlan, folder: str | Path) -> Gains:
    """The gains of every shard of ``plan`` in ``folder``, checked against the plan and merged in module order."""
    folder = Path(folder)
    missing = plan.missing(folder)
    if missing:
        raise FileNotFoundError(f"{len(missing)} gains shard(s) missing in {folder}, e.g. {missing[0].filename()} "
                                f"(shard {missing[0].index}); measure them before merging")
    gains: dict[str, float] = {}
    influence: dict[str, float] | None = None
    metadata: dict = {}
    for shard in plan.shards:
        path = plan.path(folder, shard)
        data = read_json_artifact(path, GAIN_SHARD_FORMAT, "gains shard")
        _check_fingerprint(data.get("fingerprint", {}), plan.fingerprint, f"{path}:", "was measured with another")
        if data.get("modules") != list(shard.modules) or set(data.get("gains", {})) != set(shard.modules):
            raise ValueError(f"{path}: holds other modules than shard {shard.index} of the plan; rejected, not merged")
        gains.update({k: float(v) for k, v in data["gains"].items()})
        shard_influence = {k: float(v) for k, v in data["block_influence"].items()}
        if influence is None:
            influence, metadata = shard_influence, dict(data["metadata"])
        else:
            _check_influence(shard_influence, influence, path)
    metadata["shards"] = plan.manifest()
    return Gains({name: gains[name] for name in plan.modules}, influence or {}, metadata)


def _check_influence(found: dict[str, float], first: dict[str, float], path: Path) -> None:
    if set(found) != set(first):
        raise ValueError(f"{path}: its block influence covers other blocks than shard 0's; rejected, not merged")
    for name, value in found.items():
        if abs(value - first[name]) > INFLUENCE_RTOL * max(abs(first[name]), 1e-30):
            raise ValueError(f"{path}: block influence of {name} is {value:.9g}, shard 0 measured {first[name]:.9g} "
                             f"(more than {INFLUENCE_RTOL:g} relative apart): the shards ran different models or "
                             "devices; rejected, not merged")


def measure_gains_sharded(pipe, prompts: Sequence[str], sampler: SamplerSettings, folder: str | Path, *, shards: int,
                          num_calls: int, rel_noise: float, seed: int, noise_chunk: int = DEFAULT_NOISE_CHUNK,
                          progress: bool = False, reference: TruncationReference | None = None,
                          record: RecordDecomposition | None = None) -> tuple[Gains, GainShardPlan, list[int]]:
    """Plan, measure the missing shards here (one after another), verify and merge. Returns the gains, the plan and
    the indices this call measured (none when a distributed run, ``flows.distributed``, wrote them all)."""
    _, denoiser = denoiser_of(pipe)
    model_hash = model_content_hash(denoiser)  # once, for the plan and every shard measured here
    plan = plan_gain_shards(pipe, prompts, sampler, shards=shards, num_calls=num_calls, rel_noise=rel_noise, seed=seed,
                            noise_chunk=noise_chunk, model_hash=model_hash, reference=reference)
    missing = plan.missing(folder)
    for shard in missing:
        measure_gain_shard(pipe, plan, shard, prompts, sampler, folder, progress=progress, model_hash=model_hash,
                           reference=reference, record=record)
    return merge_gain_shards(plan, folder), plan, [s.index for s in missing]


def gain_shard_tags(gains_path: str | Path, prefix: str = "lineage.gains.shard") -> dict[str, str]:
    """MLflow tags naming the shard digests a gains file was merged from (none for gains measured in one process)."""
    path = Path(gains_path)
    if not path.is_file():
        return {}
    shards = Gains.load(path).metadata.get("shards") or []
    tags = {f"{prefix}s": str(len(shards))} if shards else {}
    for entry in shards:
        tags[f"{prefix}.{entry['index']}"] = entry["digest"]
    return tags
