"""The capture's sums (``SiteStats``, ``Capture``): the file format, its validation, merging, and lazy reading one site
at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from slimdiff.files import atomic_path, stream_safetensors
from slimdiff.runtime.sampling import prompts_digest_from_hashes
from slimdiff.statistics.kernels import _add_in_rows, _all_finite

CAPTURE_FORMAT = "slimdiff-capture/2"


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


def statistics_bytes(dims: Sequence[int], num_buckets: int, bucket_bytes: int = 4) -> int:
    """Bytes of the statistics of sites with input widths ``dims``: float64 pooled sums plus per-bucket sums."""
    pooled = sum(8 * (d * d + 2 * d) for d in dims)  # sum x x^T, sum x, sum |x|
    per_bucket = 0 if num_buckets == 1 else sum(bucket_bytes * num_buckets * (d * d + d) for d in dims)
    return pooled + per_bucket + 8 * num_buckets * len(dims)


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
    "model_id", "model_hash", "denoiser_class", "scheduler", "num_inference_steps", "guidance_scale", "guidance_argument",
    "max_sequence_length", "height", "width", "seed", "bucket_edges", "site_tokens",
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


class _LazySites(Mapping):
    """Sites of a capture file, each read from disk when asked for (nothing is kept).

    Opening checks what ``Capture.load`` checks, from the header alone (no tensor is read): the file is there,
    readable and fully covered by its tensors, a capture in this slimdiff's format, and every site's parts are
    present with consistent shapes, dtypes and bucket counts. A damaged file fails here with ``Capture.load``'s
    one line, not half-way through a decomposition."""

    def __init__(self, path: Path, device: torch.device | str):
        from safetensors import SafetensorError, safe_open

        self.path, self.device = path, device
        if not path.is_file():
            raise FileNotFoundError(f"capture file not found: {path}")
        self._stamp = _file_stamp(path)
        layout: dict[str, dict[str, torch.Tensor]] = {}
        try:
            with safe_open(str(path), framework="pt") as handle:  # refuses a file its tensors do not exactly cover
                header = capture_header(path, handle)
                for key in handle.keys():
                    site, _, part = key.rpartition("|")
                    layout.setdefault(site, {})[part] = _meta_tensor(path, key, handle.get_slice(key))
        except (SafetensorError, json.JSONDecodeError, OSError) as error:
            raise unreadable_capture(path, error) from None
        if not layout:
            raise ValueError(f"{path}: the capture holds no statistics")
        for site, parts in layout.items():
            check_site_parts(path, site, parts)
        self.metadata: dict = header.get("metadata", {})
        check_buckets(path, {int(parts["count"].shape[0]) for parts in layout.values()}, self.metadata)
        self._keys = {site: list(parts) for site, parts in layout.items()}

    def __getitem__(self, site: str) -> SiteStats:
        from safetensors import SafetensorError, safe_open

        if site not in self._keys:
            raise KeyError(site)
        try:
            if _file_stamp(self.path) != self._stamp:
                raise ValueError(f"{self.path}: site {site}: the capture file changed since it was opened; re-run the stage")
            with safe_open(str(self.path), framework="pt", device=str(self.device)) as handle:
                parts = {part: handle.get_tensor(f"{site}|{part}") for part in self._keys[site]}
        except (SafetensorError, OSError) as error:
            raise unreadable_capture(self.path, error, site) from None
        return _site_stats(self.path, site, parts)

    def __contains__(self, site: object) -> bool:
        return site in self._keys  # from the index: Mapping's own __contains__ would read the site

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# safetensors' dtype names -> torch's: any a file may hold, so that a wrong dtype is named as Capture.load names it
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
                       "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _file_stamp(path: Path) -> tuple[int, int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns, status.st_ino


def _meta_tensor(path: Path, key: str, piece) -> torch.Tensor:
    """A tensor of the stored shape and dtype on the meta device (no data): what the layout checks read."""
    dtypes = {name: getattr(torch, dtype) for name, dtype in _SAFETENSORS_DTYPES.items() if hasattr(torch, dtype)}
    name = piece.get_dtype()
    if name not in dtypes:
        raise ValueError(f"{path}: {key} holds {name} values, no capture part does; the file is corrupt, re-run the capture")
    return torch.empty(tuple(piece.get_shape()), dtype=dtypes[name], device="meta")


def open_capture(path: str | Path, device: torch.device | str = "cpu") -> Capture:
    """A ``Capture`` whose sites are read from ``path`` onto ``device`` one at a time, on access: a decomposition
    asks for one group's statistics at a time (``group_statistics``) and holds only those (``Capture.load`` reads
    every site at once). Membership (``in``) and ``num_buckets`` read no site. A missing, truncated, corrupt,
    foreign or inconsistent file fails here, with the one line ``Capture.load`` gives for it."""
    sites = _LazySites(Path(path), device)
    return Capture(sites, sites.metadata)  # type: ignore[arg-type]
