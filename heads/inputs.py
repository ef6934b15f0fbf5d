"""Input checks and the shared library-size conventions of every head (arrays only).

Errors name the argument at fault (``X``, ``y``, ``library_size``, ``groups``).
"""

from __future__ import annotations

import numpy as np


def check_X(X: np.ndarray, n_features: int | None = None) -> np.ndarray:
    """``X`` (n_spots, dim) embeddings (float16/32/64) -> float32, finite, 2-D."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X: expected a 2-D (n_spots, dim) array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"X: expected a numeric array, got dtype {arr.dtype}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"X: has {arr.shape[1]} features, the head was fitted with {n_features}")
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError("X: contains NaN or infinite values")
    return arr


def check_counts(y: np.ndarray, n_spots: int) -> np.ndarray:
    """``y`` (n_spots, n_genes) RAW non-negative integer counts -> float64."""
    arr = np.asarray(y)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] != n_spots:
        raise ValueError(f"y: expected shape ({n_spots}, n_genes) of raw counts, got {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise ValueError("y: must hold raw counts (finite, non-negative integers)")
    return arr


def check_library_size(library_size: np.ndarray | float | None, y: np.ndarray | None, n_spots: int) -> np.ndarray:
    """Library sizes (raw counts, > 0) per spot; default ``y.sum(1)``.

    Callers should pass the total raw counts over ALL genes of the spot: the default
    (sum over the genes given in ``y``) makes one gene's scale depend on the others.
    """
    if library_size is None:
        if y is None:
            raise ValueError("library_size: required when no counts are given")
        lib = np.asarray(y, dtype=np.float64).sum(axis=1)
    else:
        lib = np.asarray(library_size, dtype=np.float64)
        lib = np.full(n_spots, float(lib)) if lib.ndim == 0 else lib.ravel()
    if lib.shape[0] != n_spots:
        raise ValueError(f"library_size: {lib.shape[0]} values for {n_spots} spots")
    bad = ~np.isfinite(lib) | (lib <= 0)
    if np.any(bad):
        raise ValueError(f"library_size: {int(bad.sum())} spots have a library size that is <= 0 or not finite")
    return lib


def check_groups(groups: np.ndarray | None, n_spots: int) -> np.ndarray | None:
    """Group labels (slide or patient) per spot, or ``None``."""
    if groups is None:
        return None
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n_spots:
        raise ValueError(f"groups: expected {n_spots} labels (one per spot), got shape {g.shape}")
    return g


def counts_at_library(normalised_at_ref: np.ndarray, library_size: np.ndarray | float | None, ref: float) -> np.ndarray:
    """Scale per-spot values expressed at library size ``ref`` to ``library_size``
    (``None`` -> ``ref``, scalar or (n_spots,))."""
    if library_size is None:
        return normalised_at_ref
    lib = check_library_size(library_size, None, normalised_at_ref.shape[0])
    return normalised_at_ref * (lib / ref)[:, None]
