"""Slide images: one interface over whole-slide formats and plain rasters.

* Whole-slide formats (SVS, NDPI, MRXS, SCN, BIF, tiled/pyramidal TIFF ...) are read with
  OpenSlide, region by region, from the pyramid level nearest the requested resolution.
* Plain rasters (JPEG, PNG, stripped TIFF) are decoded once, in full, with imagecodecs /
  tifffile into memory. Size is checked deliberately against ``max_pixels`` (an explicit
  budget, default 4 gigapixels) instead of tripping PIL's decompression-bomb guard.

All coordinates are **full-resolution (level-0) pixels**, x = column, y = row.
Windows that reach past the image edge are padded with white (255) and the padded
fraction of the window's area is returned with every tile.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image

from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4_000_000_000
PAD_VALUE = 255
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
}
RASTER_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _resample_window(patch: np.ndarray, box: tuple[float, float, float, float], out_px: int, interpolation: str) -> np.ndarray:
    """Resample the float ``box`` (x0, y0, x1, y1, in ``patch`` pixels) to out_px x out_px."""
    resample = RESAMPLING[interpolation]
    img = Image.fromarray(patch)
    scale = (box[2] - box[0]) / out_px
    # Downsampling by >= 2: let PIL reduce first (area-averaging) to avoid aliasing.
    gap = 2.0 if scale >= 2 else None
    out = img.resize((out_px, out_px), resample=resample, box=box, reducing_gap=gap)
    return np.asarray(out)


def raster_size(path: Path) -> tuple[int, int]:
    """(width, height) of a JPEG or PNG read from its header, without decoding.

    Read by hand so that size limits are ours (``max_pixels``), not PIL's global
    decompression-bomb threshold, which refuses legitimate > 179 MP H&E scans.
    """
    with open(path, "rb") as fh:
        head = fh.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if head[:2] != b"\xff\xd8":
            raise InputError(path, "image", "not a JPEG, PNG or TIFF file (unknown signature)")
        fh.seek(2)
        while True:
            marker = fh.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                raise InputError(path, "image", "corrupt JPEG: no frame header found")
            code = marker[1]
            if code == 0xFF:  # fill byte
                fh.seek(-1, 1)
                continue
            length = int.from_bytes(fh.read(2), "big")
            if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
                seg = fh.read(5)
                return int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big")
            fh.seek(length - 2, 1)


def padded_fraction(x0: float, y0: float, size: float, width: int, height: int) -> float:
    """Fraction of the square window [x0, x0+size) x [y0, y0+size) lying outside the image."""
    ix = max(0.0, min(x0 + size, width) - max(x0, 0.0))
    iy = max(0.0, min(y0 + size, height) - max(y0, 0.0))
    return float(1.0 - (ix * iy) / (size * size))


class SlideImage:
    """An open H&E image. Use :meth:`open`; close with :meth:`close` or a ``with`` block.

    Attributes: ``path``, ``width``/``height`` (level-0 px), ``level_downsamples``.
    """

    def __init__(self, path: Path, width: int, height: int, level_downsamples: list[float], backend: str):
        self.path = path
        self.width = width
        self.height = height
        self.level_downsamples = level_downsamples
        self.backend = backend
        self._array: np.ndarray | None = None
        self._slide = None  # openslide.OpenSlide

    # -- construction -----------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> "SlideImage":
        """Open ``path``; raises :class:`InputError` (field ``image``) if missing or corrupt."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "image", "image file does not exist")
        import openslide

        try:
            vendor = openslide.OpenSlide.detect_format(str(path))
        except openslide.OpenSlideError as exc:
            raise InputError(path, "image", f"cannot read image header: {exc}") from exc
        if vendor is not None:
            try:
                slide = openslide.OpenSlide(str(path))
            except openslide.OpenSlideError as exc:
                raise InputError(path, "image", f"corrupt whole-slide image: {exc}") from exc
            w, h = slide.dimensions
            obj = cls(path, w, h, [float(d) for d in slide.level_downsamples], f"openslide:{vendor}")
            obj._slide = slide
            obj.properties = dict(slide.properties)
            return obj
        return cls._open_raster(path, max_pixels)

    @classmethod
    def _open_raster(cls, path: Path, max_pixels: int) -> "SlideImage":
        import imagecodecs
        import tifffile

        try:
            if path.suffix.lower() in (".tif", ".tiff"):
                with tifffile.TiffFile(path) as tif:
                    shape = tif.series[0].shape
                    n_px = int(np.prod(shape[:2]))
                    if n_px > max_pixels:
                        raise InputError(path, "image", f"{n_px:,} pixels exceeds max_pixels={max_pixels:,}; convert to a pyramidal TIFF")
                    arr = tif.series[0].asarray()
            else:
                w, h = raster_size(path)
                if w * h > max_pixels:
                    raise InputError(path, "image", f"{w * h:,} pixels exceeds max_pixels={max_pixels:,}; convert to a pyramidal TIFF")
                arr = imagecodecs.imread(str(path))
        except InputError:
            raise
        except (OSError, ValueError, RuntimeError, imagecodecs.DelayedImportError, Image.DecompressionBombError) as exc:
            raise InputError(path, "image", f"cannot decode image: {exc}") from exc
        except Exception as exc:  # imagecodecs raises codec-specific error classes
            if type(exc).__module__.startswith("imagecodecs"):
                raise InputError(path, "image", f"cannot decode image: {exc}") from exc
            raise
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise InputError(path, "image", f"expected an RGB image, got array of shape {arr.shape}")
        if arr.dtype != np.uint8:
            raise InputError(path, "image", f"expected 8-bit RGB, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr[..., :3])
        obj = cls(path, arr.shape[1], arr.shape[0], [1.0], "raster")
        obj._array = arr
        obj.properties = {}
        return obj

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
        self._slide = None
        self._array = None

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ---------------------------------------------------------------------
    def um_per_px_from_metadata(self) -> float | None:
        """µm per level-0 pixel from the file's metadata (OpenSlide ``openslide.mpp-x``)."""
        mpp = self.properties.get("openslide.mpp-x") if self._slide is not None else None
        try:
            return float(mpp) if mpp else None
        except ValueError:
            return None

    # -- pixels -----------------------------------------------------------------------
    def best_level(self, downsample: float) -> int:
        """Pyramid level whose downsample is the largest not exceeding ``downsample``."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample + 1e-6:
                best = i
        return best

    def read_window(
        self, cx: float, cy: float, size: float, out_px: int, interpolation: str = "bicubic"
    ) -> tuple[np.ndarray, float]:
        """Square window of ``size`` level-0 px centred on (cx, cy), resampled to out_px.

        Returns ``(tile uint8 (out_px, out_px, 3), padded_fraction)``.
        """
        x0, y0 = cx - size / 2.0, cy - size / 2.0
        pad = padded_fraction(x0, y0, size, self.width, self.height)
        if pad >= 1.0:
            raise InputError(self.path, "pixel_x/pixel_y", f"window centred at ({cx:.1f}, {cy:.1f}) lies entirely outside the {self.width}x{self.height} image")
        level = self.best_level(size / out_px)
        ds = self.level_downsamples[level]
        # integer region at that level with a 2-px margin for the interpolation kernel
        lx0, ly0 = math.floor(x0 / ds) - 2, math.floor(y0 / ds) - 2
        lx1, ly1 = math.ceil((x0 + size) / ds) + 2, math.ceil((y0 + size) / ds) + 2
        patch = self._read_level_region(level, lx0, ly0, lx1 - lx0, ly1 - ly0)
        box = (x0 / ds - lx0, y0 / ds - ly0, (x0 + size) / ds - lx0, (y0 + size) / ds - ly0)
        return _resample_window(patch, box, out_px, interpolation), pad

    def _read_level_region(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [y, y+h) x [x, x+w) at ``level`` (level coordinates), white outside."""
        if self._slide is not None:
            ds = self.level_downsamples[level]
            lw, lh = self._slide.level_dimensions[level]
            out = np.full((h, w, 3), PAD_VALUE, np.uint8)
            cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
            if cx1 > cx0 and cy1 > cy0:
                region = self._slide.read_region((int(round(cx0 * ds)), int(round(cy0 * ds))), level, (cx1 - cx0, cy1 - cy0))
                rgba = np.asarray(region)
                alpha = rgba[..., 3:4].astype(np.float32) / 255.0
                rgb = rgba[..., :3].astype(np.float32) * alpha + PAD_VALUE * (1.0 - alpha)
                out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = rgb.round().astype(np.uint8)
            return out
        arr = self._array
        assert arr is not None, "image is closed"
        H, W = arr.shape[:2]
        if x >= 0 and y >= 0 and x + w <= W and y + h <= H:
            return arr[y : y + h, x : x + w]
        out = np.full((h, w, 3), PAD_VALUE, np.uint8)
        cx0, cy0, cx1, cy1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = arr[cy0:cy1, cx0:cx1]
        return out

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is <= max_side; returns (array, downsample),
        downsample = level-0 px per thumbnail px."""
        scale = max(self.width, self.height) / max_side
        if scale <= 1:
            if self._array is not None:
                return self._array.copy(), 1.0
            scale = 1.0
        tw, th = max(1, round(self.width / scale)), max(1, round(self.height / scale))
        if self._slide is not None:
            img = self._slide.get_thumbnail((tw, th)).convert("RGB")
        else:
            img = Image.fromarray(self._array).reduce(max(1, math.ceil(scale)))
        thumb = np.asarray(img)
        return thumb, self.width / thumb.shape[1]
