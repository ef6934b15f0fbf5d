"""Predictions of a saved model on the tiles of an image-only slide, in chunks.

The slide's vectors are scanned from ``embeddings_<backbone>`` a chunk at a time (never the
whole table), predicted with :func:`stimage_embed.predictions.runner.predict_head` on
:class:`SpotArrays` without counts or library sizes (image-only prediction), appended to
the ``predictions`` table chunk by chunk, and gathered into dense ``(tiles, genes)``
float32 matrices (one per prediction column) for the AnnData, heatmaps and pseudo-bulk.
The model's rows for the slide are deleted first, so a re-run replaces them; call it under
the store's writer lock (a run killed midway leaves some chunks, which a re-run replaces).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from stimage_embed.embeddings.provenance import VectorProvenance, describe, existing_provenance
from stimage_embed.errors import ProvenanceError, StoreError
from stimage_embed.inference.model import SavedModel
from stimage_embed.predictions.arrays import SpotArrays
from stimage_embed.predictions.runner import VALUE_COLUMNS, predict_head
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

#: prediction columns gathered as (tiles, genes) matrices when the head fills them
#: long prediction rows per chunk (tiles per chunk = this / genes, at least 64)
ROWS_PER_CHUNK = 400_000


@dataclass
class TilePredictions:
    """Dense predictions on the slide's tiles, rows in ``spot_ids`` order.

    ``values[col]``: ``(n_tiles, n_genes)`` float32 (``mean_log1p``: predicted
    log1p(CP10k); ``mean``/``variance``/quantiles on the head's count scale; ``prob_high``
    for classifiers); only columns the head filled. ``rows_written``: long rows appended.
    """

    spot_ids: np.ndarray
    genes: list[str]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    rows_written: int = 0


def check_vector_provenance(store: Store, sm: SavedModel, slide_id: str) -> None:
    """The slide's vectors must carry the model's training provenance."""
    table = sm.source.table
    pids = set(
        store.read(table, ["provenance_id"], where=f"slide_id IN ({sql_list([slide_id])})")["provenance_id"].to_pylist()
    )
    records = {p.id: p for p in map(VectorProvenance.of, existing_provenance(store, table))}
    for pid in pids:
        diff = sm.identity.differences(records.get(pid) or VectorProvenance.of({}))
        if diff:
            raise ProvenanceError(
                f"{sm.path}: the vectors of slide {slide_id!r} differ from the model's training vectors: "
                f"provenance mismatch: {describe(diff, 'model', 'vectors')}"
            )


def predict_slide_tiles(store: Store, sm: SavedModel, slide_id: str, keys: pl.DataFrame) -> TilePredictions:
    """Predict every tile of ``slide_id`` in ``keys`` (columns slide_id, spot_id, patient,
    array_row, array_col, pixel_x, pixel_y); writes the model's rows of ``predictions``."""
    genes = sm.genes
    table = sm.source.table
    check_vector_provenance(store, sm, slide_id)
    row_of = {s: i for i, s in enumerate(keys["spot_id"].to_list())}
    n, g = keys.height, len(genes)
    col_of = {x: j for j, x in enumerate(genes)}
    out = TilePredictions(keys["spot_id"].to_numpy(), genes)
    seen = np.zeros(n, bool)
    store.delete("predictions", f"run_id = {sql_list([sm.run_id])} AND slide_id = {sql_list([slide_id])}")
    chunk = max(64, ROWS_PER_CHUNK // max(g, 1))
    if getattr(sm.head, "spatial_context", False):
        # a context head reads each tile's neighbours: the slide's vectors in one batch, and
        # the tile centres in µm (``SpotArrays.coords_um``)
        chunk = max(n, 1)
        um = store.read("slides", ["um_per_px"], where=f"slide_id IN ({sql_list([slide_id])})")["um_per_px"].to_pylist()
        keys = keys.with_columns(pl.lit(float(um[0]) if um else None, dtype=pl.Float64).alias("um_per_px"))
    scanner = store.dataset(table).to_batches(
        columns=["slide_id", "spot_id", "vector"], filter=f"slide_id IN ({sql_list([slide_id])})", batch_size=chunk
    )
    for batch in scanner:
        if batch.num_rows == 0:
            continue
        ids = batch.column("spot_id").to_pylist()
        rows = np.array([row_of.get(s, -1) for s in ids])
        sel = rows >= 0  # vectors of tiles no longer in the grid are ignored
        if not sel.any():
            continue
        vec = batch.column("vector")
        dim = vec.type.list_size
        X = vec.values.to_numpy(zero_copy_only=False).reshape(-1, dim)[sel].astype(np.float32)
        rows = rows[sel]
        arrays = SpotArrays(
            keys=keys[rows], X=X, counts=None, library_size=None, genes=genes, provenance=sm.identity.identity()
        )
        pred = predict_head(sm.head_name, sm.head, arrays).with_columns(pl.lit(sm.run_id).alias("run_id"))
        store.append("predictions", pred)
        out.rows_written += pred.height
        r = np.array([row_of[s] for s in pred["spot_id"].to_list()])
        c = np.array([col_of[x] for x in pred["gene"].to_list()])
        for name in VALUE_COLUMNS:
            if name not in pred.columns or pred[name].null_count() == pred.height:
                continue
            mat = out.values.setdefault(name, np.full((n, g), np.nan, np.float32))
            mat[r, c] = pred[name].cast(pl.Float32).fill_null(np.nan).to_numpy()
        seen[rows] = True
    if not seen.all():
        missing = keys["spot_id"].filter(pl.Series(~seen)).to_list()
        raise StoreError(
            f"{store.path}: {len(missing)} tile(s) of slide {slide_id!r} have no {sm.backbone} vectors, "
            f"e.g. {missing[:3]}"
        )
    return out
