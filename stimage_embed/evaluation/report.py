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
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.evaluation import plots
from stimage_embed.evaluation.metrics import normalise_log1p, pearson
from stimage_embed.evaluation.spatial import spatial_iou

log = logging.getLogger(__name__)

BASELINE_HEADS = plots.BASELINE_HEADS
#: heads that predict P(high), not expression: no expression maps
CLASSIFIER_HEADS = ("highlow",)
#: heads whose epistemic sd is a spread between members, and what the members are
MEMBER_KIND = {"ensemble": "between seeds", "fstimage": "between backbones"}
IOU_SIGMA = 1.0
IOU_THRESHOLD = 0.5

REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "metrics": ("run_id", "dataset", "backbone", "head", "fold", "scope", "slide_id", "gene", "metric", "value"),
    "predictions": ("run_id", "slide_id", "spot_id", "gene", "mean", "mean_log1p", "variance", "observed",
                    "library_size"),
    "runs": ("run_id", "dataset", "backbone", "head", "fold", "test_slides", "genes"),
    "spots": ("slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"),
}
NUMERIC_COLUMNS: dict[str, tuple[str, ...]] = {
    "metrics": ("value",),
    "predictions": ("mean", "mean_log1p", "variance", "observed", "library_size"),
    "spots": ("array_row", "array_col", "pixel_x", "pixel_y"),
}
LIST_COLUMNS: dict[str, tuple[str, ...]] = {"runs": ("test_slides", "genes")}
#: optional prediction columns used when present (null-filled otherwise)
OPTIONAL_PREDICTION_COLUMNS = ("epistemic", "aleatoric")


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


def _clean_metrics(metrics: pl.DataFrame) -> pl.DataFrame:
    return metrics.with_columns(
        pl.col("dataset").cast(pl.String).fill_null(""),
        pl.col("slide_id").cast(pl.String).fill_null(""),
        pl.col("value").cast(pl.Float64).fill_nan(None),
    )


# ----------------------------------------------------------------------------- selection
def per_slide_pearson(metrics: pl.DataFrame) -> pl.DataFrame:
    """Per-slide Pearson rows: ``dataset, backbone, head, run_id, fold, slide_id, gene, value``
    (``value`` null where undefined)."""
    validate_inputs(metrics=metrics)
    return (
        _clean_metrics(metrics)
        .filter((pl.col("scope") == "slide") & (pl.col("metric") == "pearson"))
        .select("dataset", "backbone", "head", "run_id", "fold", "slide_id", "gene", "value")
    )


def gene_scores(metrics: pl.DataFrame) -> pl.DataFrame:
    """Mean per-slide Pearson of every (dataset, backbone, head, gene) over its test
    slides: ``dataset, backbone, head, gene, mean_pearson, n_slides`` (``mean_pearson``
    null if undefined on every slide)."""
    return (
        per_slide_pearson(metrics)
        .group_by("dataset", "backbone", "head", "gene")
        .agg(pl.col("value").mean().alias("mean_pearson"), pl.col("value").count().alias("n_slides"))
        .sort("dataset", "backbone", "head", "gene")
    )


def top_genes(metrics: pl.DataFrame, k: int = 3) -> pl.DataFrame:
    """The ``k`` most predictable genes of every model: ``dataset, backbone, head, rank
    (1 = best), gene, mean_pearson``. Genes with undefined Pearson are never ranked."""
    if k < 1:
        raise InputError(None, "top_k_genes", f"must be >= 1, got {k}")
    return (
        gene_scores(metrics)
        .drop_nulls("mean_pearson")
        .sort(["dataset", "backbone", "head", "mean_pearson", "gene"], descending=[False, False, False, True, False])
        .with_columns(pl.int_range(1, pl.len() + 1).over("dataset", "backbone", "head").alias("rank"))
        .filter(pl.col("rank") <= k)
        .select("dataset", "backbone", "head", "rank", "gene", "mean_pearson")
    )


