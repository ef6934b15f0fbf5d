"""Baselines: HEST's ridge protocol with grouped-CV alpha, and the per-gene mean.

Both follow the shared regression convention (see :mod:`heads`): ``predict(X,
library_size=None)`` returns expected RAW counts at ``library_size`` (default
``ref_library_size_`` = median library size of the fit spots), and
``predict_log1p_norm(X, target_sum)`` returns the log1p-normalised scale.
"""

from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, KFold, LeaveOneGroupOut
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from heads.inputs import check_counts, check_groups, check_library_size, check_X, counts_at_library
from heads.outputs import PointOutputs
from heads.pca import principal_axes
from heads.scale import TARGET_SUM, log1p_normalise

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = tuple(np.logspace(-2, 6, 17).tolist())
TARGETS = ("log1p_norm", "counts")
BACK_TRANSFORMS = ("smearing", "expm1")


def _n_components(requested: int, n_samples: int, n_features: int) -> int:
    return int(max(1, min(int(requested), n_samples - 1, n_features)))


def ridge_path_predict(Z_train: np.ndarray, T_train: np.ndarray, Z_test: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Predictions of ``sklearn.linear_model.Ridge(alpha, fit_intercept=True)`` for every
    alpha at once, (n_alphas, n_test, n_targets), from one SVD of the centred training
    design: ``coef(alpha) = V diag(s / (s^2 + alpha)) U^T (T - mean T)``. Hand-written for
    speed (one SVD instead of one solve per alpha); tested against ``Ridge``."""
    z_mean, t_mean = Z_train.mean(axis=0), T_train.mean(axis=0)
    U, s, Vt = np.linalg.svd(Z_train - z_mean, full_matrices=False)
    UtT = U.T @ (T_train - t_mean)
    ZV = (Z_test - z_mean) @ Vt.T
    return np.stack([ZV @ ((s / (s**2 + a))[:, None] * UtT) + t_mean for a in alphas])


class _Projection:
    """Fitted principal axes: ``transform(X) = (X - mean_) @ components_.T``."""

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean_, self.components_ = np.asarray(mean, np.float64), np.asarray(components, np.float64)

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, np.float64) - self.mean_) @ self.components_.T


class RidgeBaseline(PointOutputs, BaseEstimator):
    """HEST's linear probe — ``StandardScaler -> PCA(n_components) -> Ridge`` — with the
    ridge ``alpha`` chosen by cross-validation grouped by slide (HEST's fixed alpha
    under-regularises). Scaler and PCA are fitted on the training rows only (within each CV
    fold on that fold's training rows); ``n_components`` is clipped to
    ``min(n_samples - 1, n_features)``.

    Parameters
    ----------
    n_components : PCA components (HEST: 256).
    alphas : ridge penalties to try; ``None`` = ``np.logspace(-2, 6, 17)``.
    cv : ``"group"`` (GroupKFold with min(5, n_groups) folds), ``"logo"``
        (LeaveOneGroupOut) or an int (GroupKFold with that many folds). Without ``groups``
        (or with a single group) falls back to a shuffled 5-fold KFold over spots and logs a
        warning; ``cv_strategy_`` records what was used.
    target : what the ridge fits. ``"log1p_norm"`` (recommended):
        ``log1p(counts / library_size * target_sum)``; ``"counts"``: library-normalised
        counts ``counts / library_size * ref_library_size_``.
    target_sum : counts per spot of the log1p scale (1e4, as the evaluation).
    back_transform : for ``target="log1p_norm"``, how ``predict`` maps to counts:
        ``"smearing"`` (default; Duan's smearing estimate of the MEAN,
        ``(exp(z_hat) * mean(exp(residual)) - 1) * library_size / target_sum`` per gene,
        residuals on the training rows) or ``"expm1"`` (``expm1(z_hat)``: the back-transform
        of the predicted log, i.e. the round trip through log1p returns ``z_hat`` exactly).
        ``predict_log1p_norm`` always returns ``z_hat`` itself.
    svd_solver : ``"gram_eigh"`` (default: exact and deterministic, one eigendecomposition of
        the smaller of the n x n and dim x dim Gram matrices, :func:`heads.pca.principal_axes`;
        on 830 x 1280 fold features ~10x faster than sklearn's ``"covariance_eigh"``) or any
        ``sklearn.decomposition.PCA`` solver.
    random_state : seed of a randomised PCA solver and of the KFold fallback.

    Learned: ``scaler_mean_``, ``scaler_scale_``, ``pca_mean_``, ``pca_components_``
    (k, dim), ``coef_`` (n_genes, k), ``intercept_`` (n_genes,), ``smearing_`` (n_genes,),
    ``alpha_``, ``alphas_``, ``cv_mse_`` (mean CV MSE on the target scale per alpha),
    ``cv_strategy_``, ``n_components_``, ``ref_library_size_``, ``n_features_in_``,
    ``n_genes_``.
    """

    def __init__(
        self,
        n_components: int = 256,
        alphas: tuple[float, ...] | np.ndarray | None = None,
        cv: str | int = "group",
        target: str = "log1p_norm",
        target_sum: float = TARGET_SUM,
        back_transform: str = "smearing",
        svd_solver: str = "gram_eigh",
        random_state: int | None = 0,
    ):
        self.n_components = n_components
        self.alphas = alphas
        self.cv = cv
        self.target = target
        self.target_sum = target_sum
        self.back_transform = back_transform
        self.svd_solver = svd_solver
        self.random_state = random_state

    # ------------------------------------------------------------------ helpers
    def _splitter(self, groups: np.ndarray | None) -> tuple[object, str]:
        n_groups = 0 if groups is None else len(np.unique(groups))
        if n_groups < 2:
            logger.warning("RidgeBaseline: no groups (or a single group): alpha chosen by 5-fold KFold over spots")
            return KFold(n_splits=5, shuffle=True, random_state=self.random_state), "kfold5_spots"
        if self.cv == "group":
            k = min(5, n_groups)
            return GroupKFold(n_splits=k), f"group_kfold{k}"
        if self.cv == "logo":
            return LeaveOneGroupOut(), "leave_one_group_out"
        if isinstance(self.cv, (int, np.integer)) and not isinstance(self.cv, bool):
            k = int(self.cv)
            if not 2 <= k <= n_groups:
                raise ValueError(f"cv: {k} folds need 2 <= cv <= n_groups ({n_groups})")
            return GroupKFold(n_splits=k), f"group_kfold{k}"
        raise ValueError(f"cv: expected 'group', 'logo' or an int, got {self.cv!r}")

    def _project_fit(self, X: np.ndarray) -> tuple[StandardScaler, _Projection]:
        scaler = StandardScaler().fit(X)
        k = _n_components(self.n_components, X.shape[0], X.shape[1])
        Xs = scaler.transform(X)
        if self.svd_solver == "gram_eigh":
            mean, comps, _ = principal_axes(Xs, k)
            return scaler, _Projection(mean, comps)
        pca = PCA(n_components=k, svd_solver=self.svd_solver, random_state=self.random_state).fit(Xs)
        return scaler, _Projection(pca.mean_, pca.components_)

    def _targets(self, y: np.ndarray, lib: np.ndarray, ref: float) -> np.ndarray:
        if self.target == "log1p_norm":
            return log1p_normalise(y, lib, self.target_sum)
        return y / lib[:, None] * ref

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> RidgeBaseline:
        """``X`` (n, dim) embeddings, ``y`` (n, g) RAW counts, ``groups`` slide per spot,
        ``library_size`` total raw counts per spot over ALL genes (default ``y.sum(1)``);
        ``coords`` not used."""
        if self.target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {self.target!r}")
        if self.back_transform not in BACK_TRANSFORMS:
            raise ValueError(f"back_transform: expected one of {BACK_TRANSFORMS}, got {self.back_transform!r}")
        X = check_X(X).astype(np.float64)
        n = X.shape[0]
        y = check_counts(y, n)
        lib = check_library_size(library_size, y, n)
        groups = check_groups(groups, n)
        alphas = np.asarray(DEFAULT_ALPHAS if self.alphas is None else self.alphas, dtype=np.float64).ravel()
        if alphas.size == 0 or np.any(alphas <= 0):
            raise ValueError("alphas: need at least one alpha, all > 0")
        self.ref_library_size_ = float(np.median(lib))
        T = self._targets(y, lib, self.ref_library_size_)

        splitter, self.cv_strategy_ = self._splitter(groups)
        fold_mse = []
        for tr, te in splitter.split(X, T, groups):
            scaler, pca = self._project_fit(X[tr])
            Z_tr, Z_te = pca.transform(scaler.transform(X[tr])), pca.transform(scaler.transform(X[te]))
            preds = ridge_path_predict(Z_tr, T[tr], Z_te, alphas)
            fold_mse.append(np.mean((preds - T[te][None]) ** 2, axis=(1, 2)))
        self.alphas_ = alphas
        self.cv_mse_ = np.mean(fold_mse, axis=0)
        self.alpha_ = float(alphas[int(np.argmin(self.cv_mse_))])

        scaler, pca = self._project_fit(X)
        Z = pca.transform(scaler.transform(X))
        ridge = Ridge(alpha=self.alpha_).fit(Z, T)
        self.scaler_mean_, self.scaler_scale_ = scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)
        # C-contiguous copies: the BLAS result then does not depend on the memory layout,
        # so a head reloaded from safetensors (always C order) predicts bit-identically
        self.pca_mean_ = np.ascontiguousarray(pca.mean_, dtype=np.float64)
        self.pca_components_ = np.ascontiguousarray(pca.components_, dtype=np.float64)
        self.coef_ = np.ascontiguousarray(np.atleast_2d(ridge.coef_), dtype=np.float64)
        self.intercept_ = np.ascontiguousarray(np.atleast_1d(ridge.intercept_), dtype=np.float64)
        self.n_components_ = int(pca.components_.shape[0])
        self.n_features_in_ = X.shape[1]
        self.n_genes_ = y.shape[1]
        self.smearing_ = (
            np.mean(np.exp(T - self._predict_target(X)), axis=0)
            if self.target == "log1p_norm"
            else np.ones(self.n_genes_)
        )
        return self

    # ------------------------------------------------------------------ predict
    def _predict_target(self, X: np.ndarray) -> np.ndarray:
        """Prediction on the target scale (numpy maths on the stored arrays)."""
        Xs = (np.asarray(X, dtype=np.float64) - self.scaler_mean_) / self.scaler_scale_
        Z = (Xs - self.pca_mean_) @ self.pca_components_.T
        return Z @ self.coef_.T + self.intercept_

    def predict_log1p_norm(self, X: np.ndarray, *, target_sum: float | None = None, groups=None, coords=None):
        """``log1p(counts / library_size * target_sum)`` scale (default ``self.target_sum``);
        for ``target="log1p_norm"`` this is the ridge output itself (the predicted mean of
        the log)."""
        check_is_fitted(self, "coef_")
        ts = self.target_sum if target_sum is None else float(target_sum)
        pred = self._predict_target(check_X(X, self.n_features_in_))
        if self.target == "log1p_norm":
            return pred if ts == self.target_sum else np.log1p(np.expm1(pred) * (ts / self.target_sum))
        return np.log1p(np.maximum(pred, 0.0) / self.ref_library_size_ * ts)

    def predict(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> np.ndarray:
        """Expected RAW counts at ``library_size`` (default ``ref_library_size_``), >= 0."""
        check_is_fitted(self, "coef_")
        pred = self._predict_target(check_X(X, self.n_features_in_))
        if self.target == "log1p_norm":
            if self.back_transform == "smearing":
                norm = np.exp(pred) * self.smearing_ - 1.0
            else:
                norm = np.expm1(pred)
            at_ref = np.maximum(norm, 0.0) * (self.ref_library_size_ / self.target_sum)
        else:
            at_ref = np.maximum(pred, 0.0)
        return counts_at_library(at_ref, library_size, self.ref_library_size_)


class MeanBaseline(PointOutputs, BaseEstimator):
    """Predicts each gene's training mean for every spot, on each scale separately so it
    is the best constant on that scale: ``predict`` gives the mean of library-normalised
    counts (``mean(counts / library_size) * ref_library_size_``) at the requested library
    size; ``predict_log1p_norm`` gives the mean of ``log1p(counts / library_size *
    target_sum)`` (the MSE-optimal constant on the metric scale, not the log of the mean,
    which is biased upwards). Learned: ``mean_`` (n_genes,) raw counts at
    ``ref_library_size_``, ``log1p_mean_`` (n_genes,), ``n_features_in_``, ``n_genes_``."""

    def __init__(self, target_sum: float = TARGET_SUM):
        self.target_sum = target_sum

    def fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> MeanBaseline:
        """Per-gene means of RAW counts ``y`` over the spots (``X`` only gives their number)."""
        X = check_X(X)
        y = check_counts(y, X.shape[0])
        lib = check_library_size(library_size, y, X.shape[0])
        check_groups(groups, X.shape[0])
        self.ref_library_size_ = float(np.median(lib))
        self.mean_ = np.mean(y / lib[:, None], axis=0) * self.ref_library_size_
        self.log1p_mean_ = np.mean(log1p_normalise(y, lib, self.target_sum), axis=0)
        self.n_features_in_ = X.shape[1]
        self.n_genes_ = y.shape[1]
        return self

    def predict(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> np.ndarray:
        """``mean_`` for every spot (RAW counts) at ``library_size`` (default ref)."""
        check_is_fitted(self, "mean_")
        n = check_X(X, self.n_features_in_).shape[0]
        return counts_at_library(np.tile(self.mean_, (n, 1)), library_size, self.ref_library_size_)

    def predict_log1p_norm(self, X: np.ndarray, *, groups=None, coords=None) -> np.ndarray:
        """``log1p_mean_`` (training mean on the log1p-normalised scale) for every spot."""
        check_is_fitted(self, "mean_")
        n = check_X(X, self.n_features_in_).shape[0]
        return np.tile(self.log1p_mean_, (n, 1))
