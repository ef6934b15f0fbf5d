"""Explanations on real HER2ST tiles: cost per tile, the nucleus-area comparison of two genes
(STimage: nuclei pushing VEGFA up are larger than those pushing CD52 up), and how often a top
nucleus's LIME weight agrees in sign with occluding it.

    python benchmarks/bench_explain.py --store STORE --model RID --slide C5 \
        --genes VEGFA,CD52 --top 4 --samples 300 --out docs/img

Everything is measured in this one run, on this machine; the cost of the default (1000
samples) is measured on one tile, side by side with the batched forward rate.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import mannwhitneyu

from stimage_embed.explain.lime_tile import DEFAULT_SAMPLES, explain_tile, occlusion_deltas
from stimage_embed.explain.model_fn import load_tile_model
from stimage_embed.explain.run import _top_spots, explain
from stimage_embed.explain.segment import HedSegmenter
from stimage_embed.store import Store
from stimage_embed.tiles.image import SlideImage

log = logging.getLogger("bench_explain")


def _tiles(store, tm, slide, spots):
    srow = store.read("slides", ["image_path", "um_per_px"], where=f"slide_id = '{slide}'").to_pylist()[0]
    xy = pl.from_arrow(store.read("spots", ["spot_id", "pixel_x", "pixel_y"], where=f"slide_id = '{slide}'"))
    with SlideImage.open(srow["image_path"]) as image:
        reader, norm = tm.reader(slide, image, srow["um_per_px"]), tm.normalizer(slide, image)
        tiles = [reader.read(*xy.filter(pl.col("spot_id") == s).row(0)[1:])[0] for s in spots]
    return tiles, norm


def cost(store, tm, slide, spot, samples: int) -> dict:
    tiles, norm = _tiles(store, tm, slide, [spot])
    fn = tm.classifier(tm.sm.genes[0], norm)
    t0 = time.perf_counter()
    fn(np.repeat(tiles[0][None], 128, axis=0))
    rate = 128 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    labels = HedSegmenter().segment(tiles[0], tm.tile_um / tm.tile_px)
    seg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    explain_tile(tiles[0], labels, fn, num_samples=samples, seed=0)
    return {"forward_tiles_per_s": rate, "segment_s": seg_s, f"explain_{samples}_s": time.perf_counter() - t0}


def sign_agreement(store, tm, slide, spots, gene, samples: int, k: int = 5) -> tuple[int, int]:
    tiles, norm = _tiles(store, tm, slide, spots)
    fn = tm.classifier(gene, norm)
    agree = total = 0
    for tile in tiles:
        labels = HedSegmenter().segment(tile, tm.tile_um / tm.tile_px)
        ex = explain_tile(tile, labels, fn, num_samples=samples, seed=0)
        top = [int(j) for j in np.argsort(-np.abs(ex.nucleus_weights))[:k]]
        d = occlusion_deltas(tile, ex, fn, top)
        agree += int(np.sum(np.sign(ex.weights[top]) == -np.sign(d)))
        total += len(top)
    return agree, total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--slide", default="C5")
    p.add_argument("--genes", default="VEGFA,CD52")
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--out", default="bench_explain_out")
    p.add_argument("--cost-samples", type=int, default=DEFAULT_SAMPLES, help="LIME samples of the timed explanation")
    p.add_argument("--agreement-tiles", type=int, default=4)
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    store, genes, out = Store(a.store), a.genes.split(","), Path(a.out)
    tm = load_tile_model(store, a.model, device="cpu")
    spots_tab = pl.from_arrow(
        store.read(
            "spots", ["spot_id", "pixel_x", "pixel_y", "tissue_fraction", "passes_qc"], where=f"slide_id = '{a.slide}'"
        )
    )
    spots = list(
        dict.fromkeys(s for g in genes for s in _top_spots(store, tm, spots_tab, a.slide, a.top, g)["spot_id"])
    )
    print(f"tiles: {spots} (top {a.top} of {a.slide} by each of {genes})")
    n = a.cost_samples
    c = cost(store, tm, a.slide, spots[0], n)
    t_ex, rate = c[f"explain_{n}_s"], c["forward_tiles_per_s"]
    print(
        f"cost on this machine: batched forward {rate:.1f} tiles/s; segmentation {c['segment_s']:.3f} s/tile; "
        f"one explanation at {n} samples {t_ex:.1f} s (ratio to {n} batched forwards: {t_ex * rate / n:.2f}); "
        f"at the default {DEFAULT_SAMPLES} samples: ~{DEFAULT_SAMPLES / rate:.0f} s per tile"
    )
    for g in genes:
        t0 = time.perf_counter()
        res = explain(store, a.model, a.slide, g, spots=spots, samples=a.samples, seed=0, out=out, device="cpu")
        print(
            f"{g}: {len(spots)} tiles at {a.samples} samples in {time.perf_counter() - t0:.0f} s; "
            f"median R² {np.median([t.r2 for t in res.tiles]):.2f}"
        )
    q = f"run_id = '{tm.sm.run_id}' AND slide_id = '{a.slide}' AND spot_id IN ({', '.join(repr(s) for s in spots)})"
    nuc = pl.from_arrow(store.read("nuclei", where=q)).filter(pl.col("gene").is_in(genes))
    pos = {g: nuc.filter((pl.col("gene") == g) & (pl.col("weight") > 0))["area_um2"].to_numpy() for g in genes}
    print(
        store.sql(f"""SELECT gene, COUNT(*) AS nuclei, corr(area_um2, weight) AS corr_area_weight,
        avg(area_um2) FILTER (WHERE weight > 0) AS mean_area_pushing_up,
        avg(area_um2) FILTER (WHERE weight < 0) AS mean_area_pushing_down,
        sum(area_um2 * weight) FILTER (WHERE weight > 0) / sum(weight) FILTER (WHERE weight > 0) AS weighted_area_up
        FROM nuclei WHERE {q} GROUP BY gene ORDER BY gene""")
    )
    if len(genes) == 2:
        u = mannwhitneyu(pos[genes[0]], pos[genes[1]], alternative="two-sided")
        a0, a1 = pos[genes[0]], pos[genes[1]]
        print(
            f"areas of nuclei pushing up: {genes[0]} median {np.median(a0):.1f} µm² (n={len(a0)}) "
            f"vs {genes[1]} median {np.median(a1):.1f} µm² (n={len(a1)}); Mann-Whitney p={u.pvalue:.3g}"
        )
    k = a.agreement_tiles
    agree, total = sign_agreement(store, tm, a.slide, spots[:k], genes[0], a.samples)
    print(
        f"sign agreement (LIME weight vs occluding the nucleus), top-5 nuclei of {k} tiles, {genes[0]}: "
        f"{agree}/{total} = {agree / total:.2f}"
    )


if __name__ == "__main__":
    main()
