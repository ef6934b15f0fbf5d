"""Tissue masking on a slide thumbnail and per-spot tissue fractions for QC.

The mask is computed **once per slide** on a low-resolution RGB thumbnail (uint8,
``(H, W, 3)``). Spot windows are given in **full-resolution (level-0) pixels** and mapped
onto the mask with ``downsample`` = full-resolution pixels per mask pixel (the value the
image layer returns with its thumbnail).

Method (:func:`tissue_mask`): HSV saturation, Gaussian-smoothed, thresholded with Otsu's
method (with a floor so a blank slide gives an empty mask), plus textured pixels of moderate
saturation (fat septa, pale stroma); then morphological clean-up (scipy.ndimage): speck
removal, closing, removal of small objects, filling of small holes. Saturation rather than
optical density because it ignores grey scanner artefacts and neutral debris; it works on both
a well-stained slide with a tinted background (HER2ST) and a pale stain (STutility MOB).
Holes (fat, lumens) smaller than ``max_hole_fraction`` of the thumbnail count as tissue.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from scipy import ndimage as ndi

from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

TISSUE_THRESHOLD = 0.7
"""Default minimum tissue fraction of a spot window for the spot to pass QC (as in STimage)."""

REFERENCE_SIDE_PX = 2048
"""Thumbnail side (px) that the default morphology sizes are tuned for; they scale with it."""


def as_rgb_uint8(image: object, field: str = "image", source: str | None = None) -> np.ndarray:
    """Return ``image`` as a C-contiguous ``(H, W, 3)`` uint8 array or raise :class:`InputError`.

    ``source`` names the file the array came from (for the error message), ``field`` the argument.
    """
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(source, field, f"expected an RGB array of shape (H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(source, field, f"expected dtype uint8 (0-255 RGB), got {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(source, field, f"empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): the histogram bin centre maximising the
    between-class variance, with classes ``values <= t`` and ``values > t``.

    Same convention as ``skimage.filters.threshold_otsu`` (``nbins`` bins over [min, max]).
    A constant input returns that constant.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError(None, "values", "no finite values to threshold")
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return lo
    counts, edges = np.histogram(v, bins=nbins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    counts = counts.astype(np.float64)
    w0 = np.cumsum(counts)  # class "<= t"
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m0 / w0
        mu1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1.0
    return float(centres[int(np.argmax(between))])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation ``(max - min) / max`` of an RGB uint8 image, float32 in [0, 1] (0 for black)."""
    rgb = as_rgb_uint8(rgb)
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    out = np.zeros_like(mx)
    np.divide(mx - mn, mx, out=out, where=mx > 0)
    return out


