"""Figures of the ``compare`` report, drawn with matplotlib's Agg canvas.

Every function takes data already reduced to what it draws (numpy arrays or small polars
tables), writes one PNG and returns its path. Figures are built with the object API
(:mod:`stimage_embed.evaluation.figure`): no pyplot, so no global figure registry that
could grow, and no display needed. This module holds the box plot and the calibration
figure; the spot maps (expression, spatial IoU) are in
:mod:`stimage_embed.evaluation.plot_maps` and re-exported here.

Scales
------
* Pearson r: on log1p-normalised expression ``log1p(count / library_size * 1e4)``;
* predictive sd and absolute error: RAW-COUNT scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from stimage_embed.evaluation.figure import DPI, new_figure, save_figure
from stimage_embed.evaluation.plot_maps import OVERLAP_CLASSES, iou_maps, spatial_maps, spot_diameter
from stimage_embed.predictions.registry import HEADS, head_names

__all__ = [
    "BASELINE_HEADS",
    "DPI",
    "HEAD_ORDER",
    "OVERLAP_CLASSES",
    "SPANNING",
    "backbone_colours",
    "calibration_plot",
    "iou_maps",
    "order_heads",
    "pcc_boxplot",
    "spatial_maps",
    "spot_diameter",
]

#: heads shown as references (grey background in the box plot), from the head registry
BASELINE_HEADS = head_names(baseline=True)
#: preferred left-to-right order of heads (the registry's); unknown heads follow alphabetically
HEAD_ORDER = head_names()
#: "backbones" that are heads spanning backbones (FSTimage's rows carry its name as backbone)
SPANNING = frozenset(head_names(spans_backbones=True))
#: Okabe-Ito, colour-blind safe; backbones take them in sorted order
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
_FSTIMAGE_COLOUR = "#000000"
_HEAD_MARKERS = {name: spec.marker for name, spec in HEADS.items()}


def order_heads(heads: Sequence[str]) -> list[str]:
    """Heads in :data:`HEAD_ORDER`, unknown ones after it alphabetically."""
    known = [h for h in HEAD_ORDER if h in set(heads)]
    return known + sorted(set(heads) - set(HEAD_ORDER))


def backbone_colours(backbones: Sequence[str]) -> dict[str, str]:
    """One colour per backbone (``fstimage`` black, others from a colour-blind-safe palette)."""
    out: dict[str, str] = {}
    others = sorted(b for b in set(backbones) if b not in SPANNING)
    for i, b in enumerate(others):
        out[b] = _PALETTE[i % len(_PALETTE)]
    for b in sorted(SPANNING & set(backbones)):
        out[b] = _FSTIMAGE_COLOUR
    return out


# ----------------------------------------------------------------------------- box plot
_UNDEFINED = dict(ha="center", va="bottom", fontsize=7, color="#555555")


def _one_box(ax, x: float, v: np.ndarray, width: float, colour: str, rng: np.random.Generator) -> None:
    """One box of values ``v`` at ``x`` in ``colour``, with the points jittered over it when
    there are at most 400."""
    bp = ax.boxplot(
        v,
        positions=[x],
        widths=width * 0.8,
        patch_artist=True,
        showfliers=False,
        medianprops={"color": "black", "linewidth": 1.2},
        manage_ticks=False,
    )
    for box in bp["boxes"]:
        box.set_facecolor(colour)
        box.set_alpha(0.75)
    if v.size <= 400:
        jitter = rng.uniform(-width * 0.25, width * 0.25, v.size)
        ax.scatter(x + jitter, v, s=6, color="black", alpha=0.35, linewidths=0, zorder=3)


def _head_boxes(ax, gi: int, head: str, sub: pl.DataFrame, colours: dict, rng: np.random.Generator) -> None:
    """The boxes of one head (slot ``gi``), one per backbone (spanning ones last); a grey slot
    for a baseline; "r undefined" where a model has no defined value."""
    if head in BASELINE_HEADS:
        ax.axvspan(gi - 0.5, gi + 0.5, color="#F0F0F0", zorder=0)
    rows = sub.filter(pl.col("head") == head)
    bbs = sorted(rows["backbone"].unique().to_list(), key=lambda b: (b in SPANNING, b))
    width = 0.8 / len(bbs)
    vals = {bb: rows.filter(pl.col("backbone") == bb)["value"].drop_nulls().to_numpy() for bb in bbs}
    if all(v.size == 0 for v in vals.values()):
        ax.text(gi, 0.02, "r undefined\n(constant prediction)", **_UNDEFINED)
    for bi, bb in enumerate(bbs):
        x = gi - 0.4 + width * (bi + 0.5)
        if vals[bb].size:
            _one_box(ax, x, vals[bb], width, colours[bb], rng)
        elif any(u.size for u in vals.values()):
            ax.text(x, 0.02, "r undefined", rotation=90, **_UNDEFINED)


def _pcc_axis_labels(ax, ds: str, heads: list[str], sub: pl.DataFrame, metric_label: str) -> None:
    """Reference lines (ridge median dotted, r = 0 solid), head ticks, labels and title of one facet."""
    ridge = sub.filter(pl.col("head") == "ridge")["value"].drop_nulls()
    if ridge.len():
        ax.axhline(float(ridge.median()), color="#555555", linestyle=":", linewidth=1.2, zorder=1)
    ax.axhline(0.0, color="black", linewidth=0.8, zorder=1)
    ax.set_xticks(range(len(heads)))
    ax.set_xticklabels([f"{h}\n(baseline)" if h in BASELINE_HEADS else h for h in heads])
    ax.set_xlim(-0.5, len(heads) - 0.5)
    ax.set_xlabel("head")
    ax.set_ylabel(f"per-slide {metric_label}\n(log1p-normalised expression)")
    title = f"per-slide {metric_label} per gene (one point = one gene on one test slide)"
    ax.set_title(f"{ds}: {title}" if ds else title, fontsize=10)
    ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
    ax.set_axisbelow(True)


def pcc_boxplot(per_slide: pl.DataFrame, path: Path, *, metric_label: str = "Pearson r") -> Path:
    """Box plots of per-slide Pearson r, grouped by head, one colour per backbone.

    Parameters
    ----------
    per_slide : columns ``dataset, backbone, head, value`` — one row per (fold, test slide,
        gene); ``value`` may be NaN (undefined, e.g. a constant prediction).
    path : PNG to write.

    One facet per dataset. Baseline heads (:data:`BASELINE_HEADS`) sit on a grey
    background; a dotted line marks the median of the ``ridge`` baseline; a solid line
    marks r = 0. A model whose values are all undefined is written as text in its slot.
    """
    df = per_slide.with_columns(pl.col("value").cast(pl.Float64).fill_nan(None))
    datasets = sorted(df["dataset"].unique().to_list())
    colours = backbone_colours(df["backbone"].unique().to_list())
    heads_all = order_heads(df["head"].unique().to_list())
    n_groups = max(len(heads_all), 1)
    fig = new_figure(max(6.5, 1.25 * n_groups + 2.5), 3.8 * len(datasets) + 0.4)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)
    for ax, ds in zip(axes, datasets):
        sub = df.filter(pl.col("dataset") == ds)
        heads = [h for h in heads_all if h in set(sub["head"].to_list())]
        for gi, head in enumerate(heads):
            _head_boxes(ax, gi, head, sub, colours, rng)
        _pcc_axis_labels(ax, ds, heads, sub, metric_label)
    handles = [Patch(facecolor=c, alpha=0.75, label=b) for b, c in colours.items()]
    if df.filter(pl.col("head") == "ridge")["value"].drop_nulls().len():
        handles.append(Line2D([], [], color="#555555", linestyle=":", label="ridge median"))
    axes[0].legend(
        handles=handles,
        title="backbone",
        fontsize=8,
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    return save_figure(fig, path)


# ----------------------------------------------------------------------------- calibration
def _model_rows(df: pl.DataFrame, bb: str, head: str, order: str) -> pl.DataFrame:
    return df.filter((pl.col("backbone") == bb) & (pl.col("head") == head)).sort(order)


def _coverage_panel(ax, coverage: pl.DataFrame, models: list[tuple[str, str]], colours: dict) -> None:
    """Empirical vs nominal coverage per model (error bars: sd over genes), with the diagonal."""
    ax.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
    lo = 0.4
    for mi, (bb, head) in enumerate(models):
        sub = _model_rows(coverage, bb, head, "nominal")
        if sub.height == 0:
            continue
        dodge = 0.012 * (mi - (len(models) - 1) / 2)  # keep error bars of models apart
        x, y, e = sub["nominal"].to_numpy() + dodge, sub["empirical"].to_numpy(), sub["sd"].fill_null(0).to_numpy()
        lo = min(lo, float(np.nanmin(y - e)) - 0.05)
        marker = _HEAD_MARKERS.get(head, "o")
        style = dict(capsize=3, linewidth=1.3, markersize=6)
        ax.errorbar(x, y, yerr=e, color=colours[bb], marker=marker, label=f"{bb} / {head}", **style)
    lo = max(0.0, lo)
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("empirical coverage (mean over genes ± sd)")
    ax.set_title("interval calibration (50% and 90% intervals)", fontsize=10)
    ax.grid(color="#E5E5E5", linewidth=0.6)
    ax.legend(fontsize=7, loc="upper left", frameon=False)


def _error_panel(ax, uncertainty_error: pl.DataFrame, models: list[tuple[str, str]], colours: dict) -> None:
    """Mean absolute error vs binned predicted sd per model, with the Gaussian reference
    ``MAE = sqrt(2/pi) sd`` (log axes when the values span more than 20x)."""
    allv = []
    for bb, head in models:
        sub = _model_rows(uncertainty_error, bb, head, "sd")
        if sub.height == 0:
            continue
        x, y = sub["sd"].to_numpy(), sub["abs_error"].to_numpy()
        allv.append(np.concatenate([x, y]))
        marker = _HEAD_MARKERS.get(head, "o")
        ax.plot(x, y, color=colours[bb], marker=marker, markersize=5, linewidth=1.2, label=f"{bb} / {head}")
    v = np.concatenate(allv)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size:
        ref = np.array([v.min(), v.max()])
        label = "calibrated (Gaussian): MAE = 0.80 sd"
        ax.plot(ref, np.sqrt(2 / np.pi) * ref, color="#888888", linestyle="--", linewidth=1, label=label)
        if v.max() / v.min() > 20:
            ax.set_xscale("log")
            ax.set_yscale("log")
    ax.set_xlabel("predicted sd, binned (raw counts)")
    ax.set_ylabel("mean |observed - predicted mean| (raw counts)")
    ax.set_title("uncertainty vs error (quantile bins of predicted sd)", fontsize=10)
    ax.grid(color="#E5E5E5", linewidth=0.6, which="both")
    ax.legend(fontsize=7, loc="upper left", frameon=False)


def calibration_plot(coverage: pl.DataFrame, path: Path, uncertainty_error: pl.DataFrame | None = None) -> Path:
    """Interval calibration, and (if given) predicted sd vs observed error.

    Parameters
    ----------
    coverage : columns ``backbone, head, nominal, empirical, sd`` — mean empirical
        coverage (over genes and slides) of the central ``nominal`` predictive interval,
        and its sd over genes.
    uncertainty_error : columns ``backbone, head, sd, abs_error`` — per bin of predicted
        sd (quantile bins within each model): mean predicted sd and mean absolute error
        ``|observed - mean|``, both raw counts. ``None`` or empty: one panel only.

    A calibrated model lies on the diagonal (left) and near ``MAE = sqrt(2/pi) sd``, the
    expected absolute error of a Gaussian with that sd (right; an approximation for counts).
    """
    has_err = uncertainty_error is not None and uncertainty_error.height > 0
    fig = new_figure(11.0 if has_err else 6.0, 4.6)
    axes = fig.subplots(1, 2 if has_err else 1, squeeze=False)[0]
    models = coverage.select("backbone", "head").unique().sort("head", "backbone").rows()
    if has_err:
        models = sorted(
            set(models) | set(uncertainty_error.select("backbone", "head").unique().rows()), key=lambda m: (m[1], m[0])
        )
    colours = backbone_colours([b for b, _ in models])
    _coverage_panel(axes[0], coverage, models, colours)
    if has_err:
        _error_panel(axes[1], uncertainty_error, models, colours)
    return save_figure(fig, path)
