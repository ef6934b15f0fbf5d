"""Macenko stain normalisation (Macenko et al., ISBI 2009) of RGB uint8 tiles: the stain
matrix estimate, the normaliser, and its per-slide look-up-table transform.

Stain vectors are unit vectors in OD space (R, G, B), returned as rows, hematoxylin first (the
vector with the larger red OD component). Public names are re-exported by
:mod:`stimage_embed.tiles.stain`.
"""

from __future__ import annotations

import copy
import logging

import numpy as np

from stimage_embed.errors import InputError
from stimage_embed.tiles.stain_base import FittedNormalizer, check_tile, od_lut, tissue_od_pixels

log = logging.getLogger(__name__)


def macenko_stain_matrix(od: np.ndarray, alpha: float = 1.0, percentile: float = 99.0) -> tuple[np.ndarray, np.ndarray]:
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
        tile = check_tile(tile_rgb)
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


class MacenkoNormalizer(FittedNormalizer):
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
        return {
            "Io": float(self.Io),
            "alpha": float(self.alpha),
            "beta": float(self.beta),
            "percentile": float(self.percentile),
        }

    def estimate(
        self, rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
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

    def fit_target(
        self, template_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> MacenkoNormalizer:
        """Estimate the template's stain matrix and maximal concentrations; returns self."""
        self.target_stain_matrix_, self.target_max_concentrations_ = self.estimate(template_rgb, mask, source)
        return self

    def fit_source(
        self, slide_rgb: np.ndarray, mask: np.ndarray | None = None, source: str | None = None
    ) -> MacenkoNormalizer:
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
        mix = (
            np.linalg.pinv(self.source_stain_matrix_)
            * (self.target_max_concentrations_ / self.source_max_concentrations_)
        ) @ self.target_stain_matrix_
        tables = np.exp(-od_lut(self.Io)[None, :, None] * mix[:, None, :])
        tables[0] *= float(self.Io)
        return tables
