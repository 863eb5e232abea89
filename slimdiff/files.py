"""Files: atomic writes, JSON artifacts and a streaming safetensors writer."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from slimdiff.failpoints import kill_point


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes it 0600: give the artifact the mode a plain open() would
            os.chmod(tmp_path, 0o666 & ~_umask())
        kill_point(f"writing {path.as_posix()}")
        os.replace(tmp_path, path)
        kill_point(f"wrote {path.as_posix()}")
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, else it is removed."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: give it the mode a plain mkdir would
        kill_point(f"writing {path.as_posix()}")
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        kill_point(f"wrote {path.as_posix()}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data) -> Path:
    """Write JSON atomically (sorted keys, indented)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def read_json_artifact(path: str | Path, expected_format: str, what: str) -> dict[str, Any]:
    """A JSON artifact written by slimdiff; fails naming the file when it is missing, not JSON, or of another format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); the {what} file is damaged, re-run the step that writes it") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: unknown {what} format {found!r}, expected {expected_format!r}")
    return data


@contextmanager
def complete_artifact(path: str | Path, what: str) -> Iterator[None]:
    """Turn a missing key or a wrong type met while building an object from a JSON artifact into one line naming the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a complete {what} ({type(error).__name__}: {error}); the file is damaged, "
                         "re-run the step that writes it") from None


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}

# host bytes one tensor passes through at a time while it is written (a device tensor is copied chunk by chunk)
STREAM_CHUNK_BYTES = 64 << 20


def stream_safetensors(path: str | Path, layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                       tensor_of: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor: the header first (``layout``: name, dtype, shape of each tensor, in
    file order), then each tensor as ``tensor_of(name)`` returns it, on any device, copied to the host in chunks of at
    most ``STREAM_CHUNK_BYTES``. Host memory stays one chunk, never the file. The caller writes to a temporary path
    (``atomic_path``)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, dtype, shape in layout:
        size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, dtype, shape in layout:
            tensor = tensor_of(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(int(d) for d in shape):
                raise ValueError(f"{path}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, its header says {dtype} {tuple(shape)}")
            flat = tensor.detach().contiguous().reshape(-1)
            step = max(1, STREAM_CHUNK_BYTES // max(1, flat.element_size()))
            for start in range(0, flat.numel(), step):
                chunk = flat[start:start + step].cpu()
                handle.write(memoryview(chunk.view(torch.uint8).numpy()))
            del tensor, flat
        handle.flush()
        os.fsync(handle.fileno())


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count
