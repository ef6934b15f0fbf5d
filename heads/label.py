"""A label head: multinomial elastic-net logistic regression of a categorical label per spot
(cell type, pathologist region ...) from the spot's image vector; STimage's classifier family.

Model: ``StandardScaler`` fitted on the training rows, then one multinomial
``sklearn.linear_model.LogisticRegression(solver="saga")`` with the elastic-net penalty
``C``, ``l1_ratio`` (scikit-learn >= 1.8 selects the elastic net through ``l1_ratio``).
``class_weight="balanced"`` by default, so a rare class is not ignored.

Contract (scikit-learn): ``fit(X, y)`` with ``X`` (n_spots, dim) embeddings and ``y``
(n_spots,) labels (strings or integers); ``predict(X)`` -> (n_spots,) labels from
``classes_``; ``predict_proba(X)`` -> (n_spots, n_classes) probabilities, columns in the
order of ``classes_``. Arrays only.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from heads.inputs import check_X

logger = logging.getLogger(__name__)


class LabelClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial elastic-net logistic regression of one categorical label.

    Parameters
    ----------
    C : inverse regularisation strength (scikit-learn's ``C``).
    l1_ratio : elastic-net mixing, 0 = ridge, 1 = lasso.
    class_weight : ``"balanced"`` (default) or ``None``.
    max_iter, tol : saga iterations and tolerance.
    random_state : saga's shuffling seed.

    Attributes
    ----------
    classes_ : (n_classes,) the labels seen in ``fit``, sorted.
    scaler_ : the fitted ``StandardScaler``.
    model_ : the fitted ``LogisticRegression``; ``coef_`` (n_classes, dim) and
        ``intercept_`` (n_classes,) mirror it (one row per class, also for 2 classes).
    converged_ : whether saga converged within ``max_iter``.
    """

    def __init__(
        self,
        C: float = 0.1,
        l1_ratio: float = 0.5,
        class_weight: str | None = "balanced",
        max_iter: int = 300,
        tol: float = 1e-3,
        random_state: int = 0,
    ):
        self.C = C
        self.l1_ratio = l1_ratio
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: np.ndarray, *, groups=None, library_size=None, coords=None) -> LabelClassifier:
        """Fit on embeddings ``X`` (n_spots, dim) and labels ``y`` (n_spots,); the keyword
        extras of the head contract are accepted and unused."""
        X = check_X(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != X.shape[0]:
            raise ValueError(f"y: expected ({X.shape[0]},) labels, got shape {y.shape}")
        if not 0.0 <= self.l1_ratio <= 1.0:
            raise ValueError(f"l1_ratio: must be in [0, 1], got {self.l1_ratio}")
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"y: need at least 2 classes to fit, got {classes.tolist()}")
        self.scaler_ = StandardScaler().fit(X)
        model = LogisticRegression(
            C=self.C,
            l1_ratio=self.l1_ratio,
            solver="saga",
            class_weight=self.class_weight,
            max_iter=self.max_iter,
            tol=self.tol,
            random_state=self.random_state,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(self.scaler_.transform(X), y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        if not self.converged_:
            logger.warning("LabelClassifier: saga did not converge in %d iterations", self.max_iter)
        self.model_ = model
        self.classes_ = model.classes_
        coef = model.coef_
        intercept = model.intercept_
        if len(self.classes_) == 2 and coef.shape[0] == 1:  # binary: one row; expand to one per class
            coef = np.vstack([-coef[0] / 2, coef[0] / 2])
            intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
        self.coef_, self.intercept_ = coef, intercept
        self.n_features_in_ = X.shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(n_spots, n_classes) class probabilities, columns in the order of ``classes_``."""
        check_is_fitted(self, "model_")
        X = check_X(X, self.n_features_in_)
        return self.model_.predict_proba(self.scaler_.transform(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """(n_spots,) the most probable label of each spot."""
        check_is_fitted(self, "model_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def predict_outputs(self, X: np.ndarray, *, library_size=None, groups=None, coords=None) -> dict[str, np.ndarray]:
        """``{"label": (n_spots,) most probable label, "proba": (n_spots, n_classes)}``."""
        proba = self.predict_proba(X)
        return {"label": self.classes_[np.argmax(proba, axis=1)], "proba": proba}
