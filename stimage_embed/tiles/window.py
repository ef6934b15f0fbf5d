"""Physical tiles: a square window of ``tile_um`` µm centred on a spot, resampled to the
pixel size a backbone wants.

The window spans ``tile_um / um_per_px`` level-0 pixels (e.g. 100 µm at 0.687 µm/px =
145.5 px on HER2ST, resampled to 224 px). The default width is the platform's spot
diameter (55 µm Visium, 100 µm legacy ST); HEST uses 112 µm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stimage_embed.tiles.image import SlideImage


@dataclass(frozen=True)
class TileGeometry:
    """Physical tile width (µm), output size (px) and resampling filter."""

    tile_um: float
    out_px: int
    interpolation: str = "bicubic"

    def window_px(self, um_per_px: float) -> float:
        """Window width in level-0 pixels."""
        return self.tile_um / um_per_px


class TileReader:
    """Cuts tiles of one slide; optionally applies a per-slide fitted stain normaliser.

    ``normalize`` is any callable mapping an RGB uint8 tile to an RGB uint8 tile
    (e.g. ``MacenkoNormalizer.fit_source(thumb).transform``).
    """

    def __init__(
        self,
        image: SlideImage,
        um_per_px: float,
        geometry: TileGeometry,
        normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        self.image = image
        self.um_per_px = um_per_px
        self.geometry = geometry
        self.normalize = normalize
        self.window_px = geometry.window_px(um_per_px)

    def read(self, cx: float, cy: float) -> tuple[np.ndarray, float]:
        """Tile centred on (cx, cy) level-0 px -> (uint8 (out_px, out_px, 3), padded fraction)."""
        tile, pad = self.image.read_window(cx, cy, self.window_px, self.geometry.out_px, self.geometry.interpolation)
        if self.normalize is not None:
            tile = self.normalize(tile)
        return tile, pad

    def read_many(self, xs: Sequence[float], ys: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """Tiles centred on each (x, y) -> (uint8 (N, out_px, out_px, 3), padded fractions (N,)).

        The same tiles as :meth:`read` one by one, cut into one preallocated batch."""
        px = self.geometry.out_px
        out = np.empty((len(xs), px, px, 3), np.uint8)
        pad = np.zeros(len(xs), np.float32)
        for j, (x, y) in enumerate(zip(xs, ys)):
            out[j], pad[j] = self.read(x, y)
        return out, pad
