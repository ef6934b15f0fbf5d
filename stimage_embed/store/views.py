"""DuckDB views over the evaluation tables (``metrics``, ``runs``, ``predictions``):
leaderboards, per-gene scores, per-gene wins between backbones, uncertainty against error.

They are registered in every ``Store.sql`` session (see :mod:`stimage_embed.store.sql`),
so ``stimage-embed query "SELECT * FROM leaderboard"`` works. Every view groups by
``dataset, split, gene_spec, control`` (from ``runs``), so runs of different splits, gene
specs or the shuffled leak control are never averaged together. NaN metric values (e.g.
the Pearson of a constant prediction) are stored as NULL and ignored by the aggregates.
"""

from __future__ import annotations

#: metrics joined to their run's split and gene spec (stores written before the leak
#: control have NULL ``control``: read as 'none')
SCORES = """
    SELECT m.run_id, m.dataset, r.split, r.gene_spec, coalesce(m.control, 'none') AS control,
           m.backbone, m.head, m.fold, m.scope, m.slide_id, m.gene, m.metric, m.value
    FROM metrics m JOIN runs r USING (run_id)
"""

_KEYS = "dataset, split, gene_spec, control"

#: view name -> (SQL, store tables it reads)
EVALUATION_VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
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
    "gene_scores": (
        f"""
        SELECT {_KEYS}, backbone, head, gene, avg(value) AS pcc_mean, COUNT(value) AS slides
        FROM ({SCORES}) WHERE metric = 'pearson' AND scope = 'slide'
        GROUP BY ALL
        """,
        ("metrics", "runs"),
    ),
    "top_genes": (
        f"""
        SELECT *, row_number() OVER (PARTITION BY {_KEYS}, backbone, head ORDER BY pcc_mean DESC NULLS LAST) AS rank
        FROM (SELECT {_KEYS}, backbone, head, gene, avg(value) AS pcc_mean
              FROM ({SCORES}) WHERE metric = 'pearson' AND scope = 'slide' GROUP BY ALL)
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
    "uncertainty_error": (
        """
        WITH p AS (
            SELECT r.dataset, r.split, r.gene_spec, coalesce(r.control, 'none') AS control, r.backbone, r.head,
                   sqrt(p.variance) AS sd, abs(p.observed - p.mean) AS abs_error
            FROM predictions p JOIN runs r USING (run_id)
            WHERE p.variance IS NOT NULL AND p.observed IS NOT NULL)
        SELECT dataset, split, gene_spec, control, backbone, head, decile, COUNT(*) AS n,
               avg(sd) AS sd_mean, avg(abs_error) AS abs_error_mean
        FROM (SELECT *, ntile(10) OVER (PARTITION BY dataset, split, gene_spec, control, backbone, head ORDER BY sd) AS decile FROM p)
        GROUP BY ALL
        """,
        ("predictions", "runs"),
    ),
}
