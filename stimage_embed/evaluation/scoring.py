"""Score long predictions of one run against the truth: every metric per test slide and
gene, plus pooled Pearson. Truth and predictions are compared on log1p of
library-normalised counts (``log1p(count / library_size * 1e4)``, library size = total raw
counts of the spot over all genes)."""

from __future__ import annotations

import numpy as np
import polars as pl

from heads import highlow_labels
from stimage_embed.evaluation.metrics import (
    classification_metrics,
    evaluate_regression,
    interval_coverage,
    normalise_log1p,
)
from stimage_embed.evaluation.spatial import bivariate_morans_i, grid_layout, morans_i, radius_weights, spatial_iou
from stimage_embed.predictions.registry import head_spec

NEIGHBOUR_RADIUS_PITCHES = 1.2  # spots within 1.2 pitches are neighbours (4 on ST, 6 on Visium)


def _wide(pred: pl.DataFrame, column: str, genes: list[str]) -> np.ndarray:
    return (
        pred.pivot(on="gene", index=["slide_id", "spot_id"], values=column)
        .sort("slide_id", "spot_id")
        .select(genes)
        .to_numpy()
    )


def score_run(pred: pl.DataFrame, spots: pl.DataFrame, slides: pl.DataFrame, head: str) -> pl.DataFrame:
    """Metrics of one run. ``pred``: PREDICTIONS rows of the run; ``spots``: slide_id,
    spot_id, array_row, array_col, pixel_x, pixel_y; ``slides``: slide_id, um_per_px,
    spot_pitch_um, platform. Returns columns scope, slide_id, gene, metric, value."""
    genes = pred["gene"].unique(maintain_order=True).to_list()
    keys = (
        pred.filter(pl.col("gene") == genes[0])
        .select("slide_id", "spot_id", "library_size")
        .sort("slide_id", "spot_id")
    )
    observed = _wide(pred, "observed", genes).astype(np.float64)
    lib = keys["library_size"].to_numpy().astype(np.float64)
    truth = normalise_log1p(observed, lib)
    slide_ids = keys["slide_id"].to_numpy()
    geo = keys.join(spots, on=["slide_id", "spot_id"], how="left").join(slides, on="slide_id", how="left")
    parts: list[pl.DataFrame] = []

    def add(df: pl.DataFrame, scope: str, slide: str) -> None:
        parts.append(
            df.select(pl.lit(scope).alias("scope"), pl.lit(slide).alias("slide_id"), "gene", "metric", "value")
        )

    if head_spec(head).output == "classifier":
        proba = _wide(pred, "prob_high", genes)
        labels = highlow_labels(truth, slide_ids)  # the rule the classifier was trained on
        for s in np.unique(slide_ids):
            m = slide_ids == s
            add(classification_metrics(labels[m], proba[m], genes), "slide", s)
        return pl.concat(parts)

    mean = _wide(pred, "mean_log1p", genes).astype(np.float64)
    reg = evaluate_regression(truth, mean, genes, slide_ids)
    parts.append(
        reg.with_columns(pl.col("slide_id").fill_null("")).select("scope", "slide_id", "gene", "metric", "value")
    )
    has_q = pred["q25"].null_count() < pred.height
    if has_q:
        q = {c: _wide(pred, c, genes) for c in ("q05", "q25", "q75", "q95")}
    for s in np.unique(slide_ids):
        m = slide_ids == s
        g = geo.filter(pl.col("slide_id") == s)
        pitch_px = float(g["spot_pitch_um"][0]) / float(g["um_per_px"][0])
        W = radius_weights(g.select("pixel_x", "pixel_y").to_numpy(), NEIGHBOUR_RADIUS_PITCHES * pitch_px)
        layout = grid_layout(g["array_row"].to_numpy(), g["array_col"].to_numpy(), platform=g["platform"][0])
        iou = spatial_iou(truth[m], mean[m], g["array_row"].to_numpy(), g["array_col"].to_numpy(), layout=layout)
        vals = {
            "moran_i": morans_i(mean[m], W),
            "moran_bv": bivariate_morans_i(mean[m], truth[m], W),
            "iou": iou.iou,
        }
        if has_q:
            vals["coverage_50"] = interval_coverage(observed[m], q["q25"][m], q["q75"][m])
            vals["coverage_90"] = interval_coverage(observed[m], q["q05"][m], q["q95"][m])
        for metric, v in vals.items():
            parts.append(
                pl.DataFrame(
                    {
                        "scope": "slide",
                        "slide_id": s,
                        "gene": genes,
                        "metric": metric,
                        "value": np.asarray(v, np.float64),
                    }
                )
            )
    return pl.concat(parts, how="vertical_relaxed")
