"""Per-nucleus measurements of a segmented tile, in µm, with :func:`skimage.measure.regionprops`.

Columns (one row per nucleus label ``1..N``):

* ``nucleus``: the label; ``centroid_x_px``/``centroid_y_px``: centroid in level-0 slide px
  (x = column); ``centroid_x_um``/``centroid_y_um``: the same in µm (level-0 px x µm/px);
* ``area_um2``, ``perimeter_um`` (µm), ``eccentricity`` (0 = circle), ``solidity`` (area / convex area);
* ``mean_h``, ``mean_e``: mean haematoxylin and eosin optical density over the nucleus
  (:func:`skimage.color.rgb2hed` units).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from skimage.color import rgb2hed
from skimage.measure import regionprops

COLUMNS = (
    "nucleus",
    "centroid_x_px",
    "centroid_y_px",
    "centroid_x_um",
    "centroid_y_um",
    "area_um2",
    "perimeter_um",
    "eccentricity",
    "solidity",
    "mean_h",
    "mean_e",
)


@dataclass(frozen=True)
class TileFrame:
    """Where a tile sits on its slide: ``x0``/``y0`` = level-0 px of the tile's top-left
    corner, ``level0_per_tile_px`` = level-0 px per tile px, ``um_per_level0_px`` = µm per level-0 px."""

    x0: float
    y0: float
    level0_per_tile_px: float
    um_per_level0_px: float

    @property
    def um_per_tile_px(self) -> float:
        return self.level0_per_tile_px * self.um_per_level0_px

    @classmethod
    def centred(cls, cx: float, cy: float, window_px: float, tile_px: int, um_per_px: float) -> TileFrame:
        """A ``tile_px`` tile resampled from a ``window_px`` level-0 window centred on (cx, cy)."""
        return cls(cx - window_px / 2, cy - window_px / 2, window_px / tile_px, um_per_px)


def measure_nuclei(rgb: np.ndarray, labels: np.ndarray, frame: TileFrame) -> pl.DataFrame:
    """The table of the module docstring for ``labels`` (int, 0 = background) of tile ``rgb``."""
    hed = rgb2hed(rgb)
    props = regionprops(labels, intensity_image=hed[..., :2])
    s = frame.um_per_tile_px
    rows = []
    for p in props:
        r, c = p.centroid  # tile px, pixel centres at integer coordinates
        x = frame.x0 + (c + 0.5) * frame.level0_per_tile_px
        y = frame.y0 + (r + 0.5) * frame.level0_per_tile_px
        rows.append(
            (
                int(p.label),
                x,
                y,
                x * frame.um_per_level0_px,
                y * frame.um_per_level0_px,
                float(p.area) * s * s,
                float(p.perimeter) * s,
                float(p.eccentricity),
                float(p.solidity),
                float(p.intensity_mean[0]),
                float(p.intensity_mean[1]),
            )
        )
    schema = {c: (pl.Int32 if c == "nucleus" else pl.Float64) for c in COLUMNS}
    return pl.DataFrame(rows, schema=schema, orient="row")
