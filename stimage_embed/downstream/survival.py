"""Survival analysis of expression per clinical unit, on lifelines (not hand-written).

* **Univariate Cox** per gene (``lifelines.CoxPHFitter``), the gene z-scored across
  units, so the hazard ratio is per standard deviation; ``p`` is the Wald test of the
  coefficient; ``c_index`` the model's concordance on the units it was fitted to
  (Harrell's C of the gene's linear predictor, ``CoxPHFitter.concordance_index_``).
* **Multivariate Cox** on the ``n_multi`` (default 5) genes with the smallest univariate
  p. Scored by K-fold CV (default 3 folds) repeated ``n_repeats`` times (default 100,
  STimage's protocol): per fold, a Cox model fitted on the other folds (genes z-scored
  with the training folds' mean and SD) ranks the held-out units, scored by
  ``lifelines.utils.concordance_index``. ``c_index_mean`` is the mean over all folds,
  ``ci_low``/``ci_high`` the 2.5 / 97.5 percentiles of the repeats' mean c-index.
  Caveat: the genes are chosen on the whole cohort (as STimage did), which makes the CV
  estimate optimistic; ``--genes`` fixes them a priori.
* **Risk groups**: the multivariate model fitted on all units gives each a risk score
  (log partial hazard); units above the median are ``high``, the rest ``low``; compared
  by ``lifelines.statistics.logrank_test``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import polars as pl
from lifelines import CoxPHFitter
from lifelines.exceptions import ConvergenceError
from lifelines.statistics import logrank_test
from lifelines.utils import concordance_index
from sklearn.model_selection import KFold

from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

#: column names of the duration and event in the frames handed to lifelines
T, E = "_time", "_event"


@dataclasses.dataclass
class SurvivalResult:
    """Tables of one survival analysis (polars), and the log-rank test of the risk groups."""

    univariate: pl.DataFrame  # gene, n, n_events, coef, hazard_ratio, hr_low, hr_high, p, c_index
    multivariate: pl.DataFrame  # gene, coef, hazard_ratio, p, c_index_mean, ci_low, ci_high, ...
    cv: pl.DataFrame  # repeat, fold, n_test, c_index
    groups: pl.DataFrame  # unit, time, event, risk, group
    logrank: dict  # statistic, p, n_high, n_low


def survival_frame(
    expression: pl.DataFrame, clinical: pl.DataFrame, time: str, event: str, key: str = "unit"
) -> pd.DataFrame:
    """Units x (genes, ``_time``, ``_event``) for lifelines: the units with expression and
    a known time and event (others are dropped, with a log line)."""
    for col in (time, event):
        if col not in clinical.columns:
            raise InputError(None, col, f"no such clinical column (columns: {', '.join(clinical.columns)})")
    clin = clinical.select(pl.col(key).cast(pl.String).alias("unit"), pl.col(time).alias(T), pl.col(event).alias(E))
    joined = expression.join(clin, on="unit", how="inner").drop_nulls([T, E])
    dropped = expression.height - joined.height
    if dropped:
        log.info("%d unit(s) without clinical %s/%s dropped", dropped, time, event)
    if joined.height < 4 or joined[E].sum() < 2:
        raise InputError(
            None, event, f"{joined.height} unit(s) with expression and outcome, {joined[E].sum()} event(s): too few"
        )
    frame = joined.to_pandas().set_index("unit")
    frame[T] = frame[T].astype(float)
    frame[E] = frame[E].astype(int)
    return frame


#: what lifelines raises when a Cox model cannot be fitted (too few units, separation, singular)
FIT_ERRORS = (ConvergenceError, ValueError, ZeroDivisionError, np.linalg.LinAlgError)


def fit_cox(data: pd.DataFrame, penalizer: float, what: str) -> CoxPHFitter:
    """``CoxPHFitter(penalizer).fit(data)``; a failed fit is one :class:`InputError` line."""
    try:
        return CoxPHFitter(penalizer=penalizer).fit(data, duration_col=T, event_col=E)
    except FIT_ERRORS as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(None, "--genes", f"{what}: the Cox model cannot be fitted ({msg}); try --penalizer") from exc


def _enough(sub: pd.DataFrame, n_min: int, what: str) -> None:
    if len(sub) < n_min or sub[E].sum() < 2:
        raise InputError(
            None, "--genes", f"{what}: {len(sub)} unit(s), {int(sub[E].sum())} event(s) with every gene measured"
        )


def _zscore(x: pd.DataFrame, ref: pd.DataFrame | None = None) -> pd.DataFrame:
    ref = x if ref is None else ref
    sd = ref.std(ddof=0).replace(0.0, 1.0)
    return (x - ref.mean()) / sd


def univariate_cox(frame: pd.DataFrame, genes: Sequence[str], penalizer: float = 0.0) -> pl.DataFrame:
    """One Cox model per gene (z-scored): coef, hazard ratio per SD with its 95 % CI, Wald p
    and the c-index on the fitted units; sorted by p."""
    rows = []
    for g in genes:
        sub = frame[[g, T, E]].dropna()
        if len(sub) < 3 or sub[E].sum() < 1 or sub[g].std(ddof=0) == 0:
            log.info("gene %s: constant or measured on too few units; skipped", g)
            continue
        sub = sub.assign(**{g: _zscore(sub[[g]])[g]})
        cph = fit_cox(sub, penalizer, f"gene {g}")
        s = cph.summary.loc[g]
        rows.append(
            {
                "gene": g,
                "n": len(sub),
                "n_events": int(sub[E].sum()),
                "coef": float(s["coef"]),
                "hazard_ratio": float(s["exp(coef)"]),
                "hr_low": float(s["exp(coef) lower 95%"]),
                "hr_high": float(s["exp(coef) upper 95%"]),
                "p": float(s["p"]),
                "c_index": float(cph.concordance_index_),
            }
        )
    if not rows:
        raise InputError(None, "--genes", "no gene varies across the units")
    return pl.DataFrame(rows).sort("p", "gene")


def _fold_c_index(train: pd.DataFrame, test: pd.DataFrame, genes: list[str], penalizer: float) -> float:
    x_tr = _zscore(train[genes])
    x_te = _zscore(test[genes], ref=train[genes])
    try:
        cph = fit_cox(pd.concat([x_tr, train[[T, E]]], axis=1), penalizer, "CV fold")
    except InputError as exc:
        log.warning("%s: c-index NaN for this fold", exc)
        return float("nan")
    risk = cph.predict_log_partial_hazard(x_te).to_numpy()
    try:
        return float(concordance_index(test[T].to_numpy(), -risk, test[E].to_numpy()))
    except ZeroDivisionError:  # lifelines: no admissible pair in this fold
        return float("nan")


def cv_multivariate(
    frame: pd.DataFrame, genes: list[str], n_folds: int = 3, n_repeats: int = 100, seed: int = 0, penalizer: float = 0.0
) -> pl.DataFrame:
    """Held-out c-index of a Cox model on ``genes``: ``n_folds``-fold CV (shuffled with
    seeds ``seed``..``seed + n_repeats - 1``), one row per (repeat, fold)."""
    sub = frame[[*genes, T, E]].dropna()
    if len(sub) < 2 * n_folds:
        raise InputError(None, "--folds", f"{len(sub)} units with every gene measured: too few for {n_folds}-fold CV")
    rows = []
    for r in range(n_repeats):
        folds = KFold(n_folds, shuffle=True, random_state=seed + r).split(sub)
        for f, (tr, te) in enumerate(folds):
            c = _fold_c_index(sub.iloc[tr], sub.iloc[te], genes, penalizer)
            rows.append({"repeat": r, "fold": f, "n_test": len(te), "c_index": c})
    return pl.DataFrame(rows)


def risk_groups(
    frame: pd.DataFrame, genes: list[str], penalizer: float = 0.0
) -> tuple[pl.DataFrame, dict, CoxPHFitter]:
    """Median split of the all-units multivariate Cox risk score; log-rank test high vs low."""
    sub = frame[[*genes, T, E]].dropna()
    _enough(sub, 4, f"multivariate Cox on {', '.join(genes)}")
    x = _zscore(sub[genes])
    cph = fit_cox(pd.concat([x, sub[[T, E]]], axis=1), penalizer, f"multivariate Cox on {', '.join(genes)}")
    risk = cph.predict_log_partial_hazard(x).to_numpy()
    high = risk > np.median(risk)
    test = logrank_test(sub[T][high], sub[T][~high], sub[E][high], sub[E][~high])
    groups = pl.DataFrame(
        {
            "unit": [str(u) for u in sub.index],
            "time": sub[T].to_numpy(),
            "event": sub[E].to_numpy(),
            "risk": risk,
            "group": np.where(high, "high", "low"),
        }
    )
    stats = {
        "statistic": float(test.test_statistic),
        "p": float(test.p_value),
        "n_high": int(high.sum()),
        "n_low": int((~high).sum()),
    }
    return groups, stats, cph


def survival_analysis(
    frame: pd.DataFrame,
    genes: Sequence[str],
    n_multi: int = 5,
    n_folds: int = 3,
    n_repeats: int = 100,
    seed: int = 0,
    penalizer: float = 0.0,
) -> SurvivalResult:
    """Univariate Cox per gene, then the top-``n_multi`` multivariate Cox (CV c-index,
    risk groups and log-rank); see the module docstring."""
    uni = univariate_cox(frame, genes, penalizer)
    top = uni["gene"].head(n_multi).to_list()
    cv = cv_multivariate(frame, top, n_folds, n_repeats, seed, penalizer)
    groups, stats, cph = risk_groups(frame, top, penalizer)
    per_repeat = cv.group_by("repeat").agg(pl.col("c_index").fill_nan(None).mean())["c_index"].drop_nulls()
    s = cph.summary
    multi = pl.DataFrame(
        {
            "gene": top,
            "coef": s.loc[top, "coef"].to_numpy(),
            "hazard_ratio": s.loc[top, "exp(coef)"].to_numpy(),
            "p": s.loc[top, "p"].to_numpy(),
        }
    ).with_columns(
        pl.lit(float(cv["c_index"].fill_nan(None).mean())).alias("c_index_mean"),
        pl.lit(float(np.percentile(per_repeat, 2.5)) if len(per_repeat) else None).alias("ci_low"),
        pl.lit(float(np.percentile(per_repeat, 97.5)) if len(per_repeat) else None).alias("ci_high"),
        pl.lit(float(cph.concordance_index_)).alias("c_index_fitted"),
        pl.lit(n_folds).alias("n_folds"),
        pl.lit(n_repeats).alias("n_repeats"),
        pl.lit(len(groups)).alias("n_units"),
    )
    return SurvivalResult(uni, multi, cv, groups, stats)
