"""The NB distribution object of heads.distributions against scipy.stats.nbinom (independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from heads import distributions as D
from heads.distributions import NegativeBinomial


def _rp(mu, theta):
    return theta, theta / (theta + mu)


@pytest.fixture(scope="module")
def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 4000
    mu = np.exp(rng.uniform(np.log(1e-3), np.log(5e4), n))
    theta = np.exp(rng.uniform(np.log(1e-2), np.log(1e4), n))
    r, p = _rp(mu, theta)
    # counts around the mean, plus zeros and very large counts
    y = rng.negative_binomial(r, p).astype(np.float64)
    y[:200] = 0
    y[200:400] = rng.integers(10_000, 2_000_000, 200)
    return {"mu": mu, "theta": theta, "r": r, "p": p, "y": y}


def test_mean_dispersion_logpmf_matches_scipy(params):
    ref = stats.nbinom.logpmf(params["y"], params["theta"], params["theta"] / (params["theta"] + params["mu"]))
    nb = NegativeBinomial(params["mu"], params["theta"])
    np.testing.assert_allclose(nb.log_prob(params["y"]), ref, rtol=1e-5)
    t = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
    np.testing.assert_allclose(
        D.nb_log_prob_log_mu(t["y"], torch.log(t["mu"]), torch.log(t["theta"])).numpy(), ref, rtol=1e-5
    )


def test_stimage_logpmf_matches_scipy(params):
    rng = np.random.default_rng(1)
    n = params["y"].shape[0]
    a = rng.uniform(-4, 8, n)  # raw Dense outputs
    b = rng.uniform(-12, 12, n)
    r, p = np.log1p(np.exp(a)), 1 / (1 + np.exp(-b))  # STimage: softplus(a), sigmoid(b)
    y = params["y"]
    ref = stats.nbinom.logpmf(y, r, p)
    nb = NegativeBinomial.from_rp(r, p)
    np.testing.assert_allclose(nb.r, r, rtol=1e-12)
    np.testing.assert_allclose(nb.p, p, rtol=1e-9)
    np.testing.assert_allclose(nb.log_prob(y)[p < 1 - 1e-6], ref[p < 1 - 1e-6], rtol=1e-5)
    got = D.nb_log_prob_stimage(torch.as_tensor(y), torch.as_tensor(r), torch.as_tensor(b, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_stimage_convention_is_scipy_not_torch_probs():
    """STimage's p is scipy's success probability; torch's probs is 1 - p."""
    y = torch.arange(0, 30, dtype=torch.float64)
    r, p = torch.tensor(3.5, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    ours = D.nb_log_prob_stimage(y, r, torch.logit(p)).numpy()
    torch_nb = torch.distributions.NegativeBinomial(total_count=r, probs=1 - p).log_prob(y).numpy()
    np.testing.assert_allclose(ours, torch_nb, rtol=1e-10)
    np.testing.assert_allclose(ours, stats.nbinom.logpmf(y.numpy(), 3.5, 0.3), rtol=1e-10)
    assert not np.allclose(ours, torch.distributions.NegativeBinomial(total_count=r, probs=p).log_prob(y).numpy())


def test_parameters_and_moments_match_scipy(params):
    mu, theta, r, p = params["mu"], params["theta"], params["r"], params["p"]
    nb = NegativeBinomial(mu, theta)
    np.testing.assert_allclose(nb.r, r, rtol=1e-12)
    np.testing.assert_allclose(nb.p, p, rtol=1e-12)
    np.testing.assert_allclose(nb.mean, stats.nbinom.mean(r, p), rtol=1e-9)
    np.testing.assert_allclose(nb.variance, stats.nbinom.var(r, p), rtol=1e-9)
    back = NegativeBinomial.from_rp(r, p)
    np.testing.assert_allclose(back.mu, mu, rtol=1e-9)
    np.testing.assert_allclose(back.theta, theta, rtol=1e-12)
    mm = NegativeBinomial.from_moments(stats.nbinom.mean(r, p), stats.nbinom.var(r, p))
    keep = mu > 1e-2  # where the excess variance is representable
    np.testing.assert_allclose(mm.theta[keep], theta[keep], rtol=1e-6)
    np.testing.assert_allclose(mm.p[keep], p[keep], rtol=1e-6)
    under = NegativeBinomial.from_moments(np.array([2.0]), np.array([1.5]))  # under-dispersed: near-Poisson
    assert under.theta[0] > 1e8 and np.isclose(under.variance[0], 2.0)


def test_distribution_at_a_depth_scales_the_mean_and_keeps_the_dispersion():
    nb = NegativeBinomial(np.array([[1.0, 4.0], [2.0, 0.5]]), np.array([3.0, 0.7]))
    deep = nb.at_depth(np.array([2000.0, 500.0]), reference=1000.0)
    np.testing.assert_allclose(deep.mu, [[2.0, 8.0], [1.0, 0.25]])
    np.testing.assert_array_equal(deep.theta, nb.theta)
    ref = stats.nbinom(deep.theta, deep.theta / (deep.theta + deep.mu))
    np.testing.assert_allclose(deep.variance, ref.var(), rtol=1e-12)
    np.testing.assert_allclose(nb.at_depth(3000.0, 1000.0).mu, 3 * nb.mu)


def test_quantiles_and_samples():
    r = np.array([[0.5, 5.0], [50.0, 2.0]])
    p = np.array([[0.1, 0.5], [0.9, 0.01]])
    nb = NegativeBinomial.from_rp(r, p)
    levels = (0.05, 0.5, 0.95)
    q = nb.ppf(levels)
    assert q.shape == (3, 2, 2)
    for i, lv in enumerate(levels):
        np.testing.assert_array_equal(q[i], stats.nbinom.ppf(lv, r, p))
    s = nb.sample(20000, rng=0)
    assert s.shape == (20000, 2, 2)
    # sample means within 5 standard errors of the NB mean
    assert np.all(np.abs(s.mean(0) - stats.nbinom.mean(r, p)) < 5 * np.sqrt(stats.nbinom.var(r, p) / 20000))
    np.testing.assert_array_equal(s, nb.sample(20000, rng=0))


def test_public_surface_is_short():
    assert sorted(D.__all__) == ["NBPrediction", "NegativeBinomial", "nb_log_prob_log_mu", "nb_log_prob_stimage"]
    public = {
        n
        for n in vars(D)
        if not n.startswith("_") and callable(getattr(D, n)) and getattr(D, n).__module__ == D.__name__
    }
    assert public == set(D.__all__)


def test_fast_quantiles_equal_scipy_ppf_on_many_parameters():
    """The betainc + pmf-recurrence quantiles against ``scipy.stats.nbinom.ppf`` element by
    element: spots x genes-like draws (means 1e-3..1e4, dispersions 1e-2..1e3), tail levels,
    and the edge cases scipy defines (levels 0 and 1, p = 1, NaN, r = 0)."""
    rng = np.random.default_rng(3)
    mu = np.exp(rng.uniform(np.log(1e-3), np.log(1e4), 50_000))
    theta = np.exp(rng.uniform(np.log(1e-2), np.log(1e3), 50_000))
    r, p = _rp(mu, theta)
    levels = (0.001, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999)
    np.testing.assert_array_equal(
        NegativeBinomial(mu, theta).ppf(levels), stats.nbinom.ppf(np.array(levels)[:, None], r[None], p[None])
    )
    r_edge = np.array([1.0, 2.0, np.nan, 0.0, 5.0, 3.0])
    p_edge = np.array([1.0, 0.5, 0.5, 0.5, 1e-12, 0.3])
    lv = np.array([0.0, 0.5, 1.0])
    with np.errstate(divide="ignore", invalid="ignore"):
        edge = NegativeBinomial.from_rp(r_edge, p_edge)
    np.testing.assert_array_equal(edge.ppf(lv), stats.nbinom.ppf(lv[:, None], r_edge[None], p_edge[None]))


def test_expected_log1p_matches_a_scipy_sum():
    mu = np.array([[0.05, 1.0, 7.5], [30.0, 120.0, 2.0]])
    theta = np.array([0.3, 2.0, 15.0])
    scale = np.array([[10.0], [0.5]])
    got = NegativeBinomial(mu, theta).expected_log1p(scale)
    y = np.arange(0, 5000)
    for i in range(2):
        for j in range(3):
            r = theta[j]
            p = r / (r + mu[i, j])
            ref = (stats.nbinom.pmf(y, r, p) * np.log1p(scale[i, 0] * y)).sum()
            assert got[i, j] == pytest.approx(ref, rel=1e-5, abs=1e-9)
    assert (got < np.log1p(scale * mu)).all()  # Jensen: below the log of the mean


def test_expected_log1p_survives_extreme_overdispersion():
    mu = np.array([[3.0, 1e3], [0.5, 2.0]])
    theta = np.array([[1e-30, 1e-12], [0.0, 5.0]])  # degenerate dispersions must not hang or warn
    with np.errstate(all="raise"):
        got = NegativeBinomial(mu, theta).expected_log1p(1.0, max_count=2000)
    assert np.isfinite(got).all() and (got >= 0).all()
