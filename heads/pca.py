"""Principal axes of a feature matrix by one symmetric eigendecomposition of the smaller
of its two Gram matrices (the n x n ``Xc Xc^T`` when there are fewer rows than features,
else the d x d covariance): exact, deterministic, and several times faster than an SVD of
``X`` or scikit-learn's solvers for the usual few-hundred-spots x 1280-feature folds.
Tested against ``sklearn.decomposition.PCA``.
"""

from __future__ import annotations

import numpy as np


def principal_axes(X: np.ndarray, k: int | None = None, rtol: float = 1e-6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mean, components, singular_values)`` of the rows of ``X`` (n, d).

    ``components`` (r, d): orthonormal principal axes, largest variance first, each signed
    so its largest-magnitude loading is positive; ``r`` = ``k`` (``None``: all) capped at
    the number of singular values above ``rtol`` x the largest. ``singular_values`` (r,) of
    the centred ``X``.
    """
    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    mean = X.mean(axis=0)
    Xc = X - mean
    if n < d:
        w, U = np.linalg.eigh(Xc @ Xc.T)
    else:
        w, V = np.linalg.eigh(Xc.T @ Xc)
    order = np.argsort(w)[::-1]
    s = np.sqrt(np.clip(w[order], 0.0, None))
    keep = s > (s[0] * rtol if s.size and s[0] > 0 else np.inf)
    r = int(keep.sum()) if k is None else min(int(keep.sum()), int(k))
    r = max(r, 1) if s.size and s[0] > 0 else 0
    idx = order[:r]
    if n < d:
        comps = (Xc.T @ U[:, idx] / s[:r]).T
    else:
        comps = V[:, idx].T
    signs = np.sign(comps[np.arange(r), np.argmax(np.abs(comps), axis=1)])
    comps *= np.where(signs == 0, 1.0, signs)[:, None]
    return mean, np.ascontiguousarray(comps), s[:r]
