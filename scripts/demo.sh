#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job end to end on the real sample data:
# ingest both datasets, embed every spot with the offline EfficientNet-Lite backbones,
# then compare heads and backbones leave-one-slide-out and write a report.
# STIMAGE_BACKBONES overrides the backbones (comma-separated).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${STIMAGE_VENV:-.venv}"
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
STORE="${STIMAGE_STORE:-store}"
BACKBONES="${STIMAGE_BACKBONES:-efficientnet_lite0,efficientnet_lite1}"
SE="$VENV/bin/stimage-embed"
"$SE" ingest her2st --store "$STORE"
"$SE" ingest stutility_mob --store "$STORE"
"$SE" info --store "$STORE"
"$SE" query --store "$STORE" "SELECT dataset, slide_id, patient, COUNT(*) AS spots, COUNT(*) FILTER (passes_qc) AS pass_qc FROM spots JOIN slides USING (slide_id) GROUP BY ALL ORDER BY slide_id"
"$SE" backbones
"$SE" embed --backbone "$BACKBONES" --store "$STORE"
"$SE" query --store "$STORE" "SELECT e.slide_id, COUNT(*) AS vectors, SUM(s.total_counts)::BIGINT AS umis FROM embeddings_efficientnet_lite0 e JOIN spots s USING (slide_id, spot_id) GROUP BY 1 ORDER BY 1"
HEADS=nb,ensemble,context,highlow,ridge,mean
[[ "$BACKBONES" == *,* ]] && HEADS="$HEADS,fstimage"
"$SE" compare --store "$STORE" --backbones "$BACKBONES" --heads "$HEADS" --split loso --genes var:50 --report reports/compare
echo "report written to reports/compare/report.md"
