"""Issue 5 benchmark: wall time of a full ``compare`` from the cache, cold (nothing in the
store) and warm (re-run: every run reused), measured side by side in one run on a copy of
a store that already holds the vectors.

    python benchmarks/bench_compare.py --store STORE \\
        --backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2 \\
        --heads nb,ensemble,highlow,ridge,mean,fstimage --split loso --genes var:50
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from _common import table, timer
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="store with ingested slides and embeddings (copied, never modified)")
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--heads", default="nb,ensemble,highlow,ridge,mean,fstimage")
    ap.add_argument("--split", default="loso")
    ap.add_argument("--genes", default="var:50")
    ap.add_argument("--dataset", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        shutil.copytree(args.store, store.path, ignore=shutil.ignore_patterns("runs.lance", "predictions.lance", "metrics.lance", "models"))
        cfg = CompareConfig(backbones=args.backbones.split(","), heads=args.heads.split(","), split=args.split, genes=args.genes,
                            datasets=args.dataset.split(",") if args.dataset else None)
        t: dict[str, float] = {}
        with timer(t, "cold"):
            cold = compare(store, cfg, progress=False)
        with timer(t, "warm"):
            warm = compare(store, cfg, progress=False)
        metric_rows = store.table("metrics").count_rows()
        rows = [
            ("cold (all runs computed)", cold.computed, f"{t['cold']:.1f}", f"{cold.computed / t['cold']:.2f}"),
            ("warm (all runs reused)", warm.reused, f"{t['warm']:.1f}", "-"),
        ]
        print(f"compare {args.split} {args.genes}: backbones {args.backbones}; heads {args.heads}")
        print(table(rows, ("pass", "runs", "seconds", "runs/s")))
        print(f"cold / warm = {t['cold'] / t['warm']:.1f}x; metric rows written: {metric_rows}")


if __name__ == "__main__":
    main()
