"""Tables of the ``compare`` report: input checks, per-model / per-gene aggregates and
Markdown formatting.

Inputs are polars DataFrames with the columns of the store schemas
(:mod:`stimage_embed.store.schema`: ``METRICS``, ``PREDICTIONS``, ``RUNS``, ``SPOTS``).
"Per-slide Pearson" = metric ``pearson`` with scope ``slide``, computed on log1p-normalised
expression (``log1p(count / library_size * 1e4)``).

The aggregates are the store's SQL views (:mod:`stimage_embed.evaluation.views`) run by DuckDB
over the given frames, registered as ``metrics``, ``runs`` and ``predictions``: the report
and ``stimage-embed query "SELECT * FROM <view>"`` compute the same numbers with the same
SQL. The views group by ``dataset, split, gene_spec, control``; a frame without those
columns reads them as NULL (``control``: 'none'), and the report covers one (split, gene
spec, control) per dataset. NaN metric values are read as NULL (undefined, ignored by
the means, shown as ``n/a``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import duckdb
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.evaluation.views import SQL_VIEWS
from stimage_embed.predictions.registry import head_names

#: heads shown as references, never "best model"
BASELINE_HEADS = head_names(baseline=True)
#: heads that predict P(high), not expression: never "best model", no expression maps
CLASSIFIER_HEADS = head_names(output="classifier")

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "metrics": ("run_id", "dataset", "backbone", "head", "fold", "scope", "slide_id", "gene", "metric", "value"),
    "predictions": (
        "run_id",
        "slide_id",
        "spot_id",
        "gene",
        "mean",
        "mean_log1p",
        "variance",
        "observed",
        "library_size",
    ),
    "runs": ("run_id", "dataset", "backbone", "head", "fold", "test_slides", "genes"),
    "spots": ("slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"),
}
NUMERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "metrics": ("value",),
    "predictions": ("mean", "mean_log1p", "variance", "observed", "library_size"),
    "spots": ("array_row", "array_col", "pixel_x", "pixel_y"),
}
LIST_COLUMNS: dict[str, tuple[str, ...]] = {"runs": ("test_slides", "genes")}
#: the columns (besides ``dataset``) the SQL views group by; optional in the report's frames
VIEW_KEYS = ("split", "gene_spec", "control")


# ----------------------------------------------------------------------------- validation
def validate_inputs(**tables: pl.DataFrame) -> None:
    """Check that each named table (``metrics``, ``predictions``, ``runs``, ``spots``) has
    the columns the report reads, with usable types.

    Raises :class:`~stimage_embed.errors.InputError` (a ``ValueError``) naming the table
    and the column.
    """
    for name, df in tables.items():
        if not isinstance(df, pl.DataFrame):
            raise InputError(name, None, f"expected a polars DataFrame, got {type(df).__name__}")
        for col in REQUIRED_COLUMNS.get(name, ()):
            if col not in df.columns:
                raise InputError(name, col, f"missing column {col!r} (the table has {df.columns})")
        for col in NUMERIC_COLUMNS.get(name, ()):
            dt = df.schema[col]
            if not (dt.is_numeric() or dt == pl.Null):
                raise InputError(name, col, f"column {col!r} must be numeric, got {dt}")
        for col in LIST_COLUMNS.get(name, ()):
            dt = df.schema[col]
            if not (isinstance(dt, pl.List) or dt == pl.Null):
                raise InputError(name, col, f"column {col!r} must be a list of strings, got {dt}")
    if "metrics" in tables and tables["metrics"].height == 0:
        raise InputError("metrics", None, "no rows: nothing to report")


def clean_metrics(metrics: pl.DataFrame) -> pl.DataFrame:
    """``dataset``/``slide_id`` nulls as ``""``, ``value`` as float64 with NaN as null."""
    return metrics.with_columns(
        pl.col("dataset").cast(pl.String).fill_null(""),
        pl.col("slide_id").cast(pl.String).fill_null(""),
        pl.col("value").cast(pl.Float64).fill_nan(None),
    )


def _with_view_keys(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` with string columns :data:`VIEW_KEYS` (null where absent) and ``dataset`` ``""`` for null."""
    missing = [pl.lit(None, dtype=pl.String).alias(c) for c in VIEW_KEYS if c not in df.columns]
    return df.with_columns(*missing).with_columns(
        pl.col("dataset").cast(pl.String).fill_null(""), pl.col(*VIEW_KEYS).cast(pl.String)
    )


