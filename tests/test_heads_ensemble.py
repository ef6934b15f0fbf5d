"""SeedEnsemble variance decomposition and the cross-backbone (FSTimage) combination."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator, clone

from heads import NBRegressor, SeedEnsemble, combine_predictions


class FixedHead(BaseEstimator):
    """A fake member whose outputs are fixed functions of its seed: mean = base + seed,
    variance = (seed + 1) * base (counts, counts^2)."""

    def __init__(self, base: float = 2.0, random_state: int = 0):
        self.base = base
        self.random_state = random_state

    def fit(self, X, y, **kwargs):
        self.n_features_in_ = np.asarray(X).shape[1]
        self.ref_library_size_ = 100.0
        return self

    def _outputs(self, X):
        n = np.asarray(X).shape[0]
        grid = self.base * np.arange(1, 3 * n + 1, dtype=float).reshape(n, 3) / n
        return grid + self.random_state, (self.random_state + 1) * grid

    def predict_distribution(self, X, *, library_size=None, groups=None, coords=None):
        mean, var = self._outputs(X)
        return SimpleNamespace(mean=mean, variance=var)


def test_seed_ensemble_variance_terms_by_hand():
    X, y = np.zeros((4, 2)), np.zeros((4, 3))
    ens = SeedEnsemble(FixedHead(base=2.0), n_members=3, seeds=[0, 5, 7]).fit(X, y)
    assert [m.random_state for m in ens.members_] == [0, 5, 7]
    u = ens.predict_uncertainty(X)
    grid = 2.0 * np.arange(1, 13, dtype=float).reshape(4, 3) / 4
    means = [grid + 0, grid + 5, grid + 7]
    variances = [1 * grid, 6 * grid, 8 * grid]
    mbar = (means[0] + means[1] + means[2]) / 3
    epistemic = ((means[0] - mbar) ** 2 + (means[1] - mbar) ** 2 + (means[2] - mbar) ** 2) / 3  # ddof=0
    aleatoric = (variances[0] + variances[1] + variances[2]) / 3
    np.testing.assert_allclose(u.mean, mbar, rtol=1e-12)
    np.testing.assert_allclose(ens.predict(X), mbar, rtol=1e-12)
    np.testing.assert_allclose(u.epistemic, epistemic, rtol=1e-12)
    np.testing.assert_allclose(u.epistemic, np.full((4, 3), np.var([0, 5, 7])), rtol=1e-12)
    np.testing.assert_allclose(u.aleatoric, aleatoric, rtol=1e-12)
    np.testing.assert_allclose(u.total, epistemic + aleatoric, rtol=1e-12)
    with pytest.raises(ValueError, match="seeds"):
        SeedEnsemble(FixedHead(), n_members=2, seeds=[1, 2, 3]).fit(X, y)


def test_seed_ensemble_of_nb_regressors_and_clone():
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(120, 6)).astype(np.float32)
        y = rng.poisson(np.exp(1 + 0.4 * X[:, :3]))
        groups = np.repeat(np.arange(4), 30)
        ens = SeedEnsemble(NBRegressor(max_epochs=4, hidden=4), n_members=3)
        assert clone(ens).get_params()["base_estimator__hidden"] == 4
        ens.fit(X, y, groups=groups)
        member_means = np.stack([m.predict(X) for m in ens.members_])
        np.testing.assert_allclose(ens.predict(X), member_means.mean(0), rtol=1e-12)
        assert not np.allclose(member_means[0], member_means[1])  # seeds differ
        u = ens.predict_uncertainty(X)
        np.testing.assert_allclose(u.epistemic, member_means.var(0), rtol=1e-10)
        assert np.all(u.aleatoric > 0)
    finally:
        torch.set_num_threads(torch_threads)


def keys_for(slides_spots):
    return np.array(slides_spots, dtype=object)


def test_combine_predictions_mean_is_average_of_members():
    rng = np.random.default_rng(0)
    keys = keys_for([("s1", f"{i}x1") for i in range(5)])
    a, b, c = (rng.gamma(2, size=(5, 3)) for _ in range(3))
    perm = np.array([3, 0, 4, 1, 2])  # backbone b lists the same keys in another order
    res = combine_predictions({"a": (keys, a), "b": (keys[perm], b[perm]), "c": (keys, c, c * 2)})
    np.testing.assert_allclose(res.mean, (a + b + c) / 3, rtol=1e-12)
    np.testing.assert_allclose(res.spread, np.var(np.stack([a, b, c]), axis=0), rtol=1e-10)
    np.testing.assert_array_equal(res.n_backbones, 3)
    assert res.aleatoric is None  # not every backbone gave variances
    assert [tuple(k) for k in res.keys] == [tuple(k) for k in keys]
    both = combine_predictions({"a": (keys, a, a), "c": (keys, c, 3 * c)})
    np.testing.assert_allclose(both.aleatoric, (a + 3 * c) / 2, rtol=1e-12)


def test_missing_key_policies():
    keys = keys_for([("s1", "1x1"), ("s1", "2x1"), ("s2", "1x1"), ("s2", "5x5")])
    a = np.arange(8.0).reshape(4, 2)
    b = 10 + np.arange(6.0).reshape(3, 2)  # backbone "uni" lacks ("s2", "5x5")
    preds = {"resnet": (keys, a), "uni": (keys[:3], b)}
    with pytest.raises(ValueError, match=r"backbone 'uni' lacks 1 keys"):
        combine_predictions(preds, missing="error")
    drop = combine_predictions(preds, missing="drop")
    assert [tuple(k) for k in drop.keys] == [tuple(k) for k in keys[:3]]
    np.testing.assert_allclose(drop.mean, (a[:3] + b) / 2)
    avail = combine_predictions(preds, missing="available")
    np.testing.assert_array_equal(avail.n_backbones, [2, 2, 2, 1])
    np.testing.assert_allclose(avail.mean[:3], (a[:3] + b) / 2)
    np.testing.assert_allclose(avail.mean[3], a[3])
    np.testing.assert_allclose(avail.spread[3], 0.0)
    with pytest.raises(ValueError, match="duplicate"):
        combine_predictions({"x": (np.vstack([keys, keys[:1]]), np.zeros((5, 2)))})
    with pytest.raises(ValueError, match="genes"):
        combine_predictions({"x": (keys, a), "y": (keys, np.zeros((4, 3)))})
