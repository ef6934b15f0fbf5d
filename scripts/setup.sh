#!/usr/bin/env bash
# Set up everything on a fresh machine that has python3 and pip: a virtualenv in .venv
# (or $STIMAGE_VENV), a matched torch/torchvision pair first (so nothing pulls another
# torch), then this package with its test and distributed (Ray, object storage) extras.
# Idempotent: re-running is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STIMAGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
# x86_64 default; on aarch64 use: TORCH_SPEC="torch==2.9.1 torchvision==0.24.1"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC"
  "${PIP[@]}" install -q $TORCH_SPEC
fi
echo "[setup] installing stimage-embed and its dependencies"
# the torch pair installed above is pinned (constraints) so no extra can replace it
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -m pip freeze --disable-pip-version-check | grep -iE "^(torch|torchvision)==" > "$CONSTRAINTS" || true
"${PIP[@]}" install -q -c "$CONSTRAINTS" -e ".[test,distributed]" 2> >(grep -v "^WARNING: Location" >&2)
"$VENV/bin/python" -c "import torch, torchvision, timm, lancedb, duckdb, openslide, ray, lance_ray, boto3, moto; print('[setup] ok: torch', torch.__version__, '| timm', timm.__version__, '| lancedb', lancedb.__version__, '| duckdb', duckdb.__version__, '| ray', ray.__version__)"

# --- viewer browser tests (`stimage-embed view`): Debian's headless Chromium + its driver ---
# Only as root and only when missing; elsewhere the browser test skips (it fails under CI=true).
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 \
   && ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }; then
  echo "[setup] installing chromium and chromium-driver (apt) for the viewer's browser test"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi
# --- end viewer block ---
