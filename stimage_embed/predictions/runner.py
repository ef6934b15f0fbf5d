"""Head registry and the fit/predict glue between store arrays and ``heads``.

Heads are named: ``nb`` (NBRegressor: linear NB GLM, L2 by CV grouped by slide),
``ensemble`` (SeedEnsemble of 5 bootstrapped NBRegressors sharing that CV), ``highlow``
(elastic-net HighLowClassifier), ``ridge`` (RidgeBaseline, alpha by CV grouped by slide),
``mean`` (MeanBaseline). ``fstimage`` is not a single-backbone head: it combines the
``nb`` predictions of several backbones (see ``combine_backbones``).

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
from scipy import stats

from heads import (
    HighLowClassifier,
    MeanBaseline,
    NBRegressor,
    RidgeBaseline,
    SeedEnsemble,
    combine_predictions,
    highlow_labels,
)
from stimage_embed.errors import InputError
from stimage_embed.predictions.arrays import SpotArrays

log = logging.getLogger(__name__)

TARGET_SUM = 1e4
SINGLE_BACKBONE_HEADS = ("nb", "ensemble", "highlow", "ridge", "mean")
ALL_HEADS = SINGLE_BACKBONE_HEADS + ("fstimage",)
QUANTILES = (0.05, 0.25, 0.75, 0.95)


def make_head(name: str, params: dict[str, Any] | None = None) -> Any:
    """A fresh, unfitted head by name, with optional constructor parameters."""
    params = dict(params or {})
    if name == "nb":
        return NBRegressor(**params)
    if name == "ensemble":
        n = params.pop("n_members", 5)
        params.setdefault("bootstrap", True)
        return SeedEnsemble(NBRegressor(**params), n_members=n)
    if name == "highlow":
        params.setdefault("n_jobs", -1)  # genes fit in parallel threads (saga releases the GIL)
        return HighLowClassifier(**params)
    if name == "ridge":
        return RidgeBaseline(**params)
    if name == "mean":
        return MeanBaseline(**params)
    raise InputError(None, "--head", f"unknown head {name!r}; choose from {', '.join(ALL_HEADS)}")


def head_config(name: str, params: dict[str, Any] | None = None) -> str:
    """Every constructor parameter of the head, defaults included, as stable text: part of
    a run's id, so a change of a default recomputes instead of reusing older runs."""
    return repr(sorted(make_head(name, params).get_params(deep=True).items(), key=lambda kv: kv[0]))


def log1p_norm(counts: np.ndarray, library_size: np.ndarray) -> np.ndarray:
    lib = np.where(library_size > 0, library_size, 1.0)[:, None]
    return np.log1p(np.asarray(counts, dtype=np.float64) / lib * TARGET_SUM)


def fit_head(name: str, head: Any, arrays: SpotArrays) -> Any:
    """Fit ``head`` on the arrays' spots (groups = slides, library sizes over all genes)."""
    groups = arrays.groups
    if len(np.unique(groups)) < 2 and name != "highlow":
        log.warning("%s: a single training slide; early stopping / CV fall back to a random split of its spots", name)
        groups = None
    if name == "highlow":
        labels = highlow_labels(log1p_norm(arrays.counts, arrays.library_size), groups)
        return head.fit(arrays.X, labels)
    return head.fit(arrays.X, arrays.counts, groups=groups, library_size=arrays.library_size)


