"""Spatial structure of predictions: spot-neighbour graphs, Moran's I (uni- and
bivariate, vectorised over genes) and STimage's spatial IoU of high-expression regions.

Coordinates
-----------
* **array coordinates** (``array_row``, ``array_col``): integer grid indices.
  Legacy ST: a square grid, 1 step = 200 µm. Visium: a hex grid stored in "doubled"
  columns (a row holds only even or only odd columns; same-row neighbours are 2 columns
  apart, neighbours in the rows above/below 1 column apart).
* **pixel coordinates** (``pixel_x``, ``pixel_y``): full-resolution image pixels.

Weights are ``scipy.sparse.csr_matrix`` (n_spots x n_spots), row-standardised (each
row sums to 1; a spot without neighbours — an island — keeps an all-zero row, as
libpysal's ``transform="r"`` does).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.ndimage import gaussian_filter
from scipy.spatial import cKDTree

from heads import highlow_labels
from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

#: (d_row, d_col) neighbour offsets of each grid layout
GRID_OFFSETS: dict[str, tuple[tuple[int, int], ...]] = {
    "square4": ((-1, 0), (1, 0), (0, -1), (0, 1)),
    "square8": ((-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)),
    "hex6": ((0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)),
}


def _int_coords(array_row: np.ndarray, array_col: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(array_row)
    c = np.asarray(array_col)
    if r.shape != c.shape or r.ndim != 1:
        raise InputError(None, "array_row", f"array_row {r.shape} and array_col {c.shape} must be equal-length 1-D")
    if r.size == 0:
        raise InputError(None, "array_row", "no spots")
    if not (np.all(np.mod(r, 1) == 0) and np.all(np.mod(c, 1) == 0)):
        raise InputError(None, "array_row", "array coordinates must be integers")
    r, c = r.astype(np.int64), c.astype(np.int64)
    keys = np.stack([r, c], axis=1)
    if np.unique(keys, axis=0).shape[0] != r.size:
        raise InputError(None, "array_row", "two spots share the same array coordinates")
    return r, c


def row_standardise(adjacency: sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """Divide each row by its sum; all-zero rows (islands) stay zero (logged)."""
    a = sp.csr_matrix(adjacency, dtype=np.float64)
    rs = np.asarray(a.sum(axis=1)).ravel()
    n_isl = int((rs == 0).sum())
    if n_isl:
        log.info("%d of %d spots have no neighbours (islands)", n_isl, a.shape[0])
    inv = np.divide(1.0, rs, out=np.zeros_like(rs), where=rs > 0)
    return sp.csr_matrix(sp.diags(inv) @ a)


def grid_adjacency(array_row: np.ndarray, array_col: np.ndarray, layout: str = "square4") -> sp.csr_matrix:
    """Binary spot adjacency from array coordinates.

    ``layout``: ``square4`` (legacy ST, rook), ``square8`` (legacy ST, queen) or
    ``hex6`` (Visium, doubled columns: 6 neighbours).
    """
    if layout not in GRID_OFFSETS:
        raise InputError(None, "layout", f"unknown grid layout {layout!r}; expected one of {list(GRID_OFFSETS)}")
    r, c = _int_coords(array_row, array_col)
    r0, c0 = r - r.min(), c - c.min()
    lut = np.full((r0.max() + 1, c0.max() + 1), -1, dtype=np.int64)
    lut[r0, c0] = np.arange(r.size)
    rows, cols = [], []
    for dr, dc in GRID_OFFSETS[layout]:
        rr, cc = r0 + dr, c0 + dc
        inside = (rr >= 0) & (rr < lut.shape[0]) & (cc >= 0) & (cc < lut.shape[1])
        j = np.full(r.size, -1, dtype=np.int64)
        j[inside] = lut[rr[inside], cc[inside]]
        ok = j >= 0
        rows.append(np.flatnonzero(ok))
        cols.append(j[ok])
    i, j = np.concatenate(rows), np.concatenate(cols)
    return sp.csr_matrix((np.ones(i.size), (i, j)), shape=(r.size, r.size))


def grid_weights(array_row: np.ndarray, array_col: np.ndarray, layout: str = "square4") -> sp.csr_matrix:
    """Row-standardised weights of :func:`grid_adjacency`."""
    return row_standardise(grid_adjacency(array_row, array_col, layout))


def knn_weights(xy: np.ndarray, k: int) -> sp.csr_matrix:
    """Row-standardised k-nearest-neighbour weights from (n, 2) coordinates (e.g. pixels);
    a spot is not its own neighbour. Distance ties at the k-th neighbour are broken by
    the KD-tree (arbitrary but deterministic)."""
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] < 2:
        raise InputError(None, "xy", f"need an (n>=2, d) coordinate array, got {pts.shape}")
    if not 1 <= k < pts.shape[0]:
        raise InputError(None, "k", f"k={k} must be in [1, n_spots-1={pts.shape[0] - 1}]")
    _, idx = cKDTree(pts).query(pts, k=k + 1)
    n = pts.shape[0]
    keep = idx != np.arange(n)[:, None]  # drop self (not always column 0 with duplicate points)
    keep[keep.all(axis=1), -1] = False  # self not among the k+1: drop the farthest instead
    nbr = idx[keep].reshape(n, k)
    adj = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), nbr.ravel())), shape=(n, n))
    return row_standardise(adj)


def radius_weights(xy: np.ndarray, radius: float) -> sp.csr_matrix:
    """Row-standardised weights linking spots within ``radius`` (same units as ``xy``,
    e.g. pixels; inclusive), excluding self."""
    pts = np.asarray(xy, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] < 1:
        raise InputError(None, "xy", f"need an (n, d) coordinate array, got {pts.shape}")
    if not radius > 0:
        raise InputError(None, "radius", f"radius must be > 0, got {radius}")
    pairs = cKDTree(pts).query_pairs(r=radius, output_type="ndarray")
    i = np.concatenate([pairs[:, 0], pairs[:, 1]])
    j = np.concatenate([pairs[:, 1], pairs[:, 0]])
    adj = sp.csr_matrix((np.ones(i.size), (i, j)), shape=(pts.shape[0], pts.shape[0]))
    return row_standardise(adj)


# ----------------------------------------------------------------------------- Moran
def _values(v: np.ndarray, n: int, name: str) -> np.ndarray:
    a = np.asarray(v.toarray() if sp.issparse(v) else v, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.shape[0] != n:
        raise InputError(None, name, f"{a.shape[0]} spots but the weights have {n}")
    if not np.all(np.isfinite(a)):
        raise InputError(None, name, "contains NaN or infinite values")
    return a


def morans_i(values: np.ndarray, weights: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Moran's I per column (gene), as ``esda.Moran(y, w).I``:
    ``I = n / S0 * z' W z / z' z`` with ``z = y - mean(y)`` and ``S0`` the sum of weights.

    ``weights`` is used as given (pass row-standardised weights to match esda's default
    ``transformation="r"``). ``NaN`` for a constant column.
    """
    w = sp.csr_matrix(weights, dtype=np.float64)
    n = w.shape[0]
    y = _values(values, n, "values")
    z = y - y.mean(axis=0)
    num = np.einsum("ij,ij->j", z, w @ z)
    den = np.einsum("ij,ij->j", z, z)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = n / w.sum() * num / den
    out[np.all(y == y[:1], axis=0)] = np.nan
    return out


