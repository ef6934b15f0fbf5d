"""The ``clinical`` table: outcomes and covariates per patient or per slide, upserted from CSV.

``add_clinical(store, "clinical.csv", key="patient")`` checks the whole file first (key
column present, keys non-empty and unique, times numeric and >= 0, events in {0, 1}) and
raises one :class:`~stimage_embed.errors.InputError` naming the file, the column and the
row of the first problem; nothing is written then. A valid file is written in ONE Lance
commit (``merge_insert`` on ``(key_kind, key)``): rows with a new key are inserted, rows
with a known key are updated; columns the file lacks keep their stored values.

Time columns: ``time``, any column ending in ``_time`` and those named in ``time_columns``.
Event columns: ``event``, any column ending in ``_event`` and those in ``event_columns``.
Keys absent from the store's ``slides`` (no such patient / slide) are written and reported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa

from stimage_embed.errors import InputError
from stimage_embed.store.conform import conform
from stimage_embed.store.schema_clinical import CLINICAL, CLINICAL_KEYS, EXTRA_TYPES, clinical_schema
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

TABLE = "clinical"
KEY_KINDS = ("patient", "slide_id")
#: columns a file may not carry (the table sets them)
RESERVED = ("key_kind", "key", "source_file", "added_at")
COLUMN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclasses.dataclass(frozen=True)
class AddResult:
    """What one ``add_clinical`` wrote: rows inserted and updated, keys unknown to ``slides``."""

    file: str
    key_kind: str
    inserted: int
    updated: int
    unknown_keys: list[str]

    def lines(self) -> list[str]:
        out = [f"{self.file}: {self.inserted} row(s) inserted, {self.updated} updated (key {self.key_kind})"]
        if self.unknown_keys:
            shown = ", ".join(self.unknown_keys[:10]) + (" ..." if len(self.unknown_keys) > 10 else "")
            out.append(f"{len(self.unknown_keys)} key(s) not in the store's slides (written anyway): {shown}")
        return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _rows_of(frame: pl.DataFrame, mask: list[bool]) -> str:
    rows = [str(i + 2) for i, m in enumerate(mask) if m]  # line 1 is the header
    return ", ".join(rows[:5]) + (" ..." if len(rows) > 5 else "")


def _check_key(frame: pl.DataFrame, path: str, key: str) -> None:
    if key not in KEY_KINDS:
        raise InputError(None, "--key", f"expected patient or slide_id, got {key!r}")
    if key not in frame.columns:
        raise InputError(path, key, f"no key column {key!r} (columns: {', '.join(frame.columns)})")
    values = frame[key].to_list()
    empty = [v is None or not v.strip() for v in values]
    if any(empty):
        raise InputError(path, key, f"empty key on line(s) {_rows_of(frame, empty)}")
    dup = frame[key].is_duplicated().to_list()
    if any(dup):
        first = sorted({v for v, d in zip(values, dup, strict=True) if d})
        raise InputError(path, key, f"duplicate key(s) {', '.join(first[:5])} on line(s) {_rows_of(frame, dup)}")
    for name in frame.columns:
        if name in RESERVED or not COLUMN_NAME.fullmatch(name):
            why = "reserved by the clinical table" if name in RESERVED else "use letters, digits and '_'"
            raise InputError(path, name, f"invalid column name ({why})")


def _time_column(frame: pl.DataFrame, path: str, name: str) -> pl.Series:
    out = []
    for i, text in enumerate(frame[name].to_list()):
        if text is None or not text.strip():
            out.append(None)
            continue
        value = _number(text)
        if value is None or not math.isfinite(value):
            raise InputError(path, name, f"line {i + 2}: time {text!r} is not a number")
        if value < 0:
            raise InputError(path, name, f"line {i + 2}: negative time {text}")
        out.append(value)
    return pl.Series(name, out, dtype=pl.Float64)


def _event_column(frame: pl.DataFrame, path: str, name: str) -> pl.Series:
    out = []
    for i, text in enumerate(frame[name].to_list()):
        if text is None or not text.strip():
            out.append(None)
            continue
        value = _number(text)
        if value not in (0.0, 1.0):
            raise InputError(path, name, f"line {i + 2}: event {text!r} is not 0 or 1")
        out.append(int(value))
    return pl.Series(name, out, dtype=pl.Int8)


def _other_column(frame: pl.DataFrame, path: str, name: str, stored: pa.DataType | None) -> pl.Series:
    texts = frame[name].to_list()
    numbers = [None if t is None or not t.strip() else _number(t) for t in texts]
    numeric = all(n is not None for n, t in zip(numbers, texts, strict=True) if t is not None and t.strip())
    if stored is not None and pa.types.is_floating(stored):
        if not numeric:
            bad = next(i for i, (n, t) in enumerate(zip(numbers, texts, strict=True)) if n is None and t and t.strip())
            raise InputError(path, name, f"line {bad + 2}: {texts[bad]!r} is not a number (the stored column is)")
        return pl.Series(name, numbers, dtype=pl.Float64)
    if numeric and stored is None and name not in ("response", "subtype", "patient", "slide_id"):
        return pl.Series(name, numbers, dtype=pl.Float64)
    return pl.Series(name, [t.strip() if t else None for t in texts], dtype=pl.String)


def read_clinical_csv(
    path: str | Path,
    key: str,
    time_columns: Sequence[str] = (),
    event_columns: Sequence[str] = (),
    stored: pa.Schema | None = None,
) -> pl.DataFrame:
    """The CSV at ``path``, checked and typed (times float64, events int8, numbers float64,
    the rest strings); ``stored``: the existing table's schema (its column types win)."""
    path = str(path)
    try:
        frame = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise InputError(path, None, f"cannot read the CSV ({str(exc).splitlines()[0]})") from exc
    _check_key(frame, path, key)
    for name in (*time_columns, *event_columns):
        if name not in frame.columns:
            raise InputError(path, name, f"no such column (columns: {', '.join(frame.columns)})")
    stored_events = {f.name for f in stored or [] if pa.types.is_int8(f.type)}
    times = {c for c in frame.columns if c == "time" or c.endswith("_time")} | set(time_columns)
    events = {c for c in frame.columns if c == "event" or c.endswith("_event")} | set(event_columns) | stored_events
    typed = []
    for name in frame.columns:
        if name == key:
            typed.append(frame[name].str.strip_chars())
        elif name in times:
            typed.append(_time_column(frame, path, name))
        elif name in events:
            typed.append(_event_column(frame, path, name))
        else:
            kind = stored.field(name).type if stored is not None and name in stored.names else None
            typed.append(_other_column(frame, path, name, kind))
    return pl.DataFrame(typed)


