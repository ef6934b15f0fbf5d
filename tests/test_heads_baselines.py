"""RidgeBaseline (HEST protocol + grouped-CV alpha) and MeanBaseline."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import GridSearchCV, GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from heads import MeanBaseline, RidgeBaseline, log1p_normalise


def noisy_problem(seed: int = 0, n: int = 150, d: int = 60, g: int = 5):
    """Weak signal in many noisy features: heavy shrinkage (a large alpha) wins."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    lib = rng.integers(800, 1600, n).astype(float)
    signal = 0.15 * X[:, :1] @ np.ones((1, g))
    y = rng.poisson(lib[:, None] / 100 * np.exp(signal))
    groups = np.repeat(np.arange(5), n // 5)
    return X.astype(np.float32), y, lib, groups


def test_alpha_chosen_by_grouped_cv_matches_grid_search():
    X, y, lib, groups = noisy_problem()
    alphas = np.logspace(-2, 6, 9)
    model = RidgeBaseline(n_components=20, alphas=alphas, cv="group").fit(X, y, groups=groups, library_size=lib)
    assert model.cv_strategy_ == "group_kfold5"
    assert model.alpha_ > alphas.min()
    assert model.alpha_ >= 100.0
    # independent reference: GridSearchCV refits the whole pipeline (scaler, PCA) per fold
    T = log1p_normalise(y, lib, 1e4)
    pipe = make_pipeline(StandardScaler(), PCA(n_components=20, random_state=0), Ridge())
    search = GridSearchCV(pipe, {"ridge__alpha": alphas}, cv=GroupKFold(n_splits=5), scoring="neg_mean_squared_error")
    search.fit(X.astype(np.float64), T, groups=groups)
    np.testing.assert_allclose(model.cv_mse_, -search.cv_results_["mean_test_score"], rtol=1e-6)
    assert model.alpha_ == search.best_params_["ridge__alpha"]
    ref = search.best_estimator_.predict(X.astype(np.float64))
    np.testing.assert_allclose(model.predict_log1p_norm(X), ref, rtol=1e-6, atol=1e-8)


def test_pca_is_fitted_on_training_rows_only_and_clipped():
    X, y, lib, groups = noisy_problem(n=150, d=60)
    tr = groups < 4
    model = RidgeBaseline(n_components=10, alphas=[1.0]).fit(X[tr], y[tr], groups=groups[tr], library_size=lib[tr])
    Xs = StandardScaler().fit_transform(X[tr].astype(np.float64))
    ref = PCA(n_components=10, random_state=0).fit(Xs)
    np.testing.assert_allclose(np.abs(model.pca_components_), np.abs(ref.components_), atol=1e-8)
    on_all = PCA(n_components=10, random_state=0).fit(StandardScaler().fit_transform(X.astype(np.float64)))
    assert not np.allclose(np.abs(model.pca_components_), np.abs(on_all.components_), atol=1e-3)
    np.testing.assert_allclose(model.scaler_mean_, X[tr].astype(np.float64).mean(0), rtol=1e-9)
    before = model.predict(X[~tr])
    model.predict(X)  # predicting other rows does not refit anything
    np.testing.assert_array_equal(model.predict(X[~tr]), before)
    # n_components clipped to min(n_samples - 1, n_features)
    small = RidgeBaseline(n_components=256, alphas=[1.0]).fit(X[:40, :30], y[:40], groups=np.arange(40) % 4)
    assert small.n_components_ == 30
    tiny = RidgeBaseline(n_components=256, alphas=[1.0]).fit(X[:20], y[:20], groups=np.arange(20) % 4)
    assert tiny.n_components_ == 19


def test_predict_convention_counts_at_library_size():
    X, y, lib, groups = noisy_problem()
    naive = RidgeBaseline(n_components=10, alphas=[1.0, 1e3], back_transform="expm1").fit(
        X, y, groups=groups, library_size=lib
    )
    ref = naive.ref_library_size_
    assert ref == np.median(lib)
    counts = naive.predict(X)
    # the round trip through the evaluation's log1p transform returns the ridge output
    np.testing.assert_allclose(np.log1p(counts / ref * 1e4), naive.predict_log1p_norm(X), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(naive.predict(X, library_size=3 * ref), 3 * counts, rtol=1e-12)
    smear = RidgeBaseline(n_components=10, alphas=[1.0, 1e3]).fit(X, y, groups=groups, library_size=lib)
    assert np.all(smear.smearing_ >= 1.0)  # mean of exp(residual) >= exp(mean residual = 0)
    assert np.all(smear.predict(X) >= counts - 1e-9)
    as_counts = RidgeBaseline(n_components=10, alphas=[1.0, 1e3], target="counts").fit(
        X, y, groups=groups, library_size=lib
    )
    assert np.all(as_counts.predict(X) >= 0)
    with pytest.raises(ValueError, match="target"):
        RidgeBaseline(target="log").fit(X, y, groups=groups)


def test_ungrouped_fallback_is_recorded():
    X, y, lib, _ = noisy_problem()
    model = RidgeBaseline(n_components=5, alphas=[0.1, 10.0]).fit(X, y, library_size=lib)
    assert model.cv_strategy_ == "kfold5_spots"
    logo = RidgeBaseline(n_components=5, alphas=[0.1, 10.0], cv="logo").fit(X, y, groups=np.arange(150) % 3)
    assert logo.cv_strategy_ == "leave_one_group_out"


def test_mean_baseline_is_exact():
    rng = np.random.default_rng(0)
    y = rng.poisson(4, size=(50, 6))
    lib = rng.integers(100, 200, 50).astype(float)
    X = rng.normal(size=(50, 3))
    model = MeanBaseline().fit(X, y, library_size=lib)
    expected = (y / lib[:, None]).mean(0) * np.median(lib)
    np.testing.assert_allclose(model.mean_, expected, rtol=1e-12)
    pred = model.predict(X[:7])
    assert pred.shape == (7, 6)
    np.testing.assert_allclose(pred, np.tile(expected, (7, 1)), rtol=1e-12)
    np.testing.assert_allclose(
        model.predict(X[:2], library_size=[100.0, 400.0]),
        np.vstack([expected * 100, expected * 400]) / np.median(lib),
        rtol=1e-12,
    )


def test_ridge_path_equals_sklearn_ridge():
    from heads.baselines import ridge_path_predict

    rng = np.random.default_rng(3)
    Z, T, Zt = rng.normal(size=(40, 6)), rng.normal(size=(40, 3)), rng.normal(size=(9, 6))
    alphas = np.array([1e-3, 0.5, 30.0, 1e5])
    got = ridge_path_predict(Z, T, Zt, alphas)
    for i, a in enumerate(alphas):
        np.testing.assert_allclose(got[i], Ridge(alpha=a).fit(Z, T).predict(Zt), rtol=1e-8, atol=1e-10)


def test_mean_baseline_on_the_metric_scale_is_the_mean_of_the_log():
    """The best constant under MSE on log1p-normalised counts is the mean of the log,
    not the log of the mean (which a naive baseline would predict)."""
    rng = np.random.default_rng(1)
    y = rng.negative_binomial(2, 0.2, size=(200, 4))
    lib = rng.integers(500, 2000, 200).astype(float)
    X = rng.normal(size=(200, 3))
    model = MeanBaseline().fit(X, y, library_size=lib)
    target = np.log1p(y / lib[:, None] * 1e4)
    np.testing.assert_allclose(model.predict_log1p_norm(X[:3]), np.tile(target.mean(0), (3, 1)), rtol=1e-12)
    naive = np.log1p(model.predict(X) / model.ref_library_size_ * 1e4)
    assert ((model.predict_log1p_norm(X) - target) ** 2).mean() < ((naive - target) ** 2).mean()
