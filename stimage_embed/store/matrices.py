"""Matrices for heads read from the store: raw counts per spot and gene as a CSR matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow.compute as pc
import scipy.sparse as sp

from stimage_embed.errors import StoreError
from stimage_embed.store.store import sql_list

if TYPE_CHECKING:
    from stimage_embed.store.store import Store


def expression_matrix(
    store: Store, slide_ids: Sequence[str], genes: Sequence[str] | None = None
) -> tuple[pl.DataFrame, list[str], sp.csr_matrix, np.ndarray]:
    """Raw counts of ``slide_ids`` as a CSR (spots x genes), aligned by gene symbol.

    Returns ``(keys, genes, counts, library_size)``: keys = DataFrame(slide_id,
    spot_id) in row order; ``genes`` = the column order (the given list, or the
    union over slides, sorted); genes absent from a slide are 0 for its spots;
    ``library_size`` = total raw counts per spot over ALL genes of the slide.
    """
    gtab = pl.from_arrow(
        store.read("genes", ["slide_id", "gene_index", "gene"], where=f"slide_id IN ({sql_list(slide_ids)})")
    )
    if genes is None:
        genes = sorted(set(gtab["gene"].to_list()))
    col_of = {g: i for i, g in enumerate(genes)}
    etab = store.read("expression", where=f"slide_id IN ({sql_list(slide_ids)})")
    keys_parts, blocks, libs = [], [], []
    for sid in slide_ids:
        g = gtab.filter(pl.col("slide_id") == sid).sort("gene_index")
        if g.height == 0:
            raise StoreError(f"{store.path}: slide {sid!r} has no expression (not ingested?)")
        lut = np.full(int(g["gene_index"].max()) + 1, -1, np.int64)
        lut[g["gene_index"].to_numpy()] = [col_of.get(x, -1) for x in g["gene"].to_list()]
        mask = pc.equal(etab["slide_id"], sid)
        sub = etab.filter(mask)
        idx = sub["gene_index"].combine_chunks()
        cnt = sub["counts"].combine_chunks()
        offsets = idx.offsets.to_numpy()
        gi = idx.values.to_numpy()
        cv = cnt.values.to_numpy().astype(np.int64)
        rows = np.repeat(np.arange(len(sub)), np.diff(offsets))
        libs.append(np.bincount(rows, weights=cv, minlength=len(sub)))
        cols = lut[gi]
        keep = cols >= 0
        # CSR straight from each spot's (gene, count) list, no COO sort (duplicates sum as before)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[keep], minlength=len(sub)))]).astype(np.int64)
        blocks.append(sp.csr_matrix((cv[keep], cols[keep], indptr), shape=(len(sub), len(genes))))
        keys_parts.append(
            pl.DataFrame({"slide_id": sub["slide_id"].to_pylist(), "spot_id": sub["spot_id"].to_pylist()})
        )
    keys = pl.concat(keys_parts)
    return keys, list(genes), sp.vstack(blocks).tocsr(), np.concatenate(libs)
