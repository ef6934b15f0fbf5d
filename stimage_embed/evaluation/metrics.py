"""Per-gene metrics, vectorised over genes (no Python loop over genes).

Inputs are ``(n_spots, n_genes)`` arrays **already on the comparison scale** — usually
``normalise_log1p`` of raw counts for the truth and the head's prediction on the same
scale. Every metric returns one value per gene (column).

Undefined values are ``NaN`` (never an exception, never a RuntimeWarning):

* Pearson / Spearman: ``NaN`` if either column is constant (zero variance) or n < 2.
* Lin's CCC: ``NaN`` only when its denominator is 0 (both columns constant and equal);
  a constant prediction against a varying truth gives a finite CCC (0 if the prediction is
  constant, since the covariance is 0) — that is the point of CCC vs Pearson.
* AUC / F1: ``NaN`` if the truth column holds a single class.
* MSE / MAE / coverage: always defined for n >= 1.

Results come in long format (polars): ``gene, metric, value`` (plus ``slide_id`` and
``scope`` for the per-slide/pooled helpers), ready for a table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.stats import rankdata

from heads.scale import TARGET_SUM, log1p_normalise
from stimage_embed.errors import InputError

REGRESSION_METRICS = ("pearson", "spearman", "mse", "mae", "ccc")
POOLED = "pooled"
PER_SLIDE = "slide"

ArrayLike = np.ndarray | sp.spmatrix | sp.sparray


def normalise_log1p(counts: ArrayLike, library_size: np.ndarray, target_sum: float = TARGET_SUM) -> ArrayLike:
    """``log1p(counts / library_size * target_sum)`` per spot (row): the truth's scale.

    The one definition is :func:`heads.scale.log1p_normalise` (dense or sparse; library
    size 0 gives 0; ``library_size`` = each spot's total raw counts over ALL genes); here its
    input errors are reported as :class:`~stimage_embed.errors.InputError` naming the field.
    """
    try:
        return log1p_normalise(counts, library_size, target_sum)
    except ValueError as exc:
        field, _, msg = str(exc).partition(": ")
        raise InputError(None, field, msg) from exc


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a = y_true.toarray() if sp.issparse(y_true) else np.asarray(y_true, dtype=np.float64)
    b = y_pred.toarray() if sp.issparse(y_pred) else np.asarray(y_pred, dtype=np.float64)
    a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.shape != b.shape:
        raise InputError(None, "y_pred", f"shape {b.shape} does not match y_true {a.shape}")
    for name, arr in (("y_true", a), ("y_pred", b)):
        if not np.all(np.isfinite(arr)):
            raise InputError(None, name, "contains NaN or infinite values")
    if a.shape[0] == 0:
        raise InputError(None, "y_true", "no spots")
    return a, b


def _constant(x: np.ndarray) -> np.ndarray:
    return np.all(x == x[:1], axis=0)


def _corr_columns(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = a.shape[0]
    ac = a - a.mean(axis=0)
    bc = b - b.mean(axis=0)
    # scale first (as scipy does) to keep the product well conditioned
    with np.errstate(divide="ignore", invalid="ignore"):
        an = ac / np.linalg.norm(ac, axis=0)
        bn = bc / np.linalg.norm(bc, axis=0)
        r = np.einsum("ij,ij->j", an, bn)
    r = np.clip(r, -1.0, 1.0)
    bad = _constant(a) | _constant(b)
    if n < 2:
        bad[:] = True
    r[bad] = np.nan
    return r


def pearson(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Pearson r per gene over all given spots (pooled if they span several slides)."""
    return _corr_columns(*_pair(y_true, y_pred))


def spearman(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Spearman rho per gene: Pearson r of average ranks (ties averaged, as scipy)."""
    a, b = _pair(y_true, y_pred)
    r = _corr_columns(rankdata(a, axis=0), rankdata(b, axis=0))
    r[_constant(a) | _constant(b)] = np.nan
    return r


def mse(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Mean squared error per gene."""
    a, b = _pair(y_true, y_pred)
    return np.mean((a - b) ** 2, axis=0)


def mae(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Mean absolute error per gene."""
    a, b = _pair(y_true, y_pred)
    return np.mean(np.abs(a - b), axis=0)


def ccc(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Lin's (1989) concordance correlation coefficient per gene, population moments:
    ``2 cov / (var_true + var_pred + (mean_true - mean_pred)^2)``."""
    a, b = _pair(y_true, y_pred)
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    va, vb = a.var(axis=0), b.var(axis=0)
    cov = np.mean((a - ma) * (b - mb), axis=0)
    den = va + vb + (ma - mb) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 2.0 * cov / den
    out[den == 0] = np.nan
    return out


_REGRESSION: dict[str, Callable[[ArrayLike, ArrayLike], np.ndarray]] = {
    "pearson": pearson,
    "spearman": spearman,
    "mse": mse,
    "mae": mae,
    "ccc": ccc,
}


def _long(genes: Sequence[str], values: Mapping[str, np.ndarray]) -> pl.DataFrame:
    genes = [str(g) for g in genes]
    names = list(values)
    for m, v in values.items():
        if np.shape(v) != (len(genes),):
            raise InputError(None, "genes", f"{len(genes)} gene names for metric {m!r} of shape {np.shape(v)}")
    return pl.DataFrame(
        {
            "gene": genes * len(names),
            "metric": [m for m in names for _ in genes],
            "value": np.concatenate([np.asarray(values[m], dtype=np.float64) for m in names])
            if names
            else np.array([]),
        },
        schema={"gene": pl.String, "metric": pl.String, "value": pl.Float64},
    )


def regression_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, genes: Sequence[str], metrics: Sequence[str] = REGRESSION_METRICS
) -> pl.DataFrame:
    """Regression metrics over all given spots, long format ``gene, metric, value``.

    ``metrics`` is any subset of ``pearson, spearman, mse, mae, ccc``.
    """
    unknown = sorted(set(metrics) - set(_REGRESSION))
    if unknown:
        raise InputError(None, "metrics", f"unknown metric(s) {unknown}; known: {list(_REGRESSION)}")
    a, b = _pair(y_true, y_pred)
    return _long(genes, {m: _REGRESSION[m](a, b) for m in metrics})


def _by_slide(
    fn: Callable[..., pl.DataFrame], arrays: Sequence[ArrayLike], slide_ids: Sequence[str] | np.ndarray, **kw
) -> pl.DataFrame:
    sid = np.asarray(slide_ids).astype(str)
    n = arrays[0].shape[0]
    if sid.shape != (n,):
        raise InputError(None, "slide_id", f"{sid.shape[0]} slide ids for {n} spots")
    frames = []
    for s in sorted(set(sid.tolist())):
        m = sid == s
        sub = [x[m] if not sp.issparse(x) else sp.csr_matrix(x)[np.flatnonzero(m)] for x in arrays]
        frames.append(fn(*sub, **kw).with_columns(pl.lit(s).alias("slide_id")))
    return pl.concat(frames).select("slide_id", "gene", "metric", "value")


def per_slide_regression_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    genes: Sequence[str],
    slide_ids: Sequence[str] | np.ndarray,
    metrics: Sequence[str] = REGRESSION_METRICS,
) -> pl.DataFrame:
    """Regression metrics computed within each test slide: ``slide_id, gene, metric, value``."""
    return _by_slide(regression_metrics, (y_true, y_pred), slide_ids, genes=genes, metrics=metrics)


def evaluate_regression(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    genes: Sequence[str],
    slide_ids: Sequence[str] | np.ndarray,
    metrics: Sequence[str] = REGRESSION_METRICS,
) -> pl.DataFrame:
    """Per-slide AND pooled (all test spots together) metrics in one long table:
    ``scope`` (``"slide"`` | ``"pooled"``), ``slide_id`` (null when pooled), ``gene``,
    ``metric``, ``value``. Pooled Pearson differs from the mean of per-slide Pearson when
    slides differ in level (between-slide variation counts as signal when pooled)."""
    per = per_slide_regression_metrics(y_true, y_pred, genes, slide_ids, metrics).with_columns(
        pl.lit(PER_SLIDE).alias("scope")
    )
    pooled = regression_metrics(y_true, y_pred, genes, metrics).with_columns(
        pl.lit(POOLED).alias("scope"), pl.lit(None, dtype=pl.String).alias("slide_id")
    )
    cols = ["scope", "slide_id", "gene", "metric", "value"]
    return pl.concat([per.select(cols), pooled.select(cols)])


# ----------------------------------------------------------------------------- classifiers
def _binary(y_true: ArrayLike, y_other: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, s = _pair(y_true, y_other)
    if not np.all((t == 0) | (t == 1)):
        raise InputError(None, "y_true", "class labels must be 0/1 (1 = high)")
    return t.astype(bool), s


def roc_auc(y_true: ArrayLike, y_score: ArrayLike) -> np.ndarray:
    """ROC AUC per gene, argument order as ``sklearn.metrics.roc_auc_score(y_true, y_score)``.

    ``y_true``: 0/1 labels (1 = high); ``y_score``: predicted probability (or any score)
    of class 1. Computed as the Mann-Whitney statistic on average ranks, which equals
    sklearn's trapezoidal AUC including ties. ``NaN`` if a gene has a single class.
    """
    t, s = _binary(y_true, y_score)
    n_pos = t.sum(axis=0).astype(np.float64)
    n_neg = t.shape[0] - n_pos
    ranks = rankdata(s, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (np.where(t, ranks, 0.0).sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def f1(y_true: ArrayLike, y_label: ArrayLike) -> np.ndarray:
    """F1 of class 1 (high) per gene from 0/1 predicted labels, as
    ``sklearn.metrics.f1_score(y_true, y_label)``; ``NaN`` if the truth has a single class."""
    t, p = _binary(y_true, y_label)
    if not np.all((p == 0) | (p == 1)):
        raise InputError(None, "y_label", "predicted labels must be 0/1")
    p = p.astype(bool)
    tp = (t & p).sum(axis=0).astype(np.float64)
    fp = (~t & p).sum(axis=0)
    fn = (t & ~p).sum(axis=0)
    n_pos = t.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 2 * tp / (2 * tp + fp + fn)
    out[(n_pos == 0) | (n_pos == t.shape[0])] = np.nan
    return out


def classification_metrics(
    y_true: ArrayLike, y_score: ArrayLike, genes: Sequence[str], threshold: float = 0.5
) -> pl.DataFrame:
    """AUC (from probabilities) and F1 (labels = ``y_score > threshold``, as a fitted
    logistic model's ``predict``) per gene: ``gene, metric, value`` with metrics
    ``auc`` and ``f1``."""
    t, s = _binary(y_true, y_score)
    return _long(genes, {"auc": roc_auc(t, s), "f1": f1(t, (s > threshold).astype(np.float64))})


def per_slide_classification_metrics(
    y_true: ArrayLike,
    y_score: ArrayLike,
    genes: Sequence[str],
    slide_ids: Sequence[str] | np.ndarray,
    threshold: float = 0.5,
) -> pl.DataFrame:
    """:func:`classification_metrics` within each slide: ``slide_id, gene, metric, value``."""
    return _by_slide(classification_metrics, (y_true, y_score), slide_ids, genes=genes, threshold=threshold)


# ----------------------------------------------------------------------------- calibration
def interval_coverage(y_true: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> np.ndarray:
    """Fraction of spots per gene with ``lower <= y_true <= upper`` (bounds inclusive).

    For a discrete predictive distribution (e.g. negative binomial quantiles on counts)
    inclusive bounds make coverage >= the nominal level for a calibrated model.
    All three arrays must be on the same scale.
    """
    t, lo = _pair(y_true, lower)
    _, hi = _pair(y_true, upper)
    if np.any(lo > hi):
        raise InputError(None, "lower", "lower bound above upper bound for some spots")
    return np.mean((t >= lo) & (t <= hi), axis=0)


def coverage_metrics(
    y_true: ArrayLike, intervals: Mapping[float, tuple[ArrayLike, ArrayLike]], genes: Sequence[str]
) -> pl.DataFrame:
    """Coverage of central predictive intervals, ``gene, metric, value`` with metric
    ``coverage_<pct>`` (e.g. ``{0.5: (q25, q75), 0.9: (q05, q95)}`` gives ``coverage_50``
    and ``coverage_90``)."""
    values = {}
    for level, (lo, hi) in sorted(intervals.items()):
        if not 0 < level < 1:
            raise InputError(None, "intervals", f"interval level {level} not in (0, 1)")
        values[f"coverage_{round(level * 100):d}"] = interval_coverage(y_true, lo, hi)
    return _long(genes, values)
