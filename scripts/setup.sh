#!/usr/bin/env bash
# Create .venv at the repository root and install slimdiff with its stack.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that no
# multi-GB CUDA build is pulled in by the dependency resolver.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    .venv/bin/pip install -q torch==2.13.0
  fi
fi
TORCH_VERSION=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])")
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION}" > "$CONSTRAINTS"
# the distributed capture's engine (docs/distributed.md): pure-Python wheels, pinned so that they never move torch,
# prefect or mlflow (checked with pip install --dry-run: they add only dask, distributed and small helpers)
printf '%s\n' "dask==2026.8.0" "distributed==2026.8.0" "prefect-dask==0.3.7" >> "$CONSTRAINTS"
# uv resolves in seconds; pip is the fallback. Either way torch stays the build installed above.
# Bytecode is compiled at install: these machines set PYTHONDONTWRITEBYTECODE=1 and uv compiles nothing by default, so
# every process (a job starts about ten: the flow, DVC, each stage) compiled diffusers and transformers from source
# again, about 5 s each (stage start-up 11-16 s -> 7-9 s here).
if .venv/bin/pip install -q uv 2>/dev/null; then
  .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python -c "$CONSTRAINTS" -e ".[dev]"
else
  .venv/bin/pip install -q -c "$CONSTRAINTS" -e ".[dev]"
fi
# a .venv made before that: compile once (a few files written for Python 3.12 only fail to compile and are never
# imported here, as pip's own compile step ignores them)
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -d "$SITE/diffusers/__pycache__" ]; then
  .venv/bin/python -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
fi
