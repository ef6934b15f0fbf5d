"""The montage of a search: the query tile and each hit's tile, every one cut from its own
slide with the same µm window (the query's tile width), side by side in one PNG labelled
with slide, spot and distance. Tiles are shown as scanned (no stain normalisation)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.store.store import Store, sql_list
from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.window import TileGeometry, TileReader

#: side of each tile in the montage, px
TILE_PX = 160
COLUMNS = 6


@dataclass
class Montage:
    """``tiles`` uint8 (n, TILE_PX, TILE_PX, 3): the query first, then the hits in rank
    order; ``labels`` one per tile; ``tile_um`` the window width, µm; ``path`` the PNG."""

    tiles: np.ndarray
    labels: list[str]
    tile_um: float
    path: Path | None = None


def cut_tiles(store: Store, keys: pl.DataFrame, tile_um: float, out_px: int = TILE_PX) -> np.ndarray:
    """Tiles of ``tile_um`` µm centred on each (slide_id, spot_id) of ``keys``, in order,
    each cut from its slide's image at the slide's µm/px."""
    ids = keys["slide_id"].unique().to_list()
    spots = pl.from_arrow(
        store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y"], where=f"slide_id IN ({sql_list(ids)})")
    )
    slides = pl.from_arrow(
        store.read("slides", ["slide_id", "image_path", "um_per_px"], where=f"slide_id IN ({sql_list(ids)})")
    )
    rows = keys.select("slide_id", "spot_id").with_row_index("_i").join(spots, on=["slide_id", "spot_id"])
    out = np.zeros((keys.height, out_px, out_px, 3), np.uint8)
    for sid, path, umpp in slides.iter_rows():
        sel = rows.filter(pl.col("slide_id") == sid)
        with SlideImage.open(path) as img:
            reader = TileReader(img, float(umpp), TileGeometry(float(tile_um), out_px))
            tiles, _ = reader.read_many(sel["pixel_x"].to_list(), sel["pixel_y"].to_list())
        out[sel["_i"].to_numpy()] = tiles
    return out


def hit_labels(hits: pl.DataFrame) -> list[str]:
    return [f"{s}:{p}\nd={d:.3f}" for s, p, d in hits.select("slide_id", "spot_id", "distance").iter_rows()]


def write_montage(tiles: np.ndarray, labels: list[str], path: Path, title: str) -> Path:
    """A grid of ``tiles`` with ``labels`` under each, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(tiles)
    cols = min(COLUMNS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        ax = axes.ravel()[i]
        ax.imshow(tile)
        ax.set_title(label, fontsize=7, color="crimson" if i == 0 else "black")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def montage(
    store: Store,
    hits: pl.DataFrame,
    query_tile: np.ndarray | None,
    query_label: str,
    tile_um: float,
    path: Path | None = None,
) -> Montage:
    """The query tile (given, or ``None`` for a stored spot: cut from the first row of
    ``hits``' query key in ``query_label`` as ``SLIDE:SPOT``) and every hit's tile."""
    hit_tiles = cut_tiles(store, hits, tile_um)
    if query_tile is None:
        slide, _, spot = query_label.partition(":")
        query_tile = cut_tiles(store, pl.DataFrame({"slide_id": [slide], "spot_id": [spot]}), tile_um)[0]
    elif query_tile.shape[:2] != (TILE_PX, TILE_PX):
        from PIL import Image

        query_tile = np.asarray(Image.fromarray(query_tile).resize((TILE_PX, TILE_PX), Image.BICUBIC))
    tiles = np.concatenate([query_tile[None], hit_tiles])
    labels = [f"query {query_label}"] + hit_labels(hits)
    out = Montage(tiles, labels, float(tile_um))
    if path is not None:
        out.path = write_montage(tiles, labels, Path(path), f"{len(hits)} nearest spots, {tile_um:g} µm tiles")
    return out
