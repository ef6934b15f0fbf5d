"""Heads: models from cached spot embeddings to expression (numpy arrays in, arrays out).

This package works on arrays only; it never imports ``stimage_embed`` or reads slides.
Every head follows the scikit-learn estimator contract (``__init__`` stores parameters,
``fit`` returns ``self``, learned attributes end in ``_``, ``sklearn.base.clone`` works).

Shared convention of the regression heads
-----------------------------------------
(:class:`NBRegressor`, :class:`SeedEnsemble`, :class:`RidgeBaseline`, :class:`MeanBaseline`)

* ``fit(X, y, groups=None, library_size=None)``: ``X`` (n_spots, dim) embeddings
  (float16/32/64); ``y`` (n_spots, n_genes) RAW integer counts; ``groups`` slide (or
  patient) label per spot, used for grouped early stopping / grouped CV;
  ``library_size`` (n_spots,) total raw counts of each spot over ALL genes — pass it:
  the default ``y.sum(1)`` sums only the genes given.
* ``ref_library_size_``: median library size of the spots passed to ``fit``.
* ``predict(X, library_size=None)`` -> (n_spots, n_genes) expected RAW COUNTS at
  ``library_size`` (scalar or per spot; default ``ref_library_size_``). The evaluation
  converts with ``log1p(counts / library_size * target_sum)``.
* ``predict_log1p_norm(X, target_sum=1e4)`` -> the same prediction on the
  log1p-normalised scale (for NB heads the log of the predicted mean; for
  ``RidgeBaseline(target="log1p_norm")`` its native output, the predicted mean of the log).

The classifier (:class:`HighLowClassifier`) takes binary labels from
:func:`highlow_labels` and returns probabilities of "high".
Persistence: :func:`save_head` / :func:`load_head` (JSON + safetensors, no pickle).
"""

from heads.baselines import MeanBaseline, RidgeBaseline
from heads.classifier import HighLowClassifier, highlow_labels
from heads.context import ContextNBRegressor
from heads.distributions import (
    mean_disp_to_rp,
    mean_var_to_rp,
    moment_matched_theta,
    nb_expected_log1p,
    nb_log_prob,
    nb_log_prob_log_mu,
    nb_log_prob_stimage,
    nb_logpmf,
    nb_logpmf_rp,
    nb_mean,
    nb_quantiles,
    nb_quantiles_from_moments,
    nb_sample,
    nb_variance,
    rp_to_mean_disp,
    rp_to_mean_var,
    stimage_to_rp,
)
from heads.ensemble import CombinedPrediction, SeedEnsemble, Uncertainty, combine_predictions
from heads.errors import ProvenanceMismatch
from heads.nb import NBPrediction, NBRegressor
from heads.neighbours import Neighbours, find_neighbours
from heads.persistence import check_provenance, load_head, save_head
from heads.scale import TARGET_SUM, log1p_normalise, log1p_to_rate, rate_to_log1p
from heads.validation_split import validation_split

__all__ = [
    "TARGET_SUM",
    "CombinedPrediction",
    "ContextNBRegressor",
    "HighLowClassifier",
    "MeanBaseline",
    "NBPrediction",
    "NBRegressor",
    "Neighbours",
    "ProvenanceMismatch",
    "RidgeBaseline",
    "SeedEnsemble",
    "Uncertainty",
    "check_provenance",
    "combine_predictions",
    "find_neighbours",
    "highlow_labels",
    "load_head",
    "log1p_normalise",
    "log1p_to_rate",
    "moment_matched_theta",
    "nb_quantiles_from_moments",
    "rate_to_log1p",
    "mean_disp_to_rp",
    "mean_var_to_rp",
    "nb_log_prob",
    "nb_log_prob_log_mu",
    "nb_log_prob_stimage",
    "nb_logpmf",
    "nb_logpmf_rp",
    "nb_expected_log1p",
    "nb_mean",
    "nb_quantiles",
    "nb_sample",
    "nb_variance",
    "rp_to_mean_disp",
    "rp_to_mean_var",
    "save_head",
    "stimage_to_rp",
    "validation_split",
]
