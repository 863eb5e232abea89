#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
# One worker per core, one test file per worker (files share module-scoped fixtures); slow files start first.
exec .venv/bin/python -m pytest -q -n auto --dist loadfile "$@"