def model_scores(metrics: pl.DataFrame) -> pl.DataFrame:
    """Mean and median per-slide Pearson of each model over all (test slide, gene) values:
    ``dataset, backbone, head, mean_pearson, median_pearson, n_defined, n_values``."""
    return (
        per_slide_pearson(metrics)
        .group_by("dataset", "backbone", "head")
        .agg(
            pl.col("value").mean().alias("mean_pearson"),
            pl.col("value").median().alias("median_pearson"),
            pl.col("value").count().alias("n_defined"),
            pl.len().alias("n_values"),
        )
        .sort("dataset", "backbone", "head")
    )


def best_models(metrics: pl.DataFrame, exclude_heads: Iterable[str] = BASELINE_HEADS + CLASSIFIER_HEADS) -> pl.DataFrame:
    """The best model of each dataset by mean per-slide Pearson, baselines and classifiers
    excluded: ``dataset, backbone, head, mean_pearson`` (one row per dataset that has a
    candidate with a defined Pearson; ties broken by backbone, then head name)."""
    excl = list(exclude_heads)
    return (
        model_scores(metrics)
        .filter(~pl.col("head").is_in(excl))
        .drop_nulls("mean_pearson")
        .sort(["dataset", "mean_pearson", "backbone", "head"], descending=[False, True, False, False])
        .group_by("dataset", maintain_order=True)
        .first()
        .select("dataset", "backbone", "head", "mean_pearson")
    )


# ----------------------------------------------------------------------------- markdown
def _fmt(v: object, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x, digits) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(df: pl.DataFrame, digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table of ``df``: floats rounded to ``digits`` decimals,
    null/NaN as ``n/a``, lists comma-joined, ``|`` escaped."""
    if df.width == 0:
        return "_(empty table)_\n"
    head = "| " + " | ".join(_fmt(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---:" if df.schema[c].is_numeric() else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(_fmt(v, digits) for v in r) + " |" for r in df.iter_rows()]
    return "\n".join([head, sep, *rows]) + "\n"


def _short_list(items: Sequence[str], n: int = 12) -> str:
    items = list(items)
    s = ", ".join(f"`{x}`" for x in items[:n])
    return s + (f", … (+{len(items) - n})" if len(items) > n else "")


def _config_section(runs: pl.DataFrame) -> str:
    lines = ["## Configuration", ""]
    if runs.height == 0:
        return "\n".join([*lines, "_No runs given._", ""])
    r = runs.with_columns(pl.col("dataset").cast(pl.String).fill_null(""))
    rows: list[tuple[str, str]] = [("runs (trained heads x folds)", str(r.height))]
    rows.append(("datasets", _short_list(sorted(r["dataset"].unique().to_list()))))
    if "split" in r.columns:
        rows.append(("split", _short_list(sorted(str(s) for s in r["split"].drop_nulls().unique().to_list()))))
    folds = (
        r.select("dataset", "fold", "test_slides").unique(subset=["dataset", "fold"], keep="first")
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
    rows.append(("genes", g_txt + _short_list(union)))
    bbs = sorted(r["backbone"].drop_nulls().unique().to_list(), key=lambda b: (b == "fstimage", b))
    rows.append(("backbones", _short_list(bbs)))
    rows.append(("heads", _short_list(plots.order_heads(r["head"].drop_nulls().unique().to_list()))))
    lines += ["| item | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    return "\n".join(lines)


def _top_genes_section(metrics: pl.DataFrame, k: int) -> str:
    tg = top_genes(metrics, k)
    ms = model_scores(metrics)
    lines = ["## Most predictable genes", "",
             f"Top {k} genes of every model by mean per-slide Pearson r over its test slides "
             "(value in brackets). Baselines included; `n/a` = Pearson undefined on every "
             "slide (e.g. a constant prediction).", ""]
    cols = ["dataset", "backbone", "head", "mean per-slide r (all genes)"] + [f"#{i}" for i in range(1, k + 1)]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    order = {h: i for i, h in enumerate(plots.order_heads(ms["head"].unique().to_list()))}
    for ds, bb, head, mean_r, *_ in sorted(ms.rows(), key=lambda r: (r[0], order[r[2]], r[1] == "fstimage", r[1])):
        sub = tg.filter((pl.col("dataset") == ds) & (pl.col("backbone") == bb) & (pl.col("head") == head)).sort("rank")
        cells = [f"`{g}` ({_fmt(v)})" for g, v in zip(sub["gene"], sub["mean_pearson"])]
        cells += ["n/a"] * (k - len(cells))
        lines.append("| " + " | ".join([_fmt(ds), _fmt(bb), _fmt(head), _fmt(mean_r), *cells]) + " |")
    return "\n".join([*lines, ""])


# ----------------------------------------------------------------------------- spatial
def safe_name(s: str) -> str:
    """A file-name-safe version of a slide or gene name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(s)).strip("_") or "x"


