"""DuckDB views over the evaluation tables (``metrics``, ``runs``, ``predictions``):
leaderboards, per-gene scores, per-gene wins between backbones, uncertainty against error;
and :func:`leaderboard`, the leaderboard of some runs.

:data:`SQL_VIEWS` is registered in every ``Store.sql`` session: ``store/sql.py`` names this
module among its view providers and imports it when a query needs one of its views, so
``stimage-embed query "SELECT * FROM leaderboard"`` works. Every view groups by
``dataset, split, gene_spec, control`` (from ``runs``), so runs of different splits, gene
specs or the shuffled leak control are never averaged together. NaN metric values (e.g.
the Pearson of a constant prediction) are stored as NULL and ignored by the aggregates.
Runs are labelled by ``backbone``: the vector source a run read (``runs.vector_source``:
a table, a context table or a composite ``a+b``), or the combiner of a spanning head
(``fstimage``), as ``metrics.backbone`` stores it.

The ``compare`` report computes its aggregates with this same SQL over its polars tables
(:mod:`stimage_embed.evaluation.report_tables`), so the report and a query agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from stimage_embed.predictions.runs import RUNS_STATUS

#: the filter of :data:`SCORES` keeping current runs only
CURRENT_ONLY = "WHERE NOT r.superseded"

#: metrics of current (not superseded) runs joined to their run's split and gene spec
#: (stores written before the leak control have NULL ``control``: read as 'none')
SCORES = f"""
    SELECT m.run_id, m.dataset, r.split, r.gene_spec, coalesce(m.control, 'none') AS control,
           m.backbone, m.head, m.fold, m.scope, m.slide_id, m.gene, m.metric, m.value
    FROM metrics m JOIN ({RUNS_STATUS}) r USING (run_id) {CURRENT_ONLY}
