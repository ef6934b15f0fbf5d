"""Pseudo-bulk agreement on slides with counts: does the sum over a slide's spots of the
image-only prediction match the sum of its measured counts?

For every (model, slide, gene) of a ``predictions`` table (spots held out by their run):

* predicted pseudo-bulk = log1p(100 x mean over the slide's predicted spots of
  expm1(``mean_log1p``)), i.e. log1p of the predicted CPM (the ``infer`` pseudo-bulk's
  ``mean_cp10k`` x 100);
* measured pseudo-bulk = log1p(10^6 x sum of ``observed`` / sum of ``library_size``) over
  the same spots: log1p CPM of the summed counts, as bulk RNA-seq of the section would be.

Two Pearson correlations (scipy's definition, computed per group):

* ``per_slide``: across genes within each slide (STimage's TCGA figure, median about 0.5).
  It rewards getting the genes' overall levels right, which a per-gene mean already does:
  read it next to the ``mean`` baseline's value;
* ``per_gene``: across slides for each gene (needs 3 slides or more; NaN otherwise): does
  the model follow a gene's level from section to section.
"""

from __future__ import annotations

import numpy as np
import polars as pl

#: columns naming a model in the tables (with runs); else the run id
MODEL_COLUMNS = ("dataset", "backbone", "head")


def _pearson(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return pl.corr(a, b, method="pearson")


def slide_pseudobulk(predictions: pl.DataFrame, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per (model, slide, gene): ``predicted`` and ``measured`` log1p(CPM) and ``n_spots``.
    Rows without ``observed`` / ``library_size`` (image-only slides) are left out."""
    p = predictions.filter(pl.col("observed").is_not_null() & pl.col("library_size").is_not_null())
    keys = ["run_id"]
    if runs is not None:
        cols = [c for c in MODEL_COLUMNS if c in runs.columns]
        p = p.join(runs.select("run_id", *cols), on="run_id", how="left")
        keys = cols
    return (
        p.group_by(*keys, "slide_id", "gene")
        .agg(
            (pl.col("mean_log1p").cast(pl.Float64).exp() - 1).mean().alias("cp10k"),
            pl.col("observed").cast(pl.Float64).sum().alias("counts"),
            pl.col("library_size").cast(pl.Float64).sum().alias("library"),
            pl.len().alias("n_spots"),
        )
        .with_columns(
            (pl.col("cp10k") * 100).log1p().alias("predicted"),
            (pl.col("counts") / pl.col("library") * 1e6).log1p().alias("measured"),
        )
        .drop("cp10k", "counts", "library")
        .sort(*keys, "slide_id", "gene")
    )


def pseudobulk_agreement(
    predictions: pl.DataFrame, runs: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(per_slide, per_gene)`` PCC tables of predicted vs measured pseudo-bulk (see the
    module docstring). ``runs`` (the store's ``runs`` rows) groups runs into models
    (dataset, backbone, head), so every slide counts once per model under LOSO."""
    bulk = slide_pseudobulk(predictions, runs)
    keys = [c for c in bulk.columns if c in (*MODEL_COLUMNS, "run_id")]
    per_slide = (
        bulk.group_by(*keys, "slide_id")
        .agg(pl.len().alias("n_genes"), _pearson(pl.col("predicted"), pl.col("measured")).alias("pcc"))
        .sort(*keys, "slide_id")
    )
    per_gene = (
        bulk.group_by(*keys, "gene")
        .agg(pl.len().alias("n_slides"), _pearson(pl.col("predicted"), pl.col("measured")).alias("pcc"))
        .with_columns(pl.when(pl.col("n_slides") >= 3).then(pl.col("pcc")).otherwise(np.nan).alias("pcc"))
        .sort(*keys, "gene")
    )
    return per_slide, per_gene


def agreement_summary(per_slide: pl.DataFrame, per_gene: pl.DataFrame) -> pl.DataFrame:
    """One row per model: slides, median and mean within-slide PCC, genes, median per-gene PCC."""
    keys = [c for c in per_slide.columns if c in (*MODEL_COLUMNS, "run_id")]
    a = per_slide.group_by(*keys).agg(
        pl.len().alias("slides"),
        pl.col("pcc").fill_nan(None).median().alias("pcc_within_slide_median"),
        pl.col("pcc").fill_nan(None).mean().alias("pcc_within_slide_mean"),
    )
    b = per_gene.group_by(*keys).agg(
        pl.col("pcc").fill_nan(None).is_not_null().sum().alias("genes_3plus_slides"),
        pl.col("pcc").fill_nan(None).median().alias("pcc_across_slides_median"),
    )
    return a.join(b, on=keys, how="left").sort(*keys)


def agreement_section(predictions: pl.DataFrame, runs: pl.DataFrame) -> list[str]:
    """Markdown lines of the report's pseudo-bulk agreement section (empty without counts)."""
    from stimage_embed.evaluation.report_tables import markdown_table

    per_slide, per_gene = pseudobulk_agreement(predictions, runs)
    if per_slide.height == 0:
        return []
    summary = agreement_summary(per_slide, per_gene)
    return [
        "## Pseudo-bulk agreement",
        "",
        "Predicted vs measured pseudo-bulk of each held-out slide: log1p CPM of the mean predicted CP10k x 100 "
        "against log1p CPM of the summed counts. `pcc_within_slide`: Pearson r across genes within a slide "
        "(STimage's TCGA figure); the `mean` baseline shows how much of it the genes' overall levels alone give. "
        "`pcc_across_slides`: Pearson r across slides per gene (genes seen on 3 or more slides).",
        "",
        markdown_table(summary.with_columns(pl.col(pl.Float64).round(3))),
        "",
    ]
