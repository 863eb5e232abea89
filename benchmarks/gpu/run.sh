#!/usr/bin/env bash
# The GPU benchmark, one script (at most ~9 minutes on one H100/H200): the CUDA tests (every device-parametrised
# test: engine, device, families, latency, the real-size stages), then the main job's stages on the reference model
# on CUDA (benchmarks/gpu/job.py: each stage's time and peak host/GPU memory against slimdiff.pipeline.memory's prediction),
# then the whole compression of an SD 1.5-shaped pipeline (benchmarks/gpu/sd15.py: the tied --latency 0.7 plan's
# measured speed-up with padded attention), then one real-width Flux double and single block
# (benchmarks/gpu/flux_block.py). Time limits: CUDA tests TESTS_TIMEOUT (default 120 s), job.py JOB_TIMEOUT (150 s),
# sd15.py BENCH_TIMEOUT (240 s), flux_block.py FLUX_TIMEOUT (60 s): at most 570 s, inside one 600 s device call.
# Writes gpu.json, gpu_job.json, flux_block.json (each with its command, the machine and the code version), the docs
# page rendered from them and the test log to $OUT (the device tool's folder) or, without it, into the repository
# (benchmarks/results/, docs/benchmarks-gpu.md). Re-render the page later from the results files alone:
# .venv/bin/python -m benchmarks.pages gpu_sd15 gpu_job gpu_flux_block
#
#   bash benchmarks/gpu/run.sh            # on a CUDA machine
#   bash benchmarks/gpu/run.sh --smoke    # tiny pipeline on whatever device there is (CI runs this on CPU)
#   SKIP_CUDA_TESTS=1 BENCH_TIMEOUT=240 bash benchmarks/gpu/run.sh --capture-budget 45   # extra args go to sd15.py
#
# Python: $PYTHON, else .venv/bin/python, else python3. Wheels in .whl/ are installed into /tmp/site when diffusers
# is missing. The device image lacks diffusers and datasets (the curate stage) and their small dependencies; fetch
# them here before a device call (the device tool's README: pip download --no-deps --only-binary=:all:
# --python-version 3.12 ... -d .whl diffusers==0.42.1 datasets dill multiprocess), carry .whl.
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
# each script records its own command line in its results file; this records what started them
export BENCHMARK_LAUNCHER="bash benchmarks/gpu/run.sh${*:+ $*}"

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
  timeout "${TESTS_TIMEOUT:-120}" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_engine.py tests/test_device.py \
    tests/test_families.py tests/test_latency.py tests/test_real_size.py 2>&1 | tee "$LOG" | tail -15
  status=${PIPESTATUS[0]}
  echo "cuda tests: exit $status"
else
  echo "no CUDA device: CUDA tests skipped"
fi
# the main job's stages on the reference model on CUDA, each stage's memory against the prediction (issue 21)
JOB_JSON=$(dirname "$JSON")/gpu_job.json
timeout "${JOB_TIMEOUT:-150}" "$PY" -u benchmarks/gpu/job.py $SMOKE --out "$JOB_JSON" ${DOC:+--doc "$DOC"} || status=$?
timeout "${BENCH_TIMEOUT:-240}" "$PY" -u benchmarks/gpu/sd15.py $SMOKE --out "$JSON" --doc "$DOC" "$@" || status=$?
# one real-width Flux double + single block: original vs compressed latency (issue 12); its section goes after sd15's
FLUX_JSON=$(dirname "$JSON")/flux_block.json
timeout "${FLUX_TIMEOUT:-60}" "$PY" -u benchmarks/gpu/flux_block.py $SMOKE --out "$FLUX_JSON" --doc "$DOC" || status=$?
exit $status
