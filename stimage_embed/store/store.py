"""The store: a LanceDB database in a directory, one table per kind of record.

Writes replace whole slides atomically per table: a ``merge_insert`` keyed on
(slide_id, ...) that updates, inserts and deletes the slide's old rows in ONE Lance
commit, so a reader never sees a slide twice or half-written, and a crash leaves the
previous version intact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

from stimage_embed.errors import StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.sql import run_sql

log = logging.getLogger(__name__)

#: key columns per table (besides slide_id); used by replace_slides.
TABLE_KEYS = {
    "slides": ("slide_id",),
    "spots": ("slide_id", "spot_id"),
    "genes": ("slide_id", "gene_index"),
    "expression": ("slide_id", "spot_id"),
}


def sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


class Store:
    """A stimage-embed store at ``path`` (created on first write)."""

    def __init__(self, path: str | Path = "store"):
        self.path = Path(path).expanduser().resolve()
        self._db: lancedb.DBConnection | None = None

    # -- connection ---------------------------------------------------------------
    @property
    def db(self) -> lancedb.DBConnection:
        if self._db is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._db = lancedb.connect(str(self.path))
        return self._db

    def exists(self) -> bool:
        return self.path.is_dir() and any(self.path.glob("*.lance"))

    def table_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(self.db.list_tables().tables)

    def has_table(self, name: str) -> bool:
        return name in self.table_names()

    def table(self, name: str):
        if not self.has_table(name):
            raise StoreError(f"{self.path}: no table {name!r}; tables: {', '.join(self.table_names()) or 'none (run ingest first)'}")
        return self.db.open_table(name)

    def dataset(self, name: str):
        """The underlying ``lance.LanceDataset`` (latest version)."""
        return self.table(name).to_lance()

    # -- reading ------------------------------------------------------------------
    def sql(self, query: str) -> pl.DataFrame:
        """Run DuckDB SQL over every table of the store; returns a polars DataFrame."""
        return run_sql(self, query)

    def read(self, name: str, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table:
        """Scan a table with optional projection and a Lance SQL filter."""
        return self.dataset(name).to_table(columns=list(columns) if columns else None, filter=where)

    def slide_ids(self) -> list[str]:
        if not self.has_table("slides"):
            return []
        return sorted(self.read("slides", ["slide_id"])["slide_id"].to_pylist())

    # -- writing ------------------------------------------------------------------
    def replace_slides(self, name: str, data: pa.Table, slide_ids: Sequence[str], schema: pa.Schema | None = None) -> None:
        """Make ``data`` the only rows of ``slide_ids`` in table ``name`` (one commit)."""
        schema = schema or S.CORE_TABLES[name]
        data = data.select(schema.names).cast(schema)
        if not self.has_table(name):
            self.db.create_table(name, data=data, schema=schema)
            return
        keys = list(TABLE_KEYS.get(name, ("slide_id", "spot_id")))
        tbl = self.db.open_table(name)
        (
            tbl.merge_insert(keys)
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .when_not_matched_by_source_delete(f"slide_id IN ({sql_list(slide_ids)})")
            .execute(data)
        )

    def append(self, name: str, data: pa.Table | pl.DataFrame, schema: pa.Schema | None = None) -> None:
        """Append rows to table ``name`` (created with its declared schema if missing); one commit."""
        schema = schema or S.CORE_TABLES[name]
        table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
        table = table.select(schema.names).cast(schema)
        if self.has_table(name):
            self.db.open_table(name).add(table)
        else:
            self.db.create_table(name, data=table, schema=schema)

    # -- matrices for heads -------------------------------------------------------
    def expression_matrix(
        self, slide_ids: Sequence[str], genes: Sequence[str] | None = None
    ) -> tuple[pl.DataFrame, list[str], sp.csr_matrix, np.ndarray]:
        """Raw counts of ``slide_ids`` as a CSR (spots x genes), aligned by gene symbol.

        Returns ``(keys, genes, counts, library_size)``: keys = DataFrame(slide_id,
        spot_id) in row order; ``genes`` = the column order (the given list, or the
        union over slides, sorted); genes absent from a slide are 0 for its spots;
        ``library_size`` = total raw counts per spot over ALL genes of the slide.
        """
        gtab = pl.from_arrow(self.read("genes", ["slide_id", "gene_index", "gene"], where=f"slide_id IN ({sql_list(slide_ids)})"))
        if genes is None:
            genes = sorted(set(gtab["gene"].to_list()))
        col_of = {g: i for i, g in enumerate(genes)}
        etab = self.read("expression", where=f"slide_id IN ({sql_list(slide_ids)})")
        keys_parts, blocks, libs = [], [], []
        for sid in slide_ids:
            g = gtab.filter(pl.col("slide_id") == sid).sort("gene_index")
            if g.height == 0:
                raise StoreError(f"{self.path}: slide {sid!r} has no expression (not ingested?)")
            lut = np.full(int(g["gene_index"].max()) + 1, -1, np.int64)
            lut[g["gene_index"].to_numpy()] = [col_of.get(x, -1) for x in g["gene"].to_list()]
            mask = pa.compute.equal(etab["slide_id"], sid)
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
            blocks.append(sp.csr_matrix((cv[keep], (rows[keep], cols[keep])), shape=(len(sub), len(genes))))
            keys_parts.append(pl.DataFrame({"slide_id": sub["slide_id"].to_pylist(), "spot_id": sub["spot_id"].to_pylist()}))
        keys = pl.concat(keys_parts)
        return keys, list(genes), sp.vstack(blocks).tocsr(), np.concatenate(libs)
