"""Stain normalisation of RGB uint8 tiles: Macenko (default), Reinhard, or none.

Contract (no global state; every fitted object is immutable in use):

* ``norm = make_normalizer("macenko", template_rgb)`` fits the **target** (template) once.
* ``norm_s = norm.fit_source(slide_thumbnail)`` returns a **new** normaliser holding the
  per-slide source parameters (estimated once per slide on its thumbnail, tissue pixels only).
* ``norm_s.transform(tile)`` maps an ``(H, W, 3)`` (or ``(N, H, W, 3)``) uint8 RGB tile to the
  template's appearance, uint8 RGB, by per-channel look-up tables (about 1 ms for a 224 x 224
  tile; ``norm_s.transformer()`` precomputes them once for the many tiles of a slide).
* ``to_dict()`` / :func:`normalizer_from_dict` serialise the parameters;
  ``target_hash`` identifies the template for provenance.

Optical density (OD) follows Macenko et al., ISBI 2009: ``OD = -ln((I + 1) / Io)`` per channel
with ``I`` in 0-255 and ``Io`` the transmitted-light intensity (240 by default, as in the
reference implementation and torchstain). Stain vectors are unit vectors in OD space (R, G, B),
returned as rows, hematoxylin first (the vector with the larger red OD component).

LAB is CIE 1976 L*a*b* of sRGB under D65 (L* in 0-100), the same convention as
``skimage.color.rgb2lab``; it is implemented here with numpy because neither scikit-image nor
OpenCV is a dependency, and tested against torchstain's independent implementation.

The methods live in :mod:`~stimage_embed.tiles.stain_macenko`, :mod:`~stimage_embed.tiles.stain_reinhard`
and their shared parts (OD, input checks, persistence) in :mod:`~stimage_embed.tiles.stain_base`;
this module is the public entry point and re-exports them.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from stimage_embed.errors import InputError
from stimage_embed.tiles.stain_base import (
    MIN_TISSUE_PIXELS,
    FittedNormalizer,
    check_tile,
    od_lut,
    rgb_to_od,
    sha256_json,
    tissue_od_pixels,
)
from stimage_embed.tiles.stain_macenko import ChannelTableTransform, MacenkoNormalizer, macenko_stain_matrix
from stimage_embed.tiles.stain_reinhard import ReinhardNormalizer, lab_to_rgb, rgb_to_lab

__all__ = [
    "MIN_TISSUE_PIXELS",
    "METHODS",
    "ChannelTableTransform",
    "FittedNormalizer",
    "IdentityNormalizer",
    "MacenkoNormalizer",
    "Normalizer",
    "ReinhardNormalizer",
    "lab_to_rgb",
    "macenko_stain_matrix",
    "make_normalizer",
    "normalizer_from_dict",
    "normalizer_from_estimate",
    "od_lut",
    "rgb_to_lab",
    "rgb_to_od",
    "tissue_od_pixels",
]


# ----------------------------------------------------------------------------- identity


class IdentityNormalizer:
    """No stain normalisation: ``transform`` returns a copy of the tile."""

    method = "none"

    def fit_target(
        self, template_rgb: np.ndarray | None = None, mask: np.ndarray | None = None, source: str | None = None
    ) -> IdentityNormalizer:
        """No-op; returns self."""
        return self

    def fit_source(
        self, slide_rgb: np.ndarray | None = None, mask: np.ndarray | None = None, source: str | None = None
    ) -> IdentityNormalizer:
        """No-op; returns a new instance."""
        return IdentityNormalizer()

    def transform(self, tile_rgb: np.ndarray) -> np.ndarray:
        """The tile itself (validated, copied)."""
        return check_tile(tile_rgb).copy()

    @property
    def target_hash(self) -> str:
        """SHA-256 of ``{"method": "none"}``."""
        return sha256_json({"method": self.method})

    def to_dict(self) -> dict[str, Any]:
        """``{"method": "none", "target_hash": ...}``."""
        return {"method": self.method, "target_hash": self.target_hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdentityNormalizer:
        """Inverse of :meth:`to_dict`."""
        return cls()


Normalizer = MacenkoNormalizer | ReinhardNormalizer | IdentityNormalizer
_BY_METHOD: dict[str, type] = {"macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer, "none": IdentityNormalizer}
METHODS = tuple(_BY_METHOD)


def make_normalizer(
    method: Literal["macenko", "reinhard", "none"] = "macenko",
    template_rgb: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    source: str | None = None,
    **params: float,
) -> Normalizer:
    """A normaliser of ``method`` with its target fitted on ``template_rgb`` (tissue pixels,
    optionally restricted to ``mask``). ``"none"`` is the identity and needs no template.
    ``params`` go to the normaliser's constructor (e.g. ``Io``, ``alpha``, ``beta``)."""
    if method not in _BY_METHOD:
        raise InputError(None, "stain_normalization", f"unknown method {method!r}; expected one of {METHODS}")
    if method == "none":
        return IdentityNormalizer()
    if template_rgb is None:
        raise InputError(source, "template_rgb", f"stain normalisation {method!r} needs a template image")
    try:
        norm = _BY_METHOD[method](**params)
    except TypeError as exc:
        raise InputError(source, "stain_normalization", f"bad parameters for {method!r}: {exc}") from None
    return norm.fit_target(template_rgb, mask, source)


def normalizer_from_estimate(method: str, estimate: dict[str, Any] | None) -> Normalizer | None:
    """The normaliser ``make_normalizer(method, image, mask)`` would fit (default parameters),
    from that image's stored estimate (:meth:`FittedNormalizer.estimate_dict`) instead of the
    image; None if the estimate is missing or made with another method or parameters."""
    if method not in _BY_METHOD:
        raise InputError(None, "stain_normalization", f"unknown method {method!r}; expected one of {METHODS}")
    if method == "none":
        return IdentityNormalizer()
    return _BY_METHOD[method]().with_target_estimate(estimate)


def normalizer_from_dict(d: dict[str, Any]) -> Normalizer:
    """Rebuild a normaliser from :meth:`to_dict` output; checks ``target_hash`` if present."""
    method = d.get("method")
    if method not in _BY_METHOD:
        raise InputError(None, "method", f"unknown stain normalisation method {method!r}; expected one of {METHODS}")
    obj = _BY_METHOD[method].from_dict(d)
    if "target_hash" in d and "target" in d and obj.target_hash != d["target_hash"]:
        raise InputError(None, "target_hash", "does not match the stored target parameters")
    return obj
