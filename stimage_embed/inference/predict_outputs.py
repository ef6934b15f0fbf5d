"""What ``predict`` reports: the prediction rows written and, for every slide with measured
counts, how well the predictions follow them (per-gene Pearson r over the slide's spots,
summarised per slide)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from stimage_embed.evaluation.metrics import TARGET_SUM
from stimage_embed.store.store import sql_list

if TYPE_CHECKING:
    from stimage_embed.store.store import Store


def slide_pcc(pred: pl.DataFrame) -> pl.DataFrame:
    """Per slide: genes scored, median and mean Pearson r between the predicted log1p CP10k
    (``mean_log1p``, a function of the image vectors only) and the
    measured log1p CP10k (``log1p(count / library_size * 1e4)``) over the slide's spots.
    Slides without counts (``observed`` null) and genes constant on a slide are left out."""
    have = pred.filter(pl.col("observed").is_not_null() & pl.col("mean_log1p").is_not_null())
    if have.height == 0:
        return pl.DataFrame(schema={"slide_id": pl.Utf8, "genes": pl.UInt32, "pcc_median": pl.Float64})
    truth = (pl.col("observed").cast(pl.Float64) / pl.col("library_size").cast(pl.Float64) * TARGET_SUM).log1p()
    per_gene = (
        have.with_columns(truth.alias("_y"), pl.col("mean_log1p").alias("_p"))
        .group_by("slide_id", "gene")
        .agg(pl.corr("_y", "_p").alias("pcc"))
        .filter(pl.col("pcc").is_not_nan() & pl.col("pcc").is_not_null())
    )
    return (
        per_gene.group_by("slide_id")
        .agg(
            pl.len().alias("genes"),
            pl.col("pcc").median().alias("pcc_median"),
            pl.col("pcc").mean().alias("pcc_mean"),
        )
        .sort("slide_id")
    )


def _slides_with_counts(store: Store, slides: Sequence[str]) -> set[str]:
    if not store.has_table("expression"):
        return set()
    rows = store.sql(f"SELECT DISTINCT slide_id FROM expression WHERE slide_id IN ({sql_list(slides)})")
    return set(rows["slide_id"].to_list())


def _predict_image_only(store: Store, model: str, slide_id: str) -> int:
    """Predict every tile of an image-only slide (``infer`` registered it; it has vectors but
    no counts); returns the prediction rows written."""
    from stimage_embed.inference.model import load_saved_model
    from stimage_embed.inference.predict_tiles import predict_slide_tiles

    cols = ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"]
    keys = pl.from_arrow(store.read("spots", cols, where=f"slide_id IN ({sql_list([slide_id])})"))
    keys = keys.with_columns(pl.lit(slide_id).alias("patient")).sort("spot_id")
    with store.writer("predict"):
        sm = load_saved_model(store, model)
        return predict_slide_tiles(store, sm, slide_id, keys).rows_written


def predict_and_report(store: Store, model: str, slides: Sequence[str], out: Path | None = None) -> list[str]:
    """Run ``predict`` and return the lines to print: rows written, then each slide's PCC
    summary (slides with counts). Image-only slides (from ``infer``) are predicted too:
    predicting needs vectors, not counts. ``out``: also write each slide's AnnData,
    heatmaps and pseudo-bulk there, as ``infer`` does."""
    from stimage_embed.inference.label_predict import is_label_model, predict_label_lines
    from stimage_embed.predictions.train_predict import predict as run_predict

    if is_label_model(store, model):  # class probabilities: the label_predictions table
        return predict_label_lines(store, model, slides, out)
    # image-only slides: in the store without counts; the others (with counts, or unknown:
    # refused there after the model is checked) go through the predictions pipeline
    image_only = set(store.slide_ids()) & set(slides) - _slides_with_counts(store, slides)
    lines = []
    if set(slides) - image_only:
        pred = run_predict(store, model, [s for s in slides if s not in image_only])
        lines.append(
            f"{pred.height} prediction rows written for {pred['slide_id'].n_unique()} slide(s), "
            f"{pred['gene'].n_unique()} genes, run {pred['run_id'][0]}"
        )
        summary = slide_pcc(pred) if "mean_log1p" in pred.columns else pl.DataFrame()
        for row in summary.iter_rows(named=True):
            lines.append(
                f"slide {row['slide_id']}: PCC against its measured counts (log1p CP10k) over {row['genes']} genes: "
                f"median {row['pcc_median']:.3f}, mean {row['pcc_mean']:.3f}"
            )
    for sid in [s for s in slides if s in image_only]:
        rows = _predict_image_only(store, model, sid)
        lines.append(f"slide {sid} (image only: no counts to score against): {rows} prediction rows written")
    if out is not None:
        from stimage_embed.inference.model import load_saved_model
        from stimage_embed.inference.predict_files import write_prediction_files

        rid = load_saved_model(store, model, training=False).run_id
        for sid in slides:
            where = f"run_id IN ({sql_list([rid])}) AND slide_id IN ({sql_list([sid])})"
            rows = pl.from_arrow(store.read("predictions", where=where))
            lines += write_prediction_files(store, model, sid, rows, out)
    return lines
