#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
# One test file per worker (files share module-scoped fixtures), slow files first; one worker more than the cores:
# the end-to-end files spend a quarter of their time waiting on servers and subprocesses (SLIMDIFF_TEST_WORKERS=N
# sets the count).
WORKERS=${SLIMDIFF_TEST_WORKERS:-$(( $(nproc) + 1 ))}
exec .venv/bin/python -m pytest -q -n "$WORKERS" --dist loadfile "$@"