def _moment_theta(mean: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """Dispersion of the NB with this mean and variance (near-Poisson if var <= mean)."""
    excess = np.maximum(variance - mean, 1e-9 * np.maximum(mean, 1e-12))
    return np.maximum(mean, 1e-12) ** 2 / excess


def _nb_quantiles(mean: np.ndarray, variance: np.ndarray) -> dict[str, np.ndarray]:
    """Quantiles of the NB with this mean and variance (moment-matched)."""
    r = _moment_theta(mean, variance)
    p = r / (r + mean)
    return {f"q{int(round(q * 100)):02d}": stats.nbinom.ppf(q, r, p).astype(np.float32) for q in QUANTILES}


def rate_to_log1p(rate: np.ndarray) -> np.ndarray:
    """Metric-scale prediction from a predicted rate (fraction of a spot's counts):
    ``log1p(rate * 1e4)``, log1p(CP10k)."""
    return np.log1p(np.asarray(rate, dtype=np.float64) * TARGET_SUM)


def _long(arrays: SpotArrays, genes: list[str], cols: dict[str, np.ndarray | None]) -> pl.DataFrame:
    n, g = len(arrays.keys), len(genes)
    data: dict[str, Any] = {
        "slide_id": np.repeat(arrays.keys["slide_id"].to_numpy(), g),
        "spot_id": np.repeat(arrays.keys["spot_id"].to_numpy(), g),
        "gene": np.tile(np.asarray(genes, dtype=object), n),
    }
    for k, v in cols.items():
        data[k] = None if v is None else np.asarray(v, dtype=np.float32).reshape(-1)
    data["observed"] = None if arrays.counts is None else arrays.counts.reshape(-1).astype(np.int32)
    data["library_size"] = None if arrays.library_size is None else np.repeat(arrays.library_size.astype(np.float32), g)
    df = pl.DataFrame({k: v for k, v in data.items() if v is not None})
    for k, v in data.items():
        if v is None:
            df = df.with_columns(pl.lit(None, dtype=pl.Int32 if k == "observed" else pl.Float32).alias(k))
    return df


def predict_head(name: str, head: Any, arrays: SpotArrays) -> pl.DataFrame:
    """Long predictions of a fitted head on the arrays' spots (see module docstring).

    ``arrays.counts``/``arrays.library_size`` may be ``None`` (a slide with no counts):
    the predictions do not depend on them."""
    X, lib = arrays.X, arrays.library_size
    genes = arrays.genes
    empty = {"mean": None, "mean_log1p": None, "variance": None, "epistemic": None, "aleatoric": None,
             "q05": None, "q25": None, "q75": None, "q95": None, "prob_high": None}
    if name == "highlow":
        cols = dict(empty, prob_high=head.predict_proba(X))
        return _long(arrays, genes, cols)
    if name == "ensemble":
        unc = head.predict_uncertainty(X, library_size=lib)
        mean, var = unc.mean, unc.total
        cols = dict(empty, mean=mean, variance=var, epistemic=unc.epistemic, aleatoric=unc.aleatoric, **_nb_quantiles(mean, var))
        cols["mean_log1p"] = rate_to_log1p(head.predict_rate(X))
    elif name == "nb":
        dist = head.predict_dist(X, library_size=lib, quantiles=QUANTILES)
        q = {f"q{int(round(l * 100)):02d}": dist.quantiles[i] for i, l in enumerate(dist.quantile_levels)}
        cols = dict(empty, mean=dist.mean, variance=dist.variance, **q)
        cols["mean_log1p"] = rate_to_log1p(head.predict_rate(X))
    else:
        # baselines: the metric-scale prediction is their native output (ridge fits the log scale)
        cols = dict(empty, mean=head.predict(X, library_size=lib), mean_log1p=head.predict_log1p_norm(X))
    return _long(arrays, genes, cols)


def _wide(df: pl.DataFrame, column: str, genes: list[str]) -> pl.DataFrame:
    return df.pivot(on="gene", index=["slide_id", "spot_id"], values=column).sort("slide_id", "spot_id").select("slide_id", "spot_id", *genes)


def combine_backbones(per_backbone: dict[str, pl.DataFrame], missing: str = "error") -> pl.DataFrame:
    """FSTimage: average the ``nb`` predictions of several backbones, aligned by (slide, spot).

    Metric scale: ``mean_log1p = log1p(average of the backbones' rates * 1e4)`` (each
    backbone's rate is ``expm1(mean_log1p) / 1e4``), from the image vectors only. Count
    scale (coverage only), via :func:`heads.combine_predictions`: ``mean`` = average of the
    backbones' NB means, ``epistemic`` = between-backbone variance of the means,
    ``aleatoric`` = mean of the backbones' NB variances, ``variance`` = their sum.
    ``missing``: "error" | "drop" | "available" for spots absent from some backbone.
    """
    genes = None
    wide, rates = {}, {}
    for bb, df in per_backbone.items():
        g = df["gene"].unique(maintain_order=True).to_list()
        if genes is not None and sorted(g) != sorted(genes):
            raise InputError(None, "fstimage", f"backbone {bb!r} was predicted on other genes than {list(per_backbone)[0]!r}")
        genes = genes or g
        m, v, r = (_wide(df, c, genes) for c in ("mean", "variance", "mean_log1p"))
        keys = m.select("slide_id", "spot_id").to_numpy()
        wide[bb] = (keys, m.select(genes).to_numpy(), v.select(genes).to_numpy())
        rates[bb] = (keys, np.expm1(r.select(genes).to_numpy().astype(np.float64)) / TARGET_SUM)
    try:
        comb = combine_predictions(wide, missing=missing)
        rate = combine_predictions(rates, missing=missing)
    except ValueError as exc:
        raise InputError(None, "--missing", str(exc)) from exc
    truth = (
        pl.concat([df.select("slide_id", "spot_id", "observed", "library_size").unique(["slide_id", "spot_id"]) for df in per_backbone.values()])
        .unique(["slide_id", "spot_id"])
    )
    keys = pl.DataFrame({"slide_id": comb.keys[:, 0].astype(str), "spot_id": comb.keys[:, 1].astype(str)})
    lib = keys.join(truth, on=["slide_id", "spot_id"], how="left", maintain_order="left")["library_size"]
    has_truth = lib.null_count() == 0
    counts = None
    if has_truth:
        obs = keys.join(
            pl.concat([df.select("slide_id", "spot_id", "gene", "observed") for df in per_backbone.values()]).unique(["slide_id", "spot_id", "gene"])
            .pivot(on="gene", index=["slide_id", "spot_id"], values="observed"),
            on=["slide_id", "spot_id"], how="left", maintain_order="left",
        )
        counts = obs.select(genes).to_numpy().astype(np.int64)
    arrays = SpotArrays(keys=keys, X=np.zeros((len(keys), 0), np.float32), counts=counts,
                        library_size=lib.to_numpy().astype(np.float64) if has_truth else None, genes=genes, provenance={})
    alea = comb.aleatoric if comb.aleatoric is not None else np.zeros_like(comb.mean)
    var = comb.spread + alea
    cols = {"mean": comb.mean, "mean_log1p": rate_to_log1p(rate.mean), "variance": var, "epistemic": comb.spread,
            "aleatoric": alea, **_nb_quantiles(comb.mean, var), "prob_high": None}
    return _long(arrays, genes, cols)
