"""Spot maps of the ``compare`` report: measured vs predicted expression of one gene on
one slide, and its STimage spatial IoU, drawn at the spots' image positions.

Scales
------
* expression maps: ``log1p(count / library_size * 1e4)`` ("log1p-normalised");
* predictive uncertainty: standard deviations on the RAW-COUNT scale;
* spot positions: full-resolution image pixels, y pointing down (image orientation).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import EllipseCollection
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.spatial import cKDTree

from stimage_embed.evaluation.figure import new_figure, save_figure

#: spatial IoU overlap classes: (label, colour)
OVERLAP_CLASSES = (
    ("neither high", "#E6E6E6"),
    ("truth only (FN)", "#0072B2"),
    ("prediction only (FP)", "#D55E00"),
    ("both high (TP)", "#009E73"),
)


def spot_diameter(xy: np.ndarray) -> float:
    """Drawing diameter of a spot: 0.95 x the median nearest-neighbour distance (same unit
    as ``xy``, here pixels), so neighbouring spots almost touch."""
    pts = np.asarray(xy, dtype=np.float64)
    if pts.shape[0] < 2:
        return 1.0
    d, _ = cKDTree(pts).query(pts, k=2)
    nn = d[:, 1][d[:, 1] > 0]
    return 0.95 * float(np.median(nn)) if nn.size else 1.0


def _draw_spots(
    ax: Axes, xy: np.ndarray, values: np.ndarray, diameter: float, cmap: str | ListedColormap, norm: Normalize
) -> EllipseCollection:
    """Spots as circles of ``diameter`` data units at ``xy`` (pixels), y axis inverted."""
    n = xy.shape[0]
    coll = EllipseCollection(
        np.full(n, diameter),
        np.full(n, diameter),
        np.zeros(n),
        units="xy",
        offsets=xy,
        offset_transform=ax.transData,
        cmap=cmap,
        norm=norm,
        linewidths=0,
    )
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


def dynamic_range(values: np.ndarray) -> float:
    """``max - min`` of the finite values (0 when none): a map's dynamic range in its unit."""
    f = np.asarray(values, dtype=np.float64)
    f = f[np.isfinite(f)]
    return float(np.ptp(f)) if f.size else 0.0


def annotate_range(ax: Axes, values: np.ndarray) -> None:
    """Print the map's dynamic range on it (lower left), so a flat map drawn on its own
    colour scale does not pass for a patterned one."""
    ax.text(
        0.02, 0.02, f"range {dynamic_range(values):.3g}", transform=ax.transAxes, fontsize=7, va="bottom",
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.7, "linewidth": 0},
    )  # fmt: skip


def _robust_norm(v: np.ndarray) -> Normalize:
    """1st-99th percentile colour scale of the finite values of ``v`` (any shape)."""
    v = np.asarray(v, dtype=np.float64).ravel()
    f = v[np.isfinite(v)]
    if f.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = np.percentile(f, [1, 99])
    if hi <= lo:
        lo, hi = float(f.min()), float(f.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(float(lo), float(hi))


def _map_figure(
    n: int, xy: np.ndarray, diameter: float, *, extra_right: float = 0.0, top: float = 0.8
) -> tuple[Figure, list[Axes], list[Axes]]:
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
    fig = new_figure(fig_w, fig_h, constrained=False)
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
    shared_scale: bool = False,
) -> Path:
    """Measured vs predicted expression of one gene on one slide, plus uncertainty panels.

    Parameters
    ----------
    xy : (n_spots, 2) spot centres in full-resolution image pixels (x = column, y = row).
    measured, predicted : (n_spots,) log1p-normalised expression.
    uncertainty : panel title -> (n_spots,) values (e.g. predictive sd in raw counts);
        may be empty.
    title : figure title (gene, slide, model, PCC).
    shared_scale : draw measured and predicted on ONE colour scale (the robust scale of
        both together), so their levels and spreads compare directly.

    Without ``shared_scale`` each panel has its own robust colour scale (1st-99th
    percentile): compare patterns, not absolute levels. Every panel prints its dynamic
    range (max - min, in its unit) on it.
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
    shared = _robust_norm(np.concatenate([panels[0][1], panels[1][1]])) if shared_scale else None
    for i, (ax, cax, (name, vals, cmap, unit)) in enumerate(zip(axes, caxes, panels)):
        norm = shared if shared is not None and i < 2 else _robust_norm(vals)
        coll = _draw_spots(ax, xy, vals, diam, cmap, norm)
        annotate_range(ax, vals)
        ax.set_title(name, fontsize=9)
        if i:
            ax.set_ylabel("")
        cb = fig.colorbar(coll, cax=cax, extend="both")
        cb.set_label(unit, fontsize=7)
        cb.ax.tick_params(labelsize=7)
    _suptitle(fig, title)
    return save_figure(fig, path)


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
            dots = EllipseCollection(
                np.full(k, diam * 0.3),
                np.full(k, diam * 0.3),
                np.zeros(k),
                units="xy",
                offsets=xy[hi],
                offset_transform=ax.transData,
                facecolors="white",
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
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
    caxes[2].legend(
        handles=[Patch(color=c, label=f"{lab}: {n}") for (lab, c), n in zip(OVERLAP_CLASSES, counts)],
        fontsize=7,
        loc="center left",
        frameon=False,
        title="spots",
        title_fontsize=7,
    )
    for ax in axes[1:]:
        ax.set_ylabel("")
    _suptitle(fig, title)
    return save_figure(fig, path)
