"""HighLowClassifier and STimage's per-slide z-score labels."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from heads import HighLowClassifier, highlow_labels


def test_highlow_labels_match_scipy_zscore_per_slide():
    rng = np.random.default_rng(0)
    y = np.log1p(rng.poisson(3, size=(60, 4)).astype(float))
    groups = np.repeat(["A", "B", "C"], 20)
    y[groups == "B", 2] = 1.5  # constant within slide B: no z-score -> low
    labels = highlow_labels(y, groups)
    expected = np.zeros_like(labels)
    for g in "AC":
        rows = groups == g
        expected[rows] = stats.zscore(y[rows], axis=0) > 0
    rows = groups == "B"
    z = stats.zscore(y[rows][:, [0, 1, 3]], axis=0)
    expected[np.ix_(rows, [0, 1, 3])] = z > 0
    np.testing.assert_array_equal(labels, expected)
    assert not labels[groups == "B", 2].any()
    # per slide, not pooled: a slide-wide shift does not change the labels
    shifted = y.copy()
    shifted[groups == "A"] += 10
    np.testing.assert_array_equal(highlow_labels(shifted, groups), labels)
    assert not np.array_equal(highlow_labels(shifted), labels)
    with pytest.raises(ValueError, match="groups"):
        highlow_labels(y, groups[:10])


@pytest.fixture(scope="module")
def separable():
    rng = np.random.default_rng(0)
    n, d, g = 400, 20, 3
    X = rng.normal(size=(n, d))
    W = np.zeros((d, g))
    W[:3, :] = rng.normal(size=(3, g)) * 2
    expr = X @ W + 0.3 * rng.normal(size=(n, g))
    groups = np.repeat(np.arange(4), n // 4)
    Y = highlow_labels(expr, groups)
    Y = np.column_stack([Y, np.ones(n, dtype=bool)])  # gene 3: a single class in training
    return X, Y


def test_auc_on_separable_case_and_single_class_gene(separable):
    X, Y = separable
    tr, te = np.arange(300), np.arange(300, 400)
    clf = HighLowClassifier(C=0.1, l1_ratio=0.5, n_jobs=2).fit(X[tr], Y[tr])
    proba = clf.predict_proba(X[te])
    assert proba.shape == (100, 4)
    for j in range(3):
        assert roc_auc_score(Y[te, j], proba[:, j]) >= 0.9
    np.testing.assert_array_equal(clf.constant_genes_, [3])
    np.testing.assert_array_equal(proba[:, 3], 1.0)
    assert clf.predict(X[te]).dtype == bool
    np.testing.assert_array_equal(clf.predict(X[te]), proba > 0.5)


def test_per_gene_models_equal_sklearn_logistic_regression(separable):
    X, Y = separable
    clf = HighLowClassifier(C=0.1, l1_ratio=0.5, solver="saga", random_state=0).fit(X, Y)
    Xs = StandardScaler().fit_transform(X.astype(np.float32).astype(np.float64))  # heads casts X to float32
    for j in range(3):
        ref = LogisticRegression(C=0.1, l1_ratio=0.5, solver="saga", max_iter=1000, random_state=0).fit(Xs, Y[:, j])
        np.testing.assert_allclose(clf.coef_[j], ref.coef_[0], atol=1e-10)
        np.testing.assert_allclose(clf.predict_proba(X)[:, j], ref.predict_proba(Xs)[:, 1], atol=1e-10)
    assert np.any(clf.coef_[:3] == 0)  # the L1 part zeroes irrelevant features
    assert clf.converged_.all()


def test_bad_labels_and_clone():
    X = np.zeros((10, 2))
    with pytest.raises(ValueError, match="Y: must be binary"):
        HighLowClassifier().fit(X, np.full((10, 2), 3))
    with pytest.raises(ValueError, match="Y: expected"):
        HighLowClassifier().fit(X, np.zeros((9, 2), dtype=bool))
    est = HighLowClassifier(C=0.5, n_jobs=2)
    assert clone(est).get_params() == est.get_params()


def test_batched_fista_solves_sklearns_elastic_net_objective(separable):
    """The default solver fits all genes at once; its coefficients equal scikit-learn's
    tightly converged saga solution of the same objective."""
    X, Y = separable
    Xs = StandardScaler().fit_transform(X.astype(np.float32).astype(np.float64))
    clf = HighLowClassifier(C=0.1, l1_ratio=0.5, max_iter=20000, tol=1e-9).fit(X, Y)
    assert clf.solver == "fista" and clf.converged_.all()
    for j in range(Y.shape[1]):
        if j in clf.constant_genes_:
            continue
        ref = LogisticRegression(C=0.1, l1_ratio=0.5, solver="saga", max_iter=50000, tol=1e-12).fit(Xs, Y[:, j])
        np.testing.assert_allclose(clf.coef_[j], ref.coef_[0], atol=1e-5)
        np.testing.assert_allclose(clf.intercept_[j], ref.intercept_[0], atol=1e-5)
        np.testing.assert_array_equal(clf.coef_[j] == 0, np.abs(ref.coef_[0]) < 1e-8)  # same sparsity pattern
    with pytest.raises(ValueError, match="solver"):
        HighLowClassifier(solver="newton").fit(X, Y)
