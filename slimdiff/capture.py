"""Timestep activation capture (method.md §2).

Forward pre-hooks on the denoiser's linear layers accumulate uncentered second moments of their
inputs over every denoiser call (every timestep, both classifier-free guidance branches), on the
model's own device. Memory holds sums, never activations. Sums are additive, so captures of disjoint
prompt shards merge exactly (``merge_captures``), and a capture checkpointed every few prompts
resumes where it stopped.

Precision (docs/method.md, "Precision of the statistics"): each hooked call's Gram matrix x^T x is
formed in float32 (inputs in the model's dtype, float32 accumulation; float64 for a float64 model),
then added into a float64 pooled sum. Per-timestep-bucket sums, which only the influence score
reads, are kept in float32 (float64 for a float64 model).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from slimdiff.calls import DenoiserCall, call_spec
from slimdiff.device import module_device
from slimdiff.groups import ModuleGroup, adapter_for, compressible_groups
from slimdiff.utils import atomic_path, stream_safetensors

CAPTURE_FORMAT = "slimdiff-capture/2"
# timesteps at which the conditioning sites (adaLN inputs) are recorded, spread over the scheduler's range
DEFAULT_TIMESTEP_GRID = 64


def gram_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """Precision of one call's Gram matrix: float64 for float64 activations, else float32."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


# Gram matrices wider than this are formed block by block, upper triangle only (a symmetric rank-k
# update: ~55 % of the multiply-adds at 5120 wide), then mirrored.
GRAM_BLOCK = 512


