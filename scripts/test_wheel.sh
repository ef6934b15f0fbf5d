#!/usr/bin/env bash
# Build the wheel, install it (non-editable) into a fresh virtualenv, and run a small
# ingest -> embed -> compare flow from it (HER2ST C4 and C5: leave-one-slide-out needs two),
# outside the checkout (so nothing can be read from
# the source tree: catalogs must come from the wheel).
#
# The fresh venv sees the project venv's packages through a .pth line (torch is never
# reinstalled; nothing is downloaded: --no-index), but its own site-packages come first, so
# `import stimage_embed` is the wheel's copy (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STIMAGE_VENV:-.venv}"
PY="$(cd "$VENV" && pwd)/bin/python"
DATA="${STIMAGE_DATA_ROOT:-$(cd .. && pwd)/shared/data}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "[wheel] building (from a copy of the tracked and new files: the tree stays clean)"
mkdir "$WORK/src"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$WORK/src"
"$PY" -m build --wheel --no-isolation --skip-dependency-check --outdir "$WORK/dist" "$WORK/src" > "$WORK/build.log" 2>&1 \
  || { tail -20 "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/*.whl)"
"$PY" -c "import sys, zipfile; sys.exit('stimage_embed/catalogs/datasets/her2st.yaml' not in zipfile.ZipFile(sys.argv[1]).namelist())" "$WHEEL" \
  || { echo "[wheel] catalogs missing"; exit 1; }
"$PY" -c "import sys, zipfile; d = 'stimage_embed/viewer/static/'; sys.exit(not {d + f for f in ('index.html', 'viewer.js', 'openseadragon/openseadragon.min.js', 'openseadragon/LICENSE.txt', 'openseadragon/VERSION')} <= set(zipfile.ZipFile(sys.argv[1]).namelist()))" "$WHEEL" \
  || { echo "[wheel] viewer files (page, OpenSeadragon, its licence and version) missing"; exit 1; }

echo "[wheel] installing $(basename "$WHEEL") into a fresh venv"
BASE="$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
"$BASE" -m venv "$WORK/venv"
SITE_NEW="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
SITE_OLD="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$SITE_OLD" > "$SITE_NEW/project-venv.pth"
"$WORK/venv/bin/python" -m pip install -q --no-index --no-deps --disable-pip-version-check "$WHEEL"
"$WORK/venv/bin/python" -m pip check --disable-pip-version-check > "$WORK/check.log" 2>&1 || { grep -i stimage "$WORK/check.log" && exit 1 || true; }

cd "$WORK"  # outside the checkout
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg STIMAGE_DATA_ROOT="$DATA"
unset PYTHONPATH STIMAGE_CATALOGS
"$WORK/venv/bin/python" - <<'PY'
import stimage_embed, stimage_embed.heads, heads
from stimage_embed.paths import catalogs_dir
assert "/venv/" in stimage_embed.__file__, stimage_embed.__file__
assert (catalogs_dir() / "datasets" / "her2st.yaml").is_file(), catalogs_dir()
assert stimage_embed.heads.NBRegressor is heads.NBRegressor
print("[wheel] imports from", stimage_embed.__file__, "; catalogs from", catalogs_dir())
PY
SE="$WORK/venv/bin/stimage-embed"
echo "[wheel] flow from the wheel: ingest her2st C4, C5 -> embed -> compare (leave-one-slide-out needs two)"
"$SE" ingest her2st --slide C5 --slide C4 --store store > ingest.log
"$SE" embed --store store --precision float32 > embed.log 2>&1
"$SE" compare --store store --heads ridge,mean --genes var:10 > compare.log 2>&1 || { tail -5 compare.log; exit 1; }
grep -q "ridge" compare.log
echo "[wheel] ok: $(grep -m1 "computed" compare.log)"