def infer_layout(array_row: np.ndarray, array_col: np.ndarray) -> str:
    """``hex`` if the array coordinates look like Visium's doubled columns (``row + col``
    always even or always odd), else ``square`` (legacy ST)."""
    r = np.asarray(array_row, dtype=np.int64)
    c = np.asarray(array_col, dtype=np.int64)
    if r.size > 1 and np.unique(r).size > 1 and np.unique((r + c) % 2).size == 1:
        return "hex"
    return "square"


def _slide_long(predictions: pl.DataFrame, spots: pl.DataFrame, run_id: str, slide: str, genes: Sequence[str]) -> pl.DataFrame:
    p = predictions.filter((pl.col("run_id") == run_id) & (pl.col("slide_id") == slide) & pl.col("gene").is_in(list(genes)))
    s = spots.filter(pl.col("slide_id") == slide).select(
        "slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"
    ).drop_nulls()
    j = p.join(s, on=["slide_id", "spot_id"], how="inner")
    if j.height < p.height:
        log.warning("slide %s: %d prediction rows have no spot coordinates; not drawn", slide, p.height - j.height)
    return j.sort("spot_id", "gene")


def _pearson_lookup(metrics: pl.DataFrame, run_id: str, slide: str, gene: str) -> float | None:
    hit = metrics.filter(
        (pl.col("run_id") == run_id) & (pl.col("scope") == "slide") & (pl.col("slide_id") == slide)
        & (pl.col("gene") == gene) & (pl.col("metric") == "pearson")
    )["value"]
    return None if hit.len() == 0 else hit[0]


