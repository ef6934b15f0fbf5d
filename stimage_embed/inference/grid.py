"""A grid of tiles over the tissue of a slide, from its thumbnail.

Tissue is detected once on a thumbnail (:func:`stimage_embed.tiles.tissue.tissue_mask`);
the grid is anchored at the image origin: tile ``(row, col)`` is centred at
``(tile_px / 2 + col * pitch_px, tile_px / 2 + row * pitch_px)`` level-0 px, where
``tile_px = tile_um / um_per_px`` and ``pitch_px = pitch_um / um_per_px``. A grid position
is kept when the disk of diameter ``tile_um`` around its centre holds at least
``min_tissue`` tissue; its tissue fraction (the same disk measure as ``ingest`` uses for
spots) is recorded and it passes QC when that fraction is >= ``tissue_threshold``.

Only the thumbnail-sized mask is ever in memory: candidate positions are screened with an
integral image (square windows) and the disk fractions are computed in blocks, so a grid of
10^5 tiles costs a few MB.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from stimage_embed.errors import InputError
from stimage_embed.tiles.tissue import TISSUE_THRESHOLD, qc_flags, spot_tissue_fraction

log = logging.getLogger(__name__)

#: positions whose disk fraction is computed at once (memory ~ BLOCK x 800 samples x 8 bytes)
BLOCK = 2048
#: default minimum tissue fraction of a grid tile to be kept (embedded, predicted, drawn)
MIN_TISSUE = 0.1


@dataclass(frozen=True)
class TileGrid:
    """Kept grid tiles of one slide.

    ``row``/``col``: grid indices; ``x``/``y``: tile centres, level-0 px; ``tissue_fraction``
    of the tile's disk (diameter ``tile_um``); ``passes_qc``; ``pitch_px``/``tile_px``: pitch
    and tile width in level-0 px; ``n_rows``/``n_cols``: the grid's extent over the whole image.
    """

    row: np.ndarray
    col: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tissue_fraction: np.ndarray
    passes_qc: np.ndarray
    tile_um: float
    pitch_um: float
    um_per_px: float
    n_rows: int
    n_cols: int

    @property
    def tile_px(self) -> float:
        return self.tile_um / self.um_per_px

    @property
    def pitch_px(self) -> float:
        return self.pitch_um / self.um_per_px

    @property
    def spot_ids(self) -> np.ndarray:
        """Tile keys ``"{col}x{row}"`` (the legacy-ST ``"{x}x{y}"`` convention)."""
        return np.array([f"{c}x{r}" for r, c in zip(self.row.tolist(), self.col.tolist())], dtype=object)

    def __len__(self) -> int:
        return int(self.row.size)

    def padded_fraction(self, width: int, height: int) -> np.ndarray:
        """Fraction of each tile's square window (``tile_px``) lying outside the image."""
        half = self.tile_px / 2
        ix = np.clip(np.minimum(self.x + half, width) - np.maximum(self.x - half, 0), 0, None)
        iy = np.clip(np.minimum(self.y + half, height) - np.maximum(self.y - half, 0), 0, None)
        return 1.0 - ix * iy / (self.tile_px * self.tile_px)

    def raster(self, values: np.ndarray) -> np.ndarray:
        """``(n_rows, n_cols)`` float image of per-tile ``values`` (NaN where no tile)."""
        out = np.full((self.n_rows, self.n_cols), np.nan, np.float32)
        out[self.row, self.col] = values
        return out


def grid_axis(length_px: float, tile_px: float, pitch_px: float) -> np.ndarray:
    """Centres (px) ``tile_px / 2 + k * pitch_px`` lying inside ``[0, length_px)``."""
    n = max(0, math.floor((length_px - tile_px / 2) / pitch_px - 1e-9) + 1)
    return tile_px / 2 + np.arange(n) * pitch_px


def _check_grid_options(
    mask: np.ndarray, um_per_px: float, tile_um: float, pitch_um: float, fractions: tuple[float, float], source
) -> None:
    """Positive finite sizes (µm, µm per px), fractions in [0, 1], some tissue on the mask."""
    for name, v in (("--um-per-px", um_per_px), ("tile_um", tile_um), ("--pitch-um", pitch_um)):
        if not (v > 0 and math.isfinite(v)):
            raise InputError(source, name, f"must be positive and finite, got {v}")
    if not all(0.0 <= f <= 1.0 for f in fractions):
        raise InputError(
            source, "--tissue-threshold", f"fractions must be in [0, 1], got {fractions[0]}, {fractions[1]}"
        )
    if not np.asarray(mask).any():
        raise InputError(
            source, "image", "no tissue detected on the slide thumbnail (blank image, or not H&E?); nothing to predict"
        )


