"""``predict --out``: the same files as ``infer`` for slides of the store (with or without
counts): ``<ID>.h5ad`` (AnnData; X = predicted log1p(CP10k)), ``<ID>/<gene>.png`` heatmaps
over the slide's thumbnail and ``<ID>_pseudobulk.csv``.

The spots are the slide's own (spot centres in level-0 px, tile width = the slide's spot
diameter in µm, or the model's tile width for an image-only slide's grid)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from stimage_embed.inference.grid import TileGrid
from stimage_embed.inference.infer import DEFAULT_TOP_GENES, write_outputs
from stimage_embed.inference.model import load_saved_model
from stimage_embed.inference.predict_tiles import TilePredictions
from stimage_embed.inference.pseudobulk import pseudobulk
from stimage_embed.inference.slide_from_image import read_image
from stimage_embed.predictions.runner import VALUE_COLUMNS
from stimage_embed.store.store import sql_list

if TYPE_CHECKING:
    from stimage_embed.store.store import Store


def _slide_grid(store: Store, slide_id: str, spot_ids: list[str]) -> tuple[TileGrid, dict]:
    """The slide's spots (in ``spot_ids`` order) as a :class:`TileGrid`, and its slides row."""
    where = f"slide_id IN ({sql_list([slide_id])})"
    slide = pl.from_arrow(store.read("slides", where=where)).row(0, named=True)
    cols = ["spot_id", "array_row", "array_col", "pixel_x", "pixel_y", "tissue_fraction", "passes_qc"]
    spots = pl.from_arrow(store.read("spots", cols, where=where))
    spots = pl.DataFrame({"spot_id": spot_ids}).join(spots, on="spot_id", how="left", maintain_order="left")
    tile_um = float(slide.get("spot_diameter_um") or 0) or 100.0
    grid = TileGrid(
        row=spots["array_row"].to_numpy(),
        col=spots["array_col"].to_numpy(),
        x=spots["pixel_x"].to_numpy().astype(np.float64),
        y=spots["pixel_y"].to_numpy().astype(np.float64),
        tissue_fraction=spots["tissue_fraction"].fill_null(1.0).to_numpy(),
        passes_qc=spots["passes_qc"].fill_null(True).to_numpy(),
        tile_um=tile_um,
        pitch_um=float(slide.get("spot_pitch_um") or tile_um),
        um_per_px=float(slide["um_per_px"]),
        n_rows=int(spots["array_row"].max()) + 1,
        n_cols=int(spots["array_col"].max()) + 1,
    )
    return grid, slide


def _dense(pred: pl.DataFrame, spot_ids: list[str], genes: list[str]) -> dict[str, np.ndarray]:
    """Long predictions as (spots x genes) matrices per value column (NaN where missing)."""
    row = {s: i for i, s in enumerate(spot_ids)}
    col = {g: j for j, g in enumerate(genes)}
    r = np.array([row[s] for s in pred["spot_id"].to_list()])
    c = np.array([col[g] for g in pred["gene"].to_list()])
    out = {}
    for name in VALUE_COLUMNS:
        if name in pred.columns and pred[name].null_count() < pred.height:
            mat = np.full((len(spot_ids), len(genes)), np.nan, np.float32)
            mat[r, c] = pred[name].cast(pl.Float32).fill_null(np.nan).to_numpy()
            out[name] = mat
    return out


def write_prediction_files(
    store: Store, model: str, slide_id: str, pred: pl.DataFrame, out: Path, n_top_genes: int = DEFAULT_TOP_GENES
) -> list[str]:
    """Write the AnnData, heatmaps and pseudo-bulk of one slide's predictions ``pred`` (long
    rows of the ``predictions`` table) into ``out``; returns the lines to print."""
    sm = load_saved_model(store, model)
    spot_ids = sorted(set(pred["spot_id"].to_list()))
    grid, slide = _slide_grid(store, slide_id, spot_ids)
    img = read_image(slide["image_path"], um_per_px=float(slide["um_per_px"]))
    tiles = TilePredictions(np.asarray(spot_ids, dtype=object), sm.genes, _dense(pred, spot_ids, sm.genes))
    pb = (
        pseudobulk(sm.run_id, slide_id, sm.genes, tiles.values["mean_log1p"], grid.passes_qc)
        if "mean_log1p" in tiles.values
        else None
    )
    h5ad, csv, maps = write_outputs(out, slide_id, sm, None, img, grid, tiles, pb, None, n_top_genes)
    return [f"slide {slide_id}: AnnData {h5ad}; {len(maps)} heatmaps in {out / slide_id}; pseudo-bulk {csv or '-'}"]