# ----------------------------------------------------------------------------- SQL views over frames
def run_view(view: str, **frames: pl.DataFrame) -> pl.DataFrame:
    """Rows of the store view ``view`` (:data:`~stimage_embed.evaluation.views.SQL_VIEWS`)
    computed by DuckDB over ``frames``, each registered under its keyword (``metrics``,
    ``runs``, ``predictions``)."""
    sql, tables = SQL_VIEWS[view]
    con = duckdb.connect()
    try:
        for name in tables:
            frame = frames[name]
            if name == "runs":  # run-status columns a frame of a few run columns lacks (none superseded)
                status = {"config_id": pl.String, "created_at": pl.Datetime("us", "UTC"), "vector_source": pl.String}
                frame = frame.with_columns(
                    pl.lit(None, t).alias(c) for c, t in status.items() if c not in frame.columns
                )
            con.register(name, frame.to_arrow())
        return con.sql(f"SELECT * FROM ({sql})").pl()
    finally:
        con.close()


def _one_comparison(df: pl.DataFrame) -> pl.DataFrame:
    """``df`` without :data:`VIEW_KEYS`, after checking each dataset has one (split, gene
    spec, control): the report never mixes them."""
    combos = df.select("dataset", *VIEW_KEYS).unique().sort(pl.all(), nulls_last=True)
    many = combos.group_by("dataset").len().filter(pl.col("len") > 1)
    if many.height:
        ds = many["dataset"][0]
        seen = combos.filter(pl.col("dataset") == ds).select(*VIEW_KEYS).rows()
        raise InputError(
            "runs",
            "split/gene_spec/control",
            f"dataset {ds!r} mixes (split, gene spec, control) combinations {seen} (None: not set, or a run missing "
            "from runs); the report compares runs of one of each per dataset",
        )
    return df.drop(*VIEW_KEYS)