def _spatial_for_slide(
    out_dir: Path, metrics: pl.DataFrame, long: pl.DataFrame, run_id: str, model: str, head: str, slide: str,
    genes: Sequence[str],
) -> list[tuple[str, str, str | None, str | None, float, float]]:
    """Spatial and IoU maps of ``genes`` on one slide; returns
    ``(gene, slide, spatial_png, iou_png, pcc, iou)`` per gene drawn."""
    done = []
    genes = [g for g in genes if g in set(long["gene"].to_list())]
    long = long.filter(pl.col("observed").is_not_null() & pl.col("mean_log1p").is_not_null())
    if not genes or long.height == 0:
        return done
    # wide (spot x gene) matrices on the slide's spots that have every gene
    spots_all = (
        long.group_by("spot_id").agg(pl.col("gene").n_unique().alias("n"))
        .filter(pl.col("n") == len(genes)).select("spot_id")
    )
    long = long.join(spots_all, on="spot_id", how="semi").sort("spot_id", "gene")
    coords = long.group_by("spot_id", maintain_order=True).first().select(
        "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"
    )
    n = coords.height
    if n < 2:
        return done
    xy = coords.select("pixel_x", "pixel_y").to_numpy().astype(np.float64)

    def wide(col: str) -> np.ndarray:
        w = long.pivot(on="gene", index="spot_id", values=col, aggregate_function="first").sort("spot_id")
        return w.select(genes).to_numpy().astype(np.float64)

    lib = long.group_by("spot_id", maintain_order=True).first()["library_size"].to_numpy().astype(np.float64)
    measured = np.asarray(normalise_log1p(wide("observed"), np.nan_to_num(lib, nan=0.0)))
    predicted = wide("mean_log1p")
    variance = wide("variance")
    epi = wide("epistemic")
    alea = wide("aleatoric")
    rows = coords["array_row"].to_numpy()
    cols = coords["array_col"].to_numpy()
    iou_res = None
    try:
        iou_res = spatial_iou(measured, predicted, rows, cols, layout=infer_layout(rows, cols), sigma=IOU_SIGMA,
                              threshold=IOU_THRESHOLD)
    except InputError as e:
        log.warning("slide %s: spatial IoU not drawn: %s", slide, e)
    recomputed = pearson(measured, predicted)
    for gi, gene in enumerate(genes):
        pcc = _pearson_lookup(metrics, run_id, slide, gene)
        pcc = float(recomputed[gi]) if pcc is None else pcc
        unc: dict[str, np.ndarray] = {}
        kind = MEMBER_KIND.get(head, "between members")
        if np.all(np.isfinite(epi[:, gi])) and np.all(np.isfinite(alea[:, gi])):
            unc[f"epistemic sd ({kind})"] = np.sqrt(np.clip(epi[:, gi], 0, None))
            unc["aleatoric sd (count noise)"] = np.sqrt(np.clip(alea[:, gi], 0, None))
        elif np.all(np.isfinite(variance[:, gi])):
            unc["predictive sd = sqrt(variance)"] = np.sqrt(np.clip(variance[:, gi], 0, None))
        base = f"{safe_name(slide)}_{safe_name(gene)}"
        sp_path = plots.spatial_maps(
            out_dir / f"spatial_{base}.png", xy, measured[:, gi], predicted[:, gi], unc,
            title=f"{gene} on slide {slide} — {model} — per-slide PCC = {_fmt(pcc)}"
            + ("" if unc else " — no uncertainty from this head"),
        )
        iou_path, iou_v = None, float("nan")
        if iou_res is not None:
            r, c = iou_res.rows, iou_res.cols
            iou_v = float(iou_res.iou[gi])
            iou_path = plots.iou_maps(
                out_dir / f"iou_{base}.png", xy,
                iou_res.true_smooth[gi, r, c], iou_res.pred_smooth[gi, r, c],
                iou_res.true_high[gi, r, c], iou_res.pred_high[gi, r, c],
                threshold=IOU_THRESHOLD,
                title=f"{gene} on slide {slide} — {model} — spatial IoU of high regions = {_fmt(iou_v)}",
            )
        done.append((gene, slide, sp_path.name, iou_path.name if iou_path else None, pcc, iou_v))
    return done


# ----------------------------------------------------------------------------- calibration
def coverage_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """Mean (and sd over genes) empirical coverage of the 50% and 90% central intervals per
    model: ``backbone, head, nominal, empirical, sd``. Uses per-slide values when present,
    else pooled."""
    m = _clean_metrics(metrics).filter(pl.col("metric").is_in(["coverage_50", "coverage_90"]))
    if m.height == 0:
        return pl.DataFrame(schema={"backbone": pl.String, "head": pl.String, "nominal": pl.Float64,
                                    "empirical": pl.Float64, "sd": pl.Float64})
    scope = "slide" if (m["scope"] == "slide").any() else "pooled"
    return (
        m.filter(pl.col("scope") == scope)
        .group_by("backbone", "head", "metric")
        .agg(pl.col("value").mean().alias("empirical"), pl.col("value").std().alias("sd"))
        .with_columns((pl.col("metric").str.extract(r"(\d+)$").cast(pl.Float64) / 100).alias("nominal"))
        .select("backbone", "head", "nominal", "empirical", "sd")
        .sort("head", "backbone", "nominal")
    )


