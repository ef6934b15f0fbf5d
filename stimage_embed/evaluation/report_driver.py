"""Load a compare result's tables from the store and write the report folder.

Figures and per-model sections use the runs on the real vectors (``control = 'none'``);
the leaderboard shows the leak-control rows beside them, and two sections are added: the
paired comparisons of the result (mean per-slide PCC difference with a bootstrap 95 % CI,
ties where the CI covers 0; computed once, by ``compare``) and, when the shuffled control
was run, its scores next to the real ones. ``report.md`` is written once.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stimage_embed.evaluation.pseudobulk_agreement import agreement_section
from stimage_embed.evaluation.report import markdown_table, write_report
from stimage_embed.store.conform import runs_migrated
from stimage_embed.store.store import Store, sql_list


def _paired_section(paired: pl.DataFrame) -> list[str]:
    md = [
        "## Paired comparisons",
        "",
        "Every pair of models on the same (fold, test slide, gene) pairs: `diff` = mean per-slide Pearson r of "
        "`a` minus `b`, with a 95 % bootstrap CI over those pairs (2000 resamples). A CI that covers 0 is a "
        "**tie**, not a win.",
        "",
    ]
    if paired.height == 0:
        return md + ["_No pairs to compare._", ""]
    table = paired.select(
        "dataset",
        "split",
        "gene_spec",
        "a_backbone",
        "a_head",
        "b_backbone",
        "b_head",
        "n_pairs",
        "mean_a",
        "mean_b",
        "diff",
        "ci_low",
        "ci_high",
        "verdict",
    )
    return md + [markdown_table(table), ""]


def _control_section(leaderboard: pl.DataFrame) -> list[str]:
    if "control" not in leaderboard.columns or leaderboard.filter(pl.col("control") != "none").height == 0:
        return []
    keys = ["dataset", "split", "gene_spec", "backbone", "head"]
    real = leaderboard.filter(pl.col("control") == "none").select(
        *keys, pl.col("pcc_mean").alias("pcc_mean_real"), pl.col("auc_mean").alias("auc_mean_real")
    )
    ctrl = leaderboard.filter(pl.col("control") == "shuffled").select(
        *keys, pl.col("pcc_mean").alias("pcc_mean_shuffled"), pl.col("auc_mean").alias("auc_mean_shuffled")
    )
    table = real.join(ctrl, on=keys, how="inner")
    return [
        "## Leak control",
        "",
        "Each model trained and scored again on vectors permuted among the spots of each slide (train and test). "
        "A model that predicts from the image alone scores about 0 (AUC about 0.5) there.",
        "",
        markdown_table(table),
        "",
    ]


def write_compare_report(store: Store, result, out_dir: Path, top_k_genes: int = 3, max_slides: int | None = 6) -> Path:
    """Write the report folder of ``result`` (a ``compare.CompareResult``) into ``out_dir``;
    returns the path of ``report.md`` (written once, label-head section included)."""
    from stimage_embed.evaluation.label_report import label_section, write_label_report

    if not result.run_ids:  # label heads only
        return write_label_report(store, result.label_run_ids, out_dir)
    real = store.sql(
        f"SELECT run_id FROM runs WHERE run_id IN ({sql_list(result.run_ids)}) AND coalesce(control, 'none') = 'none'"
    )
    ids = sql_list(real["run_id"].to_list())
    metrics = pl.from_arrow(store.read("metrics", where=f"run_id IN ({ids})"))
    runs = pl.from_arrow(runs_migrated(store.read("runs", where=f"run_id IN ({ids})")))
    # runs are shown by what they read (the vector source, or the spanning head), as in metrics
    runs = runs.with_columns(pl.coalesce("vector_source", "backbone").alias("backbone"))
    predictions = pl.from_arrow(store.read("predictions", where=f"run_id IN ({ids})"))
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"]))
    sections = _paired_section(result.paired) + _control_section(result.leaderboard)
    sections += agreement_section(predictions, runs)
    if result.label_run_ids:
        sections += label_section(store, result.label_run_ids, Path(out_dir))
    return write_report(
        Path(out_dir),
        metrics,
        predictions,
        runs,
        spots,
        result.leaderboard,
        top_k_genes=top_k_genes,
        max_slides=max_slides,
        sections=sections,
    )
