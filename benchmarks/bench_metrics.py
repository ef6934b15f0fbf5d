"""Issue 5 benchmark: throughput of the metric suite against esda's Moran implementation on
the same data, measured side by side in one run on real HER2ST sections.

Data. If the store holds committed ``compare`` runs of the ``nb`` head for HER2ST with
``--backbone``, their predictions are used (truth = ``log1p(observed / library_size *
1e4)``, prediction = ``mean_log1p``; genes = each run's genes; slides = each run's test
slides). Otherwise: the top-K HVG chosen from the HER2ST slides (``select_genes``), truth =
log1p-normalised raw counts of the QC spots of each slide, prediction = truth plus Gaussian
noise of ``--noise`` x the gene's standard deviation on that slide (seed 0).

Timed (per slide, all genes; a "slide-gene" is one gene on one slide):

* (a) ours: ``morans_i(pred, W)`` + ``bivariate_morans_i(pred, truth, W)`` (vectorised
  over genes), W = ``radius_weights(pixels, 1.2 spot pitches)`` as ``score_run`` builds it;
* (b) esda: ``esda.Moran(pred_g, w, permutations=0)`` and ``esda.Moran_BV(pred_g,
  truth_g, w, permutations=0)`` gene by gene, w = ``libpysal.weights.DistanceBand(pixels,
  threshold=1.2 pitches, binary=True)`` with ``transform = "r"`` (the same graph; checked);
* (c) the whole ``score_run`` suite (pivot of the long predictions, log1p, Pearson,
  Spearman, MSE, MAE, CCC per slide and pooled, Moran, bivariate Moran, spatial IoU).

Building the weights is timed separately for (a) and (b). Each timing is the median of
``--repeats`` runs. Values of (a) and (b) must agree: the max abs difference is printed
(NaN-aware: both NaN counts as agreement, one NaN as a mismatch).

    python benchmarks/bench_metrics.py --store /tmp/demo/store [--genes 250] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
from _common import table
from esda.moran import Moran, Moran_BV
from libpysal.weights import DistanceBand

from stimage_embed.evaluation.metrics import normalise_log1p
from stimage_embed.evaluation.scoring import NEIGHBOUR_RADIUS_PITCHES, score_run
from stimage_embed.evaluation.spatial import bivariate_morans_i, morans_i, radius_weights
from stimage_embed.predictions.genes import select_genes
from stimage_embed.store import Store
from stimage_embed.store.store import sql_list

DATASET = "her2st"


@dataclass
class Block:
    """One slide's data: truth and prediction (n_spots, n_genes) on the log1p scale."""

    slide_id: str
    genes: list[str]
    truth: np.ndarray
    pred: np.ndarray
    xy: np.ndarray  # (n, 2) full-resolution pixels
    radius_px: float


