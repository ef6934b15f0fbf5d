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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from typing import Any, Literal

import numpy as np

from stimage_embed.errors import InputError
from stimage_embed.tiles.tissue import as_rgb_uint8

log = logging.getLogger(__name__)

MIN_TISSUE_PIXELS = 100
"""Fewer tissue pixels than this in a fit image raises InputError (nothing to estimate from)."""

_HASH_DECIMALS = 6

# ----------------------------------------------------------------------------- helpers


def _check_tile(tile: object, field: str = "tile") -> np.ndarray:
    arr = np.asarray(tile)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise InputError(None, field, f"expected RGB of shape (H, W, 3) or (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(None, field, f"expected dtype uint8 (0-255 RGB), got {arr.dtype}")
    return arr


def _check_mask(mask: object | None, shape: tuple[int, ...], source: str | None) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.shape != shape[:2]:
        raise InputError(source, "mask", f"mask shape {m.shape} does not match image shape {shape[:2]}")
    return m.astype(bool, copy=False).ravel()


def od_lut(Io: float) -> np.ndarray:
    """Optical density of each 8-bit intensity: ``-ln((i + 1) / Io)`` for i = 0..255 (float64)."""
    return -np.log((np.arange(256, dtype=np.float64) + 1.0) / float(Io))


def rgb_to_od(rgb: np.ndarray, Io: float = 240) -> np.ndarray:
    """Per-channel optical density ``-ln((I + 1) / Io)`` of a uint8 RGB array, same shape, float64."""
    return od_lut(Io)[np.asarray(rgb, dtype=np.uint8)]


def tissue_od_pixels(
    rgb: np.ndarray, Io: float = 240, beta: float = 0.15, mask: np.ndarray | None = None, source: str | None = None
) -> np.ndarray:
    """``(n, 3)`` OD of the tissue pixels of an image: OD >= ``beta`` in every channel
    (Macenko's transparency threshold), and inside ``mask`` if given."""
    rgb = as_rgb_uint8(rgb, "rgb", source)
    flat = rgb.reshape(-1, 3)
    lut = od_lut(Io)
    # OD >= beta per channel, looked up per 8-bit value: the same test as on the OD values,
    # without materialising the OD of every pixel (background included)
    dense = lut >= beta
    keep = dense[flat[:, 0]]
    keep &= dense[flat[:, 1]]
    keep &= dense[flat[:, 2]]
    m = _check_mask(mask, rgb.shape, source)
    if m is not None:
        keep &= m
    n = int(keep.sum())
    if n < MIN_TISSUE_PIXELS:
        raise InputError(
            source,
            "rgb",
            f"only {n} tissue pixels (OD >= {beta} in all channels{' inside mask' if m is not None else ''}); "
            f"need >= {MIN_TISSUE_PIXELS} to estimate stain parameters -- blank or empty image?",
        )
    return lut[flat[keep]]


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rounded(a: np.ndarray) -> list:
    return np.round(np.asarray(a, dtype=np.float64), _HASH_DECIMALS).tolist()


# ----------------------------------------------------------------------------- Macenko


def macenko_stain_matrix(
    od: np.ndarray, alpha: float = 1.0, percentile: float = 99.0
) -> tuple[np.ndarray, np.ndarray]:
    """Macenko stain matrix and maximal concentrations from tissue OD pixels ``(n, 3)``.

    Projects OD onto the plane of the two leading eigenvectors of its covariance (both
    oriented into the positive octant), takes the ``alpha`` and ``100 - alpha`` percentiles of
    the angle in that plane as the two stain directions, orders them hematoxylin first (larger
    red OD component). Concentrations are least-squares OD unmixing; ``max_concentrations`` is
    their ``percentile``-th percentile per stain.

    Returns:
        ``(stain_matrix (2, 3) unit rows [H, E], max_concentrations (2,))``.
    """
    od = np.asarray(od, dtype=np.float64)
    _, eigvecs = np.linalg.eigh(np.cov(od.T))
    plane = eigvecs[:, [2, 1]]  # largest eigenvalue first
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # orient into positive octant
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    he = np.stack([v_lo, v_hi] if v_lo[0] > v_hi[0] else [v_hi, v_lo])
    he = he / np.linalg.norm(he, axis=1, keepdims=True)
    he = he * np.where(he.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
    conc = od @ np.linalg.pinv(he)  # (n, 2): least squares od ~= conc @ he
    max_c = np.percentile(conc, percentile, axis=0)
    if not np.all(np.isfinite(he)) or np.any(max_c <= 0):
        raise InputError(None, "rgb", "degenerate stain estimate (non-positive maximal concentration)")
    return he, max_c


class ChannelTableTransform:
    """``tile -> clip(prod_k tables[k, tile[..., k]], 0, 255)`` as uint8, the Macenko
    transform of :meth:`MacenkoNormalizer.channel_tables` precomputed for one slide.

    Channels 0 and 1 are merged into one 65536-row table indexed by ``r << 8 | g`` (the same
    float64 products, computed once), so a pixel costs two ``np.take`` look-ups and one
    product. Accepts ``(H, W, 3)`` or ``(N, H, W, 3)`` uint8; a batch is done tile by tile so
    the float temporaries stay in cache.
    """

    def __init__(self, tables: np.ndarray):
        self.pair = np.ascontiguousarray((tables[0][:, None, :] * tables[1][None, :, :]).reshape(256 * 256, 3))
        self.last = np.ascontiguousarray(tables[2])

    def __call__(self, tile_rgb: np.ndarray) -> np.ndarray:
        tile = _check_tile(tile_rgb)
        out = np.empty(tile.shape, np.uint8)
        for src, dst in zip(tile, out) if tile.ndim == 4 else ((tile, out),):
            flat = src.reshape(-1, 3)
            idx = flat[:, 0].astype(np.intp)
            idx <<= 8
            idx |= flat[:, 1]
            acc = np.take(self.pair, idx, axis=0)
            acc *= np.take(self.last, flat[:, 2].astype(np.intp), axis=0)
            np.clip(acc, 0, 255, out=acc)
            dst.reshape(-1, 3)[...] = acc  # float -> uint8 truncates toward zero, as astype does
        return out


class _FittedNormalizer:
    """Shared persistence of the fitted normalisers: ``FIELDS`` maps each fitted quantity
    to its shape; the target is stored as ``target_<field>_`` and the per-slide source as
    ``source_<field>_``."""

    method = ""
    FIELDS: dict[str, tuple[int, ...]] = {}

    @property
    def target_hash(self) -> str:
        """SHA-256 of the method, its parameters and the fitted target (rounded to 1e-6)."""
        self._require_target()
        return _sha256_json(
            {"method": self.method, "params": self._params()}
            | {f"target_{f}": _rounded(getattr(self, f"target_{f}_")) for f in self.FIELDS}
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters (method, settings, fitted target, source if fitted, hash)."""
        d: dict[str, Any] = {"method": self.method, "params": self._params()}
        for role in ("target", "source"):
            if all(hasattr(self, f"{role}_{f}_") for f in self.FIELDS):
                d[role] = {f: getattr(self, f"{role}_{f}_").tolist() for f in self.FIELDS}
        if "target" in d:
            d["target_hash"] = self.target_hash
        return d

    def estimate_dict(self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> dict[str, Any]:
        """The per-image estimate (what :meth:`fit_source` / :meth:`fit_target` store) as a
        JSON-serialisable dict: ``{"method", "params", <field>: list}``. Ingest stores it per
        slide, so the embedding pass need not recompute it (:meth:`with_source_estimate`)."""
        values = self._estimate_fields(rgb, mask, source)
        return {"method": self.method, "params": self._params()} | {f: np.asarray(v).tolist() for f, v in zip(self.FIELDS, values)}

    def _usable_estimate(self, estimate: dict[str, Any] | None) -> dict[str, np.ndarray] | None:
        """The fields of ``estimate`` if it was made by this method with these parameters."""
        if not estimate or estimate.get("method") != self.method or estimate.get("params") != self._params():
            return None
        values = {f: np.asarray(estimate.get(f), dtype=np.float64) for f in self.FIELDS}
        if any(v.shape != shape for v, shape in zip(values.values(), self.FIELDS.values())):
            return None
        return values

    def with_source_estimate(self, estimate: dict[str, Any] | None):
        """A **new** normaliser with this target and a stored per-slide estimate (from
        :meth:`estimate_dict`) as source: equal to ``fit_source`` on the same image and mask.
        None if the estimate is missing or was made with another method or parameters."""
        self._require_target()
        values = self._usable_estimate(estimate)
        if values is None:
            return None
        out = copy.deepcopy(self)
        for f, v in values.items():
            setattr(out, f"source_{f}_", v)
        return out

    def with_target_estimate(self, estimate: dict[str, Any] | None):
        """A **new** normaliser whose target is a stored estimate (equal to ``fit_target`` on
        the same image and mask); None if unusable (see :meth:`with_source_estimate`)."""
        values = self._usable_estimate(estimate)
        if values is None:
            return None
        out = copy.deepcopy(self)
        for f, v in values.items():
            setattr(out, f"target_{f}_", v)
        return out

    def own_source(self):
        """A **new** normaliser whose source is its own target: what :meth:`fit_source`
        returns for the template image itself (the same estimate, not recomputed), so the
        template slide's tiles need no second fit."""
        self._require_target()
        out = copy.deepcopy(self)
        for f in self.FIELDS:
            setattr(out, f"source_{f}_", np.array(getattr(self, f"target_{f}_"), dtype=np.float64, copy=True))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        """Inverse of :meth:`to_dict`."""
        obj = cls(**d.get("params", {}))
        for role in ("target", "source"):
            if role not in d:
                continue
            values = {f: np.asarray(d[role][f], dtype=np.float64) for f in cls.FIELDS}
            for f, shape in cls.FIELDS.items():
                if values[f].shape != shape:
                    raise InputError(None, f"{role}.{f}", f"expected shape {shape}, got {values[f].shape}")
            for f, v in values.items():
                setattr(obj, f"{role}_{f}_", v)
        return obj


class MacenkoNormalizer(_FittedNormalizer):
    """Macenko stain normaliser (Macenko et al., ISBI 2009).

    Args:
        Io: transmitted-light intensity (0-255 scale) used in the OD transform.
        alpha: angle percentile (in %) defining the extreme stain directions.
        beta: OD threshold; pixels with OD < beta in any channel are background.
        percentile: percentile of concentrations taken as the maximal concentration.

    Fitted attributes: ``target_stain_matrix_`` (2, 3), ``target_max_concentrations_`` (2,)
    after :meth:`fit_target`; ``source_stain_matrix_``, ``source_max_concentrations_`` on the
    object returned by :meth:`fit_source`.
    """

    method = "macenko"
    FIELDS = {"stain_matrix": (2, 3), "max_concentrations": (2,)}

    def __init__(self, Io: float = 240, alpha: float = 1.0, beta: float = 0.15, percentile: float = 99.0):
        self.Io = Io
        self.alpha = alpha
        self.beta = beta
        self.percentile = percentile

    def _params(self) -> dict[str, float]:
        return {"Io": float(self.Io), "alpha": float(self.alpha), "beta": float(self.beta), "percentile": float(self.percentile)}

    def estimate(self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(stain_matrix (2, 3), max_concentrations (2,))`` of an RGB uint8 image's tissue pixels."""
        od = tissue_od_pixels(rgb, self.Io, self.beta, mask, source)
        log.debug("macenko fit on %s: %d tissue pixels", source, len(od))
        try:
            return macenko_stain_matrix(od, self.alpha, self.percentile)
        except InputError as exc:
            raise InputError(source, "rgb", exc.reason) from None

    def _estimate_fields(self, rgb: np.ndarray, mask: np.ndarray | None, source: str | None) -> tuple[np.ndarray, ...]:
        return self.estimate(rgb, mask, source)

    def stain_vectors(self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> np.ndarray:
        """Unit stain vectors in OD space as rows ``[H, E]``, shape (2, 3)."""
        return self.estimate(rgb, mask, source)[0]

    def fit_target(self, template_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> "MacenkoNormalizer":
        """Estimate the template's stain matrix and maximal concentrations; returns self."""
        self.target_stain_matrix_, self.target_max_concentrations_ = self.estimate(template_rgb, mask, source)
        return self

    def fit_source(self, slide_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> "MacenkoNormalizer":
        """A **new** normaliser with this target and the source parameters of one slide
        (estimated on its thumbnail); ``self`` is not modified."""
        self._require_target()
        out = copy.deepcopy(self)
        out.source_stain_matrix_, out.source_max_concentrations_ = self.estimate(slide_rgb, mask, source)
        return out

    def _require_target(self) -> None:
        if not hasattr(self, "target_stain_matrix_"):
            raise InputError(None, "template", "normaliser has no target: call fit_target(template_rgb) first")

    def transform(self, tile_rgb: np.ndarray) -> np.ndarray:
        """Normalise an RGB uint8 tile (``(H, W, 3)`` or ``(N, H, W, 3)``) to the template; uint8."""
        return self.transformer()(tile_rgb)

    def transformer(self) -> ChannelTableTransform:
        """The transform of this fitted normaliser as a callable with its look-up tables
        precomputed: use it for many tiles of one slide."""
        self._require_target()
        if not hasattr(self, "source_stain_matrix_"):
            raise InputError(None, "source", "normaliser has no source: use fit_source(slide_thumbnail) first")
        return ChannelTableTransform(self.channel_tables())

    def channel_tables(self) -> np.ndarray:
        """``(3, 256, 3)`` float64: ``tables[k, v, c]`` is the factor input channel ``k`` at
        8-bit value ``v`` contributes to output channel ``c`` (``Io`` folded into ``k = 0``).

        The transform is ``Io * exp(-(OD @ M))`` with ``M = pinv(S_source) * (maxC_target /
        maxC_source) @ S_target`` (3 x 3) and ``OD`` a per-channel function of the 8-bit value,
        so it factorises per input channel: ``out[c] = prod_k tables[k, x_k, c]``. Three table
        look-ups and two products per pixel instead of a log, two matrix products and an exp;
        equal to that to ~1e-15 relative, so the truncated uint8 output agrees (tested against
        the formula on real tiles and millions of random colours)."""
        mix = (np.linalg.pinv(self.source_stain_matrix_) * (self.target_max_concentrations_ / self.source_max_concentrations_)) @ self.target_stain_matrix_
        tables = np.exp(-od_lut(self.Io)[None, :, None] * mix[:, None, :])
        tables[0] *= float(self.Io)
        return tables


# ----------------------------------------------------------------------------- LAB

_RGB2XYZ = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
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


# ----------------------------------------------------------------------------- Reinhard


class ReinhardNormalizer(_FittedNormalizer):
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

    def lab_stats(self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(means (3,), stds (3,))`` of L*, a*, b* over the image's tissue pixels."""
        rgb = as_rgb_uint8(rgb, "rgb", source)
        flat = rgb.reshape(-1, 3)
        keep = np.all(od_lut(self.Io)[flat] >= self.beta, axis=1)
        m = _check_mask(mask, rgb.shape, source)
        if m is not None:
            keep &= m
        if int(keep.sum()) < MIN_TISSUE_PIXELS:
            raise InputError(
                source, "rgb", f"only {int(keep.sum())} tissue pixels; need >= {MIN_TISSUE_PIXELS} -- blank or empty image?"
            )
        lab = rgb_to_lab(flat[keep])
        means, stds = lab.mean(axis=0), lab.std(axis=0)
        if np.any(stds <= 0):
            raise InputError(source, "rgb", "tissue pixels have zero colour variance (constant image?)")
        return means, stds

    def _estimate_fields(self, rgb: np.ndarray, mask: np.ndarray | None, source: str | None) -> tuple[np.ndarray, ...]:
        return self.lab_stats(rgb, mask, source)

    def fit_target(self, template_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> "ReinhardNormalizer":
        """Estimate the template's LAB means and stds; returns self."""
        self.target_means_, self.target_stds_ = self.lab_stats(template_rgb, mask, source)
        return self

    def fit_source(self, slide_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None) -> "ReinhardNormalizer":
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
        tile = _check_tile(tile_rgb)
        lab = rgb_to_lab(tile)
        lab = (lab - self.source_means_) * (self.target_stds_ / self.source_stds_) + self.target_means_
        return lab_to_rgb(lab)


# ----------------------------------------------------------------------------- identity


class IdentityNormalizer:
    """No stain normalisation: ``transform`` returns a copy of the tile."""

    method = "none"

    def fit_target(self, template_rgb: np.ndarray | None = None, mask: np.ndarray | None = None, source: str | None = None) -> "IdentityNormalizer":
        """No-op; returns self."""
        return self

    def fit_source(self, slide_rgb: np.ndarray | None = None, mask: np.ndarray | None = None, source: str | None = None) -> "IdentityNormalizer":
        """No-op; returns a new instance."""
        return IdentityNormalizer()

    def transform(self, tile_rgb: np.ndarray) -> np.ndarray:
        """The tile itself (validated, copied)."""
        return _check_tile(tile_rgb).copy()

    @property
    def target_hash(self) -> str:
        """SHA-256 of ``{"method": "none"}``."""
        return _sha256_json({"method": self.method})

    def to_dict(self) -> dict[str, Any]:
        """``{"method": "none", "target_hash": ...}``."""
        return {"method": self.method, "target_hash": self.target_hash}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IdentityNormalizer":
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
    from that image's stored estimate (:meth:`_FittedNormalizer.estimate_dict`) instead of the
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
