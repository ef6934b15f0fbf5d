"""Heads: models from cached spot embeddings to expression (numpy arrays in, arrays out).

This package works on arrays only; it never imports ``stimage_embed`` or reads slides.
Every head follows the scikit-learn estimator contract (``__init__`` stores parameters,
``fit`` returns ``self``, learned attributes end in ``_``, ``sklearn.base.clone`` works).

The head contract (every registered head; ``stimage_embed.predictions.registry`` lists them)
--------------------------------------------------------------------------------------------
* ``fit(X, y, *, groups=None, library_size=None, coords=None) -> self``: ``X`` (n_spots,
  dim) embeddings (float16/32/64); ``y`` (n_spots, n_genes) RAW integer counts (a
  classifier: binary labels from :func:`highlow_labels`). The extras are keyword-only and
  every head accepts all three, using what it needs: ``groups`` slide (or patient) label
  per spot (grouped CV / early stopping; neighbours stay within a slide); ``library_size``
  (n_spots,) total raw counts of each spot over ALL genes (pass it: the default
  ``y.sum(1)`` sums only the genes given); ``coords`` (n_spots, 2) spot centres in µm.
* ``predict_outputs(X, *, library_size=None, groups=None, coords=None) -> dict``: the ONE
  output method callers use: named (n_spots, n_genes) arrays from
  :data:`heads.outputs.OUTPUT_COLUMNS` (``mean_log1p`` from the image vectors alone;
  ``library_size`` only re-expresses count-scale columns at a depth, for coverage).
  NB heads inherit it from :class:`heads.outputs.NBOutputs` (they implement
  ``_distribution_at_ref``), point heads from :class:`heads.outputs.PointOutputs`.
* An unfitted head raises ``sklearn.exceptions.NotFittedError`` (``check_is_fitted``).
* ``spatial_context`` (class attribute, default absent = ``False``): ``True`` when a
  spot's prediction reads the other spots passed with it (neighbours), so callers pass
  whole slides at once.
* Wrappers (ensembles, context) call only public methods of the heads they wrap.

Shared convention of the regression heads
-----------------------------------------
(:class:`NBRegressor`, :class:`SeedEnsemble`, :class:`RidgeBaseline`, :class:`MeanBaseline`)

* ``ref_library_size_``: median library size of the spots passed to ``fit``.
* ``predict(X, *, library_size=None)`` -> (n_spots, n_genes) expected RAW COUNTS at
  ``library_size`` (scalar or per spot; default ``ref_library_size_``). The evaluation
  converts with ``log1p(counts / library_size * target_sum)``.
* ``predict_log1p_norm(X, *, target_sum=1e4)`` -> the same prediction on the
  log1p-normalised scale (for NB heads the log of the predicted mean; for
  ``RidgeBaseline(target="log1p_norm")`` its native output, the predicted mean of the log).
* NB heads: ``predict_distribution(X, *, library_size=None)`` -> the predictive
  :class:`NegativeBinomial` (``Var = mu + mu**2 / theta``), ``predict_rate(X)``,
  ``predict_dist(X, ...)`` -> :class:`NBPrediction`.

The classifier (:class:`HighLowClassifier`) takes binary labels from
:func:`highlow_labels` (the one high/low rule, also used by the spatial IoU) and returns
probabilities of "high".
Persistence: :func:`save_head` / :func:`load_head` (JSON + safetensors, no pickle).
"""

from heads.baselines import MeanBaseline, RidgeBaseline
from heads.classifier import HighLowClassifier, highlow_labels
from heads.context import ContextNBRegressor
from heads.distributions import NBPrediction, NegativeBinomial, nb_log_prob_log_mu
from heads.ensemble import CombinedPrediction, SeedEnsemble, Uncertainty, combine_predictions
from heads.errors import ProvenanceMismatch
from heads.nb import NBRegressor
from heads.nb_alpha import AlphaAtPathEnd
from heads.neighbours import Neighbours, find_neighbours
from heads.outputs import OUTPUT_COLUMNS, QUANTILE_LEVELS
from heads.persistence import check_provenance, load_head, save_head
from heads.scale import TARGET_SUM, log1p_normalise, log1p_to_rate, rate_to_log1p
from heads.validation_split import validation_split

__all__ = [
    "TARGET_SUM",
    "OUTPUT_COLUMNS",
    "QUANTILE_LEVELS",
    "AlphaAtPathEnd",
    "CombinedPrediction",
    "ContextNBRegressor",
    "HighLowClassifier",
    "MeanBaseline",
    "NBPrediction",
    "NBRegressor",
    "NegativeBinomial",
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
    "nb_log_prob_log_mu",
    "rate_to_log1p",
    "save_head",
    "validation_split",
]
