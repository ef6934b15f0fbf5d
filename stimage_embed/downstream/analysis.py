"""From the store (or a file) to the outputs of ``survival`` and ``response``.

Joins expression per unit (:mod:`~stimage_embed.downstream.patient_expression`) with the
``clinical`` table, chooses the genes (``genes``, else the ``top`` most variable across
the units with an outcome; unsupervised, so no outcome leaks into the choice), runs the
analysis and writes the tables (parquet), the figures (PNG) and ``summary.json`` to
``out``. Clinical rows flagged ``synthetic = 1`` mark every title and the summary as
SYNTHETIC.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.downstream.clinical_table import read_clinical
from stimage_embed.downstream.patient_expression import unit_expression, wide_matrix
from stimage_embed.downstream.response import ResponseResult, binary_labels, nested_cv_auc, roc_plot
from stimage_embed.downstream.survival import SurvivalResult, survival_analysis, survival_frame
from stimage_embed.downstream.survival_plots import km_plot
from stimage_embed.errors import InputError
from stimage_embed.store.store import Store

SYNTHETIC_NOTE = "SYNTHETIC clinical data: shows what the pipeline computes, no clinical claim"


@dataclasses.dataclass
class Cohort:
    """Units x genes with their clinical rows, and whether the clinical rows are synthetic."""

    expression: pl.DataFrame  # unit, genes...
    clinical: pl.DataFrame  # unit, clinical columns
    genes: list[str]
    synthetic: bool
    source: str


def load_cohort(
    store: Store,
    expr: str,
    key: str = "patient",
    genes: Sequence[str] | None = None,
    top: int | None = 50,
    runs: Sequence[str] | None = None,
    needed: Sequence[str] = (),
) -> Cohort:
    """Expression of the units that have a clinical row with every ``needed`` column set."""
    clin = read_clinical(store, key).with_columns(pl.col("key").alias("unit"))
    for col in needed:
        if col not in clin.columns:
            raise InputError(None, col, f"no such clinical column (columns: {', '.join(clin.columns)})")
    clin = clin.drop_nulls(list(needed))
    wide = wide_matrix(unit_expression(store, expr, key, runs))
    wide = wide.filter(pl.col("unit").is_in(clin["unit"].to_list()))
    if wide.height == 0:
        raise InputError(None, "--key", f"no unit has both expression ({expr}) and a clinical row keyed by {key}")
    cols = [c for c in wide.columns if c != "unit"]
    if genes:
        missing = [g for g in genes if g not in cols]
        if missing:
            raise InputError(None, "--genes", f"not in the expression table: {', '.join(missing[:10])}")
        chosen = list(genes)
    else:
        var = {c: float(np.nanvar(wide[c].to_numpy())) for c in cols}
        chosen = sorted(cols, key=lambda c: (-var[c], c))[: top or len(cols)]
    synthetic = "synthetic" in clin.columns and bool((clin["synthetic"].cast(pl.Float64, strict=False) == 1).any())
    return Cohort(wide.select("unit", *chosen), clin, chosen, synthetic, expr)


def _title(cohort: Cohort, what: str) -> str:
    return f"SYNTHETIC - {what}" if cohort.synthetic else what


def write_survival(result: SurvivalResult, cohort: Cohort, out: Path, by: str | None, time: str) -> dict:
    """Tables, KM figures and summary.json of a survival run in ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    result.univariate.write_parquet(out / "univariate.parquet")
    result.multivariate.write_parquet(out / "multivariate.parquet")
    result.cv.write_parquet(out / "cv.parquet")
    result.groups.write_parquet(out / "risk_groups.parquet")
    title = _title(cohort, f"median risk groups, Cox on top {result.multivariate.height} genes")
    km_plot(result.groups, out / "km_risk_groups.png", title, time)
    m = result.multivariate.row(0, named=True)
    summary = {
        "expression": cohort.source,
        "synthetic": cohort.synthetic,
        "note": SYNTHETIC_NOTE if cohort.synthetic else "",
        "units": result.groups.height,
        "events": int(result.groups["event"].sum()),
        "genes_tested": result.univariate.height,
        "best_gene": result.univariate["gene"][0],
        "best_gene_c_index": result.univariate["c_index"][0],
        "multivariate_genes": result.multivariate["gene"].to_list(),
        "cv_c_index_mean": m["c_index_mean"],
        "cv_c_index_ci": [m["ci_low"], m["ci_high"]],
        "logrank": result.logrank,
    }
    if by:
        groups = cohort.clinical.select("unit", pl.col(by).cast(pl.String).alias("group"))
        g = result.groups.drop("group").join(groups, on="unit", how="inner")
        summary["by"] = {by: km_plot(g, out / f"km_{by}.png", _title(cohort, f"by {by}"), time)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def run_survival(
    store: Store,
    expr: str,
    time: str,
    event: str,
    key: str = "patient",
    genes: Sequence[str] | None = None,
    top: int | None = 50,
    by: str | None = None,
    out: Path | None = None,
    runs: Sequence[str] | None = None,
    **options,
) -> tuple[SurvivalResult, dict]:
    """Survival analysis of ``expr`` against the clinical ``time``/``event`` columns;
    ``options`` go to :func:`~stimage_embed.downstream.survival.survival_analysis`."""
    needed = [time, event, *([by] if by else [])]
    cohort = load_cohort(store, expr, key, genes, top, runs, needed)
    frame = survival_frame(cohort.expression, cohort.clinical, time, event)
    result = survival_analysis(frame, cohort.genes, **options)
    summary = write_survival(result, cohort, out, by, time) if out is not None else {"synthetic": cohort.synthetic}
    return result, summary


def run_response(
    store: Store,
    expr: str,
    label: str,
    key: str = "patient",
    genes: Sequence[str] | None = None,
    top: int | None = 50,
    positive: str | None = None,
    out: Path | None = None,
    runs: Sequence[str] | None = None,
    **options,
) -> tuple[ResponseResult, dict]:
    """Nested-CV RBF-SVM of the clinical ``label`` on ``expr``; ``options`` go to
    :func:`~stimage_embed.downstream.response.nested_cv_auc`."""
    cohort = load_cohort(store, expr, key, genes, top, runs, [label])
    data = cohort.expression.join(cohort.clinical.select("unit", label), on="unit", how="inner")
    y = binary_labels(data[label].to_list(), positive, label)
    result = nested_cv_auc(data.select(cohort.genes).to_numpy(), y, **options)
    summary = {
        "expression": cohort.source,
        "synthetic": cohort.synthetic,
        "note": SYNTHETIC_NOTE if cohort.synthetic else "",
        "label": label,
        "units": data.height,
        "positives": int(y.sum()),
        "genes": len(cohort.genes),
        "auc_per_fold": result.folds["auc"].to_list(),
        "auc_mean": result.auc_mean,
        "auc_sd": result.auc_sd,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        result.folds.write_parquet(out / "response_folds.parquet")
        roc_plot(result, out / "roc.png", _title(cohort, f"{label}: RBF-SVM"))
        (out / "response_summary.json").write_text(json.dumps(summary, indent=2))
    return result, summary
