"""The negative-binomial (NB) distribution of every NB head, over RAW integer counts.

One object, :class:`NegativeBinomial`, in the style of scvi-tools' ``NegativeBinomial``.

Parametrisation (stated once)
-----------------------------
**mean / dispersion** ``(mu, theta)``: ``E[Y] = mu``, ``Var[Y] = mu + mu**2 / theta``;
``theta`` > 0 is the inverse dispersion ("size"), ``theta -> inf`` is Poisson.

The same distribution in **scipy's** ``(r, p)``: ``r = theta``, ``p = theta / (theta + mu)``;
``P(Y = y) = Gamma(y + r) / (Gamma(r) y!) * p**r * (1 - p)**y`` (failures before ``r``
successes), exactly ``scipy.stats.nbinom(n=r, p=p)`` and
``numpy.random.Generator.negative_binomial(r, p)``.

STimage (``stimage/_model.py``) outputs ``r = softplus(a)`` and ``p = sigmoid(b)`` and
minimises ``lgamma(r) + lgamma(y+1) - lgamma(r+y) - r log p - y log(1-p)``: scipy's
convention (NOT torch's ``NegativeBinomial(total_count, probs)``, whose ``probs`` is
``1 - p``); :func:`nb_log_prob_stimage` is that loss.

Public surface: :class:`NegativeBinomial`, :class:`NBPrediction` (what ``predict_dist``
returns) and the two torch training losses :func:`nb_log_prob_log_mu` (mean/dispersion)
and :func:`nb_log_prob_stimage` (STimage's r/p).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import special, stats

# --------------------------------------------------------------------------- torch losses


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


# --------------------------------------------------------------------------- the distribution


@dataclass(frozen=True, eq=False)
class NegativeBinomial:
    """NB over RAW counts with mean ``mu`` and dispersion ``theta`` (``Var = mu + mu**2 / theta``).

    ``mu`` (counts, >= 0) and ``theta`` (> 0) broadcast to one shape (float64), e.g.
    (n_spots, n_genes). Build from scipy's ``(r, p)`` with :meth:`from_rp`, from moments
    with :meth:`from_moments`; re-express at another sequencing depth with :meth:`at_depth`.
    """

    mu: np.ndarray
    theta: np.ndarray

    def __post_init__(self) -> None:
        mu, theta = np.broadcast_arrays(np.asarray(self.mu, np.float64), np.asarray(self.theta, np.float64))
        object.__setattr__(self, "mu", np.array(mu))
        object.__setattr__(self, "theta", np.array(theta))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_rp(cls, r: np.ndarray, p: np.ndarray) -> NegativeBinomial:
        """From scipy's ``nbinom(n=r, p=p)``: ``mu = r (1 - p) / p``, ``theta = r``."""
        r, p = np.asarray(r, np.float64), np.asarray(p, np.float64)
        return cls(r * (1.0 - p) / p, r)

    @classmethod
    def from_moments(cls, mean: np.ndarray, variance: np.ndarray) -> NegativeBinomial:
        """The NB with this mean and variance (counts, counts^2): ``theta = mean**2 /
        (variance - mean)``; where ``variance <= mean`` the excess is floored at
        ``1e-9 * mean`` (a near-Poisson NB), so it never raises."""
        mean, variance = np.asarray(mean, np.float64), np.asarray(variance, np.float64)
        excess = np.maximum(variance - mean, 1e-9 * np.maximum(mean, 1e-12))
        return cls(mean, np.maximum(mean, 1e-12) ** 2 / excess)

    def at_depth(self, library_size: np.ndarray | float, reference: float) -> NegativeBinomial:
        """The distribution at another library size: ``mu * library_size / reference`` with
        ``theta`` unchanged (the log library offset of the NB GLM). ``library_size``: a
        scalar or one value per row (first axis), raw counts."""
        lib = np.asarray(library_size, np.float64) / float(reference)
        scale = lib if lib.ndim == 0 else lib.reshape((-1,) + (1,) * (self.mu.ndim - 1))
        return NegativeBinomial(self.mu * scale, self.theta)

    # ------------------------------------------------------------------ parameters and moments
    @property
    def r(self) -> np.ndarray:
        """scipy's ``n``: ``theta``."""
        return self.theta

    @property
    def p(self) -> np.ndarray:
        """scipy's success probability ``theta / (theta + mu)``."""
        return self.theta / (self.theta + self.mu)

    @property
    def mean(self) -> np.ndarray:
        """``mu`` (raw counts)."""
        return self.mu

    @property
    def variance(self) -> np.ndarray:
        """``mu + mu**2 / theta`` (raw counts^2)."""
        return self.mu + self.mu**2 / self.theta

    # ------------------------------------------------------------------ functions of the law
    def log_prob(self, y: np.ndarray) -> np.ndarray:
        """Log-pmf at raw counts ``y`` (broadcast against the parameters)."""
        y = np.asarray(y, np.float64)
        log_mu, log_theta = np.log(self.mu), np.log(self.theta)
        return (
            special.gammaln(y + self.theta)
            - special.gammaln(self.theta)
            - special.gammaln(y + 1.0)
            - self.theta * np.logaddexp(0.0, log_mu - log_theta)
            - y * np.logaddexp(0.0, log_theta - log_mu)
        )

    def ppf(self, q: Sequence[float]) -> np.ndarray:
        """Quantiles (raw counts) at levels ``q``; shape ``(len(q),) + shape``.

        The same numbers as ``scipy.stats.nbinom.ppf(q, r, p)`` (the smallest integer ``k``
        with ``CDF(k) >= q``; they can differ only where a CDF value is within rounding of
        ``q``), several times faster: one vectorised ``CDF(k) = I_p(r, k + 1)`` (regularised
        incomplete beta, ``scipy.special.betainc``) at a Cornish-Fisher guess corrected by
        unit steps of the pmf recurrence. Far tails, levels outside (0, 1) and non-finite
        parameters go to scipy."""
        with np.errstate(divide="ignore", invalid="ignore"):
            r, p = self.r, self.p
        levels = np.asarray(q, dtype=np.float64).ravel()
        out = np.empty((levels.size,) + r.shape)
        for i, level in enumerate(levels):
            out[i] = _nb_ppf(level, r.ravel(), p.ravel()).reshape(r.shape)
        return out

    def sample(self, n_samples: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
        """``n_samples`` raw-count draws; shape ``(n_samples,) + shape``."""
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        return gen.negative_binomial(self.r, self.p, size=(int(n_samples),) + self.mu.shape)

    def expected_log1p(self, scale: np.ndarray | float = 1.0, max_count: int = 100_000) -> np.ndarray:
        """``E[log1p(scale * Y)]`` elementwise: the prediction on the log1p-normalised scale
        (``scale = target_sum / library_size``) that minimises squared error there;
        ``log1p(scale * mu)`` is biased upwards (Jensen). Summed over the pmf until the
        remaining tail mass is < 1e-10, or up to ``max_count`` (the rest counted there)."""
        return _expected_log1p(self.mu, self.theta, scale, max_count=max_count)


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

    @classmethod
    def of(
        cls,
        dist: NegativeBinomial,
        quantiles: Sequence[float] = (),
        n_samples: int = 0,
        random_state: int | np.random.Generator | None = None,
    ) -> NBPrediction:
        """Summarise ``dist``: its moments, quantiles at ``quantiles`` and ``n_samples`` draws."""
        levels = np.asarray(quantiles, dtype=np.float64)
        q = dist.ppf(levels) if levels.size else np.zeros((0,) + dist.mu.shape)
        samples = dist.sample(n_samples, random_state) if n_samples > 0 else None
        return cls(dist.mean, dist.variance, dist.r, dist.p, levels, q, samples)


# --------------------------------------------------------------------------- private numerics


def _nb_ppf(level: float, r: np.ndarray, p: np.ndarray, steps: int = 32) -> np.ndarray:
    """``scipy.stats.nbinom.ppf(level, r, p)`` for 1-d ``r``, ``p`` (see :meth:`NegativeBinomial.ppf`).

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


def _expected_log1p(
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


__all__ = ["NBPrediction", "NegativeBinomial", "nb_log_prob_log_mu", "nb_log_prob_stimage"]