def bivariate_morans_i(x: np.ndarray, y: np.ndarray, weights: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Bivariate Moran's I per column, exactly ``esda.Moran_BV(x, y, w).I``:
    ``I = zx' W zy / (n - 1)`` with ``zx``, ``zy`` standardised (ddof=1), i.e. the
    correlation of ``x`` with the spatial lag of ``y``. (With row-standardised weights
    and no islands ``S0 = n``, so this equals ``n/S0 * zx' W zy / zx' zx``.)

    Convention here: ``x`` = prediction, ``y`` = truth — "does the prediction at a spot
    agree with the truth around it". Not symmetric for row-standardised weights.
    ``NaN`` if either column is constant.
    """
    w = sp.csr_matrix(weights, dtype=np.float64)
    n = w.shape[0]
    a, b = _values(x, n, "x"), _values(y, n, "y")
    if a.shape != b.shape:
        raise InputError(None, "y", f"shape {b.shape} does not match x {a.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        zx = (a - a.mean(axis=0)) / a.std(axis=0, ddof=1)
        zy = (b - b.mean(axis=0)) / b.std(axis=0, ddof=1)
        out = np.einsum("ij,ij->j", zx, w @ zy) / (n - 1)
    out[np.all(a == a[:1], axis=0) | np.all(b == b[:1], axis=0)] = np.nan
    return out


# ----------------------------------------------------------------------------- spatial IoU
@dataclass(frozen=True)
class SpatialIoU:
    """Result of :func:`spatial_iou` for one slide.

    Rasters are indexed ``[gene, raster_row, raster_col]``; spot ``i`` sits at
    ``(rows[i], cols[i])``. ``mask`` marks raster cells holding a spot.

    Attributes
    ----------
    iou : (n_genes,) IoU of the smoothed HIGH class, over cells holding spots (NaN if
        the gene is constant in truth or prediction, or neither has a high cell).
    true_smooth, pred_smooth : (n_genes, H, W) float32 normalised-convolution smoothing
        of the binary highs, NaN where there is no spot.
    true_high, pred_high : (n_genes, H, W) bool, ``smooth > threshold`` on spot cells.
    mask : (H, W) bool.
    rows, cols : (n_spots,) raster indices of each spot.
    """

    iou: np.ndarray
    true_smooth: np.ndarray
    pred_smooth: np.ndarray
    true_high: np.ndarray
    pred_high: np.ndarray
    mask: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def grid_layout(array_row: np.ndarray, array_col: np.ndarray, platform: str | None = None) -> str:
    """The raster layout of a slide's spot grid, one rule for scoring and reports:
    ``hex`` for a Visium platform, or, without a platform, when the array coordinates look
    like Visium's doubled columns (``row + col`` always even or always odd over several
    rows); else ``square`` (legacy ST)."""
    if platform is not None and str(platform).lower() in ("visium", "legacy_st"):  # HD bins, Xenium: from the coords
        return "hex" if str(platform).lower() == "visium" else "square"
    r = np.asarray(array_row, dtype=np.int64)
    c = np.asarray(array_col, dtype=np.int64)
    if r.size > 1 and np.unique(r).size > 1 and np.unique((r + c) % 2).size == 1:
        return "hex"
    return "square"


def spot_raster_index(
    array_row: np.ndarray, array_col: np.ndarray, layout: str = "square"
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Raster cell of each spot and the raster shape.

    ``square`` (legacy ST): ``(row - min, col - min)``. ``hex`` (Visium doubled columns):
    ``col // 2`` so that one raster step is one spot pitch along a row (rows stay offset by
    half a step — an approximation of the hex lattice on a square raster).
    """
    r, c = _int_coords(array_row, array_col)
    if layout == "hex":
        c = c // 2
    elif layout != "square":
        raise InputError(None, "layout", f"unknown raster layout {layout!r}; expected 'square' or 'hex'")
    r, c = r - r.min(), c - c.min()
    keys = r * (c.max() + 1) + c
    if np.unique(keys).size != keys.size:
        raise InputError(None, "array_col", "two spots fall on the same raster cell")
    return r, c, (int(r.max()) + 1, int(c.max()) + 1)


