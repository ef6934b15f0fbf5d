"""Expression per clinical unit (patient or slide), on one scale: log1p(CPM).

Three sources, one long table ``(unit, gene, value, n_spots, n_slides)``:

* ``measured`` — the slides' raw counts (``expression``), spots passing tissue QC:
  counts summed over every spot of every slide of the unit, divided by the unit's total
  counts over all genes, times 10^6, then log1p. A gene a slide did not measure counts 0.
* ``predicted`` — predictions from the image only: the ``pseudobulk`` table (``infer`` on
  slides without counts) and the ``predictions`` table (slides with counts, held out by
  their run). Per slide the mean predicted CP10k over its QC-passing tiles / spots; a
  unit's value is the tile-weighted mean over its slides (= the mean over all its tiles),
  times 100 (CP10k -> CPM), then log1p. Rows from several runs for one (slide, gene)
  are an error: choose the runs.
* a file — a unit x gene table (parquet or CSV; first column the unit key), already on the
  user's scale (e.g. bulk RNA-seq log CPM); taken as given.

The unit is the clinical key: ``patient`` (slides grouped by ``slides.patient``) or
``slide_id`` (every slide its own unit).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.store.store import Store, sql_list

SOURCES = ("predicted", "measured")


def _unit_sql(key_kind: str) -> str:
    if key_kind not in ("patient", "slide_id"):
        raise InputError(None, "--key", f"expected patient or slide_id, got {key_kind!r}")
    return "coalesce(s.patient, x.slide_id)" if key_kind == "patient" else "x.slide_id"


def measured_expression(store: Store, key_kind: str = "patient", slides: Sequence[str] | None = None) -> pl.DataFrame:
    """Measured pseudo-bulk per unit: log1p(CPM) of counts summed over QC-passing spots."""
    unit = _unit_sql(key_kind)
    where = f"AND e.slide_id IN ({sql_list(slides)})" if slides else ""
    return store.sql(
        f"""
        WITH x AS (
            SELECT e.slide_id, UNNEST(e.gene_index) AS gene_index, UNNEST(e.counts) AS count
            FROM expression e JOIN spots p ON p.slide_id = e.slide_id AND p.spot_id = e.spot_id
            WHERE p.passes_qc {where}),
        per_gene AS (
            SELECT {unit} AS unit, g.gene, SUM(x.count)::DOUBLE AS counts, COUNT(DISTINCT x.slide_id) AS n_slides
            FROM x JOIN genes g ON g.slide_id = x.slide_id AND g.gene_index = x.gene_index
            LEFT JOIN slides s ON s.slide_id = x.slide_id
            GROUP BY ALL),
        spots_per_unit AS (
            SELECT {unit.replace("x.", "p.")} AS unit, COUNT(*) AS n_spots
            FROM spots p LEFT JOIN slides s ON s.slide_id = p.slide_id
            WHERE p.passes_qc {where.replace("e.", "p.")} GROUP BY ALL)
        SELECT unit, gene, ln(1 + counts / SUM(counts) OVER (PARTITION BY unit) * 1e6) AS value,
               n_spots, n_slides
        FROM per_gene JOIN spots_per_unit USING (unit)
        ORDER BY unit, gene
        """
    )


def _per_slide_predicted(store: Store, runs: Sequence[str] | None) -> pl.DataFrame:
    """(run_id, slide_id, gene, cp10k, n) from ``pseudobulk`` and ``predictions``."""
    parts = []
    run_filter = f"WHERE run_id IN ({sql_list(runs)})" if runs else ""
    if store.has_table("pseudobulk"):
        parts.append(
            store.sql(
                f"""SELECT run_id, slide_id, gene, mean_cp10k AS cp10k, n_tiles::BIGINT AS n
                    FROM pseudobulk {run_filter}"""
            )
        )
    if store.has_table("predictions"):
        parts.append(
            store.sql(
                f"""SELECT run_id, slide_id, gene, AVG(exp(mean_log1p::DOUBLE) - 1) AS cp10k, COUNT(*)::BIGINT AS n
                    FROM predictions {run_filter} GROUP BY ALL"""
            )
        )
    parts = [p for p in parts if p.height]
    if not parts:
        raise InputError(None, "--run", "no predictions: run `infer` or `predict` first (or check the run ids)")
    both = pl.concat(parts, how="vertical_relaxed")
    # a slide with pseudo-bulk from infer and predictions of the same run: keep one (they agree)
    both = both.unique(["run_id", "slide_id", "gene"], keep="first")
    clash = both.group_by("slide_id", "gene").agg(pl.col("run_id").n_unique().alias("k")).filter(pl.col("k") > 1)
    if clash.height:
        sid = clash["slide_id"][0]
        rids = sorted(both.filter(pl.col("slide_id") == sid)["run_id"].unique().to_list())
        raise InputError(None, "--run", f"slide {sid} has predictions of several runs ({', '.join(rids)}); choose runs")
    return both


def predicted_expression(store: Store, key_kind: str = "patient", runs: Sequence[str] | None = None) -> pl.DataFrame:
    """Predicted pseudo-bulk per unit: log1p(100 x tile-weighted mean predicted CP10k)."""
    _unit_sql(key_kind)  # checks key_kind
    per_slide = _per_slide_predicted(store, runs)
    slides = (
        pl.from_arrow(store.read("slides", ["slide_id", "patient"]))
        if store.has_table("slides")
        else pl.DataFrame(schema={"slide_id": pl.String, "patient": pl.String})
    )
    per_slide = per_slide.join(slides, on="slide_id", how="left")
    unit = pl.coalesce("patient", "slide_id") if key_kind == "patient" else pl.col("slide_id")
    return (
        per_slide.with_columns(unit.alias("unit"))
        .group_by("unit", "gene")
        .agg(
            ((pl.col("cp10k") * pl.col("n")).sum() / pl.col("n").sum() * 100).log1p().alias("value"),
            pl.col("n").sum().alias("n_spots"),
            pl.col("slide_id").n_unique().alias("n_slides"),
        )
        .sort("unit", "gene")
    )


def file_expression(path: str | Path) -> pl.DataFrame:
    """A unit x gene table (parquet or CSV, first column the unit key) as the long table."""
    path = Path(path)
    try:
        wide = pl.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pl.read_csv(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise InputError(path, None, f"cannot read the expression table ({str(exc).splitlines()[0]})") from exc
    if wide.width < 2:
        raise InputError(path, None, "expected a key column and at least one gene column")
    key = wide.columns[0]
    bad = [c for c in wide.columns[1:] if not wide.schema[c].is_numeric()]
    if bad:
        raise InputError(path, bad[0], "gene columns must be numeric")
    if wide[key].is_duplicated().any():
        raise InputError(path, key, f"duplicate key {wide.filter(wide[key].is_duplicated())[key][0]!r}")
    return (
        wide.with_columns(pl.col(key).cast(pl.String))
        .unpivot(index=key, variable_name="gene", value_name="value")
        .rename({key: "unit"})
        .with_columns(pl.col("value").cast(pl.Float64), pl.lit(None, pl.Int64).alias("n_spots"))
        .with_columns(pl.lit(None, pl.Int64).alias("n_slides"))
    )


def unit_expression(
    store: Store, expr: str, key_kind: str = "patient", runs: Sequence[str] | None = None
) -> pl.DataFrame:
    """``expr``: ``predicted`` | ``measured`` | a path to a unit x gene table."""
    if expr == "predicted":
        return predicted_expression(store, key_kind, runs)
    if expr == "measured":
        return measured_expression(store, key_kind)
    return file_expression(expr)


def wide_matrix(long: pl.DataFrame, genes: Sequence[str] | None = None) -> pl.DataFrame:
    """The long table as units x genes (``unit`` first); genes in the given order or sorted."""
    wide = long.pivot(on="gene", index="unit", values="value").sort("unit")
    cols = list(genes) if genes is not None else sorted(c for c in wide.columns if c != "unit")
    missing = [g for g in cols if g not in wide.columns]
    if missing:
        raise InputError(None, "--genes", f"gene(s) not in the expression table: {', '.join(missing[:10])}")
    return wide.select("unit", *cols).with_columns(pl.col(c).cast(pl.Float64).fill_null(np.nan) for c in cols)
