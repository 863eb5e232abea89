#!/usr/bin/env bash
# The GPU benchmark, one script (at most ~8 minutes on one H100/H200): the CUDA tests, then the whole
# compression of an SD 1.5-shaped pipeline (benchmarks/gpu/sd15.py), then one real-width Flux double and
# single block (benchmarks/gpu/flux_block.py). Time limits: CUDA tests 150 s, sd15.py BENCH_TIMEOUT (default
# 360 s), flux_block.py FLUX_TIMEOUT (default 75 s): at most 585 s, inside one 600 s device call. Writes gpu.json,
# flux_block.json, the rendered docs page and the test log to $OUT (the device tool's folder) or, without it,
# into the repository (benchmarks/results/, docs/benchmarks-gpu.md).
#
#   bash benchmarks/gpu/run.sh            # on a CUDA machine
#   bash benchmarks/gpu/run.sh --smoke    # tiny pipeline on whatever device there is (CI runs this on CPU)
#   SKIP_CUDA_TESTS=1 BENCH_TIMEOUT=240 bash benchmarks/gpu/run.sh --capture-budget 45   # extra args go to sd15.py
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels in .whl/ (diffusers and the two small
# packages it needs beyond a stock CUDA image) are installed into /tmp/site when diffusers is missing.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import diffusers" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "run.sh: diffusers is not installed for $PY and there are no wheels in .whl/" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
source scripts/offline-env.sh
export PYTHONUNBUFFERED=1

if [ -n "${OUT:-}" ]; then
  JSON=$OUT/gpu.json; DOC=$OUT/benchmarks-gpu.md; LOG=$OUT/gpu_tests.log
else
  JSON=benchmarks/results/gpu.json; DOC=docs/benchmarks-gpu.md; LOG=/dev/null
fi
SMOKE=""
if [ "${1:-}" = "--smoke" ]; then
  SMOKE=--smoke; JSON=${OUT:-/tmp}/gpu-smoke.json; DOC=""
  shift
fi

status=0
if [ -n "${SKIP_CUDA_TESTS:-}" ]; then
  echo "CUDA tests skipped (SKIP_CUDA_TESTS set)"
elif "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"
  timeout 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_engine.py tests/test_device.py 2>&1 | tee "$LOG" | tail -15
  status=${PIPESTATUS[0]}
  echo "cuda tests: exit $status"
else
  echo "no CUDA device: CUDA tests skipped"
fi
timeout "${BENCH_TIMEOUT:-360}" "$PY" -u benchmarks/gpu/sd15.py $SMOKE --out "$JSON" --doc "$DOC" "$@" || status=$?
# one real-width Flux double + single block: original vs compressed latency (issue 12); its section goes after sd15's
FLUX_JSON=$(dirname "$JSON")/flux_block.json
timeout "${FLUX_TIMEOUT:-75}" "$PY" -u benchmarks/gpu/flux_block.py $SMOKE --out "$FLUX_JSON" --doc "$DOC" || status=$?
exit $status
