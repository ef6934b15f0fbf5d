"""The heads' GPU path: the NB GLM, its seed ensemble and the batched elastic net fitted on
CUDA give the CPU's answers (skipped without a CUDA GPU; the CPU paths are tested against
scipy / scikit-learn elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from heads import NBRegressor, SeedEnsemble
from heads.elastic_net import fit_elastic_net_logistic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _nb_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, d, g = 900, 64, 8
    groups = np.repeat([f"s{i}" for i in range(6)], n // 6)
    X = rng.normal(size=(n, d)).astype(np.float32)
    mu = np.exp(1.0 + 0.4 * X[:, :g])
    y = rng.negative_binomial(4, 4 / (4 + mu))
    return X, y, groups


def test_nb_glm_on_cuda_matches_cpu():
    X, y, groups = _nb_data()
    cpu = NBRegressor(device="cpu", random_state=0).fit(X, y, groups=groups)
    gpu = NBRegressor(device="cuda", random_state=0).fit(X, y, groups=groups)
    assert gpu.alpha_ == cpu.alpha_
    np.testing.assert_allclose(gpu.predict_rate(X), cpu.predict_rate(X), rtol=2e-3)
    np.testing.assert_allclose(gpu.theta_, cpu.theta_, rtol=2e-2)


def test_seed_ensemble_on_cuda_matches_cpu():
    X, y, groups = _nb_data(1)
    kw = {"n_members": 3}
    cpu = SeedEnsemble(NBRegressor(device="cpu", bootstrap=True, alpha=3.0), **kw).fit(X, y, groups=groups)
    gpu = SeedEnsemble(NBRegressor(device="cuda", bootstrap=True, alpha=3.0), **kw).fit(X, y, groups=groups)
    unc_c, unc_g = cpu.predict_uncertainty(X), gpu.predict_uncertainty(X)
    np.testing.assert_allclose(unc_g.mean, unc_c.mean, rtol=2e-3)
    np.testing.assert_allclose(unc_g.epistemic, unc_c.epistemic, rtol=5e-2, atol=1e-6)


def test_batched_elastic_net_on_cuda_matches_cpu():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(400, 50))
    Y = (X[:, :6] + rng.normal(size=(400, 6)) > 0).astype(float)
    cpu = fit_elastic_net_logistic(X, Y, 0.1, 0.5, tol=1e-6, device="cpu")
    gpu = fit_elastic_net_logistic(X, Y, 0.1, 0.5, tol=1e-6, device="cuda")
    np.testing.assert_allclose(gpu.coef, cpu.coef, atol=1e-6)
    np.testing.assert_allclose(gpu.intercept, cpu.intercept, atol=1e-6)
