"""Heatmaps of tile predictions over the slide thumbnail, one PNG per gene.

Each tile is drawn as a square of one grid pitch centred on the tile, coloured by its
prediction (semi-transparent, over the thumbnail), with a colour bar (the prediction's
scale, e.g. predicted log1p(CP10k)) and a scale bar in µm. Uses matplotlib's object API
(``Figure``), no pyplot state.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from stimage_embed.evaluation.plot_maps import annotate_range
from stimage_embed.inference.grid import TileGrid

log = logging.getLogger(__name__)

NICE_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def scale_bar_um(width_um: float, fraction: float = 0.2) -> float:
    """The largest 'nice' length (µm) not above ``fraction`` of the width (at least the smallest)."""
    fits = [n for n in NICE_UM if n <= width_um * fraction]
    return float(fits[-1] if fits else NICE_UM[0])


def _um_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def safe_name(gene: str) -> str:
    """A file name for a gene symbol (path separators and odd characters replaced by '_')."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", gene) or "_"


def top_genes(values: np.ndarray, genes: list[str], k: int, rows: np.ndarray | None = None) -> list[str]:
    """The ``k`` genes whose predictions vary most across tiles (variance over ``rows``)."""
    v = values if rows is None or not rows.any() else values[rows]
    var = np.nanvar(v, axis=0) if v.shape[0] else np.zeros(len(genes))
    order = np.argsort(-np.nan_to_num(var, nan=-1.0), kind="stable")
    return [genes[i] for i in order[: max(0, k)]]


def view_box(grid: TileGrid, width: int, height: int, margin_um: float = 500.0) -> tuple[float, float, float, float]:
    """Level-0 px box ``(x0, y0, x1, y1)`` around the grid's tiles plus ``margin_um``, inside the image."""
    half, m = grid.tile_px / 2, margin_um / grid.um_per_px
    return (
        max(0.0, grid.x.min() - half - m),
        max(0.0, grid.y.min() - half - m),
        min(float(width), grid.x.max() + half + m),
        min(float(height), grid.y.max() + half + m),
    )


def shared_scale_of(maps: list[np.ndarray]) -> tuple[float, float]:
    """The 2nd-98th percentile of the finite values of all ``maps`` together ((0, 1) if none)."""
    finite = np.concatenate([np.asarray(m, np.float64).ravel() for m in maps] or [np.zeros(0)])
    finite = finite[np.isfinite(finite)]
    return tuple(np.percentile(finite, [2, 98]).tolist()) if finite.size else (0.0, 1.0)


def heatmap_figure(
    thumbnail: np.ndarray,
    width: int,
    height: int,
    grid: TileGrid,
    values: np.ndarray,
    title: str,
    label: str,
    scale: tuple[float, float] | None = None,
) -> Figure:
    """Figure of per-tile ``values`` over the ``thumbnail`` of a ``width`` x ``height`` px image,
    zoomed on the tissue (the tiles' bounding box plus 0.5 mm). Colours span ``scale``
    ``(lo, hi)`` (default: the 2nd-98th percentile of ``values``); the map's dynamic range
    is printed on it."""
    th, tw = thumbnail.shape[:2]
    dsx, dsy = width / tw, height / th
    bx0, by0, bx1, by1 = view_box(grid, width, height)
    aspect = ((by1 - by0) / dsy) / max((bx1 - bx0) / dsx, 1e-9)
    fig = Figure(figsize=(7.5, min(12.0, 6.2 * aspect + 1.0)), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(thumbnail, interpolation="antialiased")
    raster = grid.raster(values)
    x0 = (grid.tile_px / 2 - grid.pitch_px / 2) / dsx
    y0 = (grid.tile_px / 2 - grid.pitch_px / 2) / dsy
    extent = (x0, x0 + grid.n_cols * grid.pitch_px / dsx, y0 + grid.n_rows * grid.pitch_px / dsy, y0)
    lo, hi = shared_scale_of([values]) if scale is None else scale
    if hi <= lo:
        hi = lo + 1e-6
    im = ax.imshow(
        np.ma.masked_invalid(raster),
        extent=extent,
        origin="upper",
        cmap="viridis",
        vmin=lo,
        vmax=hi,
        alpha=0.8,
        interpolation="nearest",
    )
    ax.set_xlim(bx0 / dsx, bx1 / dsx)
    ax.set_ylim(by1 / dsy, by0 / dsy)
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    annotate_range(ax, values)
    cbar = fig.colorbar(im, ax=ax, shrink=0.8, pad=0.01)
    cbar.set_label(label)
    bar_um = scale_bar_um((bx1 - bx0) * grid.um_per_px)
    bar = AnchoredSizeBar(
        ax.transData,
        bar_um / grid.um_per_px / dsx,
        _um_label(bar_um),
        "lower right",
        pad=0.4,
        color="black",
        frameon=True,
        size_vertical=max(1.0, (by1 - by0) / dsy / 200),
        sep=4,
    )
    bar.patch.set_alpha(0.7)
    ax.add_artist(bar)
    return fig


def write_heatmaps(
    folder: Path,
    thumbnail: np.ndarray,
    width: int,
    height: int,
    grid: TileGrid,
    values: np.ndarray,
    genes_all: list[str],
    genes: list[str],
    slide_id: str,
    model_label: str,
    label: str,
    shared_scale: bool = False,
) -> dict[str, Path]:
    """One ``<folder>/<gene>.png`` per gene of ``genes``; returns gene -> path.
    ``shared_scale``: one colour scale for every gene's map (their levels then compare)."""
    folder.mkdir(parents=True, exist_ok=True)
    col = {g: j for j, g in enumerate(genes_all)}
    scale = shared_scale_of([values[:, col[g]] for g in genes]) if shared_scale else None
    out = {}
    for gene in genes:
        fig = heatmap_figure(
            thumbnail, width, height, grid, values[:, col[gene]], f"{gene} — {slide_id} ({model_label})", label, scale
        )
        path = folder / f"{safe_name(gene)}.png"
        fig.savefig(path)
        out[gene] = path
    return out
