"""DuckDB views over ``metrics``/``runs``/``predictions``: leaderboard, per-slide
leaderboard, top genes, per-gene wins between backbones, uncertainty against error.

They are registered in every ``Store.sql`` session (see ``stimage_embed.store.sql``), so
``stimage-embed query "SELECT * FROM leaderboard"`` works. NaN metric values (e.g. the
Pearson of a constant prediction) are stored as NULL and ignored by the aggregates.
"""

from __future__ import annotations

from typing import Sequence

import polars as pl

#: view name -> (SQL, store tables it reads)
EVALUATION_VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    # per dataset x backbone x head: PCC over (test slide, gene) pairs, plus other metrics
    "leaderboard": (
        """
        SELECT dataset, backbone, head,
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
        FROM metrics
        GROUP BY ALL
        """,
        ("metrics",),
    ),
    "leaderboard_slide": (
        """
        SELECT dataset, backbone, head, slide_id,
               median(value) AS pcc_median, avg(value) AS pcc_mean, COUNT(value) AS genes
        FROM metrics WHERE metric = 'pearson' AND scope = 'slide'
        GROUP BY ALL
        """,
        ("metrics",),
    ),
    "gene_scores": (
        """
        SELECT dataset, backbone, head, gene, avg(value) AS pcc_mean, COUNT(value) AS slides
        FROM metrics WHERE metric = 'pearson' AND scope = 'slide'
        GROUP BY ALL
        """,
        ("metrics",),
    ),
    "top_genes": (
        """
        SELECT *, row_number() OVER (PARTITION BY dataset, backbone, head ORDER BY pcc_mean DESC NULLS LAST) AS rank
        FROM (SELECT dataset, backbone, head, gene, avg(value) AS pcc_mean
              FROM metrics WHERE metric = 'pearson' AND scope = 'slide' GROUP BY ALL)
        """,
        ("metrics",),
    ),
    "gene_wins": (
        """
        WITH g AS (SELECT dataset, backbone, head, gene, avg(value) AS pcc
                   FROM metrics WHERE metric = 'pearson' AND scope = 'slide' GROUP BY ALL)
        SELECT a.dataset, a.head, a.backbone AS backbone_a, b.backbone AS backbone_b,
               COUNT(*) FILTER (WHERE a.pcc > b.pcc) AS wins_a,
               COUNT(*) FILTER (WHERE b.pcc > a.pcc) AS wins_b,
               COUNT(*) AS genes
        FROM g a JOIN g b ON a.dataset = b.dataset AND a.head = b.head AND a.gene = b.gene AND a.backbone < b.backbone
        GROUP BY ALL
        """,
        ("metrics",),
    ),
    "uncertainty_error": (
        """
        WITH p AS (
            SELECT r.dataset, r.backbone, r.head, sqrt(p.variance) AS sd, abs(p.observed - p.mean) AS abs_error
            FROM predictions p JOIN runs r USING (run_id)
            WHERE p.variance IS NOT NULL)
        SELECT dataset, backbone, head, decile, COUNT(*) AS n, avg(sd) AS sd_mean, avg(abs_error) AS abs_error_mean
        FROM (SELECT *, ntile(10) OVER (PARTITION BY dataset, backbone, head ORDER BY sd) AS decile FROM p)
        GROUP BY ALL
        """,
        ("predictions", "runs"),
    ),
}


def leaderboard(store, run_ids: Sequence[str] | None = None) -> pl.DataFrame:
    """The leaderboard, optionally restricted to some runs."""
    sql = EVALUATION_VIEWS["leaderboard"][0]
    if run_ids is not None:
        ids = ", ".join("'" + r + "'" for r in run_ids) or "''"
        sql = sql.replace("FROM metrics", f"FROM metrics WHERE run_id IN ({ids})")
    return store.sql(f"SELECT * FROM ({sql}) ORDER BY dataset, pcc_median DESC NULLS LAST, head")
