"""Xenium geometry: 10x's H&E alignment matrix and Visium-like hex pseudo-spots.

Units: cell centroids and lattice positions in **µm** (Xenium frame); the alignment matrix
maps H&E **pixels** to Xenium morphology-image **pixels** of ``pixel_um`` µm each.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.spatial import cKDTree

from stimage_embed.errors import InputError

AFFINE_TOL = 1e-6


def read_alignment(path: Path) -> np.ndarray:
    """The 3x3 affine of a 10x alignment CSV (3 rows of 3 comma-separated numbers, optionally
    a header). Raises naming the file when it is not a finite, invertible 3x3 affine."""
    try:
        m = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError:
        try:
            m = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64, skiprows=1)
        except ValueError as exc:
            raise InputError(path, "alignment", f"not a CSV of numbers: {exc}") from exc
    except OSError as exc:
        raise InputError(path, "alignment", f"cannot read: {exc}") from exc
    if m.shape != (3, 3):
        raise InputError(path, "alignment", f"expected a 3x3 affine matrix, got shape {m.shape[0]}x{m.shape[1]}")
    if not np.isfinite(m).all():
        raise InputError(path, "alignment", "matrix holds non-finite values")
    if not np.allclose(m[2], [0.0, 0.0, 1.0], atol=AFFINE_TOL):
        raise InputError(path, "alignment", f"not an affine matrix: last row is {m[2].tolist()}, expected [0, 0, 1]")
    if abs(np.linalg.det(m[:2, :2])) < 1e-12:
        raise InputError(path, "alignment", "the matrix is singular (cannot place the H&E)")
    return m


def um_to_image_px(xy_um: np.ndarray, matrix: np.ndarray, pixel_um: float) -> tuple[np.ndarray, np.ndarray]:
    """H&E pixel (x, y) of Xenium points ``xy_um`` (n, 2) µm: ``M^-1 (x/p, y/p, 1)``."""
    morph = np.column_stack([xy_um / pixel_um, np.ones(len(xy_um))])
    img = np.linalg.solve(matrix, morph.T).T
    return img[:, 0].astype(np.float64), img[:, 1].astype(np.float64)


@dataclass
class PseudoSpots:
    """Cells grouped onto a hex lattice: ids, array coordinates (Visium convention: odd rows
    have odd columns), centres (µm), summed raw counts, and the number of cells captured."""

    spot_ids: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    centres_um: np.ndarray
    counts: sp.csr_matrix
    n_cells: int


def hex_lattice(xy_um: np.ndarray, pitch_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, centres µm) of a hex lattice of ``pitch_um`` covering the points ``xy_um``;
    rows are ``pitch * sqrt(3) / 2`` apart, odd rows shifted by half a pitch."""
    dy = pitch_um * np.sqrt(3) / 2
    lo, hi = xy_um.min(0) - pitch_um, xy_um.max(0) + pitch_um
    rows = np.arange(int(np.floor(lo[1] / dy)), int(np.ceil(hi[1] / dy)) + 1)
    ks = np.arange(int(np.floor(lo[0] / pitch_um)) - 1, int(np.ceil(hi[0] / pitch_um)) + 1)
    rr, kk = np.meshgrid(rows, ks, indexing="ij")
    rr, kk = rr.ravel(), kk.ravel()
    odd = (rr % 2).astype(np.float64)
    centres = np.column_stack([(kk + odd / 2) * pitch_um, rr * dy])
    return rr, 2 * kk + (rr % 2), centres


def hex_pseudo_spots(xy_um: np.ndarray, counts: sp.csr_matrix, pitch_um: float, diameter_um: float) -> PseudoSpots:
    """Sum the counts of the cells whose centroid lies within ``diameter_um / 2`` of a hex
    lattice point (``pitch_um`` apart); lattice points without cells are left out."""
    rows, cols, centres = hex_lattice(xy_um, pitch_um)
    dist, nearest = cKDTree(centres).query(xy_um)
    captured = np.flatnonzero(dist <= diameter_um / 2)
    used, inverse = np.unique(nearest[captured], return_inverse=True)
    member = sp.csr_matrix(
        (np.ones(len(captured), np.int64), (inverse.ravel(), captured)), shape=(len(used), len(xy_um))
    )
    summed = (member @ counts).tocsr()
    summed.sort_indices()
    ids = np.array([f"hex_{r}_{c}" for r, c in zip(rows[used], cols[used])]).astype(str)
    return PseudoSpots(
        ids, rows[used].astype(np.int64), cols[used].astype(np.int64), centres[used], summed, len(captured)
    )