"""

_KEYS = "dataset, split, gene_spec, control"

#: per-slide Pearson rows (one per run x test slide x gene; NULL where undefined)
_PCC_SLIDE = f"SELECT * FROM ({SCORES}) WHERE metric = 'pearson' AND scope = 'slide'"

#: mean per-slide Pearson of each gene of each model over its test slides
GENE_SCORES = f"""
        SELECT {_KEYS}, backbone, head, gene, avg(value) AS pcc_mean, COUNT(value) AS slides
        FROM ({_PCC_SLIDE})
        GROUP BY ALL
        """

#: view name -> (SQL, store tables it reads)
SQL_VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    # per dataset x split x gene spec x control x backbone x head: PCC over (test slide, gene) pairs
    "leaderboard": (
        f"""
        SELECT {_KEYS}, backbone, head,
               COUNT(DISTINCT fold) AS folds,
               COUNT(DISTINCT gene) AS genes,
               median(value) FILTER (WHERE metric = 'pearson' AND scope = 'slide') AS pcc_median,
               avg(value) FILTER (WHERE metric = 'pearson' AND scope = 'slide') AS pcc_mean,
               avg(value) FILTER (WHERE metric = 'spearman' AND scope = 'slide') AS spearman_mean,
               avg(value) FILTER (WHERE metric = 'mse' AND scope = 'slide') AS mse_mean,
               avg(value) FILTER (WHERE metric = 'ccc' AND scope = 'slide') AS ccc_mean,
               avg(value) FILTER (WHERE metric = 'iou') AS iou_mean,
               avg(value) FILTER (WHERE metric = 'moran_bv') AS moran_bv_mean,
               avg(value) FILTER (WHERE metric = 'auc') AS auc_mean,
               avg(value) FILTER (WHERE metric = 'coverage_50') AS coverage_50,
               avg(value) FILTER (WHERE metric = 'coverage_90') AS coverage_90
        FROM ({SCORES})
        GROUP BY ALL
        """,
        ("metrics", "runs"),
    ),
    "leaderboard_slide": (
        f"""
        SELECT {_KEYS}, backbone, head, slide_id,
               median(value) AS pcc_median, avg(value) AS pcc_mean, COUNT(value) AS genes
        FROM ({SCORES}) WHERE metric = 'pearson' AND scope = 'slide'
        GROUP BY ALL
        """,
        ("metrics", "runs"),
    ),
    # per model: mean and median per-slide PCC over its (test slide, gene) values; how many are defined
    "model_scores": (
        f"""
        SELECT {_KEYS}, backbone, head, avg(value) AS pcc_mean, median(value) AS pcc_median,
               COUNT(value) AS pcc_defined, COUNT(*) AS pcc_values
        FROM ({_PCC_SLIDE})
        GROUP BY ALL
        """,
        ("metrics", "runs"),
    ),
    "gene_scores": (GENE_SCORES, ("metrics", "runs")),
    # genes of each model ranked by mean per-slide PCC (1 = best; ties by gene name; undefined last)
    "top_genes": (
        f"""
        SELECT {_KEYS}, backbone, head, gene, pcc_mean,
               row_number() OVER (PARTITION BY {_KEYS}, backbone, head ORDER BY pcc_mean DESC NULLS LAST, gene) AS rank
        FROM ({GENE_SCORES})
        """,
        ("metrics", "runs"),
    ),
    # empirical coverage of the central 50% / 90% predictive intervals: mean and sd over (slide, gene) values
    "coverage": (
        f"""
        SELECT {_KEYS}, backbone, head, scope,
               CAST(regexp_extract(metric, '([0-9]+)$', 1) AS DOUBLE) / 100 AS nominal,
               avg(value) AS empirical, stddev_samp(value) AS sd, COUNT(value) AS n
        FROM ({SCORES}) WHERE metric IN ('coverage_50', 'coverage_90')
        GROUP BY ALL
        """,
        ("metrics", "runs"),
    ),
    "gene_wins": (
        f"""
        WITH g AS (SELECT {_KEYS}, backbone, head, gene, avg(value) AS pcc
                   FROM ({SCORES}) WHERE metric = 'pearson' AND scope = 'slide' GROUP BY ALL)
        SELECT a.dataset, a.split, a.gene_spec, a.control, a.head, a.backbone AS backbone_a, b.backbone AS backbone_b,
               COUNT(*) FILTER (WHERE a.pcc > b.pcc) AS wins_a,
               COUNT(*) FILTER (WHERE b.pcc > a.pcc) AS wins_b,
               COUNT(*) AS genes
        FROM g a JOIN g b ON a.dataset = b.dataset AND a.split = b.split AND a.gene_spec = b.gene_spec
             AND a.control = b.control AND a.head = b.head AND a.gene = b.gene AND a.backbone < b.backbone
        GROUP BY ALL
        """,
        ("metrics", "runs"),
    ),
    # deciles of predicted sd (raw counts) per model: mean sd and mean |observed - mean| (raw counts);
    # rows without a finite, non-negative variance, a finite mean or an observed count are skipped
    "uncertainty_error": (
        f"""
        WITH p AS (
            SELECT r.dataset, r.split, r.gene_spec, coalesce(r.control, 'none') AS control,
                   coalesce(r.vector_source, r.backbone) AS backbone, r.head,
                   sqrt(CAST(p.variance AS DOUBLE)) AS sd,
                   abs(CAST(p.observed AS DOUBLE) - CAST(p.mean AS DOUBLE)) AS abs_error
            FROM predictions p JOIN ({RUNS_STATUS}) r USING (run_id)
            WHERE NOT r.superseded AND isfinite(p.variance) AND p.variance >= 0 AND isfinite(p.mean)
                  AND p.observed IS NOT NULL)
        SELECT dataset, split, gene_spec, control, backbone, head, decile, COUNT(*) AS n,
               avg(sd) AS sd_mean, avg(abs_error) AS abs_error_mean
        FROM (SELECT *, ntile(10) OVER (PARTITION BY dataset, split, gene_spec, control, backbone, head
                                        ORDER BY sd, abs_error) AS decile FROM p)
        GROUP BY ALL
        """,
        ("predictions", "runs"),
    ),
}


def leaderboard(store, run_ids: Sequence[str] | None = None) -> pl.DataFrame:
    """The leaderboard, optionally restricted to some runs."""
    sql = SQL_VIEWS["leaderboard"][0]
    if run_ids is not None:
        ids = ", ".join("'" + r + "'" for r in run_ids) or "''"
        sql = sql.replace(SCORES, SCORES.replace(CURRENT_ONLY, f"WHERE run_id IN ({ids})"))  # exactly these runs
    return store.sql(
        f"SELECT * FROM ({sql}) ORDER BY dataset, split, gene_spec, control, pcc_mean DESC NULLS LAST, head"
    )
