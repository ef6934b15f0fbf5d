"""Negative-binomial (NB) maths: log-pmf (torch and numpy), parameter conversions, moments,
quantiles and sampling. All counts are RAW integer counts.

Two parametrisations, one distribution
--------------------------------------
**mean / dispersion** ``(mu, theta)``: ``E[Y] = mu``, ``Var[Y] = mu + mu**2 / theta``;
``theta`` (a.k.a. inverse dispersion, "size") > 0, ``theta -> inf`` is Poisson.

**(r, p), scipy's convention** — the one implemented here for STimage:
``P(Y = y) = Gamma(y + r) / (Gamma(r) y!) * p**r * (1 - p)**y``, i.e. the number of
failures before ``r`` successes with success probability ``p``. This is exactly
``scipy.stats.nbinom(n=r, p=p)`` and ``numpy.random.Generator.negative_binomial(r, p)``,
with ``mean = r (1 - p) / p`` and ``var = r (1 - p) / p**2``.

STimage (``stimage/_model.py``) outputs ``r = softplus(a)`` ("n") and ``p = sigmoid(b)``
from a ``Dense(2)`` per gene and minimises the hand-written NLL
``lgamma(r) + lgamma(y+1) - lgamma(r+y) - r log p - y log(1-p)``, then predicts
``scipy.stats.nbinom.mean(r, p)``: the scipy convention above (NOT TensorFlow
Probability's / torch's ``NegativeBinomial(total_count, probs)``, where ``probs`` is the
success probability but the *successes* are counted, so ``probs_torch = 1 - p``).

The two are linked by ``r = theta`` and ``p = theta / (theta + mu)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special, stats

# --------------------------------------------------------------------------- torch


def nb_log_prob_log_mu(y: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """Log-pmf of NB(mean ``exp(log_mu)``, dispersion ``exp(log_theta)``) at raw counts ``y``.

    Stable for large counts and small/large ``theta``: ``lgamma`` terms and
    ``log(theta + mu)`` via softplus of log ratios (no ``log(0)``, no overflow).
    Broadcasts; works in the dtype of the inputs.
    """
    theta = torch.exp(log_theta)
    return (
        torch.lgamma(y + theta)
        - torch.lgamma(theta)
        - torch.lgamma(y + 1.0)
        - theta * F.softplus(log_mu - log_theta)  # theta * log(theta / (theta + mu))
        - y * F.softplus(log_theta - log_mu)  # y * log(mu / (theta + mu))
    )


def nb_log_prob(y: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Log-pmf of NB(mean ``mu`` > 0, dispersion ``theta`` > 0) at raw counts ``y`` (torch)."""
    return nb_log_prob_log_mu(y, torch.log(mu), torch.log(theta))


def nb_log_prob_stimage(y: torch.Tensor, r: torch.Tensor, logit_p: torch.Tensor) -> torch.Tensor:
    """Log-pmf in STimage's (scipy's) convention: ``r`` successes, success prob
    ``p = sigmoid(logit_p)``, ``y`` failures: ``lgamma(y+r) - lgamma(r) - lgamma(y+1)
    + r log p + y log(1-p)`` with ``log p = logsigmoid(logit_p)`` and
    ``log(1-p) = logsigmoid(-logit_p)`` (stable for saturated ``p``)."""
    return (
        torch.lgamma(y + r)
        - torch.lgamma(r)
        - torch.lgamma(y + 1.0)
        + r * F.logsigmoid(logit_p)
        + y * F.logsigmoid(-logit_p)
    )


# --------------------------------------------------------------------------- numpy


def nb_logpmf(y: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Numpy log-pmf of NB(mean ``mu`` > 0, dispersion ``theta`` > 0) at raw counts ``y``."""
    y, mu, theta = (np.asarray(a, dtype=np.float64) for a in (y, mu, theta))
    log_mu, log_theta = np.log(mu), np.log(theta)
    return (
        special.gammaln(y + theta)
        - special.gammaln(theta)
        - special.gammaln(y + 1.0)
        - theta * np.logaddexp(0.0, log_mu - log_theta)
        - y * np.logaddexp(0.0, log_theta - log_mu)
    )


def nb_logpmf_rp(y: np.ndarray, r: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Numpy log-pmf in scipy's ``nbinom(n=r, p=p)`` convention (see module doc)."""
    y, r, p = (np.asarray(a, dtype=np.float64) for a in (y, r, p))
    return special.gammaln(y + r) - special.gammaln(r) - special.gammaln(y + 1.0) + r * np.log(p) + y * np.log1p(-p)


# --------------------------------------------------------------------------- conversions


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))``, overflow-free."""
    return np.logaddexp(0.0, np.asarray(x, dtype=np.float64))


def stimage_to_rp(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """STimage's raw outputs ``(a, b)`` -> ``(r, p) = (softplus(a), sigmoid(b))``."""
    return softplus(a), special.expit(np.asarray(b, dtype=np.float64))


