"""Deep-zoom tiles of a slide image, for OpenSeadragon.

Tiles always come from OpenSlide's :class:`openslide.deepzoom.DeepZoomGenerator` (its level
geometry, tile addressing, overlap and resampling), over one of two slide objects:

* a whole-slide file OpenSlide opens (SVS, NDPI, MRXS, tiled/pyramidal TIFF ...): the
  :class:`openslide.OpenSlide` itself, read region by region from the best pyramid level;
* a plain raster (JPEG/PNG, e.g. HER2ST sections): :class:`RasterSlide`, an OpenSlide-like
  object over the image decoded once by :class:`stimage_embed.tiles.image.SlideImage`, with
  the lower pyramid levels (downsample 2, 4, 8 ... px of level 0 per level px) built on first
  use by 2x2 box averaging, each from the level above. Memory: the decoded raster plus a third.

Tile size: 254 px with a 1 px overlap (256 px tiles inside the image), OpenSlide's defaults.

Encoded tiles (JPEG bytes) are kept in a bounded LRU per open slide (:data:`TILE_CACHE`
tiles, about 10-20 kB each): a tile asked for again (both panes of the side-by-side view,
panning back, a reload) is not read and encoded again, and concurrent requests for one tile
share one read. Reads are thread-safe: OpenSlide's C library is, and ctypes releases the GIL
during a read, so two requests use two cores; :class:`RasterSlide` builds each level once
under a lock and only reads afterwards.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from stimage_embed.tiles.image import SlideImage
from stimage_embed.viewer.cache import LRU

log = logging.getLogger(__name__)

TILE_SIZE = 254
OVERLAP = 1
#: the smallest pyramid level RasterSlide builds has its longer side below this (px)
MIN_LEVEL_SIDE = 512
JPEG_QUALITY = 80
#: encoded tiles kept per open slide (JPEG bytes, about 10-20 kB each)
TILE_CACHE = 1024


class RasterSlide:
    """An OpenSlide-like view of a plain raster (the attributes DeepZoomGenerator reads).

    Level ``k`` is the image reduced ``2**k`` times (box average; ``ceil`` sizes), built
    lazily under a lock and kept. ``read_region`` returns RGBA, transparent outside the
    image, like :meth:`openslide.OpenSlide.read_region`. Coordinates: level-0 px."""

    def __init__(self, image: SlideImage):
        # the decoded raster, level 0 (SlideImage keeps it; a view, not a copy)
        base = image._read_level_region(0, 0, 0, image.width, image.height)
        self.properties: dict[str, str] = {}
        dims = [(image.width, image.height)]
        while max(dims[-1]) >= MIN_LEVEL_SIDE * 2:
            w, h = dims[-1]
            dims.append(((w + 1) // 2, (h + 1) // 2))
        self.level_dimensions = tuple(dims)
        self.level_downsamples = tuple(float(2**k) for k in range(len(dims)))
        self.level_count = len(dims)
        self.dimensions = dims[0]
        self._levels: list[np.ndarray | None] = [base] + [None] * (len(dims) - 1)
        self._lock = threading.Lock()

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """Largest level whose downsample does not exceed ``downsample``."""
        best = 0
        for k, d in enumerate(self.level_downsamples):
            if d <= downsample + 1e-9:
                best = k
        return best

    def _level(self, k: int) -> np.ndarray:
        arr = self._levels[k]
        if arr is not None:
            return arr
        with self._lock:
            for j in range(1, k + 1):
                if self._levels[j] is None:
                    prev = Image.fromarray(self._levels[j - 1])
                    self._levels[j] = np.asarray(prev.reduce(2))
            return self._levels[k]

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """RGBA region of ``size`` level px at ``level`` whose top-left is ``location`` (level-0 px)."""
        arr = self._level(level)
        ds = self.level_downsamples[level]
        x, y = int(location[0] // ds), int(location[1] // ds)
        w, h = size
        out = np.zeros((h, w, 4), np.uint8)
        H, W = arr.shape[:2]
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x, :3] = arr[cy0:cy1, cx0:cx1]
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x, 3] = 255
        return Image.fromarray(out, "RGBA")

    def close(self) -> None:
        self._levels = []


class SlideTiles:
    """Deep-zoom tiles of one slide image (OpenSlide or raster), thread-safe for reads."""

    def __init__(self, path: str | Path, tile_cache: int = TILE_CACHE):
        """Open ``path``; raises :class:`~stimage_embed.errors.InputError` naming it if unreadable.
        ``tile_cache``: encoded tiles kept (0: none)."""
        self.path = Path(path)
        self._jpegs: LRU[bytes] | None = LRU(tile_cache) if tile_cache > 0 else None
        self._image = SlideImage.open(self.path)
        osr = self._image._slide if self._image._slide is not None else RasterSlide(self._image)
        self.backend = self._image.backend
        self._osr = osr
        self.dz = DeepZoomGenerator(osr, tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=False)

    @property
    def width(self) -> int:
        """Level-0 width, px."""
        return self._image.width

    @property
    def height(self) -> int:
        """Level-0 height, px."""
        return self._image.height

    def info(self) -> dict:
        """What OpenSeadragon needs for a tile source (level-0 px; levels 0 = 1x1 px)."""
        return {
            "width": self.width,
            "height": self.height,
            "tile_size": TILE_SIZE,
            "overlap": OVERLAP,
            "max_level": self.dz.level_count - 1,
            "backend": self.backend,
        }

    def valid(self, level: int, col: int, row: int) -> bool:
        """Whether (level, col, row) addresses a tile."""
        if not 0 <= level < self.dz.level_count:
            return False
        cols, rows = self.dz.level_tiles[level]
        return 0 <= col < cols and 0 <= row < rows

    def tile(self, level: int, col: int, row: int) -> Image.Image:
        """The RGB tile (PIL) at deep-zoom ``level`` and (col, row)."""
        return self.dz.get_tile(level, (col, row))

    def tile_jpeg(self, level: int, col: int, row: int) -> bytes:
        """The tile as JPEG bytes (from the tile cache when it holds them)."""
        if self._jpegs is None:
            return self._encode(level, col, row)
        return self._jpegs.get((level, col, row), lambda: self._encode(level, col, row))

    def _encode(self, level: int, col: int, row: int) -> bytes:
        buf = io.BytesIO()
        self.tile(level, col, row).save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()

    def tile_box(self, level: int, col: int, row: int) -> tuple[float, float, float, float, float]:
        """(x0, y0, w, h, scale): the tile's top-left in level-0 px, its size in tile px and
        ``scale`` = level-0 px per tile px (``2 ** (max_level - level)``), overlap included."""
        scale = float(2 ** (self.dz.level_count - 1 - level))
        zx0 = col * TILE_SIZE - (OVERLAP if col > 0 else 0)
        zy0 = row * TILE_SIZE - (OVERLAP if row > 0 else 0)
        w, h = self.dz.get_tile_dimensions(level, (col, row))
        return zx0 * scale, zy0 * scale, w, h, scale

    def window(self, cx: float, cy: float, size: float, out_px: int) -> np.ndarray:
        """Square RGB window of ``size`` level-0 px centred on (cx, cy), resampled to ``out_px``."""
        return self._image.read_window(cx, cy, size, out_px)[0]

    def close(self) -> None:
        if self._jpegs is not None:
            self._jpegs.clear()
        self._image.close()
        if isinstance(self._osr, RasterSlide):
            self._osr.close()
