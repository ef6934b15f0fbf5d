#!/usr/bin/env bash
# Set up (scripts/setup.sh), lint (ruff check + ruff format --check), check the built wheel in a
# fresh venv (scripts/test_wheel.sh; STIMAGE_SKIP_WHEEL=1 skips it), then run the whole test suite
# on the real data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${STIMAGE_VENV:-.venv}"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
if [ -z "${STIMAGE_SKIP_WHEEL:-}" ] && [ "$#" -eq 0 ]; then
  STIMAGE_VENV="$VENV" bash scripts/test_wheel.sh
fi
exec "$VENV/bin/python" -m pytest -q "$@"
