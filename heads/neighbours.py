"""Lattice neighbours of spots within each slide (arrays only, ``scipy.spatial.cKDTree``).

Spot-based platforms place spots on a regular lattice: hexagonal on Visium (6 nearest
neighbours at one pitch), square on legacy ST (4 at one pitch, 4 more diagonal ones at
sqrt(2) pitch). With the default radius of 1.5 pitch and up to ``k = 8`` neighbours the
same rule finds the 6 hexagonal neighbours on Visium and the 8 (4 + 4 diagonal) on
legacy ST; the next shells (sqrt(3) and 2 pitch) lie outside it. A spot at a tissue edge
or next to a spot removed by QC has fewer neighbours: the missing slots are masked.

On HER2ST (legacy ST, spot centres detected on the image) the lattice is jittered and
slightly anisotropic: the median nearest distance is ~187 µm and the diagonal neighbours
fall between 1.3 and 1.7 pitches, so the 1.5-pitch ring holds about half of them (most
spots have 4-6 neighbours) and the second ring ``(1.5, 2.5]`` the rest.

The pitch of a slide is measured, not assumed: the median distance from each of its spots
to its nearest other spot, in the unit of ``coords`` (µm for the heads). Neighbours never
cross slides: coordinates of different slides are unrelated frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

#: default neighbour radius, in units of the slide's pitch
DEFAULT_RADIUS = 1.5
#: default maximum number of neighbours (8: legacy ST with diagonals; Visium has 6)
DEFAULT_K = 8


@dataclass(frozen=True)
class Neighbours:
    """Neighbours of ``n`` spots, up to ``k`` each.

    ``index`` (n, k) int64: row of each neighbour; masked slots hold the spot's own row
    (so gathering with it is always safe). ``mask`` (n, k) bool: True where the slot is a
    real neighbour. ``offset`` (n, k, 2) float64: neighbour minus spot position, divided by
    the slide's pitch (dimensionless; 0 where masked). ``distance`` (n, k) float64: the
    same in units of pitch. ``pitch`` (n,) float64: the pitch of each spot's slide in the
    unit of the coordinates (NaN for a slide with a single spot). Slots are sorted by
    distance, nearest first.
    """

    index: np.ndarray
    mask: np.ndarray
    offset: np.ndarray
    distance: np.ndarray
    pitch: np.ndarray

    @property
    def count(self) -> np.ndarray:
        """Number of real neighbours per spot, (n,) int."""
        return self.mask.sum(axis=1)


def _check_coords(coords: np.ndarray) -> np.ndarray:
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords: expected (n_spots, 2) positions, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("coords: positions must be finite")
    return c


def _check_groups(groups: np.ndarray | None, n: int) -> np.ndarray:
    if groups is None:
        return np.zeros(n, dtype=np.int64)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups: expected ({n},) labels, got shape {g.shape}")
    return g


def slide_pitch(coords: np.ndarray) -> float:
    """Median nearest-neighbour distance of the spots of ONE slide (unit of ``coords``);
    NaN with fewer than 2 spots. Duplicated positions are ignored (distance 0)."""
    c = _check_coords(coords)
    if c.shape[0] < 2:
        return float("nan")
    d, _ = cKDTree(c).query(c, k=2)
    d1 = d[:, 1]
    d1 = d1[d1 > 0]
    return float(np.median(d1)) if d1.size else float("nan")


def find_neighbours(
    coords: np.ndarray,
    groups: np.ndarray | None = None,
    k: int = DEFAULT_K,
    radius: float = DEFAULT_RADIUS,
    inner: float = 0.0,
) -> Neighbours:
    """The up to ``k`` nearest other spots of each spot in its own group (slide), at a
    distance in ``(inner, radius]`` pitches (see the module doc).

    Parameters
    ----------
    coords : (n, 2) spot centres; one frame per group (µm for the heads).
    groups : (n,) slide label per spot; ``None``: all spots in one slide.
    k : maximum neighbours per spot (>= 1).
    radius, inner : the ring of distances kept, in units of each slide's pitch
        (``inner=1.5, radius=2.5`` with ``k=16``: the second ring of legacy ST).
    """
    c = _check_coords(coords)
    n = c.shape[0]
    g = _check_groups(groups, n)
    if int(k) < 1:
        raise ValueError(f"k: must be >= 1, got {k}")
    if not 0.0 <= float(inner) < float(radius):
        raise ValueError(f"radius: need 0 <= inner < radius, got inner={inner}, radius={radius}")
    k = int(k)
    index = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
    mask = np.zeros((n, k), dtype=bool)
    dist = np.zeros((n, k))
    pitch = np.full(n, np.nan)
    for label in np.unique(g):
        rows = np.flatnonzero(g == label)
        p = slide_pitch(c[rows])
        pitch[rows] = p
        if not np.isfinite(p):
            continue
        kk = min(k + 1, rows.size)  # + the spot itself
        # room for the spots inside ``inner`` (dropped below): a hexagonal lattice holds
        # 2/sqrt(3) ~ 1.15 spots per pitch**2; 1.3 x the disc of radius inner + 1 bounds it
        extra = 0 if inner == 0 else int(np.ceil(1.3 * np.pi * (float(inner) + 1.0) ** 2))
        kq = min(kk + extra, rows.size)
        d, j = cKDTree(c[rows]).query(c[rows], k=kq, distance_upper_bound=float(radius) * p * (1 + 1e-9))
        d, j = d.reshape(rows.size, kq), j.reshape(rows.size, kq)
        keep = np.isfinite(d) & (j != np.arange(rows.size)[:, None]) & (d > float(inner) * p * (1 + 1e-9)) & (d > 0)
        # compact the kept candidates to the left (stable: stays sorted by distance)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        kept = np.take_along_axis(keep, order, axis=1)
        jj = np.take_along_axis(np.where(keep, j, 0), order, axis=1)
        dd = np.take_along_axis(np.where(keep, d, 0.0), order, axis=1)
        w = kept.shape[1]
        index[rows, :w] = np.where(kept, rows[jj], rows[:, None])
        mask[rows, :w] = kept
        dist[rows, :w] = np.where(kept, dd / p, 0.0)
    offset = (c[index] - c[:, None, :]) / np.where(np.isfinite(pitch), pitch, 1.0)[:, None, None]
    offset[~mask] = 0.0
    return Neighbours(index=index, mask=mask, offset=offset, distance=dist, pitch=pitch)


def masked_neighbour_mean(X: np.ndarray, nb: Neighbours) -> np.ndarray:
    """Mean of the neighbours' rows of ``X`` (n, d) per spot, over real neighbours only;
    a spot with no neighbour gets its own row (so the feature stays on the data's scale)."""
    X = np.asarray(X)
    w = nb.mask.astype(X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64)
    cnt = w.sum(axis=1, keepdims=True)
    s = np.einsum("nk,nkd->nd", w, X[nb.index])
    return np.where(cnt > 0, s / np.maximum(cnt, 1), X)


__all__ = ["DEFAULT_K", "DEFAULT_RADIUS", "Neighbours", "find_neighbours", "masked_neighbour_mean", "slide_pitch"]
