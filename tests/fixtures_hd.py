"""Builders for Visium HD and Xenium test layouts, written the way 10x software writes them.

A Visium HD ``binned_outputs/square_XXXum`` folder follows the real fixture in
``shared/data/formats/visium_hd`` (same positions columns and dtypes, scalefactors keys,
10x HDF5 v3 matrix). Bin positions, counts and images built here are **synthetic**; the
Xenium helpers reuse the real ``formats/xenium`` cells and matrix.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
from fixtures_formats import write_10x_h5, write_10x_mtx

HD_REAL = "visium_hd/binned_outputs/square_002um"


def bin_pixels(rows: np.ndarray, cols: np.ndarray, bin_um: float, um_per_px: float, origin=(40.0, 30.0), angle=0.01):
    """Full-res pixel centres (x, y) of bins (rows, cols) of ``bin_um`` on a grid rotated by
    ``angle`` rad and shifted by ``origin`` px (Space Ranger's registration is near-affine)."""
    xu, yu = (cols + 0.5) * bin_um, (rows + 0.5) * bin_um
    c, s = np.cos(angle), np.sin(angle)
    return origin[0] + (c * xu - s * yu) / um_per_px, origin[1] + (s * xu + c * yu) / um_per_px


def write_square_folder(
    binned: Path,
    bin_um: int,
    grid_shape: tuple[int, int],
    counts: sp.csr_matrix,
    with_counts: np.ndarray,
    genes: list[str],
    um_per_px: float,
    fmt: str = "h5",
    origin: tuple[float, float] = (40.0, 30.0),
    angle: float = 0.01,
) -> Path:
    """``binned/square_{bin_um:03d}um``: positions of every bin of a ``grid_shape`` grid
    (in_tissue = bins listed in ``with_counts``), the matrix of ``with_counts`` bins
    (``counts`` rows) and scalefactors. Returns the folder."""
    folder = binned / f"square_{bin_um:03d}um"
    spatial = folder / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    rr, cc = np.meshgrid(np.arange(grid_shape[0]), np.arange(grid_shape[1]), indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    barcodes = np.array([f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rr, cc)])
    px, py = bin_pixels(rr, cc, bin_um, um_per_px, origin, angle)
    in_tissue = np.zeros(len(rr), np.int32)
    in_tissue[with_counts] = 1
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": in_tissue,
            "array_row": rr.astype(np.int32),
            "array_col": cc.astype(np.int32),
            "pxl_row_in_fullres": py,
            "pxl_col_in_fullres": px,
        }
    ).to_parquet(spatial / "tissue_positions.parquet", index=False)
    (spatial / "scalefactors_json.json").write_text(
        json.dumps({"bin_size_um": float(bin_um), "microns_per_pixel": um_per_px, "spot_diameter_fullres": 7.3})
    )
    frame = pd.DataFrame(counts.toarray().astype(np.int32), index=barcodes[with_counts], columns=genes)
    ids = np.array([f"ENSG{i:011d}" for i in range(len(genes))])
    types = np.array(["Gene Expression"] * len(genes))
    if fmt == "h5":
        write_10x_h5(folder / "filtered_feature_bc_matrix.h5", frame, ids, types)
    else:
        write_10x_mtx(folder / "filtered_feature_bc_matrix", frame, ids, types)
    return folder


def synthetic_hd(binned: Path, grid_shape=(24, 20), n_genes=6, seed=0, um_per_px=0.5, fmt="h5"):
    """A small synthetic square_002um folder: about 60 % of bins in tissue with Poisson counts.
    Returns (folder, counts (in-tissue bins x genes CSR), in-tissue flat indices, genes)."""
    rng = np.random.default_rng(seed)
    n = grid_shape[0] * grid_shape[1]
    with_counts = np.sort(rng.choice(n, int(0.6 * n), replace=False))
    counts = sp.csr_matrix(rng.poisson(0.7, size=(len(with_counts), n_genes)).astype(np.int64))
    genes = [f"G{i}" for i in range(n_genes)]
    folder = write_square_folder(binned, 2, grid_shape, counts, with_counts, genes, um_per_px, fmt)
    return folder, counts, with_counts, genes
