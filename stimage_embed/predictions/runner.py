"""Fit and predict any registered head on store arrays (the glue between
:class:`~stimage_embed.predictions.arrays.SpotArrays` and ``heads``).

Every head follows one contract (``heads`` package doc): ``fit(X, y, *, groups,
library_size, coords)`` and ``predict_outputs(X, *, library_size, groups, coords)``, so
this module has one fit rule per target (counts, or high/low labels for classifiers)
and one prediction call for every head.

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
from typing import Any

import numpy as np
import polars as pl

from heads import OUTPUT_COLUMNS, QUANTILE_LEVELS, highlow_labels, log1p_normalise
from stimage_embed.predictions.arrays import SpotArrays
from stimage_embed.predictions.registry import head_spec

log = logging.getLogger(__name__)

#: levels of the count-scale predictive quantiles stored with NB predictions (q05 ... q95)
QUANTILES = QUANTILE_LEVELS
#: every value column of a long prediction, in the ``predictions`` table's order
VALUE_COLUMNS = OUTPUT_COLUMNS


def make_head(name: str, params: dict[str, Any] | None = None) -> Any:
    """A fresh, unfitted head by name, with optional constructor parameters."""
    return head_spec(name).make(params)


def head_config(name: str, params: dict[str, Any] | None = None) -> str:
    """Every constructor parameter of the head, defaults included, as stable text: part of
    a run's id, so a change of a default recomputes instead of reusing older runs."""
    return repr(sorted(make_head(name, params).get_params(deep=True).items(), key=lambda kv: kv[0]))


def fit_head(name: str, head: Any, arrays: SpotArrays) -> Any:
    """Fit ``head`` on the arrays' spots (groups = slides, library sizes over all genes,
    spot centres in µm); a classifier on the high/low labels of :func:`heads.highlow_labels`."""
    groups = arrays.groups
    target = arrays.counts
    if head_spec(name).output == "classifier":
        target = highlow_labels(log1p_normalise(arrays.counts, arrays.library_size), groups)
    elif len(np.unique(groups)) < 2:
        log.warning("%s: a single training slide; early stopping / CV fall back to a random split of its spots", name)
        groups = None
    return head.fit(arrays.X, target, groups=groups, library_size=arrays.library_size, coords=arrays.coords_um)


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
    the metric-scale predictions do not depend on them."""
    spec = head_spec(name)
    if spec.build is None:
        raise ValueError(f"{name}: a {spec.output!r} head is not predicted from vectors")
    cols = head.predict_outputs(
        arrays.X, library_size=arrays.library_size, groups=arrays.groups, coords=arrays.coords_um
    )
    return long_predictions(arrays, arrays.genes, cols)
