"""Search quality on real data: does similar morphology mean similar biology?

For every QC-passing spot of each dataset (HER2ST, MOB), its top-10 hits (cosine, Lite0
vectors) among the spots of the dataset's OTHER slides are compared with 10 random spots of
those same slides: mean Pearson correlation between the query's and each hit's
log1p(CP10k) profile over the dataset's ``var:50`` genes. Enrichment = mean PCC(hits) -
mean PCC(random), with a bootstrap 95 % CI over query slides' spots (resampling spots within
each query slide) and the ratio. Hits come from exact search in numpy; the first queries are
checked against :func:`stimage_embed.search.search` (the code ``stimage-embed search`` runs).

Then ``knn`` vs ``nb`` in ``compare`` (leave-one-slide-out within each dataset, var:50 genes
chosen on the training slides, the shuffled-vector control), with the paired per-slide x gene
PCC difference and its bootstrap CI.

    python benchmarks/bench_search_quality.py --store /tmp/search_store
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import polars as pl

from heads import log1p_normalise
from heads.knn import exact_neighbours, unit_rows
from stimage_embed.predictions.arrays import load_spot_arrays
from stimage_embed.predictions.genes import select_genes
from stimage_embed.search import SearchOptions, search
from stimage_embed.store import Store

log = logging.getLogger("bench_search_quality")
K = 10
N_CHECK = 20


def row_pcc(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``A`` with the same row of ``B`` (NaN for a constant row)."""
    a = A - A.mean(axis=-1, keepdims=True)
    b = B - B.mean(axis=-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.divide((a * b).sum(-1), den, out=np.full(den.shape, np.nan), where=den > 0)


def dataset_enrichment(store: Store, dataset: str, backbone: str, n_boot: int, seed: int) -> dict:
    slides = store.sql(f"SELECT slide_id FROM slides WHERE dataset = '{dataset}' ORDER BY slide_id")["slide_id"]
    slides = slides.to_list()
    keys, gl, counts, lib = store.expression_matrix(slides)
    genes = select_genes("var:50", counts, gl, keys["slide_id"].to_numpy(), slides, library_size=lib)
    arr = load_spot_arrays(store, backbone, slides, genes)
    T = log1p_normalise(arr.counts, arr.library_size)
    R = unit_rows(arr.X)
    sl = arr.groups
    rng = np.random.default_rng(seed)
    hit_pcc, rand_pcc, qslide = [], [], []
    for s in slides:
        q, other = np.flatnonzero(sl == s), np.flatnonzero(sl != s)
        idx, _ = exact_neighbours(R[q], R[other], K)
        hits = other[idx]  # (nq, K)
        rand = other[rng.integers(0, len(other), (len(q), K))]
        hit_pcc.append(np.nanmean(row_pcc(T[q][:, None, :], T[hits]), axis=1))
        rand_pcc.append(np.nanmean(row_pcc(T[q][:, None, :], T[rand]), axis=1))
        qslide += [s] * len(q)
        for j in range(min(N_CHECK // len(slides) + 1, len(q))):  # the search verb gives the same hits
            spot = arr.keys.row(int(q[j]), named=True)
            got = search(
                store,
                backbone,
                like=f"{s}:{spot['spot_id']}",
                k=K,
                where=f"dataset = '{dataset}' AND passes_qc",
                exclude_slide=True,
                options=SearchOptions(use_index=False),
            )
            want = set(zip(arr.keys["slide_id"].to_numpy()[hits[j]], arr.keys["spot_id"].to_numpy()[hits[j]]))
            assert len(want & set(zip(got["slide_id"], got["spot_id"]))) >= K - 1, (s, spot)
    h, r, qs = np.concatenate(hit_pcc), np.concatenate(rand_pcc), np.array(qslide)
    diff = h - r
    boots = []
    for _ in range(n_boot):  # resample spots within each query slide
        pick = np.concatenate([rng.choice(np.flatnonzero(qs == s), (qs == s).sum()) for s in slides])
        boots.append(np.nanmean(diff[pick]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {
        "dataset": dataset,
        "slides": len(slides),
        "queries": len(h),
        "pcc_hits": float(np.nanmean(h)),
        "pcc_random": float(np.nanmean(r)),
        "enrichment": float(np.nanmean(diff)),
        "ci_lo": float(lo),
        "ci_hi": float(hi),
        "ratio": float(np.nanmean(h) / np.nanmean(r)),
    }


def knn_vs_nb(store: Store, backbone: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    from stimage_embed.evaluation.compare import CompareConfig, compare
    from stimage_embed.evaluation.paired import paired_comparisons

    cfg = CompareConfig(backbones=[backbone], heads=["nb", "knn"], split="loso", genes="var:50", controls=["shuffled"])
    result = compare(store, cfg, progress=False)
    board = result.leaderboard.select("dataset", "control", "head", "folds", "pcc_mean", "pcc_median")
    return board.sort("dataset", "control", "head"), paired_comparisons(store, run_ids=result.run_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="store with both datasets embedded")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--skip-compare", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    store = Store(args.store)
    rows = [dataset_enrichment(store, d, args.backbone, args.boot, 0) for d in ("her2st", "stutility_mob")]
    print(
        "| dataset | slides | query spots | PCC top-10 other-slide hits | PCC random other-slide spots "
        "| enrichment (95 % CI) | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['slides']} | {r['queries']} | {r['pcc_hits']:.3f} | {r['pcc_random']:.3f} | "
            f"{r['enrichment']:+.3f} ({r['ci_lo']:+.3f}, {r['ci_hi']:+.3f}) | {r['ratio']:.2f} |"
        )
    if args.skip_compare:
        return
    board, paired = knn_vs_nb(store, args.backbone)
    with pl.Config(tbl_rows=50, tbl_cols=20, tbl_width_chars=200):
        print(board)
        print(paired)


if __name__ == "__main__":
    main()
