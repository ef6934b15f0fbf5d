"""DuckDB over every LanceDB table of a store, returning polars DataFrames.

DuckDB has no half-float type and refuses to scan an Arrow source whose schema holds a
float16 column, even when the query never touches it. Tables without float16 are
registered as Lance datasets (projection and filter push-down, re-scannable); tables
with float16 vectors are registered as a Lance scanner that casts those columns to
float32 on the fly (``arrow_cast`` inside Lance), batch by batch, so nothing is
materialised up front.

Views: ``expression_long(slide_id, spot_id, gene_index, gene, gene_id, count)`` — the
sparse ``expression`` table unnested and joined to ``genes`` — declared here, and the views
of the later stages, declared where their SQL belongs: each module named in
:data:`VIEW_PROVIDERS` exposes ``SQL_VIEWS`` (view name -> (SQL, store tables it reads)).
The store never imports them at module level (they sit later in the data flow); a session
imports them only when its query names something that is neither a store table nor a view
declared here (or lists what exists), so a plain table query stays light.
"""

from __future__ import annotations

import importlib
import logging
import re
from typing import TYPE_CHECKING

import duckdb
import polars as pl
import pyarrow as pa

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


#: modules declaring SQL views over the store (each exposes ``SQL_VIEWS``, shaped like
#: :data:`VIEWS`): run status (superseded runs) and the evaluation views (leaderboards ...)
VIEW_PROVIDERS = ("stimage_embed.predictions.runs", "stimage_embed.evaluation.views")


def _all_views() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every view: :data:`VIEWS` and those of the :data:`VIEW_PROVIDERS` (imported here)."""
    out = dict(VIEWS)
    for module in VIEW_PROVIDERS:
        out.update(importlib.import_module(module).SQL_VIEWS)
    return out


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
    (:data:`stimage_embed.store.schema.CORE_TABLES`), its rows with those columns as NULL
    (``runs`` of a store written before ``vector_source``: as its migration on open leaves them)."""
    from stimage_embed.store.conform import runs_migrated
    from stimage_embed.store.schema import CORE_TABLES

    declared = CORE_TABLES.get(name) if name in _SMALL_TABLES else None
    missing = [f for f in declared or () if f.name not in dataset.schema.names and f.nullable]
    if not missing:
        return dataset
    table = runs_migrated(dataset.to_table()) if name == "runs" else dataset.to_table()
    missing = [f for f in missing if f.name not in table.column_names]
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
    """Store tables and views a query needs (views expanded later). Every one of them for a
    discovery query (``SHOW TABLES``, ``information_schema``, ``duckdb_tables()`` ...) and for
    a name that is not in the store, so DuckDB's "did you mean" suggests the store's own
    tables (``FROM spot`` -> ``spots``). Falls back to all on binder quirks. The
    :data:`VIEW_PROVIDERS` are imported only when a name is not a table or a :data:`VIEWS` view."""
    if _DISCOVERY.search(query):
        return set(available) | set(_all_views())
    try:
        names = {n.split(".")[-1] for n in duckdb.get_table_names(query)}
    except duckdb.ParserException:
        raise
    except duckdb.Error:
        return set(available) | set(_all_views())
    if names - set(available) - set(VIEWS):
        everything = set(available) | set(_all_views())
        if names - everything:
            return everything
    return names


#: queries that list what exists: every table and view is registered for them
_DISCOVERY = re.compile(
    r"\b(information_schema|duckdb_(tables|views|columns)|show|pragma|describe|summarize|sqlite_master)\b",
    re.IGNORECASE,
)

#: settings of a sandboxed session (user SQL): no file system, network or extension access
#: (no directory allowed, not even DuckDB's temp folder), and a locked configuration so the
#: SQL itself cannot lift them
SANDBOX_SETTINGS = (
    "SET autoinstall_known_extensions = false",
    "SET autoload_known_extensions = false",
    "SET temp_directory = ''",  # else DuckDB allows <cwd>/.tmp/ even without external access
    "SET allowed_directories = []",
    "SET enable_external_access = false",
    "SET lock_configuration = true",
)
#: statement kinds user SQL may run without file access: queries only (SHOW, DESCRIBE,
#: SUMMARIZE, WITH and VALUES are SELECTs); EXPORT, COPY, ATTACH, SET ... are refused before
#: DuckDB runs them (EXPORT DATABASE would create its folder before it is refused)
SANDBOX_STATEMENTS = ("SELECT", "EXPLAIN")


def check_statements(query: str, file_access: bool) -> None:
    """Refuse an empty query (only comments) and, in a sandbox, any statement that is not a
    query. Raises ``duckdb.Error`` subclasses (printed by the caller as one line)."""
    kinds = [st.type.name for st in duckdb.extract_statements(query)]
    if not kinds:
        raise duckdb.InvalidInputException("the query holds no SQL statement (empty, or only a comment)")
    if not file_access:
        bad = [k for k in kinds if k not in SANDBOX_STATEMENTS]
        if bad:
            raise duckdb.PermissionException(
                f"{bad[0]} statements need --allow-file-access; without it only queries (SELECT, SHOW, "
                "DESCRIBE, EXPLAIN ...) run, over the store's tables"
            )


def available_views(available: set[str]) -> list[str]:
    """The SQL views whose tables are all in the store (``info`` lists them)."""
    return sorted(v for v, (_, needs) in _all_views().items() if set(needs) <= available)


def _connect(store: Store, query: str, file_access: bool) -> duckdb.DuckDBPyConnection:
    """A DuckDB session with the store tables and views ``query`` needs registered (and,
    without ``file_access``, sandboxed). A store folder that does not exist is not created."""
    check_statements(query, file_access)
    exists = store.remote or store.path.is_dir()
    available = set(store.table_names()) if exists else set()
    wanted = referenced_tables(query, available)
    con = duckdb.connect()
    try:
        views = _all_views() if wanted - available - set(VIEWS) else VIEWS
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
    except BaseException:
        con.close()
        raise
    return con


def run_sql(store: Store, query: str, file_access: bool = True) -> pl.DataFrame:
    """Run ``query`` with every store table (and the views) in scope; return polars.

    ``file_access=False`` (user SQL): the store's tables are registered first, then DuckDB's
    external access (files, network, extensions) is disabled and the configuration locked,
    so ``COPY ... TO``, ``read_csv('/etc/passwd')``, ``ATTACH`` or ``SET`` cannot reach
    anything outside the store.
    """
    return run_query(store, query, file_access=file_access)[0]


def run_query(
    store: Store, query: str, file_access: bool = True, limit: int | None = None
) -> tuple[pl.DataFrame, bool]:
    """:func:`run_sql` with an optional row cap: ``(rows, more)``, where ``more`` says the
    result had more than ``limit`` rows. The cap is applied inside DuckDB, so a huge result
    (``SELECT * FROM range(1e9)``) is never materialised."""
    con = _connect(store, query, file_access)
    try:
        rel = con.sql(query)
        if rel is None:  # a statement without a result (e.g. SET)
            return pl.DataFrame(), False
        if limit is None:
            return rel.pl(), False
        df = rel.limit(limit + 1).pl()
        return df.head(limit), df.height > limit
    finally:
        con.close()
