"""Fit and predict any registered head on store arrays (the glue between
:class:`~stimage_embed.predictions.arrays.SpotArrays` and ``heads``).

Which head does what comes from :mod:`stimage_embed.predictions.registry`; here one fit
rule per target (counts, or high/low labels for classifiers) and one predictor per
output kind.

Predictions come back long, one row per (slide, spot, gene). The metric-scale column
``mean_log1p`` (log1p(CP10k)) is a function of the image vectors ONLY:

* NB heads: ``log1p(rate * 1e4)``, ``rate`` the predicted expected fraction of the
  spot's counts (the NB mean at the training reference depth over that depth); seed
  ensemble and FSTimage: ``log1p`` of the average of their members' rates;
* ``ridge``: its native prediction on the log1p(CP10k) scale; ``mean``: the training mean
  of log1p(CP10k).

Nothing measured on the predicted spot (counts, library size) enters it. The count-scale
columns (``mean``, ``variance``, ``epistemic``, ``aleatoric``, quantiles) are the
predictive NB expressed at the spot's observed library size when one is known (a
technical covariate, used only for interval coverage; at the training reference depth
otherwise); ``observed`` and ``library_size`` are the truth, kept for scoring.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import polars as pl

from heads import highlow_labels, log1p_normalise, nb_quantiles_from_moments, rate_to_log1p
from stimage_embed.predictions.arrays import SpotArrays
from stimage_embed.predictions.registry import head_spec

log = logging.getLogger(__name__)

#: levels of the count-scale predictive quantiles stored with NB predictions (q05 ... q95)
QUANTILES = (0.05, 0.25, 0.75, 0.95)
#: every value column of a long prediction, in the ``predictions`` table's order
VALUE_COLUMNS = ("mean", "mean_log1p", "variance", "epistemic", "aleatoric", "q05", "q25", "q75", "q95", "prob_high")


def make_head(name: str, params: dict[str, Any] | None = None) -> Any:
    """A fresh, unfitted head by name, with optional constructor parameters."""
    return head_spec(name).make(params)


def head_config(name: str, params: dict[str, Any] | None = None) -> str:
    """Every constructor parameter of the head, defaults included, as stable text: part of
    a run's id, so a change of a default recomputes instead of reusing older runs."""
    return repr(sorted(make_head(name, params).get_params(deep=True).items(), key=lambda kv: kv[0]))


def _spatial_inputs(name: str, arrays: SpotArrays) -> dict[str, Any]:
    """``groups`` and ``coords`` (µm) for heads that look at neighbouring spots."""
    if not head_spec(name).uses_coords:
        return {}
    return {"groups": arrays.groups, "coords": arrays.coords_um}


def fit_head(name: str, head: Any, arrays: SpotArrays) -> Any:
    """Fit ``head`` on the arrays' spots (groups = slides, library sizes over all genes)."""
    spec = head_spec(name)
    groups = arrays.groups
    if spec.output == "classifier":
        labels = highlow_labels(log1p_normalise(arrays.counts, arrays.library_size), groups)
        return head.fit(arrays.X, labels)
    if len(np.unique(groups)) < 2:
        log.warning("%s: a single training slide; early stopping / CV fall back to a random split of its spots", name)
        groups = None
    extra = _spatial_inputs(name, arrays)
    extra.pop("groups", None)
    return head.fit(arrays.X, arrays.counts, groups=groups, library_size=arrays.library_size, **extra)


def nb_quantile_columns(mean: np.ndarray, variance: np.ndarray) -> dict[str, np.ndarray]:
    """``q05 ... q95`` (raw counts) of the NB moment-matched to ``mean``/``variance``."""
    q = nb_quantiles_from_moments(mean, variance, QUANTILES)
    return {f"q{int(round(level * 100)):02d}": q[i].astype(np.float32) for i, level in enumerate(QUANTILES)}


def _predict_nb(head: Any, X: np.ndarray, lib: np.ndarray | None, extra: dict) -> dict:
    dist = head.predict_dist(X, library_size=lib, quantiles=QUANTILES, **extra)
    q = {f"q{int(round(level * 100)):02d}": dist.quantiles[i] for i, level in enumerate(dist.quantile_levels)}
    return dict(mean=dist.mean, variance=dist.variance, mean_log1p=rate_to_log1p(head.predict_rate(X, **extra)), **q)


def _predict_nb_ensemble(head: Any, X: np.ndarray, lib: np.ndarray | None, extra: dict) -> dict:
    unc = head.predict_uncertainty(X, library_size=lib, **extra)
    return dict(
        mean=unc.mean,
        variance=unc.total,
        epistemic=unc.epistemic,
        aleatoric=unc.aleatoric,
        mean_log1p=rate_to_log1p(head.predict_rate(X, **extra)),
        **nb_quantile_columns(unc.mean, unc.total),
    )


def _predict_classifier(head: Any, X: np.ndarray, lib: np.ndarray | None, extra: dict) -> dict:
    return dict(prob_high=head.predict_proba(X, **extra))


def _predict_log1p(head: Any, X: np.ndarray, lib: np.ndarray | None, extra: dict) -> dict:
    # baselines: the metric-scale prediction is their native output (ridge fits the log scale)
    return dict(mean=head.predict(X, library_size=lib, **extra), mean_log1p=head.predict_log1p_norm(X, **extra))


#: output kind -> (head, X, library size or None, spatial inputs) -> value columns
PREDICTORS: dict[str, Callable[[Any, np.ndarray, np.ndarray | None, dict], dict]] = {
    "nb": _predict_nb,
    "nb_ensemble": _predict_nb_ensemble,
    "classifier": _predict_classifier,
    "log1p": _predict_log1p,
}


def long_predictions(arrays: SpotArrays, genes: list[str], cols: dict[str, np.ndarray | None]) -> pl.DataFrame:
    """One row per (slide, spot, gene) with every :data:`VALUE_COLUMNS` column (null where
    the head has no such output), plus the truth ``observed``/``library_size`` (null
    without counts)."""
    n, g = len(arrays.keys), len(genes)
    data: dict[str, Any] = {
        "slide_id": np.repeat(arrays.keys["slide_id"].to_numpy(), g),
        "spot_id": np.repeat(arrays.keys["spot_id"].to_numpy(), g),
        "gene": np.tile(np.asarray(genes, dtype=object), n),
    }
    for k in VALUE_COLUMNS:
        v = cols.get(k)
        data[k] = None if v is None else np.asarray(v, dtype=np.float32).reshape(-1)
    data["observed"] = None if arrays.counts is None else arrays.counts.reshape(-1).astype(np.int32)
    data["library_size"] = None if arrays.library_size is None else np.repeat(arrays.library_size.astype(np.float32), g)
    df = pl.DataFrame({k: v for k, v in data.items() if v is not None})
    return df.with_columns(
        pl.lit(None, dtype=pl.Int32 if k == "observed" else pl.Float32).alias(k) for k, v in data.items() if v is None
    ).select(list(data))


def predict_head(name: str, head: Any, arrays: SpotArrays) -> pl.DataFrame:
    """Long predictions of a fitted head on the arrays' spots (see module docstring).

    ``arrays.counts``/``arrays.library_size`` may be ``None`` (a slide with no counts):
    the predictions do not depend on them."""
    spec = head_spec(name)
    if spec.output not in PREDICTORS:
        raise ValueError(f"{name}: a {spec.output!r} head is not predicted from vectors")
    cols = PREDICTORS[spec.output](head, arrays.X, arrays.library_size, _spatial_inputs(name, arrays))
    return long_predictions(arrays, arrays.genes, cols)
