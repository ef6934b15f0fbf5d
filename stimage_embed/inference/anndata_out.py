"""AnnData of tile predictions, laid out the way scanpy (``sc.pl.spatial``) and squidpy
read Visium data.

* ``X``: predicted log1p(CP10k) (``mean_log1p``), tiles x genes, float32; for a
  classifier head (no expression scale) ``X`` is the probability of "high".
* ``layers``: every other prediction column the head filled (``variance``,
  ``epistemic``, ``aleatoric``, quantiles on the count scale, ``prob_high``, ``mean``).
* ``obs`` (index = tile key ``"{col}x{row}"``): ``slide_id``, ``array_row``/``array_col``
  (grid indices), ``tissue_fraction``, ``passes_qc``, ``pixel_x``/``pixel_y`` (level-0 px).
* ``obsm['spatial']``: tile centres, level-0 px, columns (x, y).
* ``uns['spatial'][slide_id]``: ``images['hires']`` (the thumbnail, uint8 RGB) and
  ``scalefactors`` (``tissue_hires_scalef`` = thumbnail px per level-0 px,
  ``spot_diameter_fullres`` = tile width in level-0 px), plus ``metadata``.
* ``uns['stimage_embed']``: model run id, backbone, head, provenance id, tile and pitch µm,
  µm/px, what ``X`` holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from stimage_embed.inference.grid import TileGrid
from stimage_embed.inference.predict_tiles import TilePredictions


def build_anndata(
    slide_id: str, grid: TileGrid, pred: TilePredictions, thumbnail: np.ndarray, downsample: float, info: dict[str, Any]
) -> ad.AnnData:
    """The AnnData described in the module docstring (rows in ``grid`` order)."""
    values = dict(pred.values)
    x_name = "mean_log1p" if "mean_log1p" in values else "prob_high"
    X = values.pop(x_name)
    obs = pd.DataFrame(
        {
            "slide_id": pd.Categorical([slide_id] * len(grid)),
            "array_row": grid.row.astype(np.int32),
            "array_col": grid.col.astype(np.int32),
            "tissue_fraction": grid.tissue_fraction.astype(np.float32),
            "passes_qc": grid.passes_qc.astype(bool),
            "pixel_x": grid.x.astype(np.float64),
            "pixel_y": grid.y.astype(np.float64),
        },
        index=pd.Index(pred.spot_ids.astype(str), name="spot_id"),
    )
    var = pd.DataFrame(index=pd.Index(pred.genes, name="gene"))
    adata = ad.AnnData(
        X=np.asarray(X, np.float32), obs=obs, var=var, layers={k: np.asarray(v, np.float32) for k, v in values.items()}
    )
    adata.obsm["spatial"] = np.column_stack([grid.x, grid.y]).astype(np.float64)
    adata.uns["spatial"] = {
        slide_id: {
            "images": {"hires": np.ascontiguousarray(thumbnail, dtype=np.uint8)},
            "scalefactors": {
                "tissue_hires_scalef": float(1.0 / downsample),
                "spot_diameter_fullres": float(grid.tile_px),
            },
            "metadata": {"source_image_path": str(info.get("image_path", "")), "um_per_px": float(grid.um_per_px)},
        }
    }
    adata.uns["stimage_embed"] = {
        **{k: v for k, v in info.items() if v is not None},
        "X": x_name,
        "tile_um": grid.tile_um,
        "pitch_um": grid.pitch_um,
        "um_per_px": grid.um_per_px,
    }
    return adata


def write_anndata(adata: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path, compression="gzip")
    return path
