"""The principal axes behind ridge's and the NB GLM's features, against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from heads.pca import principal_axes


@pytest.mark.parametrize(
    "n, d, k",
    # fewer rows than features, and more (float64 eigh of all); then the heads' 256 leading
    # axes of a larger Gram matrix (the mixed-precision float32 + Rayleigh-Ritz path)
    [(60, 150, 20), (150, 40, 20), (600, 700, 256), (900, 640, 256)],
)
def test_principal_axes_equal_sklearn_pca(n, d, k):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.2 + rng.normal(size=(n, d)) + 3.0
    mean, comps, s = principal_axes(X, k)
    ref = PCA(n_components=k, svd_solver="full").fit(X)
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-12)
    np.testing.assert_allclose(s, ref.singular_values_, rtol=1e-9)
    # same axes up to sign, orthonormal, and signed deterministically
    np.testing.assert_allclose(np.abs(np.sum(comps * ref.components_, axis=1)), 1.0, atol=1e-9)
    np.testing.assert_allclose(comps @ comps.T, np.eye(k), atol=1e-9)
    assert np.all(comps[np.arange(k), np.argmax(np.abs(comps), axis=1)] > 0)


def test_rank_deficient_input_keeps_only_non_null_axes():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 3)) @ rng.normal(size=(3, 50))  # rank 3 after centring at most
    _, comps, s = principal_axes(X)
    assert comps.shape == (3, 50) and s.shape == (3,)
