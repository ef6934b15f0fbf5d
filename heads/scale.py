"""The expression scales every part of the project shares (one definition each).

* **raw counts**: integer UMI/read counts of a spot and gene;
* **library size**: a spot's total raw counts over ALL genes of its slide (not only the
  genes a head predicts), so a gene's normalised value does not depend on the gene panel;
* **rate**: expected fraction of a spot's counts that fall on a gene (counts / library size);
* **log1p(CP10k)**: ``log1p(counts / library_size * TARGET_SUM)`` = ``log1p(rate * TARGET_SUM)``,
  scanpy's ``normalize_total(target_sum=1e4)`` then ``log1p``. Metrics, gene selection,
  high/low labels and every head's metric-scale prediction use it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: counts per spot of the log1p-normalised scale (scanpy ``normalize_total`` default)
TARGET_SUM = 1e4


def log1p_normalise(counts, library_size: np.ndarray, target_sum: float = TARGET_SUM):
    """``log1p(counts / library_size * target_sum)`` per spot (row).

    ``counts``: (n_spots, n_genes) RAW counts, dense or sparse (sparse stays sparse CSR);
    ``library_size``: (n_spots,) total raw counts of each spot over all genes. Spots with
    library size 0 give 0. Raises ``ValueError`` naming ``library_size`` on a length
    mismatch, a negative or a non-finite value.
    """
    lib = np.asarray(library_size, dtype=np.float64).ravel()
    if lib.shape[0] != counts.shape[0]:
        raise ValueError(f"library_size: {lib.shape[0]} library sizes for {counts.shape[0]} spots")
    if np.any(lib < 0) or not np.all(np.isfinite(lib)):
        raise ValueError("library_size: library sizes must be finite and >= 0")
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    if sp.issparse(counts):
        out = sp.csr_matrix(sp.diags(scale) @ sp.csr_matrix(counts, dtype=np.float64))
        out.data = np.log1p(out.data)
        return out
    return np.log1p(np.asarray(counts, dtype=np.float64) * scale[:, None])


def rate_to_log1p(rate: np.ndarray, target_sum: float = TARGET_SUM) -> np.ndarray:
    """log1p(CP10k) of a predicted rate (fraction of a spot's counts): ``log1p(rate * target_sum)``."""
    return np.log1p(np.asarray(rate, dtype=np.float64) * target_sum)


def log1p_to_rate(value: np.ndarray, target_sum: float = TARGET_SUM) -> np.ndarray:
    """The rate of a log1p(CP10k) value: ``expm1(value) / target_sum`` (inverse of :func:`rate_to_log1p`)."""
    return np.expm1(np.asarray(value, dtype=np.float64)) / target_sum
