"""Issue 14 benchmark: a cold full ``compare`` against one embedding pass, side by side in
one run on a copy of a store that already holds every backbone's vectors.

1. ``embed`` of the first backbone over all the store's slides with ``overwrite=True`` (the
   default Macenko stain): one embedding pass, the reference;
2. ``compare`` cold: every backbone, every head (nb, ensemble, highlow, ridge, mean,
   fstimage), leave-one-slide-out per dataset, ``var:50``: nothing in the store yet;
3. the shuffled-vector leak control added on top (only its runs are new);
4. ``compare`` warm (everything reused).

Prints the wall seconds and the ratios compare / embedding pass, and with ``--profile N``
the top ``N`` functions of the cold compare by cumulative time (cProfile).

    python benchmarks/bench_compare.py --store STORE \\
        [--backbones efficientnet_lite0,efficientnet_lite1,efficientnet_lite2] [--profile 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import shutil
import tempfile
from pathlib import Path

import polars as pl
from _common import table, timer

from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="store with ingested slides and embeddings (copied, never modified)")
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--heads", default="nb,ensemble,highlow,ridge,mean,fstimage")
    ap.add_argument("--split", default="loso")
    ap.add_argument("--genes", default="var:50")
    ap.add_argument("--profile", type=int, default=0, help="print the top N functions of the cold compare")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backbones = args.backbones.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store")
        shutil.copytree(
            args.store,
            store.path,
            ignore=shutil.ignore_patterns("runs.lance", "predictions.lance", "metrics.lance", "models"),
        )
        t: dict[str, float] = {}
        with timer(t, "embed"):
            rep = embed(store, [backbones[0]], overwrite=True, progress=False)
        tiles = rep.tiles
        cfg = CompareConfig(backbones=backbones, heads=args.heads.split(","), split=args.split, genes=args.genes)
        prof = cProfile.Profile() if args.profile else None
        with timer(t, "cold"):
            if prof:
                prof.enable()
            cold = compare(store, cfg, progress=False)
            if prof:
                prof.disable()
        cfg.controls = ["shuffled"]
        with timer(t, "control"):
            ctrl = compare(store, cfg, progress=False)
        with timer(t, "warm"):
            warm = compare(store, cfg, progress=False)
    e = t["embed"]
    rows = [
        (f"embedding pass ({backbones[0]}, all slides)", "-", f"{e:.1f}", "1.00"),
        ("compare cold (all runs computed)", cold.computed, f"{t['cold']:.1f}", f"{t['cold'] / e:.2f}"),
        ("+ shuffled leak control (its runs)", ctrl.computed, f"{t['control']:.1f}", f"{t['control'] / e:.2f}"),
        ("compare warm (all reused)", warm.reused, f"{t['warm']:.1f}", f"{t['warm'] / e:.2f}"),
    ]
    print(
        f"compare {args.split} {args.genes}: backbones {args.backbones}; heads {args.heads}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}" + (f"; {tiles} tiles embedded" if tiles else "")
    )
    print(table(rows, ("step", "runs", "seconds", "/ embedding pass")))
    print(
        f"compare cold / one embedding pass = {t['cold'] / e:.2f}; with the leak control "
        f"{(t['cold'] + t['control']) / e:.2f} (the control adds {t['control'] / t['cold']:.0%})"
    )
    board = cold.leaderboard.select("dataset", "backbone", "head", "pcc_mean", "mse_mean", "auc_mean")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=3):
        print("leaderboard of the cold compare (mean per-slide PCC, MSE; AUC for highlow):")
        print(board.sort("dataset", "pcc_mean", descending=[False, True], nulls_last=True))
    if prof:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(args.profile)
        print(s.getvalue())


if __name__ == "__main__":
    main()
