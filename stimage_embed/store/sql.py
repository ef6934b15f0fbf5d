"""DuckDB over every LanceDB table of a store, returning polars DataFrames.

DuckDB has no half-float type and refuses to scan an Arrow source whose schema holds a
float16 column, even when the query never touches it. Tables without float16 are
registered as Lance datasets (projection and filter push-down, re-scannable); tables
with float16 vectors are registered as a Lance scanner that casts those columns to
float32 on the fly (``arrow_cast`` inside Lance), batch by batch, so nothing is
materialised up front.

Views always available: ``expression_long(slide_id, spot_id, gene_index, gene, gene_id,
count)`` — the sparse ``expression`` table unnested and joined to ``genes``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import duckdb
import polars as pl
import pyarrow as pa

from stimage_embed.store.views import EVALUATION_VIEWS

if TYPE_CHECKING:
    from stimage_embed.store.store import Store

log = logging.getLogger(__name__)

#: view name -> (SQL, store tables it reads)
VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "expression_long": (
        """
    SELECT u.slide_id, u.spot_id, u.gene_index, g.gene, g.gene_id, u.count
    FROM (SELECT slide_id, spot_id, UNNEST(gene_index) AS gene_index, UNNEST(counts) AS count
          FROM expression) AS u
    JOIN genes g ON g.slide_id = u.slide_id AND g.gene_index = u.gene_index
    """,
        ("expression", "genes"),
    ),
}


def _all_views() -> dict[str, tuple[str, tuple[str, ...]]]:
    return {**VIEWS, **EVALUATION_VIEWS}


def _half_columns(schema: pa.Schema) -> list[str]:
    out = []
    for f in schema:
        t = f.type
        if pa.types.is_float16(t) or (
            (pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or pa.types.is_large_list(t))
            and pa.types.is_float16(t.value_type)
        ):
            out.append(f.name)
    return out


def _cast_expr(name: str, t: pa.DataType) -> str:
    """Lance SQL projection casting a half-float column to float32 (backticks quote identifiers)."""
    if pa.types.is_float16(t):
        return f"arrow_cast(`{name}`, 'Float32')"
    if pa.types.is_fixed_size_list(t):
        return f"arrow_cast(`{name}`, 'FixedSizeList({t.list_size}, Float32)')"
    return f"arrow_cast(`{name}`, 'List(Float32)')"


#: small tables whose newer nullable columns are shown as NULL in a store written before them
#: (its next write adds them), so views naming them work on every store
_SMALL_TABLES = ("runs", "slides")


def _with_new_columns(name: str, dataset):
    """``dataset``, or for a small table lacking newer nullable columns of its declared schema
    (:data:`stimage_embed.store.schema.CORE_TABLES`), its rows with those columns as NULL."""
    from stimage_embed.store.schema import CORE_TABLES

    declared = CORE_TABLES.get(name) if name in _SMALL_TABLES else None
    missing = [f for f in declared or () if f.name not in dataset.schema.names and f.nullable]
    if not missing:
        return dataset
    table = dataset.to_table()
    for f in missing:
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table


def register_table(con: duckdb.DuckDBPyConnection, name: str, dataset) -> None:
    """Register one Lance dataset under ``name`` so DuckDB can scan it."""
    dataset = _with_new_columns(name, dataset)
    halves = _half_columns(dataset.schema)
    if not halves:
        con.register(name, dataset)
        return
    columns = {f.name: (_cast_expr(f.name, f.type) if f.name in halves else f"`{f.name}`") for f in dataset.schema}
    reader = dataset.scanner(columns=columns).to_reader()
    con.register(name, reader)


def referenced_tables(query: str, available: set[str]) -> set[str]:
    """Store tables a query needs (views expanded). Falls back to all on binder quirks."""
    try:
        names = {n.split(".")[-1] for n in duckdb.get_table_names(query)}
    except duckdb.ParserException:
        raise
    except duckdb.Error:
        return set(available) | set(_all_views())
    return names


#: settings of a sandboxed session (user SQL): no file system, network or extension access,
#: and a locked configuration so the SQL itself cannot lift them
SANDBOX_SETTINGS = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)


def run_sql(store: Store, query: str, file_access: bool = True) -> pl.DataFrame:
    """Run ``query`` with every store table (and the views) in scope; return polars.

    ``file_access=False`` (user SQL): the store's tables are registered first, then DuckDB's
    external access (files, network, extensions) is disabled and the configuration locked,
    so ``COPY ... TO``, ``read_csv('/etc/passwd')``, ``ATTACH`` or ``SET`` cannot reach
    anything outside the store.
    """
    available = set(store.table_names())
    wanted = referenced_tables(query, available)
    con = duckdb.connect()
    try:
        views = _all_views()
        needed = set(wanted & available)
        for view in wanted & set(views):
            needed |= set(views[view][1]) & available
        for name in sorted(needed):
            register_table(con, name, store.dataset(name))
        for view in sorted(wanted & set(views)):
            if set(views[view][1]) <= available:
                con.execute(f"CREATE TEMP VIEW {view} AS {views[view][0]}")
        if not file_access:
            for setting in SANDBOX_SETTINGS:
                con.execute(setting)
        rel = con.sql(query)
        if rel is None:  # a statement without a result (e.g. SET)
            return pl.DataFrame()
        return rel.pl()
    finally:
        con.close()
