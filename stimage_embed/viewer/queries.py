"""What the viewer reads from the store: slides, runs, a run's genes, a run's values for one
slide and gene. DuckDB SQL over the store's tables, registered by
:func:`stimage_embed.store.sql.register_table` (half-float vectors cast as everywhere else);
every id is a bound parameter (``?``), never part of the SQL text.

Each query opens the tables at their latest committed Lance version, so a reply is one
consistent snapshot per table even while another process writes to the store.

Units: ``pixel_x``/``pixel_y`` are level-0 image px (spot centres); ``predicted`` is the
predicted log1p(CP10k) (``predictions.mean_log1p``); ``measured`` is the observed
log1p(count / library size * 1e4) kept with the prediction (NULL where the slide has no
counts); ``epistemic`` is the between-member variance of the predicted count-scale mean
(counts^2); ``prob_high`` is the classifier's P(high) in [0, 1].

Leiden clusters are read, when present, from a table ``clusters`` with columns
``slide_id``, ``spot_id`` and ``leiden`` (or ``cluster``), and optionally ``run_id``
(then only the run's rows are used). Without it the cluster layer is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import polars as pl

from stimage_embed.store.schema_labels import LABEL_PREDICTIONS_TABLE
from stimage_embed.store.sql import register_table
from stimage_embed.store.store import Store

CLUSTER_TABLE = "clusters"
#: (table of a run's per-spot rows, the run's kind)
RUN_KINDS = (("predictions", "expression"), (LABEL_PREDICTIONS_TABLE, "label"))
CLUSTER_COLUMNS = ("leiden", "cluster")


class NotFound(LookupError):
    """An id the store does not hold (the app answers 404 with this message)."""


def run_query(store: Store, tables: Sequence[str], sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
    """Run ``sql`` with ``params`` bound, the store tables ``tables`` registered under their names."""
    con = duckdb.connect()
    try:
        for name in tables:
            register_table(con, name, store.dataset(name))
        return con.sql(sql, params=list(params)).pl()
    finally:
        con.close()


def slides(store: Store) -> list[dict]:
    """Every slide: id, dataset, patient, image size (px), µm per px, spot diameter (µm), has_counts."""
    if not store.has_table("slides"):
        return []
    df = run_query(
        store,
        ["slides"],
        """SELECT slide_id, dataset, patient, n_spots, image_width, image_height, um_per_px, spot_diameter_um,
                  coalesce(total_counts, 0) > 0 AS has_counts
           FROM slides ORDER BY dataset, slide_id""",
    )
    return df.to_dicts()


def slide(store: Store, slide_id: str) -> dict:
    """One slide's row (with ``image_path``); :class:`NotFound` if the store lacks it."""
    if store.has_table("slides"):
        df = run_query(
            store,
            ["slides"],
            """SELECT slide_id, dataset, patient, image_path, image_width, image_height, um_per_px,
                      spot_diameter_um, coalesce(total_counts, 0) > 0 AS has_counts
               FROM slides WHERE slide_id = ?""",
            [slide_id],
        )
        if df.height:
            return df.row(0, named=True)
    raise NotFound(f"unknown slide {slide_id!r}")


def runs(store: Store) -> list[dict]:
    """Runs with predictions: id, head, backbone, gene spec, number of genes, predicted slides,
    and ``kind``: ``expression`` (rows in ``predictions``) or ``label`` (rows in
    ``label_predictions``: a label head, whose "genes" are its classes)."""
    parts = [
        f"SELECT run_id, list(DISTINCT slide_id ORDER BY slide_id) AS slides, '{kind}' AS kind FROM {table} "
        "GROUP BY run_id"
        for table, kind in RUN_KINDS
        if store.has_table(table)
    ]
    if not (store.has_table("runs") and parts):
        return []
    df = run_query(
        store,
        ["runs", *(t for t, _ in RUN_KINDS if store.has_table(t))],
        f"""WITH p AS ({" UNION ALL ".join(parts)})
           SELECT r.run_id, r.dataset, coalesce(r.vector_source, r.backbone) AS backbone, r.head, r.split,
                  r.fold, r.gene_spec,
                  len(r.genes) AS n_genes, p.slides, strftime(r.created_at, '%Y-%m-%dT%H:%M:%SZ') AS created_at,
                  p.kind
           FROM runs r JOIN p USING (run_id) ORDER BY r.created_at DESC, r.run_id""",
    )
    return df.to_dicts()


def run_genes(store: Store, run_id: str) -> list[str]:
    """The genes a run predicts, in the run's order; :class:`NotFound` for an unknown run."""
    if store.has_table("runs"):
        df = run_query(store, ["runs"], "SELECT genes FROM runs WHERE run_id = ? LIMIT 1", [run_id])
        if df.height:
            return list(df["genes"][0])
    raise NotFound(f"unknown run {run_id!r}")


def cluster_column(store: Store) -> tuple[str, bool] | None:
    """(cluster column, has run_id) of the ``clusters`` table, or None without one."""
    if not store.has_table(CLUSTER_TABLE):
        return None
    names = store.dataset(CLUSTER_TABLE).schema.names
    if not {"slide_id", "spot_id"} <= set(names):
        return None
    for col in CLUSTER_COLUMNS:
        if col in names:
            return col, "run_id" in names
    return None


def values(store: Store, run_id: str, slide_id: str, gene: str) -> pl.DataFrame:
    """One row per predicted spot of ``slide_id``: spot_id, pixel_x, pixel_y (level-0 px),
    predicted, measured, epistemic, prob_high, cluster (see the module doc for units).
    :class:`NotFound` for an unknown run, slide or gene, or a slide the run did not predict."""
    slide(store, slide_id)
    if gene not in run_genes(store, run_id):
        raise NotFound(f"unknown gene {gene!r} for run {run_id!r}")
    clusters = cluster_column(store)
    tables = ["predictions", "spots"]
    cluster_sql, join_sql, params = "NULL::VARCHAR AS cluster", "", [run_id, slide_id, gene]
    if clusters:
        col, by_run = clusters
        tables.append(CLUSTER_TABLE)
        cluster_sql = f"CAST(c.{col} AS VARCHAR) AS cluster"
        run_cond = " AND c.run_id = ?" if by_run else ""
        join_sql = f"LEFT JOIN {CLUSTER_TABLE} c ON c.slide_id = p.slide_id AND c.spot_id = p.spot_id{run_cond}"
        params = ([run_id] if by_run else []) + params
    df = run_query(
        store,
        tables,
        f"""SELECT p.spot_id, s.pixel_x, s.pixel_y,
                   CAST(p.mean_log1p AS DOUBLE) AS predicted,
                   CASE WHEN p.observed IS NULL OR NOT p.library_size > 0 THEN NULL
                        ELSE ln(1 + p.observed / p.library_size * 1e4) END AS measured,
                   CAST(p.epistemic AS DOUBLE) AS epistemic, CAST(p.prob_high AS DOUBLE) AS prob_high,
                   {cluster_sql}
            FROM predictions p JOIN spots s ON s.slide_id = p.slide_id AND s.spot_id = p.spot_id
            {join_sql}
            WHERE p.run_id = ? AND p.slide_id = ? AND p.gene = ?
            ORDER BY p.spot_id""",
        params,
    )
    if df.height == 0:
        raise NotFound(f"run {run_id!r} has no predictions for slide {slide_id!r}")
    return df
