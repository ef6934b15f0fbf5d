"""Aligned arrays for heads: embeddings (X), raw counts (Y), library sizes and groups.

Rows are spots present in BOTH the backbone's embedding table and ``expression``,
optionally restricted to spots passing tissue QC, in (slide_id, spot_id) order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow.compute as pc
import scipy.sparse as sp

from stimage_embed.embeddings.provenance import existing_provenance
from stimage_embed.embeddings.vector_source import VectorSource
from stimage_embed.errors import StoreError
from stimage_embed.store.maintenance import SlideReader
from stimage_embed.store.store import Store, sql_list


@dataclass
class SpotArrays:
    keys: pl.DataFrame  # slide_id, spot_id, patient, array_row, array_col, pixel_x, pixel_y, um_per_px
    X: np.ndarray  # (n, dim) float32 embeddings
    counts: np.ndarray | None  # (n, g) raw counts (int64); None for a slide with no counts (image only)
    library_size: np.ndarray | None  # (n,) total raw counts over ALL genes of the spot; None without counts
    genes: list[str]
    provenance: dict

    @property
    def groups(self) -> np.ndarray:
        return self.keys["slide_id"].to_numpy()

    @property
    def coords_um(self) -> np.ndarray | None:
        """(n, 2) spot centres in µm (level-0 pixel x, y times the slide's µm/px), one
        frame per slide; ``None`` when the keys carry no pixel coordinates."""
        if not {"pixel_x", "pixel_y", "um_per_px"} <= set(self.keys.columns):
            return None
        um = self.keys["um_per_px"].to_numpy().astype(np.float64)[:, None]
        return self.keys.select("pixel_x", "pixel_y").to_numpy().astype(np.float64) * um


def shuffled_within_slides(arrays: SpotArrays, seed: int = 0) -> SpotArrays:
    """The leak control: the same arrays with the vectors ``X`` permuted among the spots of
    each slide (keys, counts and library sizes stay in place). Seeded, so reproducible."""
    rng = np.random.default_rng(seed)
    slides = arrays.keys["slide_id"].to_numpy()
    order = np.arange(len(slides))
    for s in np.unique(slides):
        rows = np.flatnonzero(slides == s)
        order[rows] = rng.permutation(rows)
    return SpotArrays(
        keys=arrays.keys,
        X=arrays.X[order],
        counts=arrays.counts,
        library_size=arrays.library_size,
        genes=arrays.genes,
        provenance=arrays.provenance,
    )


def vector_parts(backbone: str) -> list[str]:
    """The vector tables' source names of ``backbone`` (one, or the parts of ``a+b``;
    :class:`~stimage_embed.embeddings.vector_source.VectorSource`)."""
    return VectorSource.parse(backbone).part_names


def table_provenance(store: Store, backbone: str) -> dict:
    """Provenance of a backbone's vectors; for a composite ``a+b``, each identity field is
    the list of its parts' values (so a change in any part changes the provenance id)."""
    provs = []
    for part in VectorSource.parse(backbone).parts:
        found = existing_provenance(store, part.table)
        if not found:
            raise StoreError(
                f"{store.path}: no vectors for backbone {part.name!r}; run `stimage-embed embed --backbone {part.name}`"
            )
        provs.append(found[0])
    if len(provs) == 1:
        return provs[0]
    keys = dict.fromkeys(k for p in provs for k in p)
    return {k: [p.get(k) for p in provs] for k in keys}


def embedded_slides(store: Store, backbone: str) -> set[str]:
    """Slides with vectors of ``backbone`` (of every part of a composite)."""
    sets = [
        set(store.sql(f"SELECT DISTINCT slide_id FROM {t}")["slide_id"]) for t in VectorSource.parse(backbone).tables
    ]
    return set.intersection(*sets)


