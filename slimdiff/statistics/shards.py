"""Sharded capture (docs/distributed.md): content-addressed shards, computed anywhere, merged by streaming.

A capture splits two ways. **Prompt shards**: contiguous runs of whole batches of the calibration prompts
(each prompt's noise is seeded from the prompt, and a shard batches its prompts exactly as the single-process
capture does, so every per-call Gram matrix is the same and the float64 sums agree to rounding of the
additions, ~1e-16 relative). **Site groups**: disjoint sets of hooked sites, balanced by bytes, so that a worker
holds the statistics of its sites only (Flux-sized models, whose statistics exceed one worker's memory).
Shard ``(p, s)`` runs prompt shard ``p`` with the sites of group ``s`` hooked.

Each shard is named by its digest: sha256 of the model hash, the denoiser class, the sampler, the scheduler,
the hooked sites, the bucket count, the batch size, dtype and device type, and the ordered hashes of its
prompts. It is written atomically to ``<folder>/<digest>.safetensors`` (a killed worker leaves a temporary and
the shard's own checkpoint, never a torn shard); a re-run computes only the digests that are missing.
Before merging, each file's recorded identity is checked against the plan: a shard of another model, sampler
or prompt set is rejected by its digest, naming the field that differs, and never merged.

``merge_shards`` sums the shards one tensor at a time into a safetensors file written incrementally, so the
merged statistics never sit in one process at once (``slimdiff.statistics.sums.open_capture`` reads the result
back one site at a time).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from slimdiff.arch.pipelines import denoiser_of
from slimdiff.arch.sites import site_width, sites_for
from slimdiff.files import atomic_path, stream_safetensors
from slimdiff.runtime.sampling import (
    SAMPLER_DEFAULTS,
    SamplerSettings,
    prompt_hash,
    prompts_digest_from_hashes,
)
from slimdiff.statistics.recorder import grid_points_for
from slimdiff.statistics.recording import (
    DEFAULT_TIMESTEP_GRID,
    capture,
    capture_fingerprint,
    model_content_hash,
)
from slimdiff.statistics.sums import _PARTS, _SHARD_INVARIANT_KEYS

SHARD_FORMAT = "slimdiff-capture-shard/1"

# identity fields a shard digest covers besides its prompts (capture_fingerprint minus the prompt order)
IDENTITY_KEYS = ("model_hash", "denoiser_class", "sampler", "scheduler", "sites", "num_buckets", "batch_size", "timestep_grid",
                 "device_type", "dtype")


def split_prompts(prompts: Sequence[str], batch_size: int, shards: int) -> list[list[str]]:
    """``shards`` contiguous runs of whole batches of ``prompts`` (sizes differ by at most one batch).

    Whole batches: each shard then forms exactly the batches the single-process capture forms, so every
    denoiser call, and every per-call float32 Gram matrix, is bit-identical to the unsharded run."""
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"capture.shards must be a whole number >= 1, got {shards!r}")
    if batch_size < 1:
        raise ValueError(f"capture.batch_size must be >= 1, got {batch_size}")
    batches = [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    if shards > len(batches):
        raise ValueError(f"capture.shards {shards} exceeds the {len(batches)} batches of {len(prompts)} prompts at "
                         f"capture.batch_size {batch_size}; use at most {len(batches)} shards or a smaller batch size")
    out: list[list[str]] = []
    start = 0
    for index in range(shards):
        count = len(batches) // shards + (1 if index < len(batches) % shards else 0)
        out.append([p for batch in batches[start:start + count] for p in batch])
        start += count
    return out


def split_sites(sites: Sequence[str], widths: Sequence[int], groups: int) -> list[list[str]]:
    """``groups`` contiguous, disjoint runs of ``sites`` with about equal statistics bytes (width squared)."""
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"capture.site_groups must be a whole number >= 1, got {groups!r}")
    if groups > len(sites):
        raise ValueError(f"capture.site_groups {groups} exceeds the {len(sites)} hooked sites; use at most {len(sites)}")
    weights = [w * w for w in widths]
    total = sum(weights)
    out: list[list[str]] = [[] for _ in range(groups)]
    done = 0
    for site, weight in zip(sites, weights):
        # by the midpoint of the site's byte range: contiguous runs of about total / groups bytes each
        out[min(int((done + weight / 2) * groups / total), groups - 1)].append(site)
        done += weight
    empty = [i for i, o in enumerate(out) if not o]
    if empty:  # very unequal widths: fall back to equal counts (still contiguous and disjoint)
        out = contiguous_runs(sites, groups)
    return out


def contiguous_runs(items: Sequence, count: int) -> list[list]:
    """``items`` in ``count`` contiguous runs whose lengths differ by at most one (the longer ones first)."""
    size, extra = divmod(len(items), count)
    out, start = [], 0
    for i in range(count):
        stop = start + size + (1 if i < extra else 0)
        out.append(list(items[start:stop]))
        start = stop
    return out


def shard_digest(identity: dict, prompts: Sequence[str]) -> str:
    """Content address of one shard: its identity (model, sampler, sites, ...) and its prompts in order."""
    return _digest(identity, [prompt_hash(p) for p in prompts])


def _digest(identity: dict, ordered_prompt_hashes: Sequence[str]) -> str:
    payload = {"format": SHARD_FORMAT, **{k: identity[k] for k in IDENTITY_KEYS}, "prompts": list(ordered_prompt_hashes)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    """One unit of work: prompt shard ``prompt_index`` with the sites of ``site_index`` hooked."""

    index: int
    prompt_index: int
    site_index: int
    prompts: tuple[str, ...]
    sites: tuple[str, ...]
    identity: dict
    digest: str

    def filename(self) -> str:
        return f"{self.digest}.safetensors"


class ContentAddressedPlan:
    """Shards stored as ``<folder>/<digest>.<suffix>`` (each shard's ``filename()``): where each lives, which are missing."""

    shards: list

    def path(self, folder: str | Path, shard) -> Path:
        return Path(folder) / shard.filename()

    def missing(self, folder: str | Path) -> list:
        """Shards without a file under their digest in ``folder`` (what a re-run computes)."""
        return [s for s in self.shards if not self.path(folder, s).is_file()]


@dataclass
class ShardPlan(ContentAddressedPlan):
    """Every shard of one capture, in merge order (site group major, prompt shard minor)."""

    shards: list[Shard]
    model_id: str
    num_buckets: int
    batch_size: int
    sampler: SamplerSettings
    timestep_grid_points: int = DEFAULT_TIMESTEP_GRID

    @property
    def prompt_shards(self) -> int:
        return 1 + max(s.prompt_index for s in self.shards)

    @property
    def site_groups(self) -> int:
        return 1 + max(s.site_index for s in self.shards)

    def manifest(self) -> list[dict]:
        return [{"index": s.index, "digest": s.digest, "prompt_shard": s.prompt_index, "site_group": s.site_index,
                 "prompts": len(s.prompts), "sites": len(s.sites)} for s in self.shards]


def plan_shards(pipe, prompts: Sequence[str], sampler: SamplerSettings, *, shards: int, site_groups: int = 1,
                num_buckets: int = 4, batch_size: int = 8, model_id: str = "", extra_sites: Sequence[str] = (),
                model_hash: str | None = None, timestep_grid_points: int = DEFAULT_TIMESTEP_GRID) -> ShardPlan:
    """The shards of a capture of ``prompts`` on ``pipe`` (hashes the model once, unless given ``model_hash``, its
    ``model_content_hash``; runs no denoiser call)."""
    from slimdiff.arch import compressible_groups

    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture needs at least one prompt")
    prompt_runs = split_prompts(prompts, batch_size, shards)
    _, denoiser = denoiser_of(pipe)
    sites = list(dict.fromkeys([*sites_for(compressible_groups(denoiser)), *extra_sites]))
    site_runs = split_sites(sites, [site_width(denoiser, s) for s in sites], site_groups)
    model_hash = model_hash or model_content_hash(denoiser)
    planned: list[Shard] = []
    for s_index, site_run in enumerate(site_runs):
        for p_index, run in enumerate(prompt_runs):
            identity = _identity(capture_fingerprint(denoiser, run, sampler, site_run, num_buckets, batch_size,
                                                     pipe.scheduler, model_hash,
                                                     grid_points_for(denoiser, site_run, timestep_grid_points)))
            planned.append(Shard(len(planned), p_index, s_index, tuple(run), tuple(site_run), identity,
                                 shard_digest(identity, run)))
    return ShardPlan(planned, model_id, num_buckets, batch_size, sampler, timestep_grid_points)


def _identity(fingerprint: dict) -> dict:
    return {k: fingerprint[k] for k in IDENTITY_KEYS}


def capture_shard(pipe, plan: ShardPlan, shard: Shard, folder: str | Path, *, checkpoint_every: int = 100,
                  progress: bool = False, model_hash: str | None = None) -> Path:
    """Capture one shard into ``<folder>/<digest>.safetensors`` (atomically) and return the path.

    A shard file already there is kept (content-addressed: same digest, same sums). The shard checkpoints
    its partial sums to ``<folder>/.<digest>.ckpt`` and resumes from it, so a retried shard continues where
    a killed worker stopped. While it runs, ``<folder>/.<digest>.lease`` names the process (host, pid).
    ``model_hash``: ``pipe``'s denoiser's ``model_content_hash``, when the caller computed it for this loaded
    model (a worker hashes its model once, not once per shard)."""
    folder = Path(folder)
    target = plan.path(folder, shard)
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    _, denoiser = denoiser_of(pipe)
    model_hash = model_hash or model_content_hash(denoiser)
    here = _identity(capture_fingerprint(denoiser, shard.prompts, plan.sampler, shard.sites, plan.num_buckets,
                                         plan.batch_size, pipe.scheduler, model_hash,
                                         grid_points_for(denoiser, shard.sites, plan.timestep_grid_points)))
    if here != shard.identity:
        differ = sorted(k for k in IDENTITY_KEYS if here[k] != shard.identity[k])
        raise ValueError(f"shard {shard.index} ({shard.digest[:12]}) was planned for another {', '.join(differ)} than "
                         "this worker's model and settings; re-plan the capture")
    for stale in folder.glob(f"..{shard.digest}.*.tmp"):  # what a killed try of this shard left mid-write
        stale.unlink(missing_ok=True)
    for stale in folder.glob(f".{shard.digest}.safetensors.*.tmp"):
        stale.unlink(missing_ok=True)
    lease = folder / f".{shard.digest}.lease"
    lease.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}))
    checkpoint = folder / f".{shard.digest}.ckpt"
    try:
        stats = capture(pipe, list(shard.prompts), plan.sampler, num_buckets=plan.num_buckets, batch_size=plan.batch_size,
                        groups=[], extra_sites=shard.sites, model_id=plan.model_id, progress=progress,
                        checkpoint=checkpoint, checkpoint_every=checkpoint_every, model_hash=model_hash,
                        timestep_grid_points=plan.timestep_grid_points)
        stats.metadata["shard"] = {"format": SHARD_FORMAT, "digest": shard.digest, "identity": shard.identity,
                                   "prompt_hashes_in_order": [prompt_hash(p) for p in shard.prompts],
                                   "prompt_shard": shard.prompt_index, "site_group": shard.site_index}
        stats.save(target)
    finally:
        lease.unlink(missing_ok=True)
    checkpoint.unlink(missing_ok=True)
    return target