def uncertainty_error_table(predictions: pl.DataFrame, runs: pl.DataFrame, models: Sequence[tuple[str, str]],
                            n_bins: int = 10) -> pl.DataFrame:
    """Per model, quantile bins of predicted sd (``sqrt(variance)``, raw counts) with mean sd
    and mean absolute error ``|observed - mean|`` (raw counts): ``backbone, head, bin, sd,
    abs_error, n``. Rows without a finite variance or an observed count are skipped."""
    if not models or predictions.height == 0:
        return pl.DataFrame()
    keys = pl.DataFrame({"backbone": [b for b, _ in models], "head": [h for _, h in models]})
    rid = runs.select("run_id", "backbone", "head").join(keys, on=["backbone", "head"], how="semi")
    p = (
        predictions.lazy()
        .select("run_id", "observed", "mean", "variance")
        .join(rid.lazy(), on="run_id", how="inner")
        .with_columns(pl.col("variance").cast(pl.Float64), pl.col("mean").cast(pl.Float64))
        .filter(pl.col("variance").is_finite() & (pl.col("variance") >= 0) & pl.col("observed").is_not_null()
                & pl.col("mean").is_finite())
        .with_columns(
            pl.col("variance").sqrt().alias("sd"),
            (pl.col("observed").cast(pl.Float64) - pl.col("mean")).abs().alias("err"),
        )
        .with_columns(
            ((pl.col("sd").rank("ordinal").over("backbone", "head") - 1) * n_bins
             // pl.len().over("backbone", "head")).alias("bin")
        )
        .group_by("backbone", "head", "bin")
        .agg(pl.col("sd").mean(), pl.col("err").mean().alias("abs_error"), pl.len().alias("n"))
        .sort("backbone", "head", "bin")
    )
    return p.collect()


# ----------------------------------------------------------------------------- entry point
def write_report(
    out_dir: Path,
    metrics: pl.DataFrame,
    predictions: pl.DataFrame,
    runs: pl.DataFrame,
    spots: pl.DataFrame,
    leaderboard: pl.DataFrame,
    top_k_genes: int = 3,
    max_slides: int | None = None,
) -> Path:
    """Write ``report.md`` and its figures into ``out_dir``; return the path of report.md.

    Figures: ``pcc_boxplot.png``; ``spatial_<slide>_<gene>.png`` and
    ``iou_<slide>_<gene>.png`` for the ``top_k_genes`` genes of each dataset's best model
    on each of its test slides (at most ``max_slides`` per dataset); ``calibration.png``
    when any model has ``coverage_50``/``coverage_90`` metrics.

    Raises :class:`~stimage_embed.errors.InputError` (a ``ValueError``) when a table lacks
    a column the report reads (the message names table and column).
    """
    validate_inputs(metrics=metrics, predictions=predictions, runs=runs, spots=spots)
    if not isinstance(leaderboard, pl.DataFrame):
        raise InputError("leaderboard", None, f"expected a polars DataFrame, got {type(leaderboard).__name__}")
    if top_k_genes < 1:
        raise InputError(None, "top_k_genes", f"must be >= 1, got {top_k_genes}")
    if max_slides is not None and max_slides < 0:
        raise InputError(None, "max_slides", f"must be >= 0, got {max_slides}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = _clean_metrics(metrics)
    for col in OPTIONAL_PREDICTION_COLUMNS:
        if col not in predictions.columns:
            predictions = predictions.with_columns(pl.lit(None, dtype=pl.Float32).alias(col))
    runs = runs.with_columns(pl.col("dataset").cast(pl.String).fill_null(""))

    md: list[str] = ["# stimage-embed comparison report", "",
                     "Predicted vs measured spatial gene expression from H&E embeddings. Expression is "
                     "compared on the log1p-normalised scale `log1p(count / library size x 1e4)`; "
                     "`mean` and `ridge` are baselines.", ""]
    md.append(_config_section(runs))
    md += ["## Leaderboard", "", "As computed by `compare` (baselines included); floats rounded to 3 decimals.", "",
           markdown_table(leaderboard), ""]
    md.append(_top_genes_section(metrics, top_k_genes))

    # 1. box plot
    psp = per_slide_pearson(metrics)
    md += ["## Per-slide Pearson r", ""]
    if psp.height:
        plots.pcc_boxplot(psp, out_dir / "pcc_boxplot.png")
        md += ["![Per-slide Pearson r per backbone and head](pcc_boxplot.png)", "",
               "*How to read: each box is one model (colour = backbone, group = head) and holds one point per "
               "(test slide, gene) Pearson r between predicted and measured expression; higher is better, the "
               "grey groups are the baselines, the dotted line the ridge median and the solid line r = 0.*", ""]
    else:
        md += ["_No per-slide Pearson values in the metrics._", ""]

    # 2-3. spatial and IoU maps of the best model's top genes
    md += ["## Spatial maps of the most predictable genes", ""]
    best = best_models(metrics)
    tg = top_genes(metrics, top_k_genes)
    run_slides = runs.select("run_id", "dataset", "backbone", "head", "fold", "test_slides").explode("test_slides")
    pred_keys = predictions.select("run_id", "slide_id").unique()
    drawn_any = False
    if best.height == 0:
        md += ["_No non-baseline model with a defined per-slide Pearson: no maps._", ""]
    for ds, bb, head, score in best.iter_rows():
        is_model = (pl.col("dataset") == ds) & (pl.col("backbone") == bb) & (pl.col("head") == head)
        genes = tg.filter(is_model).sort("rank")["gene"].to_list()
        model = f"{bb} / {head}"
        md += [f"Best model{' on ' + ds if ds else ''}: **{model}** (mean per-slide r = {_fmt(score)}); "
               f"top genes: {', '.join(f'`{g}`' for g in genes)}.", ""]
        cand = (
            run_slides.filter(is_model)
            .rename({"test_slides": "slide_id"})
            .join(pred_keys, on=["run_id", "slide_id"], how="semi")
            .sort("slide_id", "fold", "run_id")
            .unique(subset="slide_id", keep="first", maintain_order=True)
        )
        if max_slides is not None:
            cand = cand.head(max_slides)
        if cand.height == 0:
            md += ["_No predictions of this model on its test slides: no maps._", ""]
        for run_id, slide in cand.select("run_id", "slide_id").iter_rows():
            long = _slide_long(predictions, spots, run_id, slide, genes)
            done = _spatial_for_slide(out_dir, metrics, long, run_id, model, head, slide, genes)
            if not done:
                continue
            md += [f"### Slide `{slide}`", ""]
            for gene, _, sp_png, iou_png, pcc, iou_v in done:
                drawn_any = True
                md += [f"![{gene} on {slide}: measured, predicted, uncertainty]({sp_png})", "",
                       f"*How to read: `{gene}` on slide `{slide}` (per-slide r = {_fmt(pcc)}); left the measured "
                       "and middle the predicted log1p-normalised expression at each spot (own colour scale each: "
                       "compare patterns, not levels), right the predictive uncertainty as a standard deviation "
                       "in raw counts (brighter = less certain).*", ""]
                if iou_png:
                    md += [f"![{gene} on {slide}: spatial IoU]({iou_png})", "",
                           f"*How to read: spots above the slide mean, smoothed over neighbours (sigma = "
                           f"{IOU_SIGMA:g} spot) and thresholded at {IOU_THRESHOLD:g}, form the high region of the "
                           f"truth (left) and the prediction (middle); right, green = both high, blue = missed, "
                           f"orange = false alarm; IoU = green / (green + blue + orange) = {_fmt(iou_v)}.*", ""]
    if best.height and not drawn_any:
        md += ["_No maps drawn (no matching predictions with spot coordinates)._", ""]

    # 4. calibration
    md += ["## Calibration", ""]
    cov = coverage_table(metrics)
    if cov.height:
        models = sorted(set(cov.select("backbone", "head").rows()))
        ue = uncertainty_error_table(predictions, runs, models)
        plots.calibration_plot(cov, out_dir / "calibration.png", ue if ue.height else None)
        md += ["![Calibration of predictive intervals](calibration.png)", "",
               "*How to read: left, the fraction of measured counts inside each model's central 50% and 90% "
               "predictive intervals against the nominal level (on the dashed diagonal = calibrated, below = "
               "over-confident, above = under-confident)"
               + ("; right, spots binned by predicted sd against their mean absolute error in raw counts "
                  "(a rising curve near the dashed line = the uncertainty tracks the error).*" if ue.height else ".*"),
               "", markdown_table(cov.rename({"nominal": "nominal coverage", "empirical": "empirical coverage (mean)",
                                              "sd": "sd over genes"})), ""]
    else:
        md += ["_No coverage metrics (no head with predictive quantiles)._", ""]

    path = out_dir / "report.md"
    path.write_text("\n".join(md), encoding="utf-8")
    log.info("wrote %s", path)
    return path
