"""STimage's high/low expression classifier: per-gene elastic-net logistic regression.

Labels (:func:`highlow_labels`): a spot is "high" for a gene when the gene's per-slide
z-score is > 0, i.e. when it is above the slide's mean of that gene *on the scale given*.
STimage z-scores log-normalised expression within each slide. The scale matters: the
mean of log1p values is not the log1p of the mean, so raw counts and log1p-normalised
values give different labels — pass ``log1p`` library-normalised expression to match
STimage.

Model: ``StandardScaler`` (fitted on the training rows) then, per gene, STimage's
elastic-net logistic regression ``LogisticRegression(C, l1_ratio)``. ``solver="fista"``
(default) fits every gene at once with one batched proximal-gradient solver on the same
objective (:mod:`heads.elastic_net`, tested against scikit-learn); ``solver="saga"`` fits
one ``sklearn.linear_model.LogisticRegression(solver="saga")`` per gene in parallel threads
(STimage's own choice; scikit-learn >= 1.8 selects the elastic net through ``l1_ratio``).
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch
from joblib import Parallel, delayed
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from heads.elastic_net import fit_elastic_net_logistic
from heads.inputs import check_groups, check_X

logger = logging.getLogger(__name__)


def highlow_labels(y: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Boolean (n_spots, n_genes): per-group (slide) z-score of each column > 0.

    ``y``: expression (n_spots, n_genes), raw counts or — as STimage — log1p
    library-normalised values. ``groups``: slide label per spot (``None`` = one group).
    z = (y - mean_group) / std_group (ddof=0); a column constant within a group has no
    z-score and is labelled low (False) there.
    """
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"y: expected (n_spots, n_genes), got shape {arr.shape}")
    groups = check_groups(groups, arr.shape[0])
    labels = np.zeros(arr.shape, dtype=bool)
    for g in np.unique(groups) if groups is not None else [None]:
        rows = np.arange(arr.shape[0]) if g is None else np.flatnonzero(groups == g)
        block = arr[rows]
        constant = np.ptp(block, axis=0) == 0
        std = np.where(constant, 1.0, block.std(axis=0))
        z = (block - block.mean(axis=0)) / std
        labels[rows] = (z > 0) & ~constant
    return labels