def gram(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(x^T x, sum of x) of row tokens ``rows`` (n, d), accumulated in ``gram_dtype`` on ``rows``' device.

    Half-precision inputs on CUDA go to the tensor cores with float32 accumulation (their products are
    exact in float32); TF32 is never used for float32 inputs. Wide matrices compute only the blocks on
    and above the diagonal.
    """
    out_dtype = gram_dtype(rows.dtype)
    if not (rows.is_cuda and rows.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        rows = rows.to(out_dtype)
    dim = rows.shape[1]
    if dim <= GRAM_BLOCK:
        outer = _product(rows, rows, out_dtype)
    else:
        outer = torch.empty(dim, dim, dtype=out_dtype, device=rows.device)
        edges = list(range(0, dim, GRAM_BLOCK)) + [dim]
        for i in range(len(edges) - 1):
            left = rows[:, edges[i]:edges[i + 1]]
            right = rows[:, edges[i]:]
            block = _product(left, right, out_dtype)  # row block i, columns i.. (upper triangle)
            outer[edges[i]:edges[i + 1], edges[i]:] = block
            outer[edges[i + 1]:, edges[i]:edges[i + 1]] = block[:, edges[i + 1] - edges[i]:].T
    return outer, rows.sum(0, dtype=out_dtype)


_MIXED_MM = {"available": True}


def _product(left: Tensor, right: Tensor, out_dtype: torch.dtype) -> Tensor:
    """left^T right with ``out_dtype`` accumulation and output."""
    if left.dtype == out_dtype:
        with _no_tf32():
            return left.T @ right
    if _MIXED_MM["available"]:
        try:
            return torch.mm(left.T, right, out_dtype=out_dtype)
        except (TypeError, RuntimeError) as error:
            # torch without a mixed-precision mm for these inputs: the same products after an upcast
            # (exact for half inputs, only slower); said once, never silently
            _MIXED_MM["available"] = False
            print(f"slimdiff: torch.mm(out_dtype=float32) unavailable ({str(error).splitlines()[0][:120]}); "
                  "Gram matrices upcast half-precision activations first", file=sys.stderr)
    with _no_tf32():
        return left.T.to(out_dtype) @ right.to(out_dtype)


@contextmanager
def _no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@dataclass
class SiteStats:
    """Sums for one hooked input: pooled over all buckets in float64, and per timestep bucket."""

    sum_outer: Tensor  # (d, d) float64: sum of x x^T over every token of every bucket
    sum: Tensor  # (d,) float64
    count: Tensor  # (buckets,) int64 tokens per bucket (CPU)
    bucket_sum_outer: Tensor | None  # (buckets, d, d) float32 (float64 for float64 models); None with one bucket
    bucket_sum: Tensor | None  # (buckets, d)
    sum_abs: Tensor | None = None  # (d,) float64: sum of |x| (ASVD's mean |x|); None in captures written before it

    @classmethod
    def zeros(cls, buckets: int, dim: int, device: torch.device | str = "cpu",
              bucket_dtype: torch.dtype = torch.float32) -> "SiteStats":
        per_bucket = buckets > 1
        return cls(
            torch.zeros(dim, dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dtype=torch.float64, device=device),
            torch.zeros(buckets, dtype=torch.int64, device="cpu"),  # bookkeeping stays on the host: no syncs
            torch.zeros(buckets, dim, dim, dtype=bucket_dtype, device=device) if per_bucket else None,
            torch.zeros(buckets, dim, dtype=bucket_dtype, device=device) if per_bucket else None,
            torch.zeros(dim, dtype=torch.float64, device=device),
        )

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    @property
    def num_buckets(self) -> int:
        return self.count.shape[0]

    def add(self, bucket: int, outer: Tensor, first: Tensor, tokens: int, absolute: Tensor | None = None) -> None:
        """Add one call's Gram matrix, token sum and sum of absolute values (any float dtype, same device) to ``bucket``."""
        _add_in_rows(self.sum_outer, outer)
        self.sum.add_(first)
        if absolute is not None and self.sum_abs is not None:
            self.sum_abs.add_(absolute)
        self.count[bucket] += tokens
        if self.bucket_sum_outer is not None:
            _add_in_rows(self.bucket_sum_outer[bucket], outer)
            self.bucket_sum[bucket].add_(first)

    def outer_in(self, buckets: Sequence[int]) -> tuple[Tensor, Tensor, int]:
        """(sum x x^T, sum x, tokens) over ``buckets``, in float64."""
        index = sorted(set(int(b) for b in buckets))
        tokens = int(self.count[index].sum())
        if index == list(range(self.num_buckets)) or self.bucket_sum_outer is None:
            if index != list(range(self.num_buckets)):
                raise ValueError(f"this capture keeps no per-bucket statistics; buckets {index} cannot be separated")
            return self.sum_outer, self.sum, tokens
        return (self.bucket_sum_outer[index].sum(0, dtype=torch.float64),
                self.bucket_sum[index].sum(0, dtype=torch.float64), tokens)

    def nbytes(self) -> int:
        parts = (self.sum_outer, self.sum, self.count, self.bucket_sum_outer, self.bucket_sum, self.sum_abs)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def to(self, device: torch.device | str) -> "SiteStats":
        """The same sums on ``device`` (the token counts stay on the host)."""
        move = (lambda t: None if t is None else t.to(device))
        return SiteStats(move(self.sum_outer), move(self.sum), self.count.clone(), move(self.bucket_sum_outer), move(self.bucket_sum),
                         move(self.sum_abs))


# rows of a (d, d) sum updated at a time: adding a float32 Gram matrix into a float64 sum converts it through a
# temporary, which would otherwise be the whole (d, d) matrix in float64 (1.2 GB at 12288 wide)
_ADD_BYTES = 64 << 20


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite, checked in row blocks (no full-size boolean mask at once)."""
    rows = max(1, _ADD_BYTES // max(1, tensor.shape[-1] * tensor.element_size()))
    return all(bool(torch.isfinite(tensor[start:start + rows]).all()) for start in range(0, tensor.shape[0], rows))


def _add_in_rows(total: Tensor, part: Tensor) -> None:
    """``total += part`` in row blocks, so that a dtype conversion never holds more than ``_ADD_BYTES`` at once."""
    if total.dtype == part.dtype:
        total.add_(part)
        return
    rows = max(1, _ADD_BYTES // max(1, total.shape[-1] * total.element_size()))
    for start in range(0, total.shape[0], rows):
        total[start:start + rows].add_(part[start:start + rows])


def statistics_bytes(dims: Sequence[int], num_buckets: int, bucket_bytes: int = 4) -> int:
    """Bytes of the statistics of sites with input widths ``dims``: float64 pooled sums plus per-bucket sums."""
    pooled = sum(8 * (d * d + 2 * d) for d in dims)  # sum x x^T, sum x, sum |x|
    per_bucket = 0 if num_buckets == 1 else sum(bucket_bytes * num_buckets * (d * d + d) for d in dims)
    return pooled + per_bucket + 8 * num_buckets * len(dims)


def group_input_sites(group: ModuleGroup) -> tuple[str, str]:
    """(x_site, y_site): the hooked inputs whose statistics a group's decomposition needs.

    QK needs the query input (x) and key input (y); VO the value input (y, also as x); FFN the
    hidden activation entering the down projection (both entries).
    """
    if group.kind == "ffn":
        site = f"{group.path}.net.2"
        return site, site
    q_site = f"{group.path}.to_q"
    kv_site = f"{group.path}.to_k" if group.kind.endswith("cross") else q_site
    if group.kind.startswith("qk"):
        return q_site, kv_site
    return kv_site, kv_site


def group_sites(group: ModuleGroup) -> tuple[str, ...]:
    """Every capture site a group's decomposition reads: the adapter's ``sites`` for joint, fused and modulation
    layouts, else the (x, y) sites of ``group_input_sites``."""
    return group.sites if group.sites else tuple(dict.fromkeys(group_input_sites(group)))


def sites_for(groups: Sequence[ModuleGroup]) -> list[str]:
    """Unique hooked input sites for ``groups``, in order."""
    sites: dict[str, None] = {}
    for group in groups:
        for site in group_sites(group):
            sites[site] = None
    return list(sites)


def site_width(denoiser: nn.Module, site: str) -> int:
    """Width of a site's statistics: its linear's input width, or the width of its column slice."""
    path, columns = parse_site(site)
    return int(denoiser.get_submodule(path).in_features) if columns is None else columns.stop - columns.start


def parse_site(site: str) -> tuple[str, slice | None]:
    """(module path, input columns) of a site name: ``"a.b.to_q"`` (the whole input of that linear) or
    ``"a.b.proj_out[3072:15360]"`` (columns 3072..15359 of its input: one part of a fused linear)."""
    if not site.endswith("]"):
        return site, None
    path, _, cols = site[:-1].rpartition("[")
    start, _, stop = cols.partition(":")
    try:
        columns = slice(int(start), int(stop))
    except ValueError:
        raise ValueError(f"site {site!r}: columns must read [start:stop]") from None
    if not 0 <= columns.start < columns.stop:
        raise ValueError(f"site {site!r}: empty or negative column range")
    return path, columns


def bucket_edges(num_buckets: int, num_train_timesteps: int) -> list[float]:
    """Equal-width timestep buckets over [0, num_train_timesteps]."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return [num_train_timesteps * i / num_buckets for i in range(num_buckets + 1)]


_PARTS = ("sum_outer", "sum", "count", "bucket_sum_outer", "bucket_sum", "sum_abs")


@dataclass
class Capture:
    """Accumulated second moments of a denoiser's compressible inputs, with provenance metadata."""

    sites: dict[str, SiteStats]
    metadata: dict = field(default_factory=dict)

    @property
    def num_buckets(self) -> int:
        """Timestep buckets: from the recorded ``bucket_edges`` (a lazily read capture then reads no site; ``load``
        and ``open_capture`` check that the sites agree), else from the first site."""
        edges = self.metadata.get("bucket_edges")
        if isinstance(edges, (list, tuple)) and len(edges) >= 2:
            return len(edges) - 1
        return next(iter(self.sites.values())).num_buckets

    def subset(self, sites: Sequence[str]) -> "Capture":
        """The statistics of ``sites`` only, each read once (one access each to ``self.sites``), with this metadata:
        what one group's moments need, so that a lazily read capture reads each of its sites once per group."""
        for site in sites:
            if site not in self.sites:
                raise KeyError(f"capture has no statistics for {site!r}")
        return Capture({site: self.sites[site] for site in dict.fromkeys(sites)}, self.metadata)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.sites.values())

    def second_moment(self, site: str, buckets: Sequence[int] | None = None, augment: bool = False) -> Tensor:
        """E[x x^T] (float64, on the statistics' device) over the chosen buckets (all by default);
        with ``augment`` the moment of [x, 1]."""
        if site not in self.sites:
            raise KeyError(f"capture has no statistics for {site!r}")
        stats = self.sites[site]
        index = list(range(self.num_buckets)) if buckets is None else list(buckets)
        outer, first, count = stats.outer_in(index)
        if count == 0:
            raise ValueError(f"capture holds no tokens for {site!r} in buckets {index}")
        outer = outer / count
        if not augment:
            return outer
        mean = first / count
        dim = stats.dim
        aug = torch.empty(dim + 1, dim + 1, dtype=torch.float64, device=outer.device)
        aug[:dim, :dim] = outer
        aug[:dim, dim] = mean
        aug[dim, :dim] = mean
        aug[dim, dim] = 1.0
        return aug

    def stacked_second_moment(self, sites: Sequence[str], augment: Sequence[bool], buckets: Sequence[int] | None = None) -> Tensor:
        """Second moment of the streams of a joint attention stacked block-diagonally (method.md §6): each token
        belongs to one stream, so the stacked input is zero outside its stream's block. Each block is the stream's
        mean moment weighted by its share of the tokens, i.e. the mean over the tokens of all streams together."""
        index = list(range(self.num_buckets)) if buckets is None else list(buckets)
        counts = [float(self.sites[s].count[index].sum()) if s in self.sites else 0.0 for s in sites]
        blocks = [self.second_moment(s, buckets, augment=a) for s, a in zip(sites, augment)]
        total = sum(counts)
        return torch.block_diag(*[block * (count / total) for block, count in zip(blocks, counts)])

    def check_finite(self, where: str = "capture") -> None:
        """Fail naming the first site whose sums hold NaN or Inf (e.g. half-precision activations that overflowed)."""
        bad = [site for site, stats in self.sites.items() if not _all_finite(stats.sum_outer)]
        if bad:
            more = f" (and {len(bad) - 1} more sites)" if len(bad) > 1 else ""
            raise ValueError(f"{where}: the statistics of {bad[0]}{more} hold NaN/Inf: activations overflowed or were "
                             "not finite; capture with --dtype float32 or bfloat16")

    def save(self, path: str | Path) -> Path:
        """Write to a safetensors file (JSON metadata + the sums), atomically, streaming: each tensor goes from its
        device to the file in chunks, so a checkpoint of statistics on a GPU holds no host copy of them."""
        parts = {f"{site}|{part}": getattr(stats, part) for site, stats in self.sites.items() for part in _PARTS
                 if getattr(stats, part) is not None}
        layout = [(key, tensor.dtype, tuple(tensor.shape)) for key, tensor in sorted(parts.items())]
        header = {"format": CAPTURE_FORMAT, "metadata": self.metadata}
        path = Path(path)
        with atomic_path(path) as tmp:
            stream_safetensors(tmp, layout, parts.__getitem__, {"slimdiff": json.dumps(header, sort_keys=True)})
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "Capture":
        """Read a capture written by ``save`` onto ``device``; a missing, truncated, corrupt, foreign or inconsistent
        file fails with one line naming it and what is wrong."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"capture file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                header = capture_header(path, handle)
                parts: dict[str, dict[str, Tensor]] = {}
                for key in handle.keys():
                    site, part = key.rsplit("|", 1)
                    parts.setdefault(site, {})[part] = handle.get_tensor(key)
        except (SafetensorError, json.JSONDecodeError, OSError) as error:
            raise unreadable_capture(path, error) from None
        if not parts:
            raise ValueError(f"{path}: the capture holds no statistics")
        sites = {site: _site_stats(path, site, p) for site, p in parts.items()}
        metadata = header.get("metadata", {})
        check_buckets(path, {s.num_buckets for s in sites.values()}, metadata)
        return cls(sites, metadata)


def capture_header(path: Path, handle) -> dict:
    """The slimdiff header of the capture file open in ``handle`` (a safetensors ``safe_open``), checked: slimdiff
    metadata in the format this slimdiff reads. Raises ``json.JSONDecodeError`` for a garbled header."""
    raw = (handle.metadata() or {}).get("slimdiff")
    if raw is None:
        raise ValueError(f"{path} is not a slimdiff capture (no 'slimdiff' metadata)")
    header = json.loads(raw)
    if header.get("format") != CAPTURE_FORMAT:
        raise ValueError(f"{path}: capture format {header.get('format')!r}, this slimdiff reads {CAPTURE_FORMAT!r}; "
                         "re-run the capture")
    return header


def unreadable_capture(path: Path, error: Exception, site: str | None = None) -> ValueError:
    """The one line for a capture file the safetensors reader refuses (truncated, corrupt, changed under us)."""
    # not re-raised as is: a raw parser traceback would not say which artifact to re-create
    where = f"{path}: site {site}" if site is not None else f"{path}"
    return ValueError(f"{where}: unreadable capture ({str(error).splitlines()[0][:160]}); the file is truncated or "
                      "corrupt, re-run the capture")


def check_buckets(path: Path, buckets: set[int], metadata: dict) -> None:
    """Every site has the same number of timestep buckets, the one the metadata's ``bucket_edges`` record (when
    recorded): then ``Capture.num_buckets`` may answer from the metadata."""
    if len(buckets) != 1:
        raise ValueError(f"{path}: sites disagree on the number of timestep buckets ({sorted(buckets)}); the file is corrupt")
    edges = metadata.get("bucket_edges")
    if isinstance(edges, (list, tuple)) and len(edges) >= 2 and len(edges) - 1 not in buckets:
        raise ValueError(f"{path}: its metadata records {len(edges) - 1} timestep buckets, its statistics hold "
                         f"{next(iter(buckets))}; the file is corrupt, re-run the capture")


def _site_stats(path: Path, site: str, parts: dict[str, Tensor]) -> SiteStats:
    """One site's sums, after checking that every part is there with consistent shapes and dtypes."""
    check_site_parts(path, site, parts)
    bucket_outer, bucket_first = parts.get("bucket_sum_outer"), parts.get("bucket_sum")
    return SiteStats(parts["sum_outer"], parts["sum"], parts["count"].cpu(), bucket_outer, bucket_first, parts.get("sum_abs"))


