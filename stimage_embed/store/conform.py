"""Rows made to fit a table's declared schema before they are written."""

from __future__ import annotations

import polars as pl
import pyarrow as pa

from stimage_embed.errors import StoreError


def conform(data: pa.Table | pl.DataFrame, schema: pa.Schema) -> pa.Table:
    """``data`` with the columns of ``schema`` in its order and types; missing nullable
    columns become nulls, a missing required column is a :class:`StoreError`."""
    table = data.to_arrow() if isinstance(data, pl.DataFrame) else data
    for f in [f for f in schema if f.name not in table.column_names]:
        if not f.nullable:
            raise StoreError(f"cannot write rows without the required column {f.name!r}")
        table = table.append_column(f, pa.nulls(table.num_rows, f.type))
    return table.select(schema.names).cast(schema)