def run_shards(pipe, plan: ShardPlan, folder: str | Path, *, checkpoint_every: int = 100, progress: bool = False,
               model_hash: str | None = None) -> list[int]:
    """Compute the shards of ``plan`` missing from ``folder`` in this process; returns their indices."""
    missing = plan.missing(folder)
    if missing:
        _, denoiser = denoiser_of(pipe)
        model_hash = model_hash or model_content_hash(denoiser)  # once for all the shards
    for shard in missing:
        capture_shard(pipe, plan, shard, folder, checkpoint_every=checkpoint_every, progress=progress,
                      model_hash=model_hash)
    return [s.index for s in missing]


def read_header(path: str | Path) -> dict:
    """The slimdiff header of a capture or shard file (metadata only; no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("slimdiff")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: unreadable shard ({str(error).splitlines()[0][:160]}); delete it and re-run") from None
    if raw is None:
        raise ValueError(f"{path} is not a slimdiff capture shard (no 'slimdiff' metadata)")
    return json.loads(raw)


def verify_shard(path: str | Path, shard: Shard) -> dict:
    """Check that the file at ``path`` holds ``shard``; returns its capture metadata.

    Rejected (one line naming the file and the first field that differs): a file that is not a shard, a shard
    whose recorded identity does not hash to its recorded digest, a shard of another digest (model, sampler,
    scheduler, sites, prompts, ...), and one whose capture metadata contradicts its identity."""
    path = Path(path)
    metadata = read_header(path).get("metadata", {})
    info = metadata.get("shard")
    if not isinstance(info, dict) or info.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a {SHARD_FORMAT} file; it cannot be merged")
    identity, ordered = info.get("identity", {}), info.get("prompt_hashes_in_order", [])
    if any(k not in identity for k in IDENTITY_KEYS) or _digest(identity, ordered) != info.get("digest"):
        raise ValueError(f"{path}: its recorded identity does not hash to its digest {str(info.get('digest'))[:12]}; "
                         "the file was altered, delete it and re-run")
    if info["digest"] != shard.digest:
        differ = [k for k in IDENTITY_KEYS if identity.get(k) != shard.identity[k]]
        if list(ordered) != [prompt_hash(p) for p in shard.prompts]:
            differ.append("prompts")
        what = ", ".join(f"{k} {_short(identity.get(k))} (expected {_short(shard.identity.get(k))})" if k != "prompts"
                         else "prompts" for k in differ[:2])
        raise ValueError(f"{path}: shard digest {info['digest'][:12]} is not the planned {shard.digest[:12]}: it was "
                         f"captured with another {what}; rejected, not merged")
    sampler = shard.identity["sampler"]
    recorded = {"model_hash": metadata.get("model_hash"), "denoiser_class": metadata.get("denoiser_class"),
                **{k: metadata.get(k, SAMPLER_DEFAULTS.get(k)) for k in sampler},
                "dtype": metadata.get("dtype"), "device_type": metadata.get("device_type")}
    expected = {"model_hash": identity["model_hash"], "denoiser_class": identity["denoiser_class"],
                **sampler,
                "dtype": identity["dtype"], "device_type": identity["device_type"]}
    differ = [k for k in expected if recorded[k] != expected[k]]
    if differ or sorted(ordered) != metadata.get("prompt_hashes"):
        field = differ[0] if differ else "prompt_hashes"
        raise ValueError(f"{path}: its statistics were taken with {field} {_short(recorded.get(field, '?'))}, its digest "
                         f"says {_short(expected.get(field, 'its prompts'))}; rejected, not merged")
    return metadata


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return text if len(text) <= 60 else hashlib.sha256(text.encode()).hexdigest()[:12]


def merge_shards(plan: ShardPlan, folder: str | Path, out: str | Path) -> Path:
    """Sum the shards of ``plan`` in ``folder`` into the capture file ``out``, one tensor at a time.

    Every shard is verified first (``verify_shard``); a missing one fails naming it. Each site's sums come
    from the prompt shards of its site group, added in prompt order (pooled float64 sums, per-bucket sums in
    their own dtype, token counts), and are written straight to ``out`` (atomically): peak memory is the
    largest single tensor twice, never the whole statistics. ``Capture.load(out)`` equals
    ``merge_captures`` of the shards."""
    from safetensors import safe_open

    folder, out = Path(folder), Path(out)
    missing = plan.missing(folder)
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) missing in {folder}, e.g. {missing[0].filename()} "
                                f"(shard {missing[0].index}); compute them before merging")
    metas = {s.index: verify_shard(plan.path(folder, s), s) for s in plan.shards}
    first = metas[plan.shards[0].index]
    for shard in plan.shards[1:]:
        for key in _SHARD_INVARIANT_KEYS:
            if key == "site_tokens":
                continue  # site groups record their own sites' token counts; merged below
            if metas[shard.index].get(key) != first.get(key):
                raise ValueError(f"{plan.path(folder, shard)}: disagrees with shard 0 on {key!r}; rejected, not merged")
    handles: dict[int, object] = {}
    try:
        for shard in plan.shards:
            handles[shard.index] = safe_open(str(plan.path(folder, shard)), framework="pt")
        layout: dict[str, tuple[torch.dtype, tuple[int, ...], list[int]]] = {}
        for shard in plan.shards:
            handle = handles[shard.index]
            keys = set(handle.keys())
            wanted = {f"{site}|{part}" for site in shard.sites for part in _PARTS}
            if not keys <= wanted or not any(k.endswith("|sum_outer") for k in keys):
                raise ValueError(f"{plan.path(folder, shard)}: holds other sites than its plan; rejected, not merged")
            for key in sorted(keys):
                piece = handle.get_slice(key)
                dtype, shape = _torch_dtype(piece.get_dtype()), tuple(piece.get_shape())
                if key in layout and layout[key][:2] != (dtype, shape):
                    raise ValueError(f"{plan.path(folder, shard)}: {key} is {dtype} {shape}, other shards hold "
                                     f"{layout[key][0]} {layout[key][1]}; rejected, not merged")
                layout.setdefault(key, (dtype, shape, []))[2].append(shard.index)
        metadata = _merged_metadata(plan, metas)
        header = {"format": _capture_format(), "metadata": metadata}
        with atomic_path(out) as tmp:
            _stream_safetensors(tmp, layout, handles, {"slimdiff": json.dumps(header, sort_keys=True)})
    finally:
        handles.clear()
    return out


def _capture_format() -> str:
    from slimdiff.statistics.sums import CAPTURE_FORMAT

    return CAPTURE_FORMAT


def _torch_dtype(name: str) -> torch.dtype:
    names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    if name not in names:
        raise ValueError(f"unexpected tensor dtype {name} in a capture shard")
    return names[name]


def _merged_metadata(plan: ShardPlan, metas: dict[int, dict]) -> dict:
    """The capture metadata of the whole prompt set: what ``merge_captures`` writes, plus the shard manifest."""
    first_group = [s for s in plan.shards if s.site_index == 0]
    metadata = {k: v for k, v in metas[first_group[0].index].items() if k != "shard"}
    metadata["denoiser_calls"] = sum(metas[s.index].get("denoiser_calls", 0) for s in first_group)
    hashes = sorted(h for s in first_group for h in metas[s.index].get("prompt_hashes", []))
    metadata.update(prompt_hashes=hashes, num_prompts=len(hashes), prompts_digest=prompts_digest_from_hashes(hashes))
    site_tokens: dict = {}
    for shard in plan.shards:
        for site, tokens in metas[shard.index].get("site_tokens", {}).items():
            site_tokens[site] = tokens if site_tokens.setdefault(site, tokens) == tokens else -1
    metadata["site_tokens"] = site_tokens
    metadata["shards"] = plan.manifest()
    return metadata


def _stream_safetensors(path: Path, layout: dict, handles: dict, metadata: dict[str, str]) -> None:
    """Write the merged capture tensor by tensor (``slimdiff.files.stream_safetensors``): each tensor is the sum of its
    shards' tensors, in shard order, the same order and dtype as ``merge_captures``."""
    def summed(key: str) -> torch.Tensor:
        total = None
        for index in layout[key][2]:
            value = handles[index].get_tensor(key)
            total = value if total is None else total + value
        return total

    order = [(key, layout[key][0], layout[key][1]) for key in sorted(layout)]
    stream_safetensors(path, order, summed, metadata)