def _median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _geometry(store: Store, slides: list[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    spots = pl.from_arrow(
        store.read(
            "spots",
            ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y", "passes_qc"],
            where=f"slide_id IN ({sql_list(slides)})",
        )
    )
    meta = pl.from_arrow(store.read("slides", ["slide_id", "um_per_px", "spot_pitch_um", "platform"]))
    return spots, meta


def _radius(meta: pl.DataFrame, slide: str) -> float:
    r = meta.filter(pl.col("slide_id") == slide).row(0, named=True)
    return NEIGHBOUR_RADIUS_PITCHES * r["spot_pitch_um"] / r["um_per_px"]


def from_runs(store: Store, backbone: str) -> tuple[list[Block], list[pl.DataFrame], str] | None:
    """Blocks and long prediction frames of committed HER2ST nb runs, or None."""
    if not store.has_table("runs") or not store.has_table("predictions"):
        return None
    runs = store.sql(
        f"SELECT run_id FROM runs WHERE dataset = '{DATASET}' AND head = 'nb' AND backbone = '{backbone}' ORDER BY fold"
    )
    if runs.height == 0:
        return None
    preds = [pl.from_arrow(store.read("predictions", where=f"run_id = '{r}'")) for r in runs["run_id"]]
    slides = sorted({s for p in preds for s in p["slide_id"].unique().to_list()})
    spots, meta = _geometry(store, slides)
    blocks = []
    for p in preds:
        genes = p["gene"].unique(maintain_order=True).to_list()
        for s in sorted(p["slide_id"].unique().to_list()):
            q = p.filter(pl.col("slide_id") == s)

            def wide(c, q=q, genes=genes):
                return (
                    q.pivot(on="gene", index="spot_id", values=c)
                    .sort("spot_id")
                    .select(genes)
                    .to_numpy()
                    .astype(np.float64)
                )

            keys = (
                q.filter(pl.col("gene") == genes[0]).sort("spot_id").join(spots, on=["slide_id", "spot_id"], how="left")
            )
            truth = normalise_log1p(wide("observed"), keys["library_size"].to_numpy())
            blocks.append(
                Block(
                    s, genes, truth, wide("mean_log1p"), keys.select("pixel_x", "pixel_y").to_numpy(), _radius(meta, s)
                )
            )
    return blocks, preds, f"store predictions of {len(preds)} committed nb run(s) ({backbone})"


def from_counts(store: Store, k: int, noise: float) -> tuple[list[Block], list[pl.DataFrame], str]:
    """Blocks from log1p-normalised counts (truth) and a noisy copy (prediction)."""
    slides = store.sql(f"SELECT slide_id FROM slides WHERE dataset = '{DATASET}' ORDER BY slide_id")[
        "slide_id"
    ].to_list()
    keys, all_genes, counts, lib = store.expression_matrix(slides)
    genes = select_genes(f"hvg:{k}", counts, all_genes, keys["slide_id"].to_numpy(), slides, library_size=lib)
    col = {g: i for i, g in enumerate(all_genes)}
    raw = counts[:, [col[g] for g in genes]].toarray()
    spots, meta = _geometry(store, slides)
    keys = keys.with_columns(pl.Series("_row", np.arange(keys.height)))
    j = keys.join(spots, on=["slide_id", "spot_id"]).filter(pl.col("passes_qc")).sort("slide_id", "spot_id")
    rng = np.random.default_rng(0)
    blocks, frames = [], []
    for s in slides:
        g = j.filter(pl.col("slide_id") == s)
        rows = g["_row"].to_numpy()
        truth = normalise_log1p(raw[rows], lib[rows])
        pred = truth + noise * truth.std(axis=0) * rng.standard_normal(truth.shape)
        blocks.append(Block(s, genes, truth, pred, g.select("pixel_x", "pixel_y").to_numpy(), _radius(meta, s)))
        n, ng = truth.shape
        frames.append(
            pl.DataFrame(
                {
                    "run_id": "bench",
                    "slide_id": s,
                    "spot_id": np.repeat(g["spot_id"].to_numpy(), ng),
                    "gene": genes * n,
                    "mean": np.expm1(pred).ravel() * np.repeat(lib[rows], ng) / 1e4,
                    "mean_log1p": pred.ravel(),
                    "observed": raw[rows].ravel().astype(np.int32),
                    "library_size": np.repeat(lib[rows], ng),
                }
            ).with_columns(
                *(
                    pl.lit(None, dtype=pl.Float32).alias(c)
                    for c in ("variance", "epistemic", "aleatoric", "q05", "q25", "q75", "q95", "prob_high")
                )
            )
        )
    return (
        blocks,
        [pl.concat(frames)],
        f"log1p counts of the top-{k} HVG, prediction = truth + {noise} x gene sd Gaussian noise",
    )


def esda_weights(xy: np.ndarray, radius: float):
    w = DistanceBand(xy, threshold=radius, binary=True, silence_warnings=True)
    w.transform = "r"
    return w


def esda_moran(pred: np.ndarray, truth: np.ndarray, w) -> tuple[np.ndarray, np.ndarray]:
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        mi = np.array([Moran(pred[:, i], w, permutations=0).I for i in range(pred.shape[1])])
        bv = np.array([Moran_BV(pred[:, i], truth[:, i], w, permutations=0).I for i in range(pred.shape[1])])
    return mi, bv


def _max_diff(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Max abs difference where both are finite, and how many genes differ in NaN-ness."""
    fa, fb = np.isfinite(a), np.isfinite(b)
    both = fa & fb
    return (float(np.max(np.abs(a[both] - b[both]))) if both.any() else 0.0), int(np.sum(fa != fb))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="store with the HER2ST sections ingested")
    ap.add_argument("--backbone", default="efficientnet_lite0", help="backbone of the compare runs to use, if any")
    ap.add_argument("--genes", type=int, default=250, help="top-K HVG (only without compare runs)")
    ap.add_argument(
        "--noise", type=float, default=0.5, help="noise sd as a fraction of the gene sd (only without compare runs)"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--use-counts", action="store_true", help="ignore compare runs; use counts + noisy copy")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"load average at start {os.getloadavg()[0]:.2f}")
    store = Store(args.store)
    got = None if args.use_counts else from_runs(store, args.backbone)
    blocks, frames, source = got if got is not None else from_counts(store, args.genes, args.noise)
    print(f"Data: {DATASET}, {source}")

    rows, tot = [], {"wa": 0.0, "wb": 0.0, "a": 0.0, "b": 0.0, "pairs": 0}
    worst = {"mi": 0.0, "bv": 0.0, "w": 0.0, "nan": 0}
    for b in blocks:
        t_wa, W = _median_time(lambda: radius_weights(b.xy, b.radius_px), args.repeats)
        t_wb, w = _median_time(lambda: esda_weights(b.xy, b.radius_px), args.repeats)
        wdiff = abs(sp.csr_matrix(W) - w.sparse.tocsr()).max()
        t_a, (mi_a, bv_a) = _median_time(
            lambda: (morans_i(b.pred, W), bivariate_morans_i(b.pred, b.truth, W)), args.repeats
        )
        t_b, (mi_b, bv_b) = _median_time(lambda: esda_moran(b.pred, b.truth, w), args.repeats)
        d_mi, n_mi = _max_diff(mi_a, mi_b)
        d_bv, n_bv = _max_diff(bv_a, bv_b)
        worst["mi"] = max(worst["mi"], d_mi)
        worst["bv"] = max(worst["bv"], d_bv)
        worst["w"] = max(worst["w"], float(wdiff))
        worst["nan"] += n_mi + n_bv
        ng = len(b.genes)
        tot["wa"] += t_wa
        tot["wb"] += t_wb
        tot["a"] += t_a
        tot["b"] += t_b
        tot["pairs"] += ng
        rows.append(
            (
                b.slide_id,
                b.truth.shape[0],
                ng,
                f"{W.nnz / W.shape[0]:.2f}",
                len(w.islands),
                f"{ng / t_a:,.0f}",
                f"{ng / t_b:,.0f}",
                f"{t_b / t_a:.0f}x",
                f"{d_mi:.1e}",
                f"{d_bv:.1e}",
            )
        )
    rows.append(
        (
            "all",
            sum(b.truth.shape[0] for b in blocks),
            tot["pairs"],
            "",
            "",
            f"{tot['pairs'] / tot['a']:,.0f}",
            f"{tot['pairs'] / tot['b']:,.0f}",
            f"{tot['b'] / tot['a']:.0f}x",
            f"{worst['mi']:.1e}",
            f"{worst['bv']:.1e}",
        )
    )

    geos = [_geometry(store, f["slide_id"].unique().to_list()) for f in frames]  # score_run's inputs, not timed
    t_c, _ = _median_time(
        lambda: [score_run(f, spots, meta, "nb") for f, (spots, meta) in zip(frames, geos)], args.repeats
    )

    print(
        "\nMoran's I (prediction) + bivariate Moran (prediction, truth), per slide, weights prebuilt "
        f"(radius {NEIGHBOUR_RADIUS_PITCHES} spot pitches); throughput in slide-genes/s, median of {args.repeats}"
    )
    print(
        table(
            rows,
            (
                "slide",
                "spots",
                "genes",
                "mean nbrs",
                "islands",
                "(a) ours genes/s",
                "(b) esda genes/s",
                "(a)/(b) speed-up",
                "max|dI| Moran",
                "max|dI| BV",
            ),
        )
    )
    print(
        f"weights identical to libpysal DistanceBand (max abs diff of W): {worst['w']:.1e}; genes NaN "
        f"in one only: {worst['nan']}"
    )
    print()
    print(
        table(
            [
                ("(a) ours Moran + BV", f"{tot['a']:.4f}", f"{tot['pairs'] / tot['a']:,.0f}", "1.0x"),
                (
                    "(b) esda Moran + Moran_BV (permutations=0), gene by gene",
                    f"{tot['b']:.3f}",
                    f"{tot['pairs'] / tot['b']:,.0f}",
                    f"{tot['b'] / tot['a']:.0f}x slower",
                ),
                (
                    "(c) full score_run suite (pivot, 5 regression metrics x slide + pooled, Moran, BV, IoU)",
                    f"{t_c:.3f}",
                    f"{tot['pairs'] / t_c:,.0f}",
                    f"{t_c / tot['a']:.1f}x of (a)",
                ),
                ("weights: ours radius_weights", f"{tot['wa']:.4f}", "", ""),
                (
                    "weights: libpysal DistanceBand + transform r",
                    f"{tot['wb']:.4f}",
                    "",
                    f"{tot['wb'] / tot['wa']:.0f}x slower",
                ),
            ],
            ("step (all slides, all genes)", "seconds", "slide-genes/s", "vs (a)"),
        )
    )
    print("(c) gets the spots/slides tables as arguments (read beforehand, not timed); it builds its own weights.")
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