def load_embeddings(
    store: Store, backbone: str, slide_ids: Sequence[str], reader: SlideReader | None = None
) -> tuple[pl.DataFrame, np.ndarray]:
    """(keys, X float32) of a backbone for the given slides, sorted by key.

    Read straight from the Lance dataset by the row positions of each slide (the store's
    :attr:`~stimage_embed.store.Store.slide_reader`, or ``reader``), on tables the store's
    upkeep keeps compact after every embed (:mod:`stimage_embed.store.maintenance`): the cost
    of one slide does not grow with the number of slides in the table.
    A composite ``a+b`` gives the spots present in every part, with the parts' vectors side
    by side (``a``'s columns first)."""
    source = VectorSource.parse(backbone)
    if source.is_composite:
        loaded = [load_embeddings(store, p, slide_ids, reader) for p in source.part_names]
        keys = loaded[0][0].with_row_index("_0")
        for i, (k, _) in enumerate(loaded[1:], start=1):
            keys = keys.join(k.with_row_index(f"_{i}"), on=["slide_id", "spot_id"], how="inner", maintain_order="left")
        X = np.hstack([x[keys[f"_{i}"].to_numpy()] for i, (_, x) in enumerate(loaded)])
        return keys.select("slide_id", "spot_id"), X
    table = source.table
    slides = list(dict.fromkeys(slide_ids))
    cols = ["spot_id", "vector"] if len(slides) == 1 else ["slide_id", "spot_id", "vector"]  # one slide: known
    t = (reader or store.slide_reader).read(table, slides, cols)
    sort_keys = [(c, "ascending") for c in cols[:-1]]
    order = pc.sort_indices(t, sort_keys=sort_keys).to_numpy()
    if np.any(order[1:] < order[:-1]):  # rows are stored by slide and spot: usually in order already
        t = t.take(order)
    slide_col = t["slide_id"].to_pylist() if "slide_id" in cols else slides * t.num_rows
    keys = pl.DataFrame(
        {"slide_id": slide_col, "spot_id": t["spot_id"].to_pylist()},
        schema={"slide_id": pl.String, "spot_id": pl.String},
    )
    vec = t["vector"].combine_chunks()
    X16 = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size)
    X = X16.astype(np.float32)  # exact; numpy, not torch: a multi-threaded torch cast stalls on a busy machine
    return keys, X


def load_spot_arrays(
    store: Store, backbone: str, slide_ids: Sequence[str], genes: Sequence[str], only_qc: bool = True
) -> SpotArrays:
    """X, raw counts of ``genes``, library sizes for ``slide_ids`` (see module doc)."""
    ekeys, X = load_embeddings(store, backbone, slide_ids)
    ckeys, gl, counts, lib = store.expression_matrix(slide_ids, genes)
    spots = pl.from_arrow(
        store.read(
            "spots",
            ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y", "passes_qc"],
            where=f"slide_id IN ({sql_list(slide_ids)})",
        )
    )
    slides = pl.from_arrow(store.read("slides", ["slide_id", "patient", "um_per_px"]))
    ekeys = ekeys.with_columns(pl.Series("_e", np.arange(ekeys.height)))
    ckeys = ckeys.with_columns(pl.Series("_c", np.arange(ckeys.height)), pl.Series("_lib", lib))
    j = (
        ekeys.join(ckeys, on=["slide_id", "spot_id"], how="inner")
        .join(spots, on=["slide_id", "spot_id"])
        .join(slides, on="slide_id")
    )
    if only_qc:
        j = j.filter(pl.col("passes_qc"))
    j = j.sort("slide_id", "spot_id")
    if j.height == 0:
        raise StoreError(
            f"{store.path}: no spots with both {backbone} vectors and counts in slides {list(slide_ids)}; "
            f"run `stimage-embed embed --backbone {backbone} --slide {','.join(slide_ids)}` first "
            "(image-only slides have no counts to train on)"
        )
    dense = counts[j["_c"].to_numpy()]
    dense = dense.toarray() if sp.issparse(dense) else np.asarray(dense)
    return SpotArrays(
        keys=j.select("slide_id", "spot_id", "patient", "array_row", "array_col", "pixel_x", "pixel_y", "um_per_px"),
        X=X[j["_e"].to_numpy()],
        counts=dense.astype(np.int64),
        library_size=j["_lib"].to_numpy().astype(np.float64),
        genes=gl,
        provenance=table_provenance(store, backbone),
    )
