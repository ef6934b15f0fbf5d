#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job end to end on the real sample data:
# ingest both datasets into a fresh store and print the cohort.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${STIMAGE_VENV:-.venv}"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
STORE="${STIMAGE_STORE:-store}"
SE="$VENV/bin/stimage-embed"
"$SE" ingest her2st --store "$STORE"
"$SE" ingest stutility_mob --store "$STORE"
"$SE" info --store "$STORE"
"$SE" query --store "$STORE" "SELECT dataset, slide_id, patient, COUNT(*) AS spots, SUM(passes_qc::INT) AS pass_qc FROM spots JOIN slides USING (slide_id) GROUP BY ALL ORDER BY slide_id"
