"""Per-gene scores over spots, on arrays: detection fraction, log1p(CP10k) moments and the
seurat-flavour highly-variable-gene statistics that :mod:`stimage_embed.predictions.genes`
ranks genes by.

Seurat-flavour highly variable genes
------------------------------------
scanpy's ``highly_variable_genes(flavor="seurat")`` on
``log1p(normalize_total(counts, target_sum=1e4))``, re-implemented on arrays (no AnnData
round trip) and cross-checked against scanpy in the tests:

1. ``x = counts / library_size * target_sum`` (the log1p/expm1 round trip scanpy does for
   this flavour cancels), where ``library_size`` is the spot's total raw count over ALL
   genes (not just the genes that pass the detection filter);
2. per gene: ``mean``, ``var`` (ddof=1), ``dispersion = log(var / mean)`` (``NaN`` if 0),
   ``means = log1p(mean)``;
3. genes are binned into ``n_bins=20`` equal-width bins of ``means`` (``pandas.cut``
   semantics) and ``dispersions_norm = (dispersion - bin mean) / bin std`` (ddof=1; a bin
   holding a single gene gets ``dispersions_norm = 1``);
4. the top ``K`` by ``dispersions_norm`` (NaN last). Scanpy keeps every gene ``>=`` the
   K-th value, so exact ties at the cut-off can give it more than K genes; we return
   exactly K, ties broken by the input gene order.

The statistics are computed on the genes that pass the detection filter (the binning
depends on which genes are present), as scanpy would after subsetting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from heads.scale import TARGET_SUM, log1p_normalise
from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

#: equal-width bins of mean expression for the seurat-flavour dispersion normalisation
N_BINS = 20


@dataclass(frozen=True)
class HVGStats:
    """Per-gene statistics of the seurat-flavour HVG selection (aligned with the input
    genes). ``means`` is ``log1p(mean normalised count)``, ``dispersions`` is
    ``log(var/mean)`` of normalised counts, ``dispersions_norm`` the bin-standardised one."""

    means: np.ndarray
    dispersions: np.ndarray
    dispersions_norm: np.ndarray


def as_csr(counts: np.ndarray | sp.spmatrix | sp.sparray) -> sp.csr_matrix:
    """``counts`` as a float64 CSR matrix (spots x genes)."""
    return sp.csr_matrix(counts, dtype=np.float64)


def detection_fraction(counts: np.ndarray | sp.spmatrix | sp.sparray) -> np.ndarray:
    """Fraction of spots (rows) in which each gene (column) has a raw count > 0."""
    x = as_csr(counts)
    if x.shape[0] == 0:
        raise InputError(None, "counts", "no spots")
    return np.asarray((x > 0).sum(axis=0)).ravel() / x.shape[0]


def hvg_seurat(
    counts: np.ndarray | sp.spmatrix | sp.sparray,
    *,
    library_size: np.ndarray | None = None,
    target_sum: float = TARGET_SUM,
    n_bins: int = N_BINS,
) -> HVGStats:
    """Seurat-flavour HVG statistics (scanpy ``flavor="seurat"``), see module docstring.

    Parameters
    ----------
    counts : (n_spots, n_genes) raw counts, dense or sparse.
    library_size : (n_spots,) total raw count of each spot over ALL genes; defaults to
        the row sums of ``counts`` (correct only if ``counts`` holds all genes).
    target_sum : counts per spot after normalisation.
    """
    x = as_csr(counts)
    n = x.shape[0]
    if n < 2:
        raise InputError(None, "counts", f"HVG needs at least 2 spots, got {n}")
    lib = np.asarray(x.sum(axis=1)).ravel() if library_size is None else np.asarray(library_size, dtype=np.float64)
    if lib.shape != (n,):
        raise InputError(None, "library_size", f"shape {lib.shape} does not match {n} spots")
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    xn = sp.diags(scale) @ x
    mean = np.asarray(xn.mean(axis=0)).ravel()
    mean_sq = np.asarray(xn.multiply(xn).mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * (n / (n - 1))
    mean[mean == 0] = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = var / mean
        dispersion[dispersion == 0] = np.nan
        dispersion = np.log(dispersion)
    means = np.log1p(mean)
    disp_norm = _bin_normalise(means, dispersion, n_bins)
    return HVGStats(means=means, dispersions=dispersion, dispersions_norm=disp_norm)


def _cut_equal_width(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each value, as ``pandas.cut(values, bins=n_bins)`` (right-closed)."""
    mn, mx = float(values.min()), float(values.max())
    if mn == mx:
        mn -= 0.001 * abs(mn) if mn != 0 else 0.001
        mx += 0.001 * abs(mx) if mx != 0 else 0.001
        edges = np.linspace(mn, mx, n_bins + 1)
    else:
        edges = np.linspace(mn, mx, n_bins + 1)
        edges[0] -= (mx - mn) * 0.001
    return np.clip(np.searchsorted(edges, values, side="left") - 1, 0, n_bins - 1)


def _bin_normalise(means: np.ndarray, dispersion: np.ndarray, n_bins: int) -> np.ndarray:
    bins = _cut_equal_width(means, n_bins)
    ok = np.isfinite(dispersion)
    cnt = np.bincount(bins[ok], minlength=n_bins).astype(np.float64)
    s1 = np.bincount(bins[ok], weights=dispersion[ok], minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = s1 / cnt
        dev_sq = np.bincount(bins[ok], weights=(dispersion[ok] - avg[bins[ok]]) ** 2, minlength=n_bins)
        dev = np.sqrt(dev_sq / (cnt - 1))
        single = cnt < 2  # pandas std is NaN here: scanpy sets avg=0, dev=avg
        dev[single] = avg[single]
        avg[single] = 0.0
        return (dispersion - avg[bins]) / dev[bins]


def log1p_cp10k_moments(
    counts: np.ndarray | sp.spmatrix | sp.sparray, library_size: np.ndarray, target_sum: float = TARGET_SUM
) -> tuple[np.ndarray, np.ndarray]:
    """Per gene (column): mean and variance (ddof=1) over spots of
    ``log1p(count / library_size * target_sum)``; ``library_size`` is each spot's total raw
    count over ALL genes. Sparse-aware (zeros stay zeros on this scale)."""
    x = as_csr(counts)
    n = x.shape[0]
    xl = log1p_normalise(x, library_size, target_sum)
    mean = np.asarray(xl.mean(axis=0)).ravel()
    mean_sq = np.asarray(xl.multiply(xl).mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * (n / max(n - 1, 1))
    return mean, var


def top_hvg(stats: HVGStats, k: int) -> np.ndarray:
    """Indices of the ``k`` genes with the largest ``dispersions_norm`` (NaN never picked;
    ties by input order). Returns fewer than ``k`` (with a warning) if fewer are finite."""
    score = np.nan_to_num(stats.dispersions_norm, nan=-np.inf)
    order = np.argsort(-score, kind="stable")
    n_finite = int(np.isfinite(stats.dispersions_norm).sum())
    if k > n_finite:
        log.warning("asked for %d highly variable genes, only %d have a finite normalised dispersion", k, n_finite)
        k = n_finite
    return order[:k]


__all__ = ["N_BINS", "HVGStats", "as_csr", "detection_fraction", "hvg_seurat", "log1p_cp10k_moments", "top_hvg"]