def check_site_parts(path: Path, site: str, parts: dict[str, Tensor]) -> None:
    """Fail with one line when a site's parts are missing or of inconsistent shapes or dtypes (shapes and dtypes
    only: meta tensors check a file's layout without reading it)."""
    missing = [part for part in ("sum_outer", "sum", "count") if part not in parts]
    if missing:
        raise ValueError(f"{path}: site {site} lacks {', '.join(missing)}; the file is incomplete")
    outer, first, count = parts["sum_outer"], parts["sum"], parts["count"]
    dim = first.shape[0] if first.dim() == 1 else -1
    problems = []
    if first.dim() != 1 or tuple(outer.shape) != (dim, dim):
        problems.append(f"sum_outer {tuple(outer.shape)} and sum {tuple(first.shape)} are not (d, d) and (d,)")
    if outer.dtype != torch.float64 or first.dtype != torch.float64:
        problems.append(f"pooled sums are {outer.dtype}/{first.dtype}, expected float64")
    if count.dim() != 1 or count.dtype != torch.int64:
        problems.append(f"count is {count.dtype} {tuple(count.shape)}, expected int64 (buckets,)")
    bucket_outer, bucket_first = parts.get("bucket_sum_outer"), parts.get("bucket_sum")
    if (bucket_outer is None) != (bucket_first is None):
        problems.append("only one of bucket_sum_outer and bucket_sum is present")
    elif bucket_outer is not None:
        buckets = count.shape[0] if count.dim() == 1 else -1  # a count of another shape is named above
        if tuple(bucket_outer.shape) != (buckets, dim, dim) or tuple(bucket_first.shape) != (buckets, dim):
            problems.append(f"bucket sums {tuple(bucket_outer.shape)}/{tuple(bucket_first.shape)} do not match "
                            f"{buckets} buckets of width {dim}")
    elif count.dim() == 1 and count.shape[0] > 1:
        problems.append(f"{count.shape[0]} buckets but no per-bucket sums")
    absolute = parts.get("sum_abs")
    if absolute is not None and (tuple(absolute.shape) != (dim,) or absolute.dtype != torch.float64):
        problems.append(f"sum_abs is {absolute.dtype} {tuple(absolute.shape)}, expected float64 ({dim},)")
    if problems:
        raise ValueError(f"{path}: site {site}: {problems[0]}; the file is corrupt, re-run the capture")