def _extra_fields(frame: pl.DataFrame, key: str) -> list[pa.Field]:
    kinds = {pl.Float64: "number", pl.Int8: "event", pl.String: "text"}
    return [
        pa.field(c, EXTRA_TYPES[kinds[frame.schema[c]]]) for c in frame.columns if c not in CLINICAL.names and c != key
    ]


def _patients_of(store: Store, frame: pl.DataFrame, key: str) -> pl.Series:
    """The patient of each row: the key; for slide keys the file's ``patient`` column, else
    the slide's patient in ``slides``, else the slide id itself."""
    ids = frame[key]
    if key == "patient":
        return ids.alias("patient")
    known = {}
    if store.has_table("slides"):
        slides = store.read("slides", ["slide_id", "patient"]).to_pydict()
        known = dict(zip(slides["slide_id"], slides["patient"], strict=True))
    given = frame["patient"].to_list() if "patient" in frame.columns else [None] * frame.height
    return pl.Series("patient", [g or known.get(s, s) for s, g in zip(ids.to_list(), given, strict=True)])


def _unknown_keys(store: Store, keys: list[str], key: str) -> list[str]:
    if not store.has_table("slides"):
        return sorted(keys)
    known = set(store.read("slides", [key])[key].to_pylist())
    return sorted(k for k in keys if k not in known)


def _key_filter(key: str, keys: list[str]) -> str:
    return f"key_kind = {sql_list([key])} AND `key` IN ({sql_list(keys)})"


def _rows_to_write(store: Store, frame: pl.DataFrame, key: str, path: str, schema: pa.Schema) -> pl.DataFrame:
    """``frame`` as rows of the table (all of ``schema``'s columns); columns the file lacks
    keep the stored values of known keys."""
    keys = frame[key].to_list()
    now = dt.datetime.now(dt.UTC)
    data = frame.with_columns(
        pl.lit(key).alias("key_kind"),
        pl.col(key).alias("key"),
        _patients_of(store, frame, key),
        pl.lit(path).alias("source_file"),
        pl.lit(now).cast(pl.Datetime("us", "UTC")).alias("added_at"),
    )
    if key == "slide_id":
        data = data.with_columns(pl.col("key").alias("slide_id"))
    missing = [n for n in schema.names if n not in data.columns]
    if missing and store.has_table(TABLE):
        old = pl.from_arrow(store.read(TABLE, ["key", *missing], where=_key_filter(key, keys)))
        data = data.join(old, on="key", how="left")
    return pl.from_arrow(conform(data, schema))


def add_clinical(
    store: Store,
    path: str | Path,
    key: str,
    time_columns: Sequence[str] = (),
    event_columns: Sequence[str] = (),
) -> AddResult:
    """Upsert the rows of the CSV at ``path`` into ``clinical`` by ``key`` (``patient`` or
    ``slide_id``) in one commit; see the module docstring for the checks."""
    stored = store.table(TABLE).schema if store.has_table(TABLE) else None
    frame = read_clinical_csv(path, key, time_columns, event_columns, stored=stored)
    fields = [*(stored or []), *_extra_fields(frame, key)]
    schema = clinical_schema([f for f in fields if f.name not in CLINICAL.names])
    keys = frame[key].to_list()
    known = set()
    if store.has_table(TABLE):
        known = set(store.read(TABLE, ["key"], where=_key_filter(key, keys))["key"].to_pylist())
    data = _rows_to_write(store, frame, key, str(path), schema)
    store.replace_where(TABLE, data, CLINICAL_KEYS, _key_filter(key, keys), schema=schema)
    result = AddResult(str(path), key, len(keys) - len(known), len(known), _unknown_keys(store, keys, key))
    for line in result.lines():
        log.debug(line)
    return result


def read_clinical(store: Store, key_kind: str | None = None) -> pl.DataFrame:
    """The ``clinical`` table (only rows of ``key_kind`` if given) as polars."""
    if not store.has_table(TABLE):
        raise InputError(None, "clinical", f"{store.path}: no clinical table (run `stimage-embed clinical add`)")
    where = None if key_kind is None else f"key_kind = {sql_list([key_kind])}"
    return pl.from_arrow(store.read(TABLE, where=where))
