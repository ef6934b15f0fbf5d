#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the whole test suite on the real data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${STIMAGE_VENV:-.venv}"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
exec "$VENV/bin/python" -m pytest -q "$@"
