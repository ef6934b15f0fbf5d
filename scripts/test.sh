#!/usr/bin/env bash
# Set up (scripts/setup.sh), run the whole test suite on the real data in ../shared/data, then
# check the built wheel in a fresh venv (scripts/test_wheel.sh; STIMAGE_SKIP_WHEEL=1 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${STIMAGE_VENV:-.venv}"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
"$VENV/bin/python" -m pytest -q "$@"
if [ -z "${STIMAGE_SKIP_WHEEL:-}" ] && [ "$#" -eq 0 ]; then
  STIMAGE_VENV="$VENV" bash scripts/test_wheel.sh
fi
