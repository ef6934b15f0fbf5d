"""Pseudo-bulk of an image-only slide: per gene, the mean prediction over its tiles that
pass tissue QC, for comparison with bulk RNA of the same block.

Columns: ``n_tiles``; ``mean_log1p`` (mean predicted log1p(CP10k)) and ``sd_log1p`` (its
standard deviation across tiles); ``mean_cp10k`` (mean of ``expm1`` of the per-tile
prediction: counts per 10^4, the linear scale bulk CPM / 100 is on). Written as a CSV and
to the store table ``pseudobulk`` (keyed by run, slide, gene; a re-run replaces its rows).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)


def pseudobulk(
    run_id: str, slide_id: str, genes: list[str], mean_log1p: np.ndarray, passes_qc: np.ndarray
) -> pl.DataFrame:
    """Per-gene pseudo-bulk of ``mean_log1p`` (tiles x genes, predicted log1p(CP10k)).

    Averages the tiles passing QC; if none does, all tiles (with a warning)."""
    rows = np.asarray(passes_qc, bool)
    if not rows.any():
        log.warning("slide %s: no tile passes tissue QC; the pseudo-bulk averages all %d tiles", slide_id, rows.size)
        rows = np.ones_like(rows)
    v = np.asarray(mean_log1p, np.float64)[rows]
    return pl.DataFrame(
        {
            "run_id": [run_id] * len(genes),
            "slide_id": [slide_id] * len(genes),
            "gene": genes,
            "n_tiles": np.full(len(genes), int(rows.sum()), np.int32),
            "mean_log1p": np.nanmean(v, axis=0),
            "sd_log1p": np.nanstd(v, axis=0),
            "mean_cp10k": np.nanmean(np.expm1(v), axis=0),
        }
    )


def write_pseudobulk_table(store: Store, table: pl.DataFrame) -> None:
    """Make ``table`` the only rows of its (run, slide) in ``pseudobulk`` (one commit)."""
    run_id, slide_id = table["run_id"][0], table["slide_id"][0]
    store.replace_where(
        "pseudobulk",
        table,
        ("run_id", "slide_id", "gene"),
        f"run_id = {sql_list([run_id])} AND slide_id = {sql_list([slide_id])}",
    )


def write_pseudobulk_csv(table: pl.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.write_csv(path)
    return path
