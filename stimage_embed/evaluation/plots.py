"""Figures of the ``compare`` report, drawn with matplotlib's Agg canvas.

Every function takes data already reduced to what it draws (numpy arrays or small polars
tables), writes one PNG and returns its path. Figures are built with the object API
(``matplotlib.figure.Figure`` on a ``FigureCanvasAgg``): no pyplot, so no global figure
registry that could grow, and no display needed.

Scales
------
* expression maps: ``log1p(count / library_size * 1e4)`` ("log1p-normalised");
* predictive uncertainty: standard deviations on the RAW-COUNT scale;
* spot positions: full-resolution image pixels, y pointing down (image orientation).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import EllipseCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy.spatial import cKDTree


DPI = 110
#: heads shown as references (grey background in the box plot)
BASELINE_HEADS = ("mean", "ridge")
#: preferred left-to-right order of heads; unknown heads follow alphabetically
HEAD_ORDER = ("mean", "ridge", "nb", "ensemble", "highlow", "fstimage")
#: Okabe-Ito, colour-blind safe; backbones take them in sorted order
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
_FSTIMAGE_COLOUR = "#000000"
#: spatial IoU overlap classes: (label, colour)
OVERLAP_CLASSES = (
    ("neither high", "#E6E6E6"),
    ("truth only (FN)", "#0072B2"),
    ("prediction only (FP)", "#D55E00"),
    ("both high (TP)", "#009E73"),
)
_HEAD_MARKERS = {"nb": "o", "ensemble": "s", "fstimage": "D", "highlow": "^", "ridge": "v", "mean": "x"}


def _new_figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, facecolor="white")
    fig.clear()
    return path


def order_heads(heads: Sequence[str]) -> list[str]:
    """Heads in :data:`HEAD_ORDER`, unknown ones after it alphabetically."""
    known = [h for h in HEAD_ORDER if h in set(heads)]
    return known + sorted(set(heads) - set(HEAD_ORDER))


def backbone_colours(backbones: Sequence[str]) -> dict[str, str]:
    """One colour per backbone (``fstimage`` black, others from a colour-blind-safe palette)."""
    out: dict[str, str] = {}
    others = sorted(b for b in set(backbones) if b != "fstimage")
    for i, b in enumerate(others):
        out[b] = _PALETTE[i % len(_PALETTE)]
    if "fstimage" in set(backbones):
        out["fstimage"] = _FSTIMAGE_COLOUR
    return out


# ----------------------------------------------------------------------------- box plot
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
    fig = _new_figure(max(6.5, 1.25 * n_groups + 2.5), 3.8 * len(datasets) + 0.4)
    axes = fig.subplots(len(datasets), 1, squeeze=False)[:, 0]
    rng = np.random.default_rng(0)
    for ax, ds in zip(axes, datasets):
        sub = df.filter(pl.col("dataset") == ds)
        heads = [h for h in heads_all if h in set(sub["head"].to_list())]
        for gi, head in enumerate(heads):
            if head in BASELINE_HEADS:
                ax.axvspan(gi - 0.5, gi + 0.5, color="#F0F0F0", zorder=0)
            bbs = sorted(sub.filter(pl.col("head") == head)["backbone"].unique().to_list(),
                         key=lambda b: (b == "fstimage", b))
            width = 0.8 / len(bbs)
            vals = {bb: sub.filter((pl.col("head") == head) & (pl.col("backbone") == bb))["value"].drop_nulls().to_numpy()
                    for bb in bbs}
            if all(v.size == 0 for v in vals.values()):
                ax.text(gi, 0.02, "r undefined\n(constant prediction)", ha="center", va="bottom", fontsize=7,
                        color="#555555")
            for bi, bb in enumerate(bbs):
                x = gi - 0.4 + width * (bi + 0.5)
                v = vals[bb]
                if v.size == 0:
                    if any(u.size for u in vals.values()):
                        ax.text(x, 0.02, "r undefined", ha="center", va="bottom", fontsize=7, color="#555555",
                                rotation=90)
                    continue
                bp = ax.boxplot(v, positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False,
                                medianprops={"color": "black", "linewidth": 1.2}, manage_ticks=False)
                for box in bp["boxes"]:
                    box.set_facecolor(colours[bb])
                    box.set_alpha(0.75)
                if v.size <= 400:
                    jitter = rng.uniform(-width * 0.25, width * 0.25, v.size)
                    ax.scatter(x + jitter, v, s=6, color="black", alpha=0.35, linewidths=0, zorder=3)
        ridge = sub.filter(pl.col("head") == "ridge")["value"].drop_nulls()
        if ridge.len():
            ax.axhline(float(ridge.median()), color="#555555", linestyle=":", linewidth=1.2, zorder=1)
        ax.axhline(0.0, color="black", linewidth=0.8, zorder=1)
        ax.set_xticks(range(len(heads)))
        ax.set_xticklabels([f"{h}\n(baseline)" if h in BASELINE_HEADS else h for h in heads])
        ax.set_xlim(-0.5, len(heads) - 0.5)
        ax.set_xlabel("head")
        ax.set_ylabel(f"per-slide {metric_label}\n(log1p-normalised expression)")
        ax.set_title(f"{ds}: per-slide {metric_label} per gene (one point = one gene on one test slide)"
                     if ds else f"per-slide {metric_label} per gene (one point = one gene on one test slide)",
                     fontsize=10)
        ax.grid(axis="y", color="#DDDDDD", linewidth=0.6)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=c, alpha=0.75, label=b) for b, c in colours.items()]
    if df.filter(pl.col("head") == "ridge")["value"].drop_nulls().len():
        handles.append(Line2D([], [], color="#555555", linestyle=":", label="ridge median"))
    axes[0].legend(handles=handles, title="backbone", fontsize=8, title_fontsize=8, loc="upper left",
                   bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, path)


# ----------------------------------------------------------------------------- spot maps
def spot_diameter(xy: np.ndarray) -> float:
    """Drawing diameter of a spot: 0.95 x the median nearest-neighbour distance (same unit
    as ``xy``, here pixels), so neighbouring spots almost touch."""
    pts = np.asarray(xy, dtype=np.float64)
    if pts.shape[0] < 2:
        return 1.0
    d, _ = cKDTree(pts).query(pts, k=2)
    nn = d[:, 1][d[:, 1] > 0]
    return 0.95 * float(np.median(nn)) if nn.size else 1.0


def _draw_spots(ax: Axes, xy: np.ndarray, values: np.ndarray, diameter: float, cmap: str | ListedColormap,
                norm: Normalize) -> EllipseCollection:
    """Spots as circles of ``diameter`` data units at ``xy`` (pixels), y axis inverted."""
    n = xy.shape[0]
    coll = EllipseCollection(np.full(n, diameter), np.full(n, diameter), np.zeros(n), units="xy",
                             offsets=xy, offset_transform=ax.transData, cmap=cmap, norm=norm, linewidths=0)
    coll.set_array(np.asarray(values, dtype=np.float64))
    ax.add_collection(coll, autolim=False)
    pad = diameter
    ax.set_xlim(xy[:, 0].min() - pad, xy[:, 0].max() + pad)
    ax.set_ylim(xy[:, 1].max() + pad, xy[:, 1].min() - pad)  # image orientation: y down
    ax.set_aspect("equal")
    ax.set_xlabel("x (image px)")
    ax.set_ylabel("y (image px)")
    ax.tick_params(labelsize=7)
    return coll


def _robust_norm(v: np.ndarray) -> Normalize:
    f = v[np.isfinite(v)]
    if f.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = np.percentile(f, [1, 99])
    if hi <= lo:
        lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(float(lo), float(hi))


def _map_figure(n: int, xy: np.ndarray, diameter: float, *, extra_right: float = 0.0,
                top: float = 0.8) -> tuple[Figure, list[Axes], list[Axes]]:
    """A row of ``n`` map panels sized to the slide's aspect ratio, each with a colour-bar
    axes on its right; fixed layout in inches (faster than constrained layout)."""
    w = float(np.ptp(xy[:, 0])) + 2 * diameter
    h = float(np.ptp(xy[:, 1])) + 2 * diameter
    aspect = h / w if w > 0 else 1.0
    pw = 3.2
    ph = pw * aspect
    if ph > 3.6:
        ph, pw = 3.6, max(3.6 / aspect, 1.2)
    elif ph < 1.2:
        ph, pw = 1.2, min(1.2 / aspect, 6.0)
    cb_w, left, gap, bottom = 0.95, 0.8, 0.5, 0.55
    fig_w = left + n * (pw + cb_w) + (n - 1) * gap + 0.1 + extra_right
    fig_h = bottom + ph + top
    fig = _new_figure(fig_w, fig_h, constrained=False)
    axes, caxes = [], []
    for i in range(n):
        x0 = left + i * (pw + cb_w + gap)
        axes.append(fig.add_axes((x0 / fig_w, bottom / fig_h, pw / fig_w, ph / fig_h)))
        caxes.append(fig.add_axes(((x0 + pw + 0.1) / fig_w, bottom / fig_h, 0.14 / fig_w, ph / fig_h)))
    return fig, axes, caxes


def _suptitle(fig: Figure, title: str) -> None:
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / fig.get_figheight(), va="top")


def spatial_maps(
    path: Path,
    xy: np.ndarray,
    measured: np.ndarray,
    predicted: np.ndarray,
    uncertainty: Mapping[str, np.ndarray],
    *,
    title: str,
) -> Path:
    """Measured vs predicted expression of one gene on one slide, plus uncertainty panels.

    Parameters
    ----------
    xy : (n_spots, 2) spot centres in full-resolution image pixels (x = column, y = row).
    measured, predicted : (n_spots,) log1p-normalised expression.
    uncertainty : panel title -> (n_spots,) values (e.g. predictive sd in raw counts);
        may be empty.
    title : figure title (gene, slide, model, PCC).

    Each panel has its own robust colour scale (1st-99th percentile): compare patterns,
    not absolute levels.
    """
    xy = np.asarray(xy, dtype=np.float64)
    panels: list[tuple[str, np.ndarray, str, str]] = [
        ("measured", np.asarray(measured, dtype=np.float64), "viridis", "log1p(count / library size x 1e4)"),
        ("predicted", np.asarray(predicted, dtype=np.float64), "viridis", "log1p(pred. mean / library size x 1e4)"),
    ]
    for name, vals in uncertainty.items():
        panels.append((name, np.asarray(vals, dtype=np.float64), "magma", "sd (raw counts)"))
    diam = spot_diameter(xy)
    fig, axes, caxes = _map_figure(len(panels), xy, diam)
    for i, (ax, cax, (name, vals, cmap, unit)) in enumerate(zip(axes, caxes, panels)):
        coll = _draw_spots(ax, xy, vals, diam, cmap, _robust_norm(vals))
        ax.set_title(name, fontsize=9)
        if i:
            ax.set_ylabel("")
        cb = fig.colorbar(coll, cax=cax, extend="both")
        cb.set_label(unit, fontsize=7)
        cb.ax.tick_params(labelsize=7)
    _suptitle(fig, title)
    return _save(fig, path)


def iou_maps(
    path: Path,
    xy: np.ndarray,
    true_smooth: np.ndarray,
    pred_smooth: np.ndarray,
    true_high: np.ndarray,
    pred_high: np.ndarray,
    *,
    threshold: float,
    title: str,
) -> Path:
    """STimage spatial IoU of one gene on one slide, drawn at the spots' image positions.

    Parameters
    ----------
    xy : (n_spots, 2) spot centres, image pixels.
    true_smooth, pred_smooth : (n_spots,) smoothed fraction of "high" spots around each
        spot (0..1), read off the :class:`~stimage_embed.evaluation.spatial.SpatialIoU`
        rasters at the spots' cells.
    true_high, pred_high : (n_spots,) bool, ``smooth > threshold``.
    threshold : binarisation threshold (marked on the colour bars).

    Panels: truth smoothed, prediction smoothed (spots of the high region marked with a
    white dot), and their overlap coloured TP / FN / FP / neither.
    """
    xy = np.asarray(xy, dtype=np.float64)
    diam = spot_diameter(xy)
    fig, axes, caxes = _map_figure(3, xy, diam, extra_right=0.9, top=0.95)
    norm = Normalize(0.0, 1.0)
    for i, (name, sm, hi) in enumerate((("truth", true_smooth, true_high), ("prediction", pred_smooth, pred_high))):
        ax = axes[i]
        coll = _draw_spots(ax, xy, np.nan_to_num(np.asarray(sm, dtype=np.float64), nan=0.0), diam, "cividis", norm)
        hi = np.asarray(hi, dtype=bool)
        if hi.any():
            k = int(hi.sum())
            dots = EllipseCollection(np.full(k, diam * 0.3), np.full(k, diam * 0.3), np.zeros(k), units="xy",
                                     offsets=xy[hi], offset_transform=ax.transData, facecolors="white",
                                     edgecolors="black", linewidths=0.6, zorder=3)
            ax.add_collection(dots, autolim=False)
        ax.set_title(f"{name}: smoothed fraction of high spots\n(white dot = high region, > {threshold:g})", fontsize=9)
        cb = fig.colorbar(coll, cax=caxes[i])
        cb.ax.axhline(threshold, color="red", linewidth=1.5)
        cb.set_label("Gaussian-weighted fraction of high spots", fontsize=7)
        cb.ax.tick_params(labelsize=7)
    t = np.asarray(true_high, dtype=bool)
    p = np.asarray(pred_high, dtype=bool)
    cls = t.astype(int) + 2 * p.astype(int)  # 0 neither, 1 FN, 2 FP, 3 TP
    cmap = ListedColormap([c for _, c in OVERLAP_CLASSES])
    _draw_spots(axes[2], xy, cls, diam, cmap, BoundaryNorm([-0.5, 0.5, 1.5, 2.5, 3.5], cmap.N))
    counts = np.bincount(cls, minlength=4)
    axes[2].set_title("overlap of the high regions", fontsize=9)
    caxes[2].set_axis_off()
    caxes[2].legend(handles=[Patch(color=c, label=f"{lab}: {n}") for (lab, c), n in zip(OVERLAP_CLASSES, counts)],
                    fontsize=7, loc="center left", frameon=False, title="spots", title_fontsize=7)
    for ax in axes[1:]:
        ax.set_ylabel("")
    _suptitle(fig, title)
    return _save(fig, path)


# ----------------------------------------------------------------------------- calibration
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
    fig = _new_figure(11.0 if has_err else 6.0, 4.6)
    axes = fig.subplots(1, 2 if has_err else 1, squeeze=False)[0]
    models = coverage.select("backbone", "head").unique().sort("head", "backbone").rows()
    if has_err:
        models = sorted(set(models) | set(uncertainty_error.select("backbone", "head").unique().rows()),
                        key=lambda m: (m[1], m[0]))
    colours = backbone_colours([b for b, _ in models])
    ax = axes[0]
    ax.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="perfect calibration")
    lo = 0.4
    for mi, (bb, head) in enumerate(models):
        sub = coverage.filter((pl.col("backbone") == bb) & (pl.col("head") == head)).sort("nominal")
        if sub.height == 0:
            continue
        dodge = 0.012 * (mi - (len(models) - 1) / 2)  # keep error bars of models apart
        x, y, e = sub["nominal"].to_numpy() + dodge, sub["empirical"].to_numpy(), sub["sd"].fill_null(0).to_numpy()
        lo = min(lo, float(np.nanmin(y - e)) - 0.05)
        ax.errorbar(x, y, yerr=e, color=colours[bb], marker=_HEAD_MARKERS.get(head, "o"), capsize=3,
                    linewidth=1.3, markersize=6, label=f"{bb} / {head}")
    lo = max(0.0, lo)
    ax.set_xlim(lo, 1.0)
    ax.set_ylim(lo, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("nominal coverage of the central interval")
    ax.set_ylabel("empirical coverage (mean over genes ± sd)")
    ax.set_title("interval calibration (50% and 90% intervals)", fontsize=10)
    ax.grid(color="#E5E5E5", linewidth=0.6)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    if has_err:
        ax = axes[1]
        allv = []
        for bb, head in models:
            sub = uncertainty_error.filter((pl.col("backbone") == bb) & (pl.col("head") == head)).sort("sd")
            if sub.height == 0:
                continue
            x, y = sub["sd"].to_numpy(), sub["abs_error"].to_numpy()
            allv.append(np.concatenate([x, y]))
            ax.plot(x, y, color=colours[bb], marker=_HEAD_MARKERS.get(head, "o"), markersize=5, linewidth=1.2,
                    label=f"{bb} / {head}")
        v = np.concatenate(allv)
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            ref = np.array([v.min(), v.max()])
            ax.plot(ref, np.sqrt(2 / np.pi) * ref, color="#888888", linestyle="--", linewidth=1,
                    label="calibrated (Gaussian): MAE = 0.80 sd")
            if v.max() / v.min() > 20:
                ax.set_xscale("log")
                ax.set_yscale("log")
        ax.set_xlabel("predicted sd, binned (raw counts)")
        ax.set_ylabel("mean |observed - predicted mean| (raw counts)")
        ax.set_title("uncertainty vs error (quantile bins of predicted sd)", fontsize=10)
        ax.grid(color="#E5E5E5", linewidth=0.6, which="both")
        ax.legend(fontsize=7, loc="upper left", frameon=False)
    return _save(fig, path)
