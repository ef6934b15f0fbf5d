"""Retrieval as a predictor (BLEEP's idea on cached vectors): a spot's expression is the
similarity-weighted mean of its k nearest training spots' profiles.

Follows the shared regression convention (see :mod:`heads`): ``fit(X, y, groups,
library_size)`` on RAW counts; ``predict_log1p_norm(X)`` is the prediction on the
log1p(CP10k) scale (its native output); ``predict(X, library_size)`` the expected raw counts
``expm1(z) * library_size / target_sum``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.model_selection import GroupKFold, KFold
from sklearn.utils.validation import check_is_fitted

from heads.inputs import check_counts, check_groups, check_library_size, check_X
from heads.outputs import PointOutputs
from heads.scale import TARGET_SUM, log1p_normalise

logger = logging.getLogger(__name__)

#: rows of queries per block of the exact search (bounds the (block, n_train) similarity matrix)
BLOCK = 2048


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32; a zero row stays zero)."""
    X = np.asarray(X, np.float32)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, norm, out=np.zeros_like(X), where=norm > 0)


def exact_neighbours(Q: np.ndarray, R: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of unit-norm ``R`` most cosine-similar to each unit-norm row of ``Q``:
    (indices (n, k), similarities (n, k)), most similar first."""
    k = min(k, R.shape[0])
    idx = np.empty((Q.shape[0], k), np.int64)
    sim = np.empty((Q.shape[0], k), np.float32)
    for start in range(0, Q.shape[0], BLOCK):
        S = Q[start : start + BLOCK] @ R.T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k] if k < R.shape[0] else np.tile(np.arange(k), (len(S), 1))
        top = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-top, axis=1, kind="stable")
        idx[start : start + BLOCK] = np.take_along_axis(part, order, axis=1)
        sim[start : start + BLOCK] = np.take_along_axis(top, order, axis=1)
    return idx, sim


def weighted_mean(T: np.ndarray, idx: np.ndarray, sim: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """Softmax(similarity / temperature)-weighted mean of the profiles ``T[idx[:, :k]]``."""
    s = sim[:, :k].astype(np.float64) / temperature
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("nk,nkg->ng", w, T[idx[:, :k]])


class IVFIndex:
    """Approximate cosine neighbours for large training sets: an inverted file of
    ``sqrt(n)`` k-means cells (scikit-learn ``MiniBatchKMeans`` on the unit rows); a query
    searches exactly the rows of its ``nprobe`` most similar cells. Tested against exact."""

    def __init__(self, centroids: np.ndarray, cells: list[np.ndarray], nprobe: int):
        self.centroids, self.cells, self.nprobe = centroids, cells, nprobe

    @classmethod
    def build(cls, R: np.ndarray, random_state: int | None = 0, nprobe: int = 8) -> IVFIndex:
        from sklearn.cluster import MiniBatchKMeans

        n_cells = max(2, int(np.sqrt(R.shape[0])))
        km = MiniBatchKMeans(n_clusters=n_cells, random_state=random_state, n_init=1, batch_size=4096).fit(R)
        labels = km.labels_
        cells = [np.flatnonzero(labels == c) for c in range(n_cells)]
        return cls(unit_rows(km.cluster_centers_), cells, min(nprobe, n_cells))

    def query(self, Q: np.ndarray, R: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, similarities) of the ``k`` best rows of ``R`` found in each query's cells."""
        probe = np.argsort(-(Q @ self.centroids.T), axis=1)[:, : self.nprobe]
        idx = np.zeros((len(Q), k), np.int64)
        sim = np.full((len(Q), k), -np.inf, np.float32)
        for c, members in enumerate(self.cells):
            rows = np.flatnonzero((probe == c).any(axis=1))
            if not len(rows) or not len(members):
                continue
            S = Q[rows] @ R[members].T
            all_sim = np.concatenate([sim[rows], S], axis=1)
            all_idx = np.concatenate([idx[rows], np.broadcast_to(members, S.shape)], axis=1)
            top = np.argsort(-all_sim, axis=1, kind="stable")[:, :k]
            sim[rows] = np.take_along_axis(all_sim, top, axis=1)
            idx[rows] = np.take_along_axis(all_idx, top, axis=1)
        return idx, sim


class KNNRegressor(PointOutputs, BaseEstimator):
    """Similarity-weighted k-nearest-neighbour regression of log1p(CP10k) on cosine similarity.

    Parameters
    ----------
    ks : neighbour counts to try.
    temperatures : softmax temperatures of the cosine similarity to try (weights
        ``exp(cos / temperature)``; large = plain mean of the k).
    cv : folds of the grouped CV (GroupKFold, at most the number of groups) choosing
        ``k`` and the temperature by mean squared error on the log1p(CP10k) scale; without
        groups (or one group), a shuffled KFold over spots (logged).
    ann_above : training sets with more spots than this are searched approximately
        (:class:`IVFIndex`: k-means cells, the nearest cells searched exactly); smaller
        ones exactly (numpy).
    target_sum : counts per spot of the log1p scale (1e4).
    random_state : seed of the KFold fallback and of the approximate index.

    Learned: ``X_train_`` (n, dim) unit-norm float32 training vectors, ``T_train_`` (n,
    n_genes) their log1p(CP10k), ``k_``, ``temperature_``, ``cv_mse_`` (len(ks),
    len(temperatures)), ``search_`` ("exact" | "ann"), ``ref_library_size_``,
    ``n_features_in_``, ``n_genes_``, ``n_train_`` (training spots).

    The two training arrays are training data: :meth:`without_training` gives the fitted
    head without them (what a saved model that references its training vectors keeps) and
    :meth:`attach_training` rebuilds them from the same raw vectors and counts.
    """

    #: learned arrays that are (derived) training data, left out by :meth:`without_training`
    TRAINING_ARRAYS = ("X_train_", "T_train_")

    def __init__(
        self,
        ks: tuple[int, ...] = (5, 10, 20, 50),
        temperatures: tuple[float, ...] = (0.02, 0.05, 0.1, 1.0),
        cv: int = 5,
        ann_above: int = 50_000,
        target_sum: float = TARGET_SUM,
        random_state: int | None = 0,
    ):
        self.ks = ks
        self.temperatures = temperatures
        self.cv = cv
        self.ann_above = ann_above
        self.target_sum = target_sum
        self.random_state = random_state

    # ------------------------------------------------------------------ search
    def _neighbours(self, Q: np.ndarray, R: np.ndarray, k: int, index=None) -> tuple[np.ndarray, np.ndarray]:
        if R.shape[0] <= self.ann_above:
            return exact_neighbours(Q, R, k)
        return (index or IVFIndex.build(R, self.random_state)).query(Q, R, k)

    def _splits(self, n: int, groups: np.ndarray | None):
        n_groups = 0 if groups is None else len(np.unique(groups))
        if n_groups < 2:
            logger.warning("KNNRegressor: no groups (or one): k and temperature chosen by KFold over spots")
            return KFold(n_splits=min(self.cv, n), shuffle=True, random_state=self.random_state).split(np.zeros(n))
        return GroupKFold(n_splits=min(self.cv, n_groups)).split(np.zeros(n), groups=groups)

    # ------------------------------------------------------------------ fit / predict
    def fit(self, X, y, *, groups=None, library_size=None, coords=None) -> KNNRegressor:
        """Keep the training vectors and profiles; choose k and temperature by grouped CV."""
        X = check_X(X)
        n = X.shape[0]
        counts = check_counts(y, n)
        lib = check_library_size(library_size, counts, n)
        groups = check_groups(groups, n)
        if any(int(k) <= 0 for k in self.ks) or any(t <= 0 for t in self.temperatures):
            raise ValueError("ks and temperatures must be positive")
        R, T = unit_rows(X), self._profiles(counts, lib)
        kmax = max(int(k) for k in self.ks)
        sse = np.zeros((len(self.ks), len(self.temperatures)))
        for tr, va in self._splits(n, groups):
            idx, sim = self._neighbours(R[va], R[tr], kmax)
            for i, k in enumerate(self.ks):
                for j, t in enumerate(self.temperatures):
                    sse[i, j] += ((weighted_mean(T[tr], idx, sim, int(k), t) - T[va]) ** 2).sum()
        self.cv_mse_ = sse / (n * T.shape[1])
        i, j = np.unravel_index(np.argmin(self.cv_mse_), self.cv_mse_.shape)
        self.k_, self.temperature_ = int(self.ks[i]), float(self.temperatures[j])
        self.X_train_, self.T_train_ = R, T
        self.search_ = "ann" if n > self.ann_above else "exact"
        self.ref_library_size_ = float(np.median(lib))
        self.n_features_in_, self.n_genes_, self.n_train_ = X.shape[1], T.shape[1], n
        return self

    def _profiles(self, counts: np.ndarray, lib: np.ndarray) -> np.ndarray:
        """(n, n_genes) float32 log1p(counts / library size * target_sum) of raw counts."""
        return np.asarray(log1p_normalise(counts, lib, self.target_sum), np.float32)

    # ------------------------------------------------------------------ training arrays
    def without_training(self) -> KNNRegressor:
        """A shallow copy of this fitted head without :data:`TRAINING_ARRAYS` (it cannot
        predict until :meth:`attach_training`); the head itself is unchanged."""
        check_is_fitted(self, "k_")
        out = copy.copy(self)
        for attr in (*self.TRAINING_ARRAYS, "_index"):
            out.__dict__.pop(attr, None)
        return out

    def attach_training(self, X, y, *, library_size=None) -> KNNRegressor:
        """Set the training vectors and profiles from the raw training vectors ``X`` (n, dim)
        and raw counts ``y`` (n, n_genes) with their library sizes (all genes), rows in
        the order of ``fit``: the arrays ``fit`` kept, bit for bit. Shapes must match the
        fitted ones (``n_train_``, ``n_features_in_``, ``n_genes_``); returns self."""
        check_is_fitted(self, "k_")
        X = check_X(X, self.n_features_in_)
        n = X.shape[0]
        counts = check_counts(y, n)
        expected = getattr(self, "n_train_", n)
        if n != expected or counts.shape[1] != self.n_genes_:
            raise ValueError(
                f"training arrays: fitted on {expected} spots x {self.n_genes_} genes, given {n} x {counts.shape[1]}"
            )
        lib = check_library_size(library_size, counts, n)
        self.X_train_, self.T_train_ = unit_rows(X), self._profiles(counts, lib)
        self.__dict__.pop("_index", None)
        return self

    def predict_log1p_norm(self, X, *, target_sum: float | None = None, groups=None, coords=None) -> np.ndarray:
        """(n_spots, n_genes) predicted log1p(counts / library * target_sum); ``target_sum``
        must be the fitted one (the training profiles are on that scale)."""
        check_is_fitted(self, "T_train_")
        if target_sum is not None and float(target_sum) != float(self.target_sum):
            raise ValueError(f"target_sum: fitted at {self.target_sum}, asked for {target_sum}")
        Q = unit_rows(check_X(X, self.n_features_in_))
        index = getattr(self, "_index", None)
        if self.search_ == "ann" and index is None:
            index = self._index = IVFIndex.build(self.X_train_, self.random_state)  # not saved: rebuilt once
        idx, sim = self._neighbours(Q, self.X_train_, self.k_, index)
        return weighted_mean(self.T_train_, idx, sim, self.k_, self.temperature_)

    def predict(self, X, *, library_size=None, groups=None, coords=None) -> np.ndarray:
        """Expected raw counts at ``library_size`` (default ``ref_library_size_``)."""
        z = self.predict_log1p_norm(X)
        lib = self.ref_library_size_ if library_size is None else check_library_size(library_size, None, len(z))
        return np.expm1(z) * (np.asarray(lib, np.float64).reshape(-1, 1) if np.ndim(lib) else lib) / self.target_sum
