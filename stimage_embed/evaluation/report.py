"""The ``compare`` report: ``report.md`` plus PNG figures, from the store's long tables.

Inputs are polars DataFrames with the columns of the store schemas
(:mod:`stimage_embed.store.schema`: ``METRICS``, ``PREDICTIONS``, ``RUNS``, ``SPOTS``)
and a ready-made leaderboard table printed as it is.

Model = (backbone, head). "Per-slide Pearson" = metric ``pearson`` with scope ``slide``,
computed on log1p-normalised expression (``log1p(count / library_size * 1e4)``).

Choices
-------
* The **best model** of a dataset is the non-baseline, non-classifier model with the
  highest mean per-slide Pearson over all (test slide, gene) values; its **top genes**
  (mean per-slide Pearson over test slides, highest first; ties by name) are mapped on
  each of its test slides (at most ``max_slides`` slides per dataset, in sorted order).
* Undefined values (NaN, e.g. Pearson of a constant prediction) are ignored in means and
  shown as ``n/a``; a model with no defined value is listed, never dropped.
* The aggregates are the store's SQL views run over the given tables
  (:mod:`stimage_embed.evaluation.report_tables`), so they equal ``stimage-embed query``.

Sections live in :mod:`~stimage_embed.evaluation.report_tables` (checks, aggregates,
Markdown), :mod:`~stimage_embed.evaluation.report_maps` (spatial and IoU maps) and
:mod:`~stimage_embed.evaluation.report_calibration`; this module assembles them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.evaluation import plots
from stimage_embed.evaluation.report_calibration import calibration_section
from stimage_embed.evaluation.report_maps import IOU_SIGMA, IOU_THRESHOLD, MEMBER_KIND, maps_section, slide_long
from stimage_embed.evaluation.report_tables import (
    BASELINE_HEADS,
    CLASSIFIER_HEADS,
    REQUIRED_COLUMNS,
    best_models,
    clean_metrics,
    coverage_table,
    fmt,
    gene_scores,
    markdown_table,
    model_scores,
    per_slide_pearson,
    safe_name,
    short_list,
    top_genes,
    uncertainty_error_table,
    validate_inputs,
)

__all__ = [
    "BASELINE_HEADS",
    "CLASSIFIER_HEADS",
    "IOU_SIGMA",
    "IOU_THRESHOLD",
    "MEMBER_KIND",
    "REQUIRED_COLUMNS",
    "best_models",
    "coverage_table",
    "gene_scores",
    "markdown_table",
    "model_scores",
    "per_slide_pearson",
    "safe_name",
    "slide_long",
    "top_genes",
    "uncertainty_error_table",
    "validate_inputs",
    "write_report",
]

log = logging.getLogger(__name__)

#: optional prediction columns used when present (null-filled otherwise)
OPTIONAL_PREDICTION_COLUMNS = ("epistemic", "aleatoric")

_INTRO = [
    "# stimage-embed comparison report",
    "",
    "Predicted vs measured spatial gene expression from H&E embeddings. Expression is "
    "compared on the log1p-normalised scale `log1p(count / library size x 1e4)`; "
    "`mean` and `ridge` are baselines.",
    "",
]


def _config_rows(r: pl.DataFrame) -> list[tuple[str, str]]:
    """(item, value) rows of the configuration table of the runs ``r``."""
    rows: list[tuple[str, str]] = [("runs (trained heads x folds)", str(r.height))]
    rows.append(("datasets", short_list(sorted(r["dataset"].unique().to_list()))))
    if "split" in r.columns:
        rows.append(("split", short_list(sorted(str(s) for s in r["split"].drop_nulls().unique().to_list()))))
    folds = (
        r.select("dataset", "fold", "test_slides")
        .unique(subset=["dataset", "fold"], keep="first")
        .sort("dataset", "fold")
    )
    multi = r["dataset"].n_unique() > 1
    fold_txt = "; ".join(
        f"`{ds + '/' if multi else ''}{f}` (test: {', '.join(ts or [])})" for ds, f, ts in folds.iter_rows()
    )
    rows.append(("folds", f"{folds.height} ({fold_txt})"))
    gene_lists = [tuple(g or []) for g in r["genes"].to_list()]
    union = sorted({g for gl in gene_lists for g in gl})
    sizes = sorted({len(gl) for gl in gene_lists})
    same = len(set(gene_lists)) == 1
    g_txt = f"{len(union)} ({'same list in every run' if same else f'per-run lists of {sizes[0]}–{sizes[-1]} genes'}): "
    rows.append(("genes", g_txt + short_list(union)))
    # a head spanning backbones (fstimage) is stored under its own name as "backbone": not one
    bbs = sorted(b for b in r["backbone"].drop_nulls().unique().to_list() if b not in plots.SPANNING)
    rows.append(("backbones", short_list(bbs)))
    rows.append(("heads", short_list(plots.order_heads(r["head"].drop_nulls().unique().to_list()))))
    return rows


def _config_section(runs: pl.DataFrame) -> str:
    lines = ["## Configuration", ""]
    if runs.height == 0:
        return "\n".join([*lines, "_No runs given._", ""])
    rows = _config_rows(runs.with_columns(pl.col("dataset").cast(pl.String).fill_null("")))
    lines += ["| item | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    return "\n".join(lines)


def _leaderboard_section(leaderboard: pl.DataFrame) -> list[str]:
    return [
        "## Leaderboard",
        "",
        "As computed by `compare` (baselines included); floats rounded to 3 decimals.",
        "",
        markdown_table(leaderboard),
        "",
    ]


def _top_genes_section(metrics: pl.DataFrame, runs: pl.DataFrame, k: int) -> str:
    tg = top_genes(metrics, k, runs)
    ms = model_scores(metrics, runs)
    lines = [
        "## Most predictable genes",
        "",
        f"Top {k} genes of every model by mean per-slide Pearson r over its test slides "
        "(value in brackets). Baselines included; `n/a` = Pearson undefined on every "
        "slide (e.g. a constant prediction).",
        "",
    ]
    cols = ["dataset", "backbone", "head", "mean per-slide r (all genes)"] + [f"#{i}" for i in range(1, k + 1)]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    order = {h: i for i, h in enumerate(plots.order_heads(ms["head"].unique().to_list()))}
    for ds, bb, head, mean_r, *_ in sorted(ms.rows(), key=lambda r: (r[0], order[r[2]], r[1] in plots.SPANNING, r[1])):
        sub = tg.filter((pl.col("dataset") == ds) & (pl.col("backbone") == bb) & (pl.col("head") == head)).sort("rank")
        cells = [f"`{g}` ({fmt(v)})" for g, v in zip(sub["gene"], sub["mean_pearson"])]
        cells += ["n/a"] * (k - len(cells))
        lines.append("| " + " | ".join([fmt(ds), fmt(bb), fmt(head), fmt(mean_r), *cells]) + " |")
    return "\n".join([*lines, ""])


def _boxplot_section(out_dir: Path, metrics: pl.DataFrame) -> list[str]:
    md = ["## Per-slide Pearson r", ""]
    psp = per_slide_pearson(metrics)
    if psp.height == 0:
        return md + ["_No per-slide Pearson values in the metrics._", ""]
    plots.pcc_boxplot(psp, out_dir / "pcc_boxplot.png")
    return md + [
        "![Per-slide Pearson r per backbone and head](pcc_boxplot.png)",
        "",
        "*How to read: each box is one model (colour = backbone, group = head) and holds one point per "
        "(test slide, gene) Pearson r between predicted and measured expression; higher is better, the "
        "grey groups are the baselines, the dotted line the ridge median and the solid line r = 0.*",
        "",
    ]


def _check_arguments(
    metrics: pl.DataFrame,
    predictions: pl.DataFrame,
    runs: pl.DataFrame,
    spots: pl.DataFrame,
    leaderboard: pl.DataFrame,
    top_k_genes: int,
    max_slides: int | None,
) -> None:
    validate_inputs(metrics=metrics, predictions=predictions, runs=runs, spots=spots)
    if not isinstance(leaderboard, pl.DataFrame):
        raise InputError("leaderboard", None, f"expected a polars DataFrame, got {type(leaderboard).__name__}")
    if top_k_genes < 1:
        raise InputError(None, "top_k_genes", f"must be >= 1, got {top_k_genes}")
    if max_slides is not None and max_slides < 0:
        raise InputError(None, "max_slides", f"must be >= 0, got {max_slides}")


def write_report(
    out_dir: Path,
    metrics: pl.DataFrame,
    predictions: pl.DataFrame,
    runs: pl.DataFrame,
    spots: pl.DataFrame,
    leaderboard: pl.DataFrame,
    top_k_genes: int = 3,
    max_slides: int | None = None,
    sections: Sequence[str] = (),
) -> Path:
    """Write ``report.md`` (once) and its figures into ``out_dir``; return the path of report.md.
    ``sections``: further Markdown lines appended to the report (e.g. ``compare``'s paired
    comparisons and leak control).

    Figures: ``pcc_boxplot.png``; ``spatial_<slide>_<gene>.png`` and
    ``iou_<slide>_<gene>.png`` for the ``top_k_genes`` genes of each dataset's best model
    on each of its test slides (at most ``max_slides`` per dataset); ``calibration.png``
    (``calibration_<dataset>.png`` with several datasets) when any model has
    ``coverage_50``/``coverage_90`` metrics.

    Raises :class:`~stimage_embed.errors.InputError` (a ``ValueError``) when a table lacks
    a column the report reads (the message names table and column), or when a dataset's
    runs mix splits, gene specs or controls.
    """
    _check_arguments(metrics, predictions, runs, spots, leaderboard, top_k_genes, max_slides)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = clean_metrics(metrics)
    predictions = predictions.with_columns(
        pl.lit(None, dtype=pl.Float32).alias(c) for c in OPTIONAL_PREDICTION_COLUMNS if c not in predictions.columns
    )
    runs = runs.with_columns(pl.col("dataset").cast(pl.String).fill_null(""))
    best = best_models(metrics, runs=runs)
    top = top_genes(metrics, top_k_genes, runs)
    md = [
        *_INTRO,
        _config_section(runs),
        *_leaderboard_section(leaderboard),
        _top_genes_section(metrics, runs, top_k_genes),
        *_boxplot_section(out_dir, metrics),
        *maps_section(out_dir, metrics, predictions, runs, spots, best, top, max_slides),
        *calibration_section(out_dir, metrics, predictions, runs),
        *sections,
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    log.info("wrote %s", path)
    return path
