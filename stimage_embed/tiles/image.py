"""Slide images: one interface over whole-slide formats and plain rasters.

* Whole-slide formats (SVS, NDPI, MRXS, SCN, BIF, tiled/pyramidal TIFF ...) are read with
  OpenSlide, region by region, from the pyramid level nearest the requested resolution.
* Plain rasters (JPEG, PNG, stripped TIFF) are decoded once, in full, with imagecodecs /
  tifffile into memory. Size is checked deliberately against ``max_pixels`` (an explicit
  budget, default 4 gigapixels) instead of tripping PIL's decompression-bomb guard, and
  before anything is decoded: the pixels a header claims must be plausible for the file's
  size (a 632-byte "20000 x 20000" JPEG is refused) and their decoded bytes must fit the
  memory budget (``max_bytes``, default half the available memory). A JPEG without its
  end-of-image marker after the scan data (a truncated file, which decoders silently
  fill with grey) is refused naming the file.

All coordinates are **full-resolution (level-0) pixels**, x = column, y = row.
Windows that reach past the image edge are padded with white (255) and the padded
fraction of the window's area is returned with every tile.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 4_000_000_000
#: most pixels one byte of a file can encode. Huffman JPEG needs >= 1 bit per 8x8 block and
#: component (<= 512 px/byte, grey progressive), deflate compresses <= 1032:1 (<= 8256
#: 1-bit px/byte); real H&E scans are at 10-200 px/byte. Anything above is a forged header.
MAX_PX_PER_BYTE = {"jpeg": 2048, "png": 8256, "tiff": 8256}
#: bytes of the end of a JPEG searched for its end-of-image marker (trailing junk allowed)
JPEG_TAIL_BYTES = 1 << 20
PAD_VALUE = 255
RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
}
RASTER_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _resample_window(
    patch: np.ndarray, box: tuple[float, float, float, float], out_px: int, interpolation: str
) -> np.ndarray:
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
    w, h, _ = _raster_header(path)
    return w, h


def _raster_header(path: Path) -> tuple[int, int, int | None]:
    """(width, height, offset of the first JPEG start-of-scan or None for PNG)."""
    with open(path, "rb") as fh:
        head = fh.read(26)
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), None
        if head[:2] != b"\xff\xd8":
            raise InputError(path, "image", "not a JPEG, PNG or TIFF file (unknown signature)")
        fh.seek(2)
        size = None
        while True:
            marker = fh.read(2)
            if len(marker) < 2 or marker[0] != 0xFF:
                raise InputError(
                    path, "image", "corrupt JPEG: " + ("no scan data found" if size else "no frame header found")
                )
            code = marker[1]
            if code == 0xFF:  # fill byte
                fh.seek(-1, 1)
                continue
            if code == 0xDA:  # start of scan: entropy-coded data follows
                if size is None:
                    raise InputError(path, "image", "corrupt JPEG: scan data before the frame header")
                return size[0], size[1], fh.tell() - 2
            length = int.from_bytes(fh.read(2), "big")
            if length < 2:
                raise InputError(path, "image", f"corrupt JPEG: marker 0xFF{code:02X} with length {length}")
            if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
                seg = fh.read(5)
                size = (int.from_bytes(seg[3:5], "big"), int.from_bytes(seg[1:3], "big"))
                fh.seek(length - 2 - 5, 1)
                continue
            fh.seek(length - 2, 1)


def _check_jpeg_complete(path: Path, sos: int) -> None:
    """Refuse a JPEG whose scan data is cut short (no end-of-image marker after it).

    0xFFD9 cannot occur inside entropy-coded data (0xFF is always stuffed there), so the
    last one must lie after the first scan; one inside an EXIF thumbnail comes before it."""
    size = path.stat().st_size
    start = max(sos, size - JPEG_TAIL_BYTES)
    with open(path, "rb") as fh:
        fh.seek(start)
        tail = fh.read()
    if tail.rfind(b"\xff\xd9") < 0:
        raise InputError(
            path,
            "image",
            f"premature end of JPEG data: no end-of-image marker after the scan data "
            f"({size:,} bytes); the file is truncated or corrupt",
        )


def _check_plausible(path: Path, kind: str, n_px: int, channels: int, max_pixels: int, max_bytes: int | None) -> None:
    """Refuse, before decoding, pixels the file cannot hold or memory cannot take."""
    if n_px <= 0:
        raise InputError(path, "image", f"header claims an empty image ({n_px} pixels)")
    if n_px > max_pixels:
        raise InputError(
            path, "image", f"{n_px:,} pixels exceeds max_pixels={max_pixels:,}; convert to a pyramidal TIFF"
        )
    size = path.stat().st_size
    if n_px > size * MAX_PX_PER_BYTE[kind]:
        raise InputError(
            path,
            "image",
            f"header claims {n_px:,} pixels but the file has only {size:,} bytes "
            f"(at most {MAX_PX_PER_BYTE[kind]} px per byte is possible); refusing a forged or corrupt header",
        )
    budget = default_max_bytes() if max_bytes is None else max_bytes
    need = n_px * channels
    if need > budget:
        raise InputError(
            path,
            "image",
            f"decoding needs {need / 1e9:.2f} GB, over the memory budget of {budget / 1e9:.2f} GB "
            "(max_bytes, default half the available memory); convert it to a pyramidal TIFF, read region by region",
        )


def default_max_bytes() -> int:
    """Memory budget of one full decode: half the memory available now, else 8 GB.

    "Available" is the kernel's ``MemAvailable`` (free memory plus the page cache it can
    reclaim), not the free pages alone: after large file writes (an install, a dataset
    copy) the cache holds most of the RAM and free pages can be a few hundred MB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


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
    def open(cls, path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> SlideImage:
        """Open ``path``; raises :class:`InputError` (field ``image``) if missing, corrupt,
        truncated or implausibly large (``max_bytes``: memory budget of a full raster decode)."""
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
        return cls._open_raster(path, max_pixels, max_bytes)

    @classmethod
    def _open_raster(cls, path: Path, max_pixels: int, max_bytes: int | None = None) -> SlideImage:
        import imagecodecs
        import tifffile

        try:
            if path.suffix.lower() in (".tif", ".tiff"):
                with tifffile.TiffFile(path) as tif:
                    shape = tif.series[0].shape
                    n_px = int(np.prod(shape[:2]))
                    channels = int(np.prod(shape[2:])) if len(shape) > 2 else 1
                    _check_plausible(path, "tiff", n_px, channels * tif.series[0].dtype.itemsize, max_pixels, max_bytes)
                    arr = tif.series[0].asarray()
            else:
                w, h, sos = _raster_header(path)
                kind = "png" if sos is None else "jpeg"
                _check_plausible(path, kind, w * h, 4 if kind == "png" else 3, max_pixels, max_bytes)
                if sos is not None:
                    _check_jpeg_complete(path, sos)
                    arr = imagecodecs.jpeg8_decode(path.read_bytes())
                else:
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

    def __enter__(self) -> SlideImage:
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
            raise InputError(
                self.path,
                "pixel_x/pixel_y",
                f"window centred at ({cx:.1f}, {cy:.1f}) lies entirely outside the {self.width}x{self.height} image",
            )
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
                region = self._slide.read_region(
                    (int(round(cx0 * ds)), int(round(cy0 * ds))), level, (cx1 - cx0, cy1 - cy0)
                )
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