# Metadata keys that must agree between shards (everything that defines the sampling distribution).
_SHARD_INVARIANT_KEYS = (
    "model_id", "model_hash", "denoiser_class", "scheduler", "num_inference_steps", "guidance_scale",
    "height", "width", "seed", "bucket_edges", "site_tokens",
)


def merge_captures(captures: Sequence[Capture]) -> Capture:
    """Sum captures of disjoint prompt shards into the capture of all their prompts."""
    if not captures:
        raise ValueError("merge_captures needs at least one capture")
    first = captures[0]
    for other in captures[1:]:
        if set(other.sites) != set(first.sites):
            raise ValueError("captures hold different sites; they come from different models or groups")
        for key in _SHARD_INVARIANT_KEYS:
            if first.metadata.get(key) != other.metadata.get(key):
                raise ValueError(f"captures disagree on {key!r}: {first.metadata.get(key)!r} vs {other.metadata.get(key)!r}")
    sites = {}
    for site, stats in first.sites.items():
        parts = {}
        for part in _PARTS:
            values = [getattr(c.sites[site], part) for c in captures]
            parts[part] = None if values[0] is None else sum(v.to(values[0].device) for v in values)
        sites[site] = SiteStats(**parts)
    metadata = dict(first.metadata)
    metadata["denoiser_calls"] = sum(c.metadata.get("denoiser_calls", 0) for c in captures)
    prompt_hashes = sorted(h for c in captures for h in c.metadata.get("prompt_hashes", []))
    metadata["prompt_hashes"] = prompt_hashes
    metadata["num_prompts"] = len(prompt_hashes)
    metadata["prompts_digest"] = prompts_digest_from_hashes(prompt_hashes)
    return Capture(sites, metadata)


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def prompts_digest_from_hashes(hashes: Sequence[str]) -> str:
    """Order-independent digest of a prompt multiset (so shards merge to the same digest)."""
    return hashlib.sha256("\n".join(sorted(hashes)).encode()).hexdigest()


