"""Spatial section of the ``compare`` report: maps of the best model's most predictable
genes on its test slides (measured vs predicted expression with the predictive
uncertainty, and the STimage spatial IoU of the high regions).

Scales: expression log1p-normalised (``log1p(count / library_size * 1e4)``); uncertainty
as a standard deviation in raw counts; spot positions in full-resolution image pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.evaluation.metrics import normalise_log1p, pearson
from stimage_embed.evaluation.plot_maps import iou_maps, spatial_maps
from stimage_embed.evaluation.report_tables import fmt, safe_name
from stimage_embed.evaluation.spatial import SpatialIoU, grid_layout, spatial_iou
from stimage_embed.predictions.registry import HEADS

log = logging.getLogger(__name__)

#: heads whose epistemic sd is a spread between members, and what the members are
MEMBER_KIND = {name: spec.spread for name, spec in HEADS.items() if spec.spread}
#: smoothing (in spots) and threshold of the spatial IoU maps
IOU_SIGMA = 1.0
IOU_THRESHOLD = 0.5


@dataclass(frozen=True)
class SlideMatrices:
    """(spot x gene) matrices of one run on one slide, on the spots that have every gene.

    ``xy``: (n_spots, 2) image pixels; ``measured``/``predicted``: log1p-normalised;
    ``variance``/``epistemic``/``aleatoric``: raw counts² (NaN where the head gives none).
    """

    xy: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    variance: np.ndarray
    epistemic: np.ndarray
    aleatoric: np.ndarray


@dataclass(frozen=True)
class MapTarget:
    """One run of a model on one test slide: what a set of maps is drawn for."""

    run_id: str
    model: str  # "backbone / head"
    head: str
    slide: str


def slide_long(
    predictions: pl.DataFrame, spots: pl.DataFrame, run_id: str, slide: str, genes: Sequence[str]
) -> pl.DataFrame:
    """Prediction rows of ``run_id`` on ``slide`` for ``genes``, joined to spot coordinates."""
    p = predictions.filter(
        (pl.col("run_id") == run_id) & (pl.col("slide_id") == slide) & pl.col("gene").is_in(list(genes))
    )
    s = (
        spots.filter(pl.col("slide_id") == slide)
        .select("slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y")
        .drop_nulls()
    )
    j = p.join(s, on=["slide_id", "spot_id"], how="inner")
    if j.height < p.height:
        log.warning("slide %s: %d prediction rows have no spot coordinates; not drawn", slide, p.height - j.height)
    return j.sort("spot_id", "gene")


def _pearson_lookup(metrics: pl.DataFrame, run_id: str, slide: str, gene: str) -> float | None:
    hit = metrics.filter(
        (pl.col("run_id") == run_id)
        & (pl.col("scope") == "slide")
        & (pl.col("slide_id") == slide)
        & (pl.col("gene") == gene)
        & (pl.col("metric") == "pearson")
    )["value"]
    return None if hit.len() == 0 else hit[0]


def slide_matrices(long: pl.DataFrame, genes: Sequence[str]) -> SlideMatrices | None:
    """Wide matrices of ``genes`` from :func:`slide_long` rows (``None`` under 2 spots)."""
    long = long.filter(pl.col("observed").is_not_null() & pl.col("mean_log1p").is_not_null())
    spots_all = (
        long.group_by("spot_id")
        .agg(pl.col("gene").n_unique().alias("n"))
        .filter(pl.col("n") == len(genes))
        .select("spot_id")
    )
    long = long.join(spots_all, on="spot_id", how="semi").sort("spot_id", "gene")
    first = long.group_by("spot_id", maintain_order=True).first()
    if first.height < 2:
        return None

    def wide(col: str) -> np.ndarray:
        w = long.pivot(on="gene", index="spot_id", values=col, aggregate_function="first").sort("spot_id")
        return w.select(list(genes)).to_numpy().astype(np.float64)

    lib = first["library_size"].to_numpy().astype(np.float64)
    return SlideMatrices(
        xy=first.select("pixel_x", "pixel_y").to_numpy().astype(np.float64),
        rows=first["array_row"].to_numpy(),
        cols=first["array_col"].to_numpy(),
        measured=np.asarray(normalise_log1p(wide("observed"), np.nan_to_num(lib, nan=0.0))),
        predicted=wide("mean_log1p"),
        variance=wide("variance"),
        epistemic=wide("epistemic"),
        aleatoric=wide("aleatoric"),
    )


def _uncertainty_panels(mx: SlideMatrices, gi: int, head: str) -> dict[str, np.ndarray]:
    """Uncertainty panels of gene ``gi``: epistemic + aleatoric sd when both are given,
    else the predictive sd, else none (all raw counts)."""
    kind = MEMBER_KIND.get(head, "between members")
    epi, alea, var = mx.epistemic[:, gi], mx.aleatoric[:, gi], mx.variance[:, gi]
    if np.all(np.isfinite(epi)) and np.all(np.isfinite(alea)):
        return {
            f"epistemic sd ({kind})": np.sqrt(np.clip(epi, 0, None)),
            "aleatoric sd (count noise)": np.sqrt(np.clip(alea, 0, None)),
        }
    if np.all(np.isfinite(var)):
        return {"predictive sd = sqrt(variance)": np.sqrt(np.clip(var, 0, None))}
    return {}


def _draw_gene(
    out_dir: Path, mx: SlideMatrices, iou: SpatialIoU | None, gi: int, gene: str, pcc: float, target: MapTarget
) -> tuple[str, str | None, float]:
    """Spatial (and IoU) maps of one gene; returns ``(spatial_png, iou_png, iou)``."""
    slide, model = target.slide, target.model
    unc = _uncertainty_panels(mx, gi, target.head)
    base = f"{safe_name(slide)}_{safe_name(gene)}"
    sp_path = spatial_maps(
        out_dir / f"spatial_{base}.png",
        mx.xy,
        mx.measured[:, gi],
        mx.predicted[:, gi],
        unc,
        title=f"{gene} on slide {slide} — {model} — per-slide PCC = {fmt(pcc)}"
        + ("" if unc else " — no uncertainty from this head"),
    )
    if iou is None:
        return sp_path.name, None, float("nan")
    r, c = iou.rows, iou.cols
    iou_v = float(iou.iou[gi])
    iou_path = iou_maps(
        out_dir / f"iou_{base}.png",
        mx.xy,
        iou.true_smooth[gi, r, c],
        iou.pred_smooth[gi, r, c],
        iou.true_high[gi, r, c],
        iou.pred_high[gi, r, c],
        threshold=IOU_THRESHOLD,
        title=f"{gene} on slide {slide} — {model} — spatial IoU of high regions = {fmt(iou_v)}",
    )
    return sp_path.name, iou_path.name, iou_v


def spatial_for_slide(
    out_dir: Path, metrics: pl.DataFrame, long: pl.DataFrame, target: MapTarget, genes: Sequence[str]
) -> list[tuple[str, str, str | None, str | None, float, float]]:
    """Spatial and IoU maps of ``genes`` on one slide; returns
    ``(gene, slide, spatial_png, iou_png, pcc, iou)`` per gene drawn. ``pcc`` is the stored
    per-slide Pearson, recomputed from the matrices when the metrics lack it."""
    genes = [g for g in genes if g in set(long["gene"].to_list())]
    mx = slide_matrices(long, genes) if genes else None
    if mx is None:
        return []
    iou = None
    try:
        iou = spatial_iou(
            mx.measured,
            mx.predicted,
            mx.rows,
            mx.cols,
            layout=grid_layout(mx.rows, mx.cols),
            sigma=IOU_SIGMA,
            threshold=IOU_THRESHOLD,
        )
    except InputError as e:
        log.warning("slide %s: spatial IoU not drawn: %s", target.slide, e)
    recomputed = pearson(mx.measured, mx.predicted)
    done = []
    for gi, gene in enumerate(genes):
        pcc = _pearson_lookup(metrics, target.run_id, target.slide, gene)
        pcc = float(recomputed[gi]) if pcc is None else pcc
        sp_png, iou_png, iou_v = _draw_gene(out_dir, mx, iou, gi, gene, pcc, target)
        done.append((gene, target.slide, sp_png, iou_png, pcc, iou_v))
    return done


def _gene_markdown(gene: str, slide: str, sp_png: str, iou_png: str | None, pcc: float, iou_v: float) -> list[str]:
    md = [
        f"![{gene} on {slide}: measured, predicted, uncertainty]({sp_png})",
        "",
        f"*How to read: `{gene}` on slide `{slide}` (per-slide r = {fmt(pcc)}); left the measured "
        "and middle the predicted log1p-normalised expression at each spot (own colour scale each: "
        "compare patterns, not levels), right the predictive uncertainty as a standard deviation "
        "in raw counts (brighter = less certain).*",
        "",
    ]
    if iou_png:
        md += [
            f"![{gene} on {slide}: spatial IoU]({iou_png})",
            "",
            f"*How to read: spots above the slide mean, smoothed over neighbours (sigma = "
            f"{IOU_SIGMA:g} spot) and thresholded at {IOU_THRESHOLD:g}, form the high region of the "
            f"truth (left) and the prediction (middle); right, green = both high, blue = missed, "
            f"orange = false alarm; IoU = green / (green + blue + orange) = {fmt(iou_v)}.*",
            "",
        ]
    return md


def _map_slides(
    runs: pl.DataFrame, predictions: pl.DataFrame, is_model: pl.Expr, max_slides: int | None
) -> pl.DataFrame:
    """``run_id, slide_id`` of the model's test slides that have predictions: one run per
    slide (first fold, then run id), slides sorted, at most ``max_slides``."""
    cand = (
        runs.select("run_id", "dataset", "backbone", "head", "fold", "test_slides")
        .explode("test_slides")
        .filter(is_model)
        .rename({"test_slides": "slide_id"})
        .join(predictions.select("run_id", "slide_id").unique(), on=["run_id", "slide_id"], how="semi")
        .sort("slide_id", "fold", "run_id")
        .unique(subset="slide_id", keep="first", maintain_order=True)
    )
    return cand if max_slides is None else cand.head(max_slides)


def maps_section(
    out_dir: Path,
    metrics: pl.DataFrame,
    predictions: pl.DataFrame,
    runs: pl.DataFrame,
    spots: pl.DataFrame,
    best: pl.DataFrame,
    top: pl.DataFrame,
    max_slides: int | None,
) -> list[str]:
    """Markdown of the spatial section: for each dataset's best model (``best``, from
    :func:`~stimage_embed.evaluation.report_tables.best_models`), its top genes (``top``,
    from :func:`~stimage_embed.evaluation.report_tables.top_genes`) mapped on each of its
    test slides (at most ``max_slides``); the figures are written into ``out_dir``."""
    md = ["## Spatial maps of the most predictable genes", ""]
    if best.height == 0:
        md += ["_No non-baseline model with a defined per-slide Pearson: no maps._", ""]
    drawn_any = False
    for ds, bb, head, score in best.iter_rows():
        is_model = (pl.col("dataset") == ds) & (pl.col("backbone") == bb) & (pl.col("head") == head)
        genes = top.filter(is_model).sort("rank")["gene"].to_list()
        model = f"{bb} / {head}"
        md += [
            f"Best model{' on ' + ds if ds else ''}: **{model}** (mean per-slide r = {fmt(score)}); "
            f"top genes: {', '.join(f'`{g}`' for g in genes)}.",
            "",
        ]
        cand = _map_slides(runs, predictions, is_model, max_slides)
        if cand.height == 0:
            md += ["_No predictions of this model on its test slides: no maps._", ""]
        for run_id, slide in cand.select("run_id", "slide_id").iter_rows():
            long = slide_long(predictions, spots, run_id, slide, genes)
            done = spatial_for_slide(out_dir, metrics, long, MapTarget(run_id, model, head, slide), genes)
            if done:
                drawn_any = True
                md += [f"### Slide `{slide}`", ""]
                for gene, _, sp_png, iou_png, pcc, iou_v in done:
                    md += _gene_markdown(gene, slide, sp_png, iou_png, pcc, iou_v)
    if best.height and not drawn_any:
        md += ["_No maps drawn (no matching predictions with spot coordinates)._", ""]
    return md