def _remove_small(mask: np.ndarray, min_size: float) -> np.ndarray:
    """Drop 4-connected True components with fewer than ``min_size`` pixels."""
    labels, n = ndi.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def binary_closing_disk(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing of ``mask`` with the disk ``x**2 + y**2 <= radius**2`` (px).

    Computed with Euclidean distance transforms (dilation: distance to tissue <= r; erosion:
    distance to background > r), which is exact for a disk and much faster than
    ``scipy.ndimage.binary_closing`` with a large structuring element. The mask is
    edge-padded first so tissue touching the border is not eroded.
    """
    m = np.asarray(mask, dtype=bool)
    if radius <= 0:
        return m.copy()
    pad = radius + 1
    padded = np.pad(m, pad, mode="edge")
    dilated = ndi.distance_transform_edt(~padded) <= radius
    closed = ndi.distance_transform_edt(dilated) > radius
    return closed[pad:-pad, pad:-pad]


def local_std(gray: np.ndarray, size: int = 3) -> np.ndarray:
    """Standard deviation of ``gray`` in a ``size x size`` window (same units as ``gray``)."""
    g = np.asarray(gray, dtype=np.float32)
    mean = ndi.uniform_filter(g, size, mode="nearest")
    sq = ndi.uniform_filter(g * g, size, mode="nearest")
    return np.sqrt(np.maximum(sq - mean * mean, 0.0))


def tissue_mask(
    thumbnail_rgb: np.ndarray,
    *,
    smooth_sigma_px: float | None = None,
    min_saturation: float = 0.05,
    texture_threshold: float = 8.0,
    speck_px: int | None = None,
    closing_radius_px: int | None = None,
    min_object_fraction: float = 2e-4,
    max_hole_fraction: float = 0.01,
    source: str | None = None,
) -> np.ndarray:
    """Boolean tissue mask (True = tissue) of a slide thumbnail, same height and width.

    Steps: (1) HSV saturation, Gaussian-smoothed; (2) Otsu threshold ``t`` on it (floored at
    ``min_saturation``); (3) the background level ``b`` = median saturation of pixels <= t;
    (4) a pixel is tissue if saturation > t, or if it is textured (local 3x3 grey-level std >
    ``texture_threshold``) and its saturation is above the midpoint ``(b + t) / 2`` -- this
    catches the thin septa of fat and pale stroma without picking up grey debris or scanner
    artefacts; (5) removal of specks, binary closing with a disk, removal of small objects,
    filling of small holes.

    Args:
        thumbnail_rgb: ``(H, W, 3)`` uint8 RGB thumbnail (typically longer side 1-2.5k px).
        smooth_sigma_px: Gaussian sigma (thumbnail px) applied to the saturation before
            thresholding; default ``max(H, W) / 2048`` (at least 0.5).
        min_saturation: floor on the Otsu threshold, so a blank (tissue-free) slide does not
            get half of its noise labelled tissue.
        texture_threshold: local grey-level standard deviation (0-255 units) above which a
            moderately saturated pixel counts as tissue. ``inf`` disables the texture cue.
        speck_px: connected pieces of the thresholded mask smaller than this (thumbnail px) are
            removed *before* closing, so scattered dust specks are not merged into an object;
            default ``round(10 * (max(H, W) / 2048) ** 2)`` (at least 2).
        closing_radius_px: radius (thumbnail px) of the disk used for binary closing;
            default ``round(12 * max(H, W) / 2048)`` (about 40 µm on a 2048 px HER2ST thumbnail,
            enough to close fat cells). 0 disables closing.
        min_object_fraction: connected tissue pieces smaller than this fraction of the
            thumbnail area are dropped (debris, dust).
        max_hole_fraction: enclosed background holes smaller than this fraction of the
            thumbnail area are filled (fat, small lumens); larger ones stay background.
        source: the image file the thumbnail came from, for error messages.
    """
    rgb = as_rgb_uint8(thumbnail_rgb, "thumbnail_rgb", source)
    h, w = rgb.shape[:2]
    scale = max(h, w) / REFERENCE_SIDE_PX
    sigma = max(0.5, scale) if smooth_sigma_px is None else float(smooth_sigma_px)
    radius = max(1, round(12.0 * scale)) if closing_radius_px is None else int(closing_radius_px)

    sat = saturation(rgb)
    if sigma > 0:
        sat = ndi.gaussian_filter(sat, sigma, mode="nearest")
    thr = max(otsu_threshold(sat), float(min_saturation))
    mask = sat > thr
    below = sat[~mask]
    if np.isfinite(texture_threshold) and below.size:
        low = 0.5 * (float(np.median(below)) + thr)
        textured = local_std(rgb.mean(axis=2)) > texture_threshold
        mask |= textured & (sat > low)
    log.debug("tissue_mask %s: saturation threshold %.4f, raw tissue fraction %.4f", source, thr, mask.mean())

    speck = max(2, round(10.0 * scale**2)) if speck_px is None else int(speck_px)
    if speck > 1 and mask.any():
        mask = _remove_small(mask, speck)
    if radius > 0 and mask.any():
        mask = binary_closing_disk(mask, radius)

    area = h * w
    if mask.any() and min_object_fraction > 0:
        mask = _remove_small(mask, min_object_fraction * area)

    if mask.any() and max_hole_fraction > 0:
        holes = ndi.binary_fill_holes(mask) & ~mask
        labels, n = ndi.label(holes)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            fill = sizes < max_hole_fraction * area
            fill[0] = False
            mask = mask | fill[labels]
    return mask


def _downsample_xy(downsample: float | tuple[float, float]) -> tuple[float, float]:
    if np.ndim(downsample) == 0:
        dx = dy = float(downsample)  # type: ignore[arg-type]
    else:
        dx, dy = (float(v) for v in downsample)  # type: ignore[union-attr]
    if not (dx > 0 and dy > 0 and math.isfinite(dx) and math.isfinite(dy)):
        raise InputError(None, "downsample", f"must be positive and finite, got {downsample!r}")
    return dx, dy


def _square_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Exact area-weighted tissue fraction of axis-aligned rectangles in mask coordinates.

    Mask pixel (i, j) covers [j, j+1) x [i, i+1). The cumulative tissue area F(x, y) over
    [0, x) x [0, y) is the bilinear interpolation of the integral image at integer nodes, so the
    rectangle's tissue area is F(x1,y1) - F(x0,y1) - F(x1,y0) + F(x0,y0). Parts of a rectangle
    outside the mask contribute no tissue but do count in its area.
    """
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), np.float64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1)

    def cum(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        j = np.minimum(np.floor(x).astype(np.intp), w - 1)
        i = np.minimum(np.floor(y).astype(np.intp), h - 1)
        fx, fy = x - j, y - i
        return (
            integral[i, j] * (1 - fx) * (1 - fy)
            + integral[i, j + 1] * fx * (1 - fy)
            + integral[i + 1, j] * (1 - fx) * fy
            + integral[i + 1, j + 1] * fx * fy
        )

    tissue = cum(x1, y1) - cum(x0, y1) - cum(x1, y0) + cum(x0, y0)
    return tissue / ((x1 - x0) * (y1 - y0))


def spot_tissue_fraction(
    mask: np.ndarray,
    downsample: float | tuple[float, float],
    centres_x_px: np.ndarray,
    centres_y_px: np.ndarray,
    *,
    radius_px: float | None = None,
    window_px: float | None = None,
    shape: Literal["disk", "square"] = "disk",
    samples: int = 32,
) -> np.ndarray:
    """Fraction (0-1) of each spot's window that is tissue, vectorised over spots.

    Args:
        mask: ``(H, W)`` boolean tissue mask (from :func:`tissue_mask`).
        downsample: full-resolution pixels per mask pixel (a float, or ``(dx, dy)``).
        centres_x_px, centres_y_px: spot centres in full-resolution pixels (x = column).
        radius_px: disk radius in full-resolution px (``shape="disk"``; if only ``window_px`` is
            given the disk has diameter ``window_px``).
        window_px: square side in full-resolution px (``shape="square"``; if only ``radius_px`` is
            given the square has side ``2 * radius_px``).
        shape: ``"square"`` gives the exact area-weighted fraction (integral image);
            ``"disk"`` samples a ``samples x samples`` grid of cell centres over the disk's
            bounding square, keeps those inside the disk and reads the mask pixel under each
            (accurate to about 1/samples).

    Parts of a window that fall outside the mask (past the slide edge) count as **non-tissue**;
    they stay in the denominator.
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise InputError(None, "mask", f"expected a non-empty 2-D mask, got shape {m.shape}")
    m = m.astype(bool, copy=False)
    dx, dy = _downsample_xy(downsample)
    cx = np.asarray(centres_x_px, dtype=np.float64).ravel()
    cy = np.asarray(centres_y_px, dtype=np.float64).ravel()
    if cx.shape != cy.shape:
        raise InputError(None, "centres_y_px", f"{cy.size} y centres for {cx.size} x centres")
    if not (np.all(np.isfinite(cx)) and np.all(np.isfinite(cy))):
        raise InputError(None, "centres_x_px", "spot centres must be finite")
    if shape not in ("disk", "square"):
        raise InputError(None, "shape", f"must be 'disk' or 'square', got {shape!r}")
    if radius_px is None and window_px is None:
        raise InputError(None, "radius_px", "give radius_px or window_px")
    if shape == "square":
        half = float(window_px) / 2 if window_px is not None else float(radius_px)  # type: ignore[arg-type]
    else:
        half = float(radius_px) if radius_px is not None else float(window_px) / 2  # type: ignore[arg-type]
    if not (half > 0 and math.isfinite(half)):
        raise InputError(None, "radius_px/window_px", f"window size must be positive and finite, got half-width {half}")
    if cx.size == 0:
        return np.zeros(0, np.float64)

    if shape == "square":
        return _square_fractions(m, (cx - half) / dx, (cy - half) / dy, (cx + half) / dx, (cy + half) / dy)

    if samples < 2:
        raise InputError(None, "samples", f"must be >= 2, got {samples}")
    offsets = (np.arange(samples) + 0.5) / samples * 2 - 1  # cell centres in (-1, 1)
    ox, oy = np.meshgrid(offsets, offsets)
    inside = ox**2 + oy**2 <= 1.0
    ox, oy = ox[inside] * half, oy[inside] * half
    h, w = m.shape
    fx = np.floor((cx[:, None] + ox[None, :]) / dx).astype(np.intp)
    fy = np.floor((cy[:, None] + oy[None, :]) / dy).astype(np.intp)
    valid = (fx >= 0) & (fx < w) & (fy >= 0) & (fy < h)
    hit = np.zeros(fx.shape, bool)
    hit[valid] = m[fy[valid], fx[valid]]
    return hit.mean(axis=1)


def qc_flags(fraction: np.ndarray, threshold: float = TISSUE_THRESHOLD) -> np.ndarray:
    """Boolean QC flags: True where the spot's tissue fraction is >= ``threshold`` (passes)."""
    f = np.asarray(fraction, dtype=np.float64)
    if not 0.0 <= threshold <= 1.0:
        raise InputError(None, "threshold", f"must be in [0, 1], got {threshold}")
    return f >= threshold