def _fit_gene(Xs: np.ndarray, y: np.ndarray, params: dict) -> tuple[np.ndarray, float, int, bool]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model = LogisticRegression(**params).fit(Xs, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return model.coef_[0].astype(np.float64), float(model.intercept_[0]), int(model.n_iter_[0]), converged


class HighLowClassifier(ClassifierMixin, BaseEstimator):
    """Per-gene elastic-net logistic regression of high (True) vs low expression.

    Contract: ``fit(X, Y)`` with ``X`` (n_spots, dim) embeddings and ``Y`` (n_spots,
    n_genes) BINARY labels (bool or 0/1) — compute them with :func:`highlow_labels`.

    A gene with a single class in training gets a constant predictor (probability 1.0 or
    0.0) instead of a model; its index is in ``constant_genes_`` and its value in
    ``constant_values_``.

    Parameters: ``C``, ``l1_ratio`` as in scikit-learn (STimage: 0.1, 0.5); ``solver``
    ``"fista"`` (all genes at once) or ``"saga"`` (one sklearn fit per gene, ``n_jobs``
    threads); ``max_iter``: FISTA iterations / saga epochs; ``tol``: stop when no
    coefficient moves by more than ``tol`` (x (1 + the largest)) in an iteration.

    Learned: ``scaler_mean_``, ``scaler_scale_``, ``coef_`` (n_genes, dim; on standardised
    X; zero rows for constant genes), ``intercept_`` (n_genes,), ``n_iter_`` (n_genes,),
    ``converged_`` (n_genes,) bool, ``constant_genes_``, ``constant_values_``,
    ``n_features_in_``, ``n_genes_``.
    """

    def __init__(
        self,
        C: float = 0.1,
        l1_ratio: float = 0.5,
        solver: str = "fista",
        max_iter: int = 1000,
        tol: float = 1e-4,
        n_jobs: int | None = None,
        random_state: int | None = 0,
    ):
        self.C = C
        self.l1_ratio = l1_ratio
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(
        self,
        X: np.ndarray,
        Y: np.ndarray,
        *,
        groups: np.ndarray | None = None,
        library_size: np.ndarray | None = None,
        coords: np.ndarray | None = None,
    ) -> HighLowClassifier:
        """Fit on ``X`` (n_spots, dim) and BINARY labels ``Y`` (n_spots, n_genes) from
        :func:`highlow_labels`; the keyword extras are accepted and not used."""
        X = check_X(X)
        Yb = np.asarray(Y)
        if Yb.ndim == 1:
            Yb = Yb[:, None]
        if Yb.ndim != 2 or Yb.shape[0] != X.shape[0]:
            raise ValueError(f"Y: expected ({X.shape[0]}, n_genes) binary labels, got shape {Yb.shape}")
        if not np.all(np.isin(Yb, (0, 1))):
            raise ValueError("Y: must be binary (bool or 0/1); compute labels with heads.highlow_labels")
        Yb = Yb.astype(bool)
        scaler = StandardScaler().fit(X)
        self.scaler_mean_ = scaler.mean_.astype(np.float64)
        self.scaler_scale_ = scaler.scale_.astype(np.float64)
        Xs = self._standardise(X)
        n_genes = Yb.shape[1]
        positives = Yb.sum(axis=0)
        constant = (positives == 0) | (positives == Yb.shape[0])
        self.constant_genes_ = np.flatnonzero(constant)
        self.constant_values_ = (positives[constant] > 0).astype(np.float64)
        if constant.any():
            logger.info("HighLowClassifier: %d genes with a single class get a constant predictor", int(constant.sum()))
        params = dict(
            C=float(self.C),
            l1_ratio=float(self.l1_ratio),
            solver=self.solver,
            max_iter=int(self.max_iter),
            tol=float(self.tol),
            random_state=self.random_state,
        )
        fit_genes = np.flatnonzero(~constant)
        if self.solver not in ("fista", "saga"):
            raise ValueError(f"solver: expected 'fista' or 'saga', got {self.solver!r}")
        if self.solver == "fista":
            # float32 halves the time; a tolerance below 1e-5 asks for more than it resolves
            dtype = torch.float32 if float(self.tol) >= 1e-5 else torch.float64
            fit = fit_elastic_net_logistic(
                Xs,
                Yb[:, fit_genes],
                float(self.C),
                float(self.l1_ratio),
                max_iter=int(self.max_iter),
                tol=float(self.tol),
                dtype=dtype,
            )
            results = list(zip(fit.coef, fit.intercept, fit.n_iter, fit.converged))
        else:
            results = Parallel(n_jobs=self.n_jobs, prefer="threads")(
                delayed(_fit_gene)(Xs, Yb[:, j], params) for j in fit_genes
            )
        self.coef_ = np.zeros((n_genes, X.shape[1]))
        self.intercept_ = np.zeros(n_genes)
        self.n_iter_ = np.zeros(n_genes, dtype=np.int64)
        self.converged_ = np.ones(n_genes, dtype=bool)
        for j, (coef, intercept, n_iter, converged) in zip(fit_genes, results):
            self.coef_[j], self.intercept_[j], self.n_iter_[j], self.converged_[j] = coef, intercept, n_iter, converged
        if not self.converged_.all():
            logger.warning(
                "HighLowClassifier: %d genes did not converge in max_iter=%d",
                int((~self.converged_).sum()),
                self.max_iter,
            )
        self.n_features_in_ = X.shape[1]
        self.n_genes_ = n_genes
        self.classes_ = np.array([False, True])
        return self

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (X.astype(np.float64) - self.scaler_mean_) / self.scaler_scale_

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Log-odds of "high" (n_spots, n_genes); +-inf for constant genes."""
        check_is_fitted(self, "coef_")
        Xs = self._standardise(check_X(X, self.n_features_in_))
        z = Xs @ self.coef_.T + self.intercept_
        z[:, self.constant_genes_] = np.where(self.constant_values_ > 0, np.inf, -np.inf)
        return z

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Probability of "high" per spot and gene, (n_spots, n_genes)."""
        return expit(self.decision_function(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Boolean (n_spots, n_genes): probability of "high" > 0.5."""
        return self.predict_proba(X) > 0.5

    def predict_outputs(self, X: np.ndarray, *, library_size=None, groups=None, coords=None) -> dict[str, np.ndarray]:
        """``{"prob_high": predict_proba(X)}`` (:mod:`heads.outputs`)."""
        return dict(prob_high=self.predict_proba(X))

    def score(self, X: np.ndarray, Y: np.ndarray) -> float:
        """Mean accuracy over all (spot, gene) entries."""
        pred = self.predict(X)
        return float(np.mean(pred == np.asarray(Y, dtype=bool).reshape(pred.shape)))