def _grid_positions(
    xs: np.ndarray, ys: np.ndarray, region: tuple[float, float, float, float] | None, source: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, cx, cy)`` of every grid position (centres in level-0 px), row-major,
    only those centred in ``region`` when one is given."""
    rows, cols = np.meshgrid(np.arange(ys.size), np.arange(xs.size), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    cx, cy = xs[cols], ys[rows]
    if region is None:
        return rows, cols, cx, cy
    x0, y0, x1, y1 = (float(v) for v in region)
    if not (x1 > x0 and y1 > y0):
        raise InputError(
            source, "--region", f"expected x0,y0,x1,y1 with x1 > x0 and y1 > y0 (level-0 px), got {region}"
        )
    inside = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    return rows[inside], cols[inside], cx[inside], cy[inside]


def _disk_fractions(
    mask: np.ndarray, downsample: float, cx: np.ndarray, cy: np.ndarray, tile_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(candidates, fractions)``: the positions whose square window (``tile_px``) holds some
    tissue (exact, integral image) and the tissue fraction of their disk (diameter
    ``tile_px``), computed in blocks of :data:`BLOCK`."""
    square = spot_tissue_fraction(mask, downsample, cx, cy, window_px=tile_px, shape="square")
    cand = np.flatnonzero(square > 0)
    frac = np.zeros(cand.size, np.float64)
    for start in range(0, cand.size, BLOCK):
        sel = cand[start : start + BLOCK]
        frac[start : start + BLOCK] = spot_tissue_fraction(
            mask, downsample, cx[sel], cy[sel], radius_px=tile_px / 2, shape="disk"
        )
    return cand, frac


def tissue_grid(
    mask: np.ndarray,
    downsample: float,
    width: int,
    height: int,
    um_per_px: float,
    tile_um: float,
    pitch_um: float | None = None,
    min_tissue: float = MIN_TISSUE,
    tissue_threshold: float = TISSUE_THRESHOLD,
    region: tuple[float, float, float, float] | None = None,
    source: str | None = None,
) -> TileGrid:
    """The grid of tiles over the tissue of ``mask`` (see module docstring).

    Args:
        mask: boolean tissue mask of the thumbnail.
        downsample: level-0 px per mask px.
        width, height: level-0 image size, px.
        um_per_px: µm per level-0 px.
        tile_um: tile width, µm (the model's training tile width).
        pitch_um: centre-to-centre distance, µm (default ``tile_um``).
        min_tissue: tiles whose disk holds less tissue than this are not kept.
        tissue_threshold: tiles at or above it pass QC.
        region: ``(x0, y0, x1, y1)``, level-0 px: keep only tiles centred in
            ``[x0, x1) x [y0, y1)`` (a region of interest).
        source: the image file, for error messages.
    """
    pitch_um = float(tile_um if pitch_um is None else pitch_um)
    _check_grid_options(mask, um_per_px, tile_um, pitch_um, (min_tissue, tissue_threshold), source)
    tile_px, pitch_px = tile_um / um_per_px, pitch_um / um_per_px
    xs, ys = grid_axis(width, tile_px, pitch_px), grid_axis(height, tile_px, pitch_px)
    if xs.size == 0 or ys.size == 0:
        raise InputError(
            source, "image", f"the {width}x{height} px image is smaller than one {tile_um:g} µm tile ({tile_px:.0f} px)"
        )
    rows, cols, cx, cy = _grid_positions(xs, ys, region, source)
    cand, frac = _disk_fractions(mask, downsample, cx, cy, tile_px)
    keep = frac >= min_tissue if min_tissue > 0 else frac > 0
    idx, frac = cand[keep], frac[keep]
    where = " in --region" if region is not None else ""
    if idx.size == 0:
        raise InputError(
            source, "image", f"no {tile_um:g} µm tile{where} holds >= {min_tissue:.0%} tissue; nothing to predict"
        )
    log.info(
        "grid: %d x %d positions of %.0f µm at %.0f µm pitch, %d over tissue%s, %d pass QC",
        ys.size,
        xs.size,
        tile_um,
        pitch_um,
        idx.size,
        " in the region" if region is not None else "",
        int((frac >= tissue_threshold).sum()),
    )
    return TileGrid(
        row=rows[idx].astype(np.int32),
        col=cols[idx].astype(np.int32),
        x=cx[idx],
        y=cy[idx],
        tissue_fraction=frac.astype(np.float32),
        passes_qc=qc_flags(frac, tissue_threshold),
        tile_um=float(tile_um),
        pitch_um=pitch_um,
        um_per_px=float(um_per_px),
        n_rows=int(ys.size),
        n_cols=int(xs.size),
    )
