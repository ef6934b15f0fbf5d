"""Rows made to fit a table's declared schema before they are written, and the migration of
tables whose meaning changed (stores written by older code are migrated on open)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import polars as pl
import pyarrow as pa

from stimage_embed.errors import StoreError
from stimage_embed.store import schema as S

if TYPE_CHECKING:
    from stimage_embed.store.store import Store


def conform(data: pa.Table | pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """``data`` with the columns of ``schema`` in its order and types; missing nullable
    columns become nulls, a missing required column is a :class:`StoreError`."""
    table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
    for f in [f for f in schema if f.name not in table.column_names]:
        if not f.nullable:
            raise StoreError(f"cannot write rows without the required column {f.name!r}")
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)


# -- runs.vector_source: older stores kept the vector source in runs.backbone ---------------
#: ``runs`` rows written before ``vector_source``: ``backbone`` holds the vector source, except
#: for a head spanning backbones, whose ``backbone`` is its own name (Lance SQL filter)
_UNMIGRATED = "vector_source IS NULL AND backbone IS NOT NULL AND backbone <> coalesce(head, '')"


def runs_migrated(table: pa.Table) -> pa.Table:
    """``runs`` rows of a store written before ``vector_source``, as the migration leaves them
    (in memory, for read-only sessions): ``vector_source`` = the old ``backbone`` and
    ``backbone`` = its real backbone names (:func:`~stimage_embed.store.schema.source_backbones`),
    except for heads spanning backbones (no vector source). Unchanged if it has the column."""
    if "vector_source" in table.column_names:
        return table
    old, heads = table["backbone"].to_pylist(), table["head"].to_pylist()
    source = [None if b is None or b == h else b for b, h in zip(old, heads)]
    backbone = [b if s is None else S.source_backbones(s) for b, s in zip(old, source)]
    i = table.column_names.index("backbone")
    table = table.set_column(i, table.schema.field(i), pa.array(backbone, pa.string()))
    return table.append_column(S.RUNS.field("vector_source"), pa.array(source, pa.string()))


def migrate_runs(store: Store) -> int:
    """Migrate the ``runs`` table of a store written before ``vector_source`` in place (on
    open, under the writer lock): add the column, then, per distinct old ``backbone`` of the
    rows without a source, set ``vector_source`` to it and ``backbone`` to its real backbone
    names. Idempotent and safe to interrupt (each update only touches rows still unmigrated).
    Returns the number of rows migrated."""
    if not store.has_table("runs"):
        return 0
    tbl = store.db.open_table("runs")
    if "vector_source" not in tbl.schema.names:
        tbl.add_columns([S.RUNS.field("vector_source")])
    n = tbl.count_rows(_UNMIGRATED)
    if not n:
        return 0
    olds = sorted(set(store.read("runs", ["backbone"], where=_UNMIGRATED)["backbone"].to_pylist()))
    for old in olds:
        quoted = "'" + old.replace("'", "''") + "'"
        tbl.update(
            where=f"{_UNMIGRATED} AND backbone = {quoted}",
            values={"vector_source": old, "backbone": S.source_backbones(old)},
        )
    return n