def capture_sharded(pipe, prompts: Sequence[str], sampler: SamplerSettings, folder: str | Path, out: str | Path, *,
                    shards: int, site_groups: int = 1, num_buckets: int = 4, batch_size: int = 8, model_id: str = "",
                    checkpoint_every: int = 100, progress: bool = False,
                    timestep_grid_points: int = DEFAULT_TIMESTEP_GRID) -> tuple[ShardPlan, list[int]]:
    """Plan, compute the missing shards here (one after another), verify and merge into ``out``.

    Returns the plan and the indices of the shards this call computed (none when a distributed run, e.g.
    ``flows.distributed``, already wrote them all)."""
    _, denoiser = denoiser_of(pipe)
    model_hash = model_content_hash(denoiser)  # once, for the plan and every shard computed here
    plan = plan_shards(pipe, prompts, sampler, shards=shards, site_groups=site_groups, num_buckets=num_buckets,
                       batch_size=batch_size, model_id=model_id, model_hash=model_hash,
                       timestep_grid_points=timestep_grid_points)
    missing = plan.missing(folder)
    if missing:
        print(f"capture: computing {len(missing)} of {len(plan.shards)} shards in this process "
              f"({len(plan.shards) - len(missing)} already in {folder})", file=sys.stderr)
    computed = run_shards(pipe, plan, folder, checkpoint_every=checkpoint_every, progress=progress, model_hash=model_hash)
    merge_shards(plan, folder, out)
    return plan, computed


def shard_tags(capture_path: str | Path, prefix: str = "lineage.capture.shard") -> dict[str, str]:
    """MLflow tags naming the shard digests a capture file was merged from (none for an unsharded capture)."""
    path = Path(capture_path)
    if not path.is_file():
        return {}
    shards = read_header(path).get("metadata", {}).get("shards") or []
    tags = {f"{prefix}s": str(len(shards))} if shards else {}
    for entry in shards:
        tags[f"{prefix}.{entry['index']}"] = entry["digest"]
    return tags