def metric_view(view: str, metrics: pl.DataFrame, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """A metrics view over ``metrics`` (and the ``split, gene_spec`` of its runs from
    ``runs`` when given; runs missing there read as NULL), without the view keys."""
    validate_inputs(metrics=metrics)
    m = _with_view_keys(clean_metrics(metrics))
    m = m.select(
        "run_id", "dataset", "control", "backbone", "head", "fold", "scope", "slide_id", "gene", "metric", "value"
    )
    r = m.select("run_id").unique()
    if runs is not None:
        keys = _with_view_keys(runs).select("run_id", "split", "gene_spec").unique("run_id", keep="first")
        r = r.join(keys, on="run_id", how="left")
    else:
        r = r.with_columns(
            pl.lit(None, dtype=pl.String).alias("split"), pl.lit(None, dtype=pl.String).alias("gene_spec")
        )
    return _one_comparison(run_view(view, metrics=m, runs=r))


# ----------------------------------------------------------------------------- aggregates
def per_slide_pearson(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per-slide Pearson rows: ``dataset, backbone, head, run_id, fold, slide_id, gene, value``
    (``value`` null where undefined)."""
    validate_inputs(metrics=metrics)
    return (
        clean_metrics(metrics)
        .filter((pl.col("scope") == "slide") & (pl.col("metric") == "pearson"))
        .select("dataset", "backbone", "head", "run_id", "fold", "slide_id", "gene", "value")
    )


def gene_scores(metrics: pl.DataFrame, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Mean per-slide Pearson of every (dataset, backbone, head, gene) over its test
    slides (view ``gene_scores``): ``dataset, backbone, head, gene, mean_pearson,
    n_slides`` (``mean_pearson`` null if undefined on every slide)."""
    return (
        metric_view("gene_scores", metrics, runs)
        .select(
            "dataset",
            "backbone",
            "head",
            "gene",
            pl.col("pcc_mean").alias("mean_pearson"),
            pl.col("slides").alias("n_slides"),
        )
        .sort("dataset", "backbone", "head", "gene")
    )


def top_genes(metrics: pl.DataFrame, k: int = 3, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """The ``k`` most predictable genes of every model (view ``top_genes``): ``dataset,
    backbone, head, rank (1 = best; ties by gene name), gene, mean_pearson``. Genes with
    undefined Pearson are never ranked."""
    if k < 1:
        raise InputError(None, "top_k_genes", f"must be >= 1, got {k}")
    return (
        metric_view("top_genes", metrics, runs)
        .filter(pl.col("pcc_mean").is_not_null() & (pl.col("rank") <= k))
        .select("dataset", "backbone", "head", "rank", "gene", pl.col("pcc_mean").alias("mean_pearson"))
        .sort("dataset", "backbone", "head", "rank")
    )


def model_scores(metrics: pl.DataFrame, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Mean and median per-slide Pearson of each model over all (test slide, gene) values
    (view ``model_scores``): ``dataset, backbone, head, mean_pearson, median_pearson,
    n_defined, n_values``."""
    return (
        metric_view("model_scores", metrics, runs)
        .select(
            "dataset",
            "backbone",
            "head",
            pl.col("pcc_mean").alias("mean_pearson"),
            pl.col("pcc_median").alias("median_pearson"),
            pl.col("pcc_defined").alias("n_defined"),
            pl.col("pcc_values").alias("n_values"),
        )
        .sort("dataset", "backbone", "head")
    )


def best_models(
    metrics: pl.DataFrame,
    exclude_heads: Iterable[str] = BASELINE_HEADS + CLASSIFIER_HEADS,
    runs: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """The best model of each dataset by mean per-slide Pearson, baselines and classifiers
    excluded: ``dataset, backbone, head, mean_pearson`` (one row per dataset that has a
    candidate with a defined Pearson; ties broken by backbone, then head name)."""
    excl = list(exclude_heads)
    return (
        model_scores(metrics, runs)
        .filter(~pl.col("head").is_in(excl))
        .drop_nulls("mean_pearson")
        .sort(["dataset", "mean_pearson", "backbone", "head"], descending=[False, True, False, False])
        .group_by("dataset", maintain_order=True)
        .first()
        .select("dataset", "backbone", "head", "mean_pearson")
    )


def coverage_table(metrics: pl.DataFrame, runs: pl.DataFrame | None = None) -> pl.DataFrame:
    """Mean (and sd over genes and slides) empirical coverage of the 50% and 90% central
    intervals per model (view ``coverage``): ``dataset, backbone, head, nominal,
    empirical, sd``. Uses per-slide values when present, else pooled."""
    cov = metric_view("coverage", metrics, runs)
    scope = "slide" if (cov["scope"] == "slide").any() else "pooled"
    return (
        cov.filter(pl.col("scope") == scope)
        .select("dataset", "backbone", "head", "nominal", "empirical", "sd")
        .sort("dataset", "head", "backbone", "nominal")
    )


def uncertainty_error_table(
    predictions: pl.DataFrame, runs: pl.DataFrame, models: Sequence[tuple[str, str, str]]
) -> pl.DataFrame:
    """Per model ``(dataset, backbone, head)``, deciles of predicted sd (``sqrt(variance)``,
    raw counts) with mean sd and mean absolute error ``|observed - mean|`` (raw counts;
    view ``uncertainty_error``): ``dataset, backbone, head, bin (0-9), sd, abs_error, n``.
    Rows without a finite variance or an observed count are skipped."""
    schema = {
        "dataset": pl.String,
        "backbone": pl.String,
        "head": pl.String,
        "bin": pl.Int64,
        "sd": pl.Float64,
        "abs_error": pl.Float64,
        "n": pl.Int64,
    }
    if not models or predictions.height == 0:
        return pl.DataFrame(schema=schema)
    keys = pl.DataFrame(list(models), schema=["dataset", "backbone", "head"], orient="row")
    r = _with_view_keys(runs).select("run_id", "dataset", *VIEW_KEYS, "backbone", "head").unique("run_id", keep="first")
    p = predictions.select("run_id", pl.col("observed", "mean", "variance").cast(pl.Float64))
    ue = _one_comparison(run_view("uncertainty_error", predictions=p, runs=r))
    return (
        ue.join(keys, on=["dataset", "backbone", "head"], how="semi")
        .select(
            "dataset",
            "backbone",
            "head",
            (pl.col("decile") - 1).cast(pl.Int64).alias("bin"),
            pl.col("sd_mean").alias("sd"),
            pl.col("abs_error_mean").alias("abs_error"),
            pl.col("n"),
        )
        .sort("dataset", "backbone", "head", "bin")
    )


# ----------------------------------------------------------------------------- markdown
def fmt(v: object, digits: int = 3) -> str:
    """One Markdown cell: floats to ``digits`` decimals, None/NaN as ``n/a``, lists comma-joined."""
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pl.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``df``: floats rounded to ``digits`` decimals,
    null/NaN as ``n/a``, lists comma-joined, ``|`` escaped."""
    if df.width == 0:
        return "_(empty table)_\n"
    head = "| " + " | ".join(fmt(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---:" if df.schema[c].is_numeric() else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(fmt(v, digits) for v in r) + " |" for r in df.iter_rows()]
    return "\n".join([head, sep, *rows]) + "\n"


def short_list(items: Sequence[str], n: int = 12) -> str:
    """The first ``n`` items as inline code, then ``… (+k)``."""
    items = list(items)
    s = ", ".join(f"`{x}`" for x in items[:n])
    return s + (f", … (+{len(items) - n})" if len(items) > n else "")


def safe_name(s: str) -> str:
    """A file-name-safe version of a slide, gene or dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"
