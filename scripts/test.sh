#!/usr/bin/env bash
# Set up .venv (if needed) and run the test suite, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
exec .venv/bin/python -m pytest -q "$@"
