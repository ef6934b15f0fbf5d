"""Load a compare result's tables from the store and write the report folder."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stimage_embed.evaluation.report import write_report
from stimage_embed.store.store import Store, sql_list


def write_compare_report(store: Store, result, out_dir: Path, top_k_genes: int = 3, max_slides: int | None = 6) -> Path:
    ids = sql_list(result.run_ids)
    metrics = pl.from_arrow(store.read("metrics", where=f"run_id IN ({ids})"))
    runs = pl.from_arrow(store.read("runs", where=f"run_id IN ({ids})"))
    predictions = pl.from_arrow(store.read("predictions", where=f"run_id IN ({ids})"))
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_report(out_dir, metrics, predictions, runs, spots, result.leaderboard, top_k_genes=top_k_genes, max_slides=max_slides)