def _smooth_highs(
    v: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    mask_f: np.ndarray,
    den: np.ndarray,
    sigma: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Per gene: the highs of ``v`` over the slide's spots (:func:`heads.highlow_labels`, the
    classifier's rule), Gaussian-smoothed on the raster; and which genes are constant."""
    g = v.shape[1]
    high = highlow_labels(v)
    const = np.ptp(v, axis=0) == 0
    raster = np.zeros((g, *shape), dtype=np.float64)
    raster[:, rows, cols] = high.T
    num = gaussian_filter(raster, sigma=(0.0, sigma, sigma), mode="constant", cval=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = np.where(mask_f[None] > 0, num / den[None], np.nan)
    return smooth, const


def spatial_iou(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    array_row: np.ndarray,
    array_col: np.ndarray,
    *,
    layout: str = "square",
    sigma: float = 1.0,
    threshold: float = 0.5,
) -> SpatialIoU:
    """STimage's spatial IoU of high-expression regions, per gene, for ONE slide.

    For truth and prediction separately, per gene:

    1. z-score the values over the slide's spots; HIGH = ``z > 0`` (above the slide mean);
    2. put the binary highs on the spot raster (:func:`spot_raster_index`);
    3. smooth with a Gaussian of ``sigma`` raster steps by **normalised convolution**:
       ``G*(high·mask) / G*mask`` (``scipy.ndimage.gaussian_filter``, ``mode="constant"``,
       truncate 4 sigma), so empty raster cells (no spot) do not pull the average down —
       a spot's smoothed value is the Gaussian-weighted fraction of high spots around it;
    4. HIGH region = smoothed value ``> threshold`` (0.5), on spot cells only.

    IoU = |true_high ∩ pred_high| / |true_high ∪ pred_high| over spot cells. Unlike
    STimage's code we do not erode the mask and we score the HIGH class.

    Parameters
    ----------
    y_true, y_pred : (n_spots,) or (n_spots, n_genes) values on any monotone scale
        (z-scoring makes the result scale-free within the slide).
    array_row, array_col : (n_spots,) integer array coordinates of the slide's spots.
    layout : ``square`` (legacy ST) or ``hex`` (Visium doubled columns).
    """
    rows, cols, shape = spot_raster_index(array_row, array_col, layout)
    n = rows.size
    t, p = _values(y_true, n, "y_true"), _values(y_pred, n, "y_pred")
    if t.shape != p.shape:
        raise InputError(None, "y_pred", f"shape {p.shape} does not match y_true {t.shape}")
    if not sigma > 0:
        raise InputError(None, "sigma", f"sigma must be > 0, got {sigma}")
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    mask_f = mask.astype(np.float64)
    den = gaussian_filter(mask_f, sigma=sigma, mode="constant", cval=0.0)
    t_s, t_const = _smooth_highs(t, rows, cols, shape, mask_f, den, sigma)
    p_s, p_const = _smooth_highs(p, rows, cols, shape, mask_f, den, sigma)
    t_hi = np.nan_to_num(t_s, nan=0.0) > threshold
    p_hi = np.nan_to_num(p_s, nan=0.0) > threshold
    inter = (t_hi & p_hi).sum(axis=(1, 2)).astype(np.float64)
    union = (t_hi | p_hi).sum(axis=(1, 2)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    iou[(union == 0) | t_const | p_const] = np.nan
    return SpatialIoU(
        iou=iou,
        true_smooth=t_s.astype(np.float32),
        pred_smooth=p_s.astype(np.float32),
        true_high=t_hi,
        pred_high=p_hi,
        mask=mask,
        rows=rows,
        cols=cols,
    )
