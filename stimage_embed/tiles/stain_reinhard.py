"""Reinhard colour transfer in CIELAB, and the sRGB <-> CIELAB conversions it uses.

LAB is CIE 1976 L*a*b* of sRGB under D65 (L* in 0-100), the same convention as
``skimage.color.rgb2lab``; it is implemented here with numpy because neither scikit-image nor
OpenCV is a dependency, and tested against torchstain's independent implementation. Public
names are re-exported by :mod:`stimage_embed.tiles.stain`.
"""

from __future__ import annotations

import copy

import numpy as np

from stimage_embed.errors import InputError
from stimage_embed.tiles.stain_base import MIN_TISSUE_PIXELS, FittedNormalizer, check_mask, check_tile, od_lut
from stimage_embed.tiles.tissue import as_rgb_uint8

_RGB2XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_XYZ2RGB = np.linalg.inv(_RGB2XYZ)
_D65 = np.array([0.95047, 1.0, 1.08883])


def _srgb_linear_lut() -> np.ndarray:
    v = np.arange(256) / 255.0
    return np.where(v > 0.04045, ((v + 0.055) / 1.055) ** 2.4, v / 12.92)


_SRGB_LINEAR_LUT = _srgb_linear_lut()
"""Linear-light value (0-1) of each 8-bit sRGB code (IEC 61966-2-1)."""


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65; L* 0-100, a*, b*) of uint8 sRGB, float64, shape ``(..., 3)``."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise InputError(None, "rgb", f"expected uint8 array with last axis 3, got {rgb.dtype} {rgb.shape}")
    xyz = _SRGB_LINEAR_LUT[rgb] @ (_RGB2XYZ.T / _D65)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    L = 116.0 * f[..., 1] - 16.0
    a = 500.0 * (f[..., 0] - f[..., 1])
    b = 200.0 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """uint8 sRGB of CIELAB (D65) values, clipped to the sRGB gamut and rounded."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([lab[..., 1] / 500.0 + fy, fy, fy - lab[..., 2] / 200.0], axis=-1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _D65
    lin = xyz @ _XYZ2RGB.T
    lin = np.clip(lin, 0.0, 1.0)
    srgb = np.where(lin > 0.0031308, 1.055 * np.power(lin, 1 / 2.4) - 0.055, 12.92 * lin)
    return np.clip(np.rint(srgb * 255.0), 0, 255).astype(np.uint8)


class ReinhardNormalizer(FittedNormalizer):
    """Reinhard colour transfer in CIELAB: per-channel ``(x - mu_s) / sd_s * sd_t + mu_t``.

    Statistics (mean and std of L*, a*, b*) are taken over tissue pixels only: OD >= ``beta``
    in every channel (with ``Io``), and inside ``mask`` if given; the transform is applied to
    every pixel of a tile. Fitted attributes: ``target_means_``, ``target_stds_`` (3,) and,
    on the object returned by :meth:`fit_source`, ``source_means_``, ``source_stds_``.
    """

    method = "reinhard"
    FIELDS = {"means": (3,), "stds": (3,)}

    def __init__(self, Io: float = 240, beta: float = 0.15):
        self.Io = Io
        self.beta = beta

    def _params(self) -> dict[str, float]:
        return {"Io": float(self.Io), "beta": float(self.beta)}

    def lab_stats(
        self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(means (3,), stds (3,))`` of L*, a*, b* over the image's tissue pixels."""
        rgb = as_rgb_uint8(rgb, "rgb", source)
        flat = rgb.reshape(-1, 3)
        keep = np.all(od_lut(self.Io)[flat] >= self.beta, axis=1)
        m = check_mask(mask, rgb.shape, source)
        if m is not None:
            keep &= m
        if int(keep.sum()) < MIN_TISSUE_PIXELS:
            raise InputError(
                source,
                "rgb",
                f"only {int(keep.sum())} tissue pixels; need >= {MIN_TISSUE_PIXELS} -- blank or empty image?",
            )
        lab = rgb_to_lab(flat[keep])
        means, stds = lab.mean(axis=0), lab.std(axis=0)
        if np.any(stds <= 0):
            raise InputError(source, "rgb", "tissue pixels have zero colour variance (constant image?)")
        return means, stds

    def _estimate_fields(self, rgb: np.ndarray, mask: np.ndarray | None, source: str | None) -> tuple[np.ndarray, ...]:
        return self.lab_stats(rgb, mask, source)

    def fit_target(
        self, template_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> ReinhardNormalizer:
        """Estimate the template's LAB means and stds; returns self."""
        self.target_means_, self.target_stds_ = self.lab_stats(template_rgb, mask, source)
        return self

    def fit_source(
        self, slide_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> ReinhardNormalizer:
        """A **new** normaliser with this target and one slide's LAB statistics."""
        self._require_target()
        out = copy.deepcopy(self)
        out.source_means_, out.source_stds_ = self.lab_stats(slide_rgb, mask, source)
        return out

    def _require_target(self) -> None:
        if not hasattr(self, "target_means_"):
            raise InputError(None, "template", "normaliser has no target: call fit_target(template_rgb) first")

    def transform(self, tile_rgb: np.ndarray) -> np.ndarray:
        """Normalise an RGB uint8 tile (``(H, W, 3)`` or ``(N, H, W, 3)``) to the template; uint8."""
        self._require_target()
        if not hasattr(self, "source_means_"):
            raise InputError(None, "source", "normaliser has no source: use fit_source(slide_thumbnail) first")
        tile = check_tile(tile_rgb)
        lab = rgb_to_lab(tile)
        lab = (lab - self.source_means_) * (self.target_stds_ / self.source_stds_) + self.target_means_
        return lab_to_rgb(lab)
