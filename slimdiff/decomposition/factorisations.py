"""What the score stage computed that the decompose stage needs: one factorisation per group, shared.

Scoring decomposes every group at every width (it needs the whole spectrum); decomposing the model needs the same
factorisation at one width per group. Recomputing it there doubles the dominant cost at real widths (an FFN's
eigendecomposition: ~400 s in float64 on this CPU at FLUX.1-dev's 12288 channels). A ``FactorisationStore`` keeps,
per group, exactly what applying any candidate width needs:

- QK, VO and adaLN: the per-head (or single) factors, in the model's dtype (the compressed weights are slices of
  them cast to that dtype, so nothing is lost), and the singular values in float64 (the predicted errors);
- FFN: the kept channels at every candidate width (one bit per channel and width); the down projection's
  closed-form correction is one solve at the planned width, from the capture.

An entry is named by the digest of everything that decides it: the capture's identity (model hash, prompts,
sampler, buckets), the group, the regularisation, the dtype and the source of the decomposition code. A store is
a folder per capture; opening it for another capture removes the folders of older captures.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from slimdiff.arch import ModuleGroup
from slimdiff.decomposition.closed_form import (
    FFNDecomposition,
    QKDecomposition,
    VODecomposition,
    regularize,
)
from slimdiff.decomposition.groups import Decomposition
from slimdiff.files import atomic_path, stream_safetensors
from slimdiff.statistics.sums import Capture

STORE_FORMAT = "slimdiff-factorisation/1"

# what decides a capture's statistics (the store's folder)
_CAPTURE_KEYS = ("model_hash", "denoiser_class", "prompts_digest", "num_inference_steps", "guidance_scale", "height",
                 "width", "seed", "bucket_edges", "denoiser_calls", "dtype", "scheduler", "shards")

_CODE = ("closed_form.py", "groups.py", "apply.py", "factorisations.py")


def capture_identity(capture: Capture) -> str:
    """Digest of what decided a capture's statistics (its metadata, not its bytes: a lazily opened capture is not read)."""
    payload = {k: capture.metadata.get(k) for k in _CAPTURE_KEYS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _code_digest() -> str:
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _CODE:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()


class FactorisationStore:
    """One folder of entries for one capture: ``put`` after scoring a group, ``get`` before applying it."""

    def __init__(self, root: str | Path, capture: Capture, reg: float, dtype: torch.dtype):
        self.root = Path(root)
        self.capture_id = capture_identity(capture)
        self.folder = self.root / self.capture_id[:32]
        self.reg, self.dtype = float(reg), dtype
        self._code = _code_digest()
        self.reads = 0  # entries ``get`` returned (what was not recomputed)

    def clear_others(self) -> list[Path]:
        """Remove the folders of other captures (what an earlier job left); returns them."""
        removed = []
        if self.root.is_dir():
            for path in self.root.iterdir():
                if path.is_dir() and path != self.folder:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def key(self, group: ModuleGroup) -> str:
        payload = {"format": STORE_FORMAT, "capture": self.capture_id, "group": group.name, "kind": group.kind,
                   "width": group.width, "reg": self.reg, "dtype": str(self.dtype), "code": self._code}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def path(self, group: ModuleGroup) -> Path:
        return self.folder / f"{self.key(group)}.safetensors"

    def __contains__(self, group: ModuleGroup) -> bool:
        return self.path(group).is_file()

    def nbytes(self) -> int:
        """Bytes on disk of this capture's entries."""
        return sum(p.stat().st_size for p in self.folder.glob("*.safetensors")) if self.folder.is_dir() else 0

    def put(self, group: ModuleGroup, decomposition: Decomposition, widths: Sequence[int] = ()) -> Path:
        """Record ``decomposition`` of ``group`` (an FFN's: its channel sets at ``widths``), atomically."""
        info = {"format": STORE_FORMAT, "group": group.name, "kind": group.kind, "key": self.key(group)}
        if isinstance(decomposition, FFNDecomposition):
            sets = decomposition.channel_sets(widths)
            full = decomposition.full_width
            masks = np.zeros((len(sets), full), dtype=bool)
            for row, width in enumerate(sets):
                masks[row, sets[width].cpu().numpy()] = True
            tensors = {"widths": torch.tensor(list(sets), dtype=torch.int64),
                       "masks": torch.from_numpy(np.packbits(masks, axis=1))}
            info.update(rank=decomposition.rank, full_width=full)
        else:
            first, second = ((decomposition.q_factors, decomposition.k_factors) if isinstance(decomposition, QKDecomposition)
                             else (decomposition.v_factors, decomposition.o_factors))
            tensors = {"first": first.to(self.dtype), "second": second.to(self.dtype),
                       "singular_values": decomposition.singular_values.to(torch.float64)}
            info.update(method=decomposition.method, exact=bool(decomposition.exact),
                        family="qk" if isinstance(decomposition, QKDecomposition) else "vo")
        layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
        path = self.path(group)
        with atomic_path(path) as tmp:
            stream_safetensors(tmp, layout, tensors.__getitem__, {"slimdiff": json.dumps(info, sort_keys=True)})
        return path

    def get(self, group: ModuleGroup, cov_hidden: Tensor | None = None, w_down: Tensor | None = None,
            device: torch.device | str = "cpu", widths: Sequence[int] = ()) -> Decomposition | None:
        """The recorded decomposition of ``group`` on ``device``, or None when there is none (or it is unreadable, or
        an FFN's lacks channel sets at some of ``widths``: said in one line, then recomputed by the caller). An FFN
        needs its hidden covariance (unregularised) and down projection (X W layout), which the capture and the
        model hold."""
        from safetensors import SafetensorError, safe_open

        path = self.path(group)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                info = json.loads((handle.metadata() or {}).get("slimdiff", "{}"))
                if info.get("key") != self.key(group):
                    raise ValueError(f"entry of another group or setting ({info.get('group')!r})")
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as error:
            print(f"factorisations: not using {path} ({str(error).splitlines()[0][:120]}); recomputing {group.name}",
                  file=sys.stderr)
            return None
        if info["kind"] in ("ffn", "ffn_single"):
            if cov_hidden is None or w_down is None:
                raise ValueError(f"{group.name}: applying recorded channel sets needs the hidden covariance and down projection")
            missing = sorted(set(int(w) for w in widths) - set(tensors["widths"].tolist()))
            if missing:
                print(f"factorisations: {path} has no channel set at {len(missing)} of the widths needed (e.g. "
                      f"{missing[0]}); recomputing {group.name}", file=sys.stderr)
                return None
            masks = np.unpackbits(tensors["masks"].cpu().numpy(), axis=1, count=int(info["full_width"])).astype(bool)
            chosen = {int(w): torch.from_numpy(np.flatnonzero(row)).to(device)
                      for w, row in zip(tensors["widths"].tolist(), masks)}
            self.reads += 1
            return FFNDecomposition(regularize(cov_hidden, self.reg), w_down.to(torch.float64), None, None, int(info["rank"]),
                                    chosen)
        cls = QKDecomposition if info["family"] == "qk" else VODecomposition
        self.reads += 1
        return cls(tensors["first"], tensors["second"], tensors["singular_values"], info["method"], bool(info["exact"]))


def store_for(root: str | Path | None, capture: Capture, reg: float, denoiser: nn.Module) -> FactorisationStore | None:
    """A store under ``root`` for this capture in the model's dtype (None without a root)."""
    if root is None:
        return None
    dtype = next((p.dtype for p in denoiser.parameters() if p.is_floating_point()), torch.float32)
    return FactorisationStore(root, capture, reg, dtype)
