"""The named value columns every head's :meth:`predict_outputs` returns (arrays only).

A head returns a ``dict`` whose keys come from :data:`OUTPUT_COLUMNS`, each value an
(n_spots, n_genes) array; a head leaves out what it does not predict:

* ``mean_log1p``: the metric-scale prediction, log1p(CP10k), from the image vectors only;
* ``mean``, ``variance`` (raw counts, counts^2) and ``q05 ... q95`` (raw counts): the
  predictive distribution at the spot's library size when one is given (a technical
  covariate, for interval coverage only), at the training reference depth otherwise;
* ``epistemic``, ``aleatoric``: the two parts of ``variance`` of an ensemble;
* ``prob_high``: a classifier's probability of "high" expression.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from heads.distributions import NBPrediction, NegativeBinomial
from heads.inputs import check_library_size
from heads.scale import TARGET_SUM, rate_to_log1p

#: levels of the count-scale predictive quantiles (columns q05 ... q95)
QUANTILE_LEVELS = (0.05, 0.25, 0.75, 0.95)
#: every value column a head may return, in the ``predictions`` table's order
OUTPUT_COLUMNS = ("mean", "mean_log1p", "variance", "epistemic", "aleatoric", "q05", "q25", "q75", "q95", "prob_high")


def quantile_columns(dist: NegativeBinomial, levels: tuple[float, ...] = QUANTILE_LEVELS) -> dict[str, np.ndarray]:
    """``{"q05": ..., ...}``: quantiles (raw counts) of ``dist`` at ``levels``."""
    q = dist.ppf(levels)
    return {f"q{int(round(level * 100)):02d}": q[i] for i, level in enumerate(levels)}


def nb_outputs(dist: NegativeBinomial, rate: np.ndarray) -> dict[str, np.ndarray]:
    """The columns of an NB head: ``dist``'s mean, variance and quantiles (count scale) and
    ``mean_log1p = log1p(rate * 1e4)`` of the predicted ``rate`` (fraction of a spot's counts)."""
    return dict(mean=dist.mean, variance=dist.variance, mean_log1p=rate_to_log1p(rate), **quantile_columns(dist))


class NBOutputs:
    """The outputs of an NB head, all derived from its predictive :class:`NegativeBinomial` at
    the reference depth ``ref_library_size_``, which the head provides as
    ``_distribution_at_ref(X, groups, coords)`` (and checks that it is fitted there).

    The rate (``predict_rate``, ``predict_log1p_norm``, ``mean_log1p``) comes from the image
    vectors alone; ``library_size`` only re-expresses the count-scale distribution at a
    given depth (:meth:`NegativeBinomial.at_depth`), unless ``use_library_offset`` is off.
    """

    def predict_distribution(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> NegativeBinomial:
        """The predictive NB per spot and gene (raw counts) at ``library_size`` (scalar or per
        spot; default the reference depth ``ref_library_size_``)."""
        return self._at_depth(self._distribution_at_ref(X, groups, coords), library_size)

    def _at_depth(self, dist: NegativeBinomial, library_size: np.ndarray | float | None) -> NegativeBinomial:
        if library_size is None or not getattr(self, "use_library_offset", True):
            return dist
        return dist.at_depth(check_library_size(library_size, None, dist.mu.shape[0]), self.ref_library_size_)

    def predict_rate(self, X: np.ndarray, *, groups=None, coords=None) -> np.ndarray:
        """Predicted rate (n_spots, n_genes): the NB mean at the reference depth divided by it
        (expected fraction of a spot's counts), from the image vectors alone."""
        return self._distribution_at_ref(X, groups, coords).mean / self.ref_library_size_

    def predict(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> np.ndarray:
        """NB mean (RAW counts) per spot and gene at ``library_size`` (default the reference)."""
        return self.predict_distribution(X, library_size=library_size, groups=groups, coords=coords).mean

    def predict_log1p_norm(self, X: np.ndarray, *, target_sum: float = TARGET_SUM, groups=None, coords=None):
        """``log1p(rate * target_sum)``: log1p(CP10k) of the predicted rate for 1e4."""
        return np.log1p(self.predict_rate(X, groups=groups, coords=coords) * target_sum)

    def predict_dist(
        self,
        X: np.ndarray,
        *,
        library_size: np.ndarray | float | None = None,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        n_samples: int = 0,
        random_state: int | np.random.Generator | None = None,
        groups=None,
        coords=None,
    ) -> NBPrediction:
        """The predictive NB summarised (:class:`NBPrediction`): moments, ``quantiles``, draws."""
        dist = self.predict_distribution(X, library_size=library_size, groups=groups, coords=coords)
        return NBPrediction.of(dist, quantiles, n_samples, random_state)

    def predict_outputs(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> dict[str, np.ndarray]:
        """The head's value columns (:func:`nb_outputs`)."""
        ref = self._distribution_at_ref(X, groups, coords)
        return nb_outputs(self._at_depth(ref, library_size), ref.mean / self.ref_library_size_)


class PointOutputs:
    """The outputs of a point-prediction head (the baselines): ``mean`` from its
    ``predict(X, library_size=...)`` (raw counts) and ``mean_log1p`` from its
    ``predict_log1p_norm(X)`` (its native metric-scale prediction)."""

    def predict_outputs(
        self, X: np.ndarray, *, library_size: np.ndarray | float | None = None, groups=None, coords=None
    ) -> dict[str, np.ndarray]:
        """``{"mean", "mean_log1p"}`` (see the class doc)."""
        extras = dict(groups=groups, coords=coords)
        return dict(
            mean=self.predict(X, library_size=library_size, **extras), mean_log1p=self.predict_log1p_norm(X, **extras)
        )


__all__ = ["OUTPUT_COLUMNS", "QUANTILE_LEVELS", "NBOutputs", "PointOutputs", "nb_outputs", "quantile_columns"]
