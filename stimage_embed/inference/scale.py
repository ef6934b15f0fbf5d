"""The scale of an image (µm per full-resolution pixel): read it from the file when the file
carries one, compare it with the one the user gave, and say where to find one when neither
is known.

Whole-slide files (svs, ndpi, mrxs, pyramidal TIFF) carry it as OpenSlide's
``openslide.mpp-x``. Plain rasters may carry a resolution tag: TIFF ``XResolution`` with
``ResolutionUnit`` (inch or centimetre), PNG ``pHYs``; these are used only when they give a
plausible microscope scale (JPEG's usual 72 or 96 dpi means 353 or 265 µm/px: a screen
default, ignored).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: µm/px range of real H&E scans (0.05: beyond any objective; 20: a low-resolution overview)
PLAUSIBLE_UM_PER_PX = (0.05, 20.0)
#: relative disagreement between a given µm/px and the file's that is a warning
SCALE_WARN = 0.20
#: where a user finds the scale (the missing-scale error, the README's "Finding µm/px")
SCALE_HINT = (
    "find it in the scanner's metadata of the file the image came from (`openslide-show-properties FILE | grep mpp`, "
    "divided by any export downsample), from the objective (most scanners: 20x ~ 0.5, 40x ~ 0.25 µm/px) or from "
    "a scale bar (its µm / its pixels)"
)


def _plausible(value: float | None) -> float | None:
    low, high = PLAUSIBLE_UM_PER_PX
    return value if value is not None and low <= value <= high else None


def raster_um_per_px(path: Path) -> float | None:
    """µm/px from a plain raster's resolution tag (TIFF, PNG), ``None`` when it has none or
    an implausible one. Reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.format == "TIFF":
                xres, unit = im.tag_v2.get(282), im.tag_v2.get(296, 2)  # XResolution, ResolutionUnit
                per_um = {2: 25_400.0, 3: 10_000.0}.get(int(unit))
                return _plausible(per_um / float(xres)) if xres and per_um else None
            dpi = im.info.get("dpi")
            return _plausible(25_400.0 / float(dpi[0])) if dpi and float(dpi[0]) > 0 else None
    except (OSError, UnidentifiedImageError, ValueError, TypeError, ZeroDivisionError):
        return None


def compare_scale(path: Path, given: float, found: float, found_where: str) -> None:
    """Warn when the given µm/px and the file's differ by more than :data:`SCALE_WARN`."""
    diff = abs(given / found - 1)
    if diff > SCALE_WARN:
        log.warning(
            "%s: --um-per-px %.4g differs by %.0f %% from the %.4g µm/px in the file's %s; tiles will have the "
            "wrong physical size if --um-per-px is wrong (using --um-per-px)",
            path,
            given,
            100 * diff,
            found,
            found_where,
        )
    elif diff > 0.02:
        log.info("%s: --um-per-px %.4g vs %.4g in the file's %s", path, given, found, found_where)