def prompts_digest(prompts: Sequence[str]) -> str:
    return prompts_digest_from_hashes([prompt_hash(p) for p in prompts])


def model_content_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_model(capture: Capture, denoiser: nn.Module, source: str = "the capture") -> None:
    """Fail when ``capture`` was taken on another checkpoint than ``denoiser`` (same shapes or not)."""
    recorded = capture.metadata.get("model_hash")
    if not recorded:
        raise ValueError(f"{source} records no model hash; re-run the capture with this slimdiff")
    actual = model_content_hash(denoiser)
    if actual != recorded:
        raise ValueError(f"{source} was taken on model {recorded[:12]}, but this model is {actual[:12]}; "
                         "re-run the capture for this checkpoint")


def check_calibration(capture: Capture, prompts: Sequence[str], sampler: "SamplerSettings", source: str = "the capture") -> None:
    """Fail when ``capture`` was taken on other calibration prompts or sampler settings than these."""
    recorded = capture.metadata.get("prompts_digest")
    if recorded != prompts_digest(prompts):
        raise ValueError(f"{source} was taken on {capture.metadata.get('num_prompts', '?')} other calibration prompts (digest "
                         f"{str(recorded)[:12]}), not on these {len(prompts)} (digest {prompts_digest(prompts)[:12]}); re-run the capture")
    wanted = {"num_inference_steps": sampler.num_inference_steps, "guidance_scale": sampler.guidance_scale,
              "height": sampler.height, "width": sampler.width, "seed": sampler.seed}
    differ = {k: (capture.metadata.get(k), v) for k, v in wanted.items() if capture.metadata.get(k) != v}
    if differ:
        detail = ", ".join(f"{k} {was} (now {now})" for k, (was, now) in differ.items())
        raise ValueError(f"{source} was taken with other sampler settings: {detail}; re-run the capture")


