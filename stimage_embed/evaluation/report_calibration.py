"""Calibration section of the ``compare`` report: empirical coverage of the central 50% and
90% predictive intervals (view ``coverage``) and predicted sd against the absolute error,
both in raw counts (view ``uncertainty_error``). One figure per dataset."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stimage_embed.evaluation import plots
from stimage_embed.evaluation.report_tables import (
    coverage_table,
    markdown_table,
    safe_name,
    uncertainty_error_table,
)

_HOW_TO_READ = (
    "*How to read: left, the fraction of measured counts inside each model's central 50% and 90% "
    "predictive intervals against the nominal level (on the dashed diagonal = calibrated, below = "
    "over-confident, above = under-confident)"
)
_HOW_TO_READ_ERROR = (
    "; right, spots binned by predicted sd against their mean absolute error in raw counts "
    "(a rising curve near the dashed line = the uncertainty tracks the error).*"
)


def _dataset_calibration(out_dir: Path, name: str, cov: pl.DataFrame, ue: pl.DataFrame) -> list[str]:
    """Figure ``name`` and table of one dataset (``cov``, ``ue`` without ``dataset``)."""
    plots.calibration_plot(cov, out_dir / name, ue if ue.height else None)
    table = cov.rename({"nominal": "nominal coverage", "empirical": "empirical coverage (mean)", "sd": "sd over genes"})
    return [
        f"![Calibration of predictive intervals]({name})",
        "",
        _HOW_TO_READ + (_HOW_TO_READ_ERROR if ue.height else ".*"),
        "",
        markdown_table(table),
        "",
    ]


def calibration_section(
    out_dir: Path, metrics: pl.DataFrame, predictions: pl.DataFrame, runs: pl.DataFrame
) -> list[str]:
    """Markdown of the calibration section; writes ``calibration.png`` (one dataset) or
    ``calibration_<dataset>.png`` (several) into ``out_dir`` when any model has
    ``coverage_50``/``coverage_90`` metrics."""
    md = ["## Calibration", ""]
    cov = coverage_table(metrics, runs)
    if cov.height == 0:
        return md + ["_No coverage metrics (no head with predictive quantiles)._", ""]
    models = sorted(set(cov.select("dataset", "backbone", "head").rows()))
    ue = uncertainty_error_table(predictions, runs, models)
    datasets = sorted(cov["dataset"].unique().to_list())
    for ds in datasets:
        name = "calibration.png" if len(datasets) == 1 else f"calibration_{safe_name(ds)}.png"
        if len(datasets) > 1:
            md += [f"### {ds}", ""]
        mine = pl.col("dataset") == ds
        md += _dataset_calibration(out_dir, name, cov.filter(mine).drop("dataset"), ue.filter(mine).drop("dataset"))
    return md
