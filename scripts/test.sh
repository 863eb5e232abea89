#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
# One test file per worker (files share module-scoped fixtures), the longest files first (tests/conftest.py; xdist
# would reorder files by their number of tests without --no-loadscope-reorder), one worker per core
# (SLIMDIFF_TEST_WORKERS=N sets the count; one more than the cores measured 10:42 against 10:53 here: not worth the
# third process's memory and contention).
WORKERS=${SLIMDIFF_TEST_WORKERS:-auto}
exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
