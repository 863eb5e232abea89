#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
# One test file per worker (files share module-scoped fixtures), slow files first, one worker per core
# (SLIMDIFF_TEST_WORKERS=N sets the count; one more than the cores measured 29 s faster here, 11:49 against 12:18,
# but a tracking server then missed the preflight's reachability timeout once).
WORKERS=${SLIMDIFF_TEST_WORKERS:-auto}
exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