def mean_disp_to_rp(mu: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, theta)`` -> scipy ``(r, p)``: ``r = theta``, ``p = theta / (theta + mu)``."""
    mu, theta = np.asarray(mu, dtype=np.float64), np.asarray(theta, dtype=np.float64)
    return np.broadcast_to(theta, np.broadcast_shapes(mu.shape, theta.shape)).copy(), theta / (theta + mu)


def rp_to_mean_disp(r: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy ``(r, p)`` -> ``(mu, theta) = (r (1-p) / p, r)``."""
    r, p = np.asarray(r, dtype=np.float64), np.asarray(p, dtype=np.float64)
    return r * (1.0 - p) / p, np.broadcast_to(r, np.broadcast_shapes(r.shape, p.shape)).copy()


def mean_var_to_rp(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moments -> scipy ``(r, p)``: ``p = mean / var``, ``r = mean**2 / (var - mean)``.

    Requires over-dispersion ``var > mean > 0`` (raises ``ValueError`` otherwise).
    """
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    if np.any(mean <= 0) or np.any(var <= mean):
        raise ValueError("mean_var_to_rp: the NB needs var > mean > 0 for every entry")
    return mean**2 / (var - mean), mean / var


def rp_to_mean_var(r: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy ``(r, p)`` -> ``(mean, var) = (r (1-p) / p, r (1-p) / p**2)``."""
    r, p = np.asarray(r, dtype=np.float64), np.asarray(p, dtype=np.float64)
    mean = r * (1.0 - p) / p
    return mean, mean / p


# --------------------------------------------------------------------------- moments etc.


@dataclass(frozen=True)
class NBPrediction:
    """Predictive NB per spot and gene, in RAW counts at the requested library size.

    ``mean``/``variance``/``r``/``p``: (n_spots, n_genes); ``r, p`` in scipy's
    ``nbinom(r, p)`` convention. ``quantiles``: (n_levels, n_spots, n_genes) at
    ``quantile_levels``. ``samples``: (n_samples, n_spots, n_genes) or ``None``.
    """

    mean: np.ndarray
    variance: np.ndarray
    r: np.ndarray
    p: np.ndarray
    quantile_levels: np.ndarray
    quantiles: np.ndarray
    samples: np.ndarray | None


def moment_matched_theta(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Dispersion ``theta`` of the NB with this mean and variance (raw counts):
    ``mean**2 / (variance - mean)``; where ``variance <= mean`` the excess is floored at
    ``1e-9 * mean``, i.e. a near-Poisson NB (unlike :func:`mean_var_to_rp`, never raises)."""
    mean, variance = np.asarray(mean, dtype=np.float64), np.asarray(variance, dtype=np.float64)
    excess = np.maximum(variance - mean, 1e-9 * np.maximum(mean, 1e-12))
    return np.maximum(mean, 1e-12) ** 2 / excess


def nb_quantiles_from_moments(mean: np.ndarray, variance: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """Quantiles (raw counts) at levels ``q`` of the NB moment-matched to ``mean``/``variance``
    (see :func:`moment_matched_theta`); shape ``(len(q),) + mean.shape``."""
    mu = np.asarray(mean, dtype=np.float64)
    r, p = mean_disp_to_rp(mu, moment_matched_theta(mu, variance))
    return nb_quantiles(r, p, q)


def nb_mean(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Mean (raw counts) of scipy ``nbinom(r, p)``."""
    return rp_to_mean_var(r, p)[0]


def nb_variance(r: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Variance (raw counts^2) of scipy ``nbinom(r, p)``."""
    return rp_to_mean_var(r, p)[1]


def nb_quantiles(r: np.ndarray, p: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """Quantiles (raw counts) at levels ``q``; shape ``(len(q),) + broadcast(r, p).shape``.

    The same numbers as ``scipy.stats.nbinom.ppf(q, r, p)`` (the smallest integer ``k`` with
    ``CDF(k) >= q``; they can differ only where a CDF value is within rounding of ``q``), several
    times faster: scipy inverts the CDF numerically (``nbdtrik``) per element; here one
    vectorised ``CDF(k) = I_p(r, k + 1)`` (the regularised incomplete beta function,
    ``scipy.special.betainc``) at a Cornish-Fisher guess is corrected by unit steps of the
    pmf recurrence. Elements still unresolved after the steps (far tails), levels outside
    (0, 1) and non-finite parameters go to scipy."""
    r, p = np.broadcast_arrays(np.asarray(r, dtype=np.float64), np.asarray(p, dtype=np.float64))
    levels = np.asarray(q, dtype=np.float64).ravel()
    out = np.empty((levels.size,) + r.shape)
    for i, level in enumerate(levels):
        out[i] = _nb_ppf(level, r.ravel(), p.ravel()).reshape(r.shape)
    return out


def _nb_ppf(level: float, r: np.ndarray, p: np.ndarray, steps: int = 32) -> np.ndarray:
    """``scipy.stats.nbinom.ppf(level, r, p)`` for 1-d ``r``, ``p`` (see :func:`nb_quantiles`).

    One ``CDF(k) = I_p(r, k + 1)`` and one pmf at the Cornish-Fisher guess ``k``, then unit
    steps by the pmf recurrence ``pmf(k + 1) = pmf(k) (k + r) (1 - p) / (k + 1)`` until
    ``CDF(k) >= level > CDF(k) - pmf(k)``."""
    ok = np.isfinite(r) & np.isfinite(p) & (r > 0) & (p > 0) & (p <= 1) & (0.0 < level < 1.0)
    k = np.full(r.shape, np.nan)
    rr, pp = r[ok], p[ok]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        mean = rr * (1.0 - pp) / pp
        skew = np.nan_to_num((2.0 - pp) / np.sqrt(rr * (1.0 - pp)), posinf=0.0)
        z = special.ndtri(level)
        guess = mean + np.sqrt(mean / pp) * (z + (z * z - 1.0) * skew / 6.0)
        kk = np.clip(np.floor(np.nan_to_num(guess, nan=0.0, posinf=0.0)), 0.0, None)
        cdf = special.betainc(rr, kk + 1.0, pp)
        pmf = np.exp(
            special.gammaln(kk + rr)
            - special.gammaln(rr)
            - special.gammaln(kk + 1.0)
            + special.xlogy(rr, pp)
            + special.xlog1py(kk, -pp)
        )
        todo = np.arange(kk.size)
        for _ in range(steps):
            c, f, kt, rt, qt = cdf[todo], pmf[todo], kk[todo], rr[todo], 1.0 - pp[todo]
            up = c < level
            down = ~up & (kt > 0) & (c - f >= level)
            f_up = f * (kt + rt) * qt / (kt + 1.0)  # pmf(k + 1)
            f_down = f * kt / ((kt - 1.0 + rt) * qt)  # pmf(k - 1)
            kk[todo] = np.where(up, kt + 1.0, np.where(down, kt - 1.0, kt))
            cdf[todo] = np.where(up, c + f_up, np.where(down, c - f, c))
            pmf[todo] = np.where(up, f_up, np.where(down, f_down, f))
            todo = todo[up | down]
            if todo.size == 0:
                break
    if todo.size:
        kk[todo] = stats.nbinom.ppf(level, rr[todo], pp[todo])
    k[ok] = kk
    if not ok.all():
        k[~ok] = stats.nbinom.ppf(level, r[~ok], p[~ok])
    return k


def nb_sample(r: np.ndarray, p: np.ndarray, n_samples: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """Draw ``n_samples`` raw-count samples; shape ``(n_samples,) + broadcast(r, p).shape``."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    r, p = np.broadcast_arrays(np.asarray(r, dtype=np.float64), np.asarray(p, dtype=np.float64))
    return gen.negative_binomial(r, p, size=(int(n_samples),) + r.shape)


def nb_expected_log1p(
    mu: np.ndarray, theta: np.ndarray, scale: np.ndarray | float, tail: float = 1e-10, max_count: int = 100_000
) -> np.ndarray:
    """``E[log1p(scale * Y)]`` for ``Y ~ NB(mean mu, dispersion theta)`` (mean/dispersion
    parametrisation: ``Var = mu + mu**2 / theta``), elementwise.

    This is the NB prediction on the log1p-normalised scale (``scale = target_sum /
    library_size``) that minimises squared error there; ``log1p(scale * mu)`` (the log of
    the mean) is biased upwards by Jensen's inequality. Computed by summing the pmf,
    built by its recursion ``p(y+1) = p(y) (y + theta) / (y + 1) * mu / (mu + theta)``,
    per element until its remaining tail mass is below ``tail``. Extremely over-dispersed
    elements stop at ``max_count``; their remaining tail mass is counted at
    ``log1p(scale * max_count)`` (a lower bound).
    """
    mu = np.asarray(mu, dtype=np.float64)
    shape = mu.shape
    theta = np.maximum(np.broadcast_to(np.asarray(theta, dtype=np.float64), shape), 1e-8).ravel()
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), shape).ravel()
    mu = np.maximum(mu.ravel(), 0.0)
    q = mu / (mu + theta)
    pmf = np.exp(theta * (np.log(theta) - np.log(theta + mu)))  # P(Y = 0)
    total = np.zeros_like(mu)
    mass = pmf.copy()
    active = np.flatnonzero(1.0 - mass > tail)
    y = 0
    while active.size and y < max_count:
        p = pmf[active] * (y + theta[active]) / (y + 1) * q[active]
        y += 1
        pmf[active] = p
        total[active] += p * np.log1p(scale[active] * y)
        mass[active] += p
        active = active[1.0 - mass[active] > tail]
    if active.size:
        total[active] += np.clip(1.0 - mass[active], 0.0, None) * np.log1p(scale[active] * y)
    return total.reshape(shape)
