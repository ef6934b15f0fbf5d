"""Shared parts of the stain normalisers (see :mod:`stimage_embed.tiles.stain`): input checks,
optical density (OD) of 8-bit RGB, the tissue-pixel selection of the fits, and the persistence
of fitted parameters (:class:`FittedNormalizer`).

OD follows Macenko et al., ISBI 2009: ``OD = -ln((I + 1) / Io)`` per channel with ``I`` in
0-255 and ``Io`` the transmitted-light intensity (240 by default, as in the reference
implementation and torchstain).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import numpy as np

from stimage_embed.errors import InputError
from stimage_embed.tiles.tissue import as_rgb_uint8

MIN_TISSUE_PIXELS = 100
"""Fewer tissue pixels than this in a fit image raises InputError (nothing to estimate from)."""

_HASH_DECIMALS = 6


def check_tile(tile: object, field: str = "tile") -> np.ndarray:
    arr = np.asarray(tile)
    if arr.ndim not in (3, 4) or arr.shape[-1] != 3:
        raise InputError(None, field, f"expected RGB of shape (H, W, 3) or (N, H, W, 3), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise InputError(None, field, f"expected dtype uint8 (0-255 RGB), got {arr.dtype}")
    return arr


def check_mask(mask: object | None, shape: tuple[int, ...], source: str | None) -> np.ndarray | None:
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
    m = check_mask(mask, rgb.shape, source)
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


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _rounded(a: np.ndarray) -> list:
    return np.round(np.asarray(a, dtype=np.float64), _HASH_DECIMALS).tolist()


class FittedNormalizer:
    """Shared persistence of the fitted normalisers: ``FIELDS`` maps each fitted quantity
    to its shape; the target is stored as ``target_<field>_`` and the per-slide source as
    ``source_<field>_``."""

    method = ""
    FIELDS: dict[str, tuple[int, ...]] = {}

    @property
    def target_hash(self) -> str:
        """SHA-256 of the method, its parameters and the fitted target (rounded to 1e-6)."""
        self._require_target()
        return sha256_json(
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

    def estimate_dict(
        self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> dict[str, Any]:
        """The per-image estimate (what :meth:`fit_source` / :meth:`fit_target` store) as a
        JSON-serialisable dict: ``{"method", "params", <field>: list}``. Ingest stores it per
        slide, so the embedding pass need not recompute it (:meth:`with_source_estimate`)."""
        values = self._estimate_fields(rgb, mask, source)
        return {"method": self.method, "params": self._params()} | {
            f: np.asarray(v).tolist() for f, v in zip(self.FIELDS, values)
        }

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
        return self._with_estimate(estimate, "source")

    def with_target_estimate(self, estimate: dict[str, Any] | None):
        """A **new** normaliser whose target is a stored estimate (equal to ``fit_target`` on
        the same image and mask); None if unusable (see :meth:`with_source_estimate`)."""
        return self._with_estimate(estimate, "target")

    def _with_estimate(self, estimate: dict[str, Any] | None, side: str):
        """A copy with the usable ``estimate`` set as its ``<side>_*_`` attributes, or None."""
        values = self._usable_estimate(estimate)
        if values is None:
            return None
        out = copy.deepcopy(self)
        for f, v in values.items():
            setattr(out, f"{side}_{f}_", v)
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
