#!/usr/bin/env bash
# Set up .venv (if needed) and run the main job on the embedded default: the compress flow over the
# DVC stages on the reference model (params.yaml), tracked and registered in the local MLflow.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/offline-env.sh
export PREFECT_HOME=${PREFECT_HOME:-$PWD/.prefect}
exec .venv/bin/python -m flows.compress --workspace . "$@"