class ActivationRecorder:
    """Stateful hooks on a denoiser that accumulate input second moments per timestep bucket.

    Statistics live on each hooked module's device. Use as a context manager: hooks are registered
    on enter and removed on exit, also on error.
    """

    def __init__(self, denoiser: nn.Module, sites: Sequence[str], num_buckets: int = 4, num_train_timesteps: int = 1000,
                 stats: dict[str, SiteStats] | None = None, timestep_scale: float = 1.0,
                 conditioning_sites: Sequence[str] = ()):
        self.denoiser = denoiser
        # sites whose input depends on the timestep and pooled conditions alone (adaLN modulations): recorded over a
        # timestep grid (``record_grid``), not from the sampler's calls (method.md §7)
        self.conditioning_sites = set(conditioning_sites) & set(sites)
        self._grid = False
        self._grid_seen: set[str] = set()
        self.last_call: DenoiserCall | None = None  # the denoiser call the grid replays (``keep_call``)
        self.keep_call = False
        self.site_names = list(sites)
        self.edges = bucket_edges(num_buckets, num_train_timesteps)
        self.num_buckets = num_buckets
        self.num_train_timesteps = num_train_timesteps
        # the denoiser's timestep argument times this is the scheduler's timestep (Flux is called with t / 1000)
        self.timestep_scale = float(timestep_scale)
        modules = dict(denoiser.named_modules())
        parsed = {s: parse_site(s) for s in self.site_names}
        missing = [s for s, (path, _) in parsed.items() if path not in modules]
        if missing:
            raise KeyError(f"denoiser has no module(s) {missing[:3]} to hook")
        self._modules = {s: modules[parsed[s][0]] for s in self.site_names}
        self._columns = {s: parsed[s][1] for s in self.site_names}
        for site, columns in self._columns.items():
            if columns is not None and columns.stop > self._modules[site].in_features:
                raise ValueError(f"site {site!r}: {parsed[site][0]} has only {self._modules[site].in_features} input columns")
        if stats is None:
            stats = {}
            for site, module in self._modules.items():
                weight = module.weight
                stats[site] = SiteStats.zeros(num_buckets, site_width(denoiser, site), weight.device, gram_dtype(weight.dtype))
        elif set(stats) != set(self.site_names):
            raise ValueError("statistics to continue hold other sites than the ones to hook")
        self.stats = stats
        # tokens per sample each site saw (-1: several resolutions): what a MACs budget counts
        self.site_tokens: dict[str, int] = {}
        self._bucket_ids: Tensor | None = None
        self._handles: list = []
        self._signature = inspect.signature(denoiser.forward)
        self.calls = 0
        self.call: dict | None = None  # the spec of the first denoiser call (slimdiff.calls.call_spec): its shapes

    def bucket_of(self, timesteps: Tensor) -> Tensor:
        """Bucket index of each timestep (on the CPU: one small copy per denoiser call)."""
        t = timesteps.detach().to("cpu", torch.float64) * self.timestep_scale
        ids = torch.floor(t * self.num_buckets / self.num_train_timesteps).to(torch.int64)
        return ids.clamp(0, self.num_buckets - 1)

    def _on_denoiser(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        if "timestep" not in bound:
            raise ValueError(f"{type(module).__name__}.forward was called without a timestep; cannot bucket statistics")
        sample = next(iter(bound.values()))
        batch = sample.shape[0]
        timestep = torch.as_tensor(bound["timestep"], device="cpu").reshape(-1)  # bucket ids live on the CPU
        if timestep.numel() == 1:
            timestep = timestep.expand(batch)
        self._bucket_ids = self.bucket_of(timestep)
        if self._grid:
            return
        if self.keep_call:
            self.last_call = (tuple(_detach_clone(a) for a in args), {k: _detach_clone(v) for k, v in kwargs.items()})
            self.keep_call = False
        if self.call is None:
            self.call = call_spec(bound)
        self.calls += 1

    def _on_linear(self, site: str):
        columns = self._columns[site]

        conditioning = site in self.conditioning_sites

        def hook(module: nn.Module, args: tuple) -> None:
            if conditioning != self._grid:
                return  # conditioning sites come from the grid, every other site from the sampler's calls
            x = args[0].detach()
            if columns is not None:
                x = x[..., columns]
            if self._bucket_ids is None:
                raise RuntimeError(f"{site} ran outside a denoiser call; cannot assign a timestep bucket")
            ids = self._bucket_ids
            stats = self.stats[site]
            tokens = x.shape[-2] if x.dim() >= 3 else 1
            if self.site_tokens.setdefault(site, tokens) != tokens:
                self.site_tokens[site] = -1
            if bool((ids == ids[0]).all()):
                groups = [(int(ids[0]), None)]
            elif x.shape[0] == ids.shape[0]:
                groups = [(int(b), torch.nonzero(ids == b).flatten().to(x.device)) for b in torch.unique(ids)]
            else:
                raise RuntimeError(f"{site}: input batch {x.shape[0]} does not match the denoiser batch {ids.shape[0]}")
            for bucket, rows in groups:
                chunk = x if rows is None else x.index_select(0, rows)
                flat = chunk.reshape(-1, chunk.shape[-1])
                outer, first = gram(flat)
                stats.add(bucket, outer, first, flat.shape[0], flat.abs().sum(0, dtype=torch.float64))
            if self._grid:
                self._grid_seen.add(site)
                if self._grid_seen >= self.conditioning_sites:
                    raise _GridStop  # the rest of the call reads no conditioning site

        return hook

    def record_grid(self, timesteps: Sequence[float]) -> int:
        """Replay the kept denoiser call (``last_call``) at each scheduler timestep of ``timesteps``, each replay
        stopping once every conditioning site has been recorded: those sites' statistics over the whole timestep range
        with this call's pooled conditions (text, guidance, class), whatever the sampler visits. Returns the replays."""
        if not self.conditioning_sites or self.last_call is None:
            return 0
        args, kwargs = self.last_call
        signature = self._signature.bind_partial(*args, **kwargs)
        original = signature.arguments["timestep"]
        self._grid = True
        try:
            for t in timesteps:
                value = float(t) / self.timestep_scale
                signature.arguments["timestep"] = (torch.full_like(original, value) if torch.is_tensor(original)
                                                   else type(original)(value))
                self._grid_seen = set()
                try:
                    self.denoiser(*signature.args, **signature.kwargs)
                except _GridStop:
                    pass
        finally:
            self._grid = False
            self._bucket_ids = None
        return len(timesteps)

    def __enter__(self) -> "ActivationRecorder":
        try:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._on_denoiser, with_kwargs=True))
            for site, module in self._modules.items():
                self._handles.append(module.register_forward_pre_hook(self._on_linear(site)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._bucket_ids = None


class _GridStop(Exception):
    """Ends a grid replay of a denoiser call once its conditioning sites are recorded."""


def _detach_clone(value):
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detach_clone(v) for k, v in value.items()}
    return value


def timestep_grid(num_train_timesteps: int, points: int) -> list[float]:
    """``points`` scheduler timesteps spread evenly over [0, num_train_timesteps): the middle of equal intervals, so
    that every timestep bucket receives the same share."""
    if points < 0:
        raise ValueError(f"timestep grid must be >= 0 points, got {points}")
    return [(i + 0.5) * num_train_timesteps / points for i in range(points)]


def conditioning_sites(groups: Sequence[ModuleGroup]) -> list[str]:
    """Sites whose input depends only on the timestep and pooled conditions: the adaLN modulations' inputs."""
    return list(dict.fromkeys(site for g in groups if g.kind == "adaln" for site in g.sites))


def hooked_conditioning_sites(denoiser: nn.Module, sites: Sequence[str]) -> list[str]:
    """The conditioning sites among ``sites`` (what a capture of those sites records over the timestep grid)."""
    return [site for site in conditioning_sites(compressible_groups(denoiser)) if site in set(sites)]


def grid_points_for(denoiser: nn.Module, sites: Sequence[str], points: int) -> int:
    """The timestep grid a capture of ``sites`` uses: ``points``, or 0 when none of them is a conditioning site."""
    return points if hooked_conditioning_sites(denoiser, sites) else 0


def denoiser_of(pipe) -> tuple[str, nn.Module]:
    """("unet", module) or ("transformer", module) of a diffusers pipeline."""
    for key in ("unet", "transformer"):
        module = getattr(pipe, key, None)
        if isinstance(module, nn.Module):
            return key, module
    raise ValueError(f"{type(pipe).__name__} has no 'unet' or 'transformer' component to compress")


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


def _batches(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


@contextmanager
def _quiet_pipeline(pipe):
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe.set_progress_bar_config(disable=False)


def capture_fingerprint(denoiser: nn.Module, prompts: Sequence[str], sampler: SamplerSettings, sites: Sequence[str],
                        num_buckets: int, batch_size: int, scheduler, model_hash: str, timestep_grid: int = 0) -> dict:
    """Everything that decides the sums a capture accumulates, batch by batch (what a resumed capture must match)."""
    parameter = next(denoiser.parameters())
    ordered = hashlib.sha256("\n".join(prompt_hash(p) for p in prompts).encode()).hexdigest()
    return {
        "timestep_grid": timestep_grid,
        "model_hash": model_hash,
        "denoiser_class": type(denoiser).__name__,
        "sampler": sampler.to_dict(),
        "scheduler": _jsonable({"class": type(scheduler).__name__, **_scheduler_config(scheduler)}),
        "sites": hashlib.sha256("\n".join(sites).encode()).hexdigest(),
        "num_buckets": num_buckets,
        "batch_size": batch_size,
        "prompts_in_order": ordered,
        "device_type": parameter.device.type,
        "dtype": str(parameter.dtype),
    }


def _resume_point(checkpoint: Path, fingerprint: dict, device: torch.device) -> tuple[dict[str, SiteStats] | None, int, int]:
    """(statistics, prompts done, denoiser calls) of a checkpoint written with the same fingerprint, else (None, 0, 0)."""
    if not checkpoint.is_file():
        return None, 0, 0
    from safetensors import SafetensorError

    try:
        partial = Capture.load(checkpoint, device)
    except (ValueError, OSError, SafetensorError) as error:  # written atomically: only a foreign or damaged file
        print(f"capture: not resuming {checkpoint}: unreadable ({str(error).splitlines()[0][:120]}); starting over",
              file=sys.stderr)
        return None, 0, 0
    info = partial.metadata.get("checkpoint", {})
    written = info.get("fingerprint", {})
    if written != fingerprint:
        differing = sorted(k for k in set(fingerprint) | set(written) if written.get(k) != fingerprint.get(k))
        print(f"capture: not resuming {checkpoint}: it was written with other settings ({', '.join(differing)}); "
              "starting over", file=sys.stderr)
        return None, 0, 0
    print(f"capture: resuming {checkpoint} after {info['done']} prompts", file=sys.stderr)
    return partial.sites, int(info["done"]), int(info["denoiser_calls"])


def capture(
    pipe,
    prompts: Sequence[str],
    sampler: SamplerSettings = SamplerSettings(),
    *,
    num_buckets: int = 4,
    batch_size: int = 8,
    groups: Sequence[ModuleGroup] | None = None,
    extra_sites: Sequence[str] = (),
    model_id: str = "",
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    model_hash: str | None = None,
    timestep_grid_points: int = DEFAULT_TIMESTEP_GRID,
) -> Capture:
    """Run ``pipe`` over ``prompts`` with the deployment sampler and return the accumulated statistics.

    Inputs that depend only on the timestep and pooled conditions (adaLN modulations, ``conditioning_sites``) are
    recorded over ``timestep_grid_points`` timesteps spread over the scheduler's whole range, replaying each batch's
    first denoiser call with its pooled text (method.md §7): their statistics then hold at any step count,
    scheduler or resolution shift, not only at the sampler's timesteps. 0 records them from the sampler's calls.

    Statistics accumulate on the denoiser's device. ``extra_sites`` names further ``nn.Linear``
    modules (by path in the denoiser) whose inputs to record, e.g. for per-matrix baselines. With
    ``checkpoint``, the partial sums are written there atomically every ``checkpoint_every`` prompts
    (rounded up to whole batches), and a checkpoint left by an interrupted run with the same model,
    prompts and settings is resumed; the result equals an uninterrupted capture. The caller removes
    the checkpoint once the final capture is saved. ``model_hash``: the denoiser's ``model_content_hash``
    when the caller already computed it for this loaded model (hashing a 12 B model takes a while).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts:
        raise ValueError("capture needs at least one prompt")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError("every calibration prompt must be a non-empty string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1 prompt, got {checkpoint_every}")
    _, denoiser = denoiser_of(pipe)
    device = module_device(denoiser)
    groups = list(groups) if groups is not None else compressible_groups(denoiser)
    # every diffusers scheduler config has it; 1000 is diffusers' own default for the few that omit it
    num_train_timesteps = int(pipe.scheduler.config.get("num_train_timesteps", 1000))
    sites = list(dict.fromkeys([*sites_for(groups), *extra_sites]))
    model_hash = model_hash or model_content_hash(denoiser)
    conditioning = hooked_conditioning_sites(denoiser, sites)
    grid = timestep_grid(num_train_timesteps, timestep_grid_points) if conditioning else []
    fingerprint = capture_fingerprint(denoiser, prompts, sampler, sites, num_buckets, batch_size, pipe.scheduler, model_hash,
                                      len(grid))
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    stats, done, calls = _resume_point(checkpoint, fingerprint, device) if checkpoint else (None, 0, 0)
    recorder = ActivationRecorder(denoiser, sites, num_buckets, num_train_timesteps, stats=stats,
                                  timestep_scale=adapter_for(denoiser).TIMESTEP_SCALE,
                                  conditioning_sites=conditioning if grid else ())
    recorder.calls = calls
    batches_per_checkpoint = max(1, math.ceil(checkpoint_every / batch_size))
    with recorder, _quiet_pipeline(pipe), torch.inference_mode():
        bar = tqdm(total=len(prompts), initial=done, desc="capture", unit="prompt", disable=not progress)
        for index, batch in enumerate(_batches(prompts[done:], batch_size), 1):
            recorder.keep_call = bool(grid)
            pipe(**sampler.pipe_kwargs(pipe, batch), output_type="latent")
            recorder.record_grid(grid)  # the batch's pooled conditions at every grid timestep
            done += len(batch)
            bar.update(len(batch))
            if checkpoint is not None and index % batches_per_checkpoint == 0 and done < len(prompts):
                partial = Capture(recorder.stats, {"checkpoint": {"fingerprint": fingerprint, "done": done,
                                                                  "denoiser_calls": recorder.calls}})
                partial.check_finite(f"capture after {done} prompts")
                partial.save(checkpoint)
        bar.close()
    hashes = [prompt_hash(p) for p in prompts]
    metadata = {
        "model_id": model_id,
        "model_hash": model_hash,
        "denoiser_class": type(denoiser).__name__,
        "scheduler": {"class": type(pipe.scheduler).__name__, "config": _jsonable(_scheduler_config(pipe.scheduler))},
        "num_inference_steps": sampler.num_inference_steps,
        "guidance_scale": sampler.guidance_scale,
        "height": sampler.height,
        "width": sampler.width,
        "seed": sampler.seed,
        "bucket_edges": recorder.edges,
        "num_prompts": len(prompts),
        "prompt_hashes": sorted(hashes),
        "prompts_digest": prompts_digest_from_hashes(hashes),
        "denoiser_calls": recorder.calls,
        "site_tokens": dict(recorder.site_tokens),
        "call": recorder.call,
        "conditioning": {"sites": sorted(recorder.conditioning_sites), "timestep_grid": len(grid),
                         "timesteps": "uniform over [0, num_train_timesteps)"} if grid else None,
        "dtype": fingerprint["dtype"],
        "device_type": device.type,
    }
    result = Capture(recorder.stats, metadata)
    result.check_finite()
    return result


def _scheduler_config(scheduler) -> dict:
    """The scheduler's settings; diffusers' ``_use_default_values`` is dropped: it lists a set, in an order that
    changes from process to process, so a checkpoint or shard written by another process would never match."""
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
