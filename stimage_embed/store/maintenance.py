"""Store upkeep after writes, and the per-slide read path it serves.

Every append or ``merge_insert`` is one Lance commit that adds a fragment (a data file),
and a version. The embedding pass commits every few hundred vectors and ingest replaces
slides table by table, so without upkeep a table read by slide ends up as many small
fragments, each opened and filtered on every read, and old versions pile up. After each
write command (``ingest``, ``embed``), :func:`maintain` therefore:

1. keeps a scalar index on ``slide_id`` (Lance BTREE) covering every row: created if
   missing, new rows folded in (``optimize_indices``);
2. compacts small fragments and deleted rows into large fragments
   (``optimize.compact_files``; the index is remapped by Lance);
3. removes versions older than ``retain`` (``cleanup_old_versions``) and their files.

Reads of one slide (:func:`read_slides`) then resolve ``slide_id IN (...)`` through the
index (Lance's ``ScalarIndexQuery``) and read only that slide's rows from a few large
fragments: the cost does not grow with the number of slides in the table.

Runs under the store's writer lock (re-entrant: inside ``ingest``/``embed`` it is held).
Works on local and object-store stores alike (tables are opened by URI with the store's
``storage_options``).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa

from stimage_embed.errors import StoreError
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

#: the column every per-slide table is read by, and the name of its index
SLIDE_COLUMN = "slide_id"
SLIDE_INDEX = "slide_id_idx"
SLIDE_INDEX_TYPE = "BTREE"
#: versions older than this are removed. Long enough for a reader that opened an older
#: version (another process) to finish its scan; the latest version is never removed.
DEFAULT_RETAIN = dt.timedelta(minutes=10)
#: fragments are compacted towards this many rows (Lance's default is 1 Mi rows)
TARGET_ROWS_PER_FRAGMENT = 1 << 20


@dataclass
class TableUpkeep:
    """What :func:`maintain_table` found and did for one table."""

    table: str
    fragments_before: int = 0
    fragments_after: int = 0
    deleted_rows_before: int = 0
    indexed: str = ""  # "created" | "updated" | "" (already complete) | "no slide_id column"
    versions_removed: int = 0
    bytes_removed: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"{self.table}: fragments {self.fragments_before} -> {self.fragments_after}, "
            f"slide_id index {self.indexed or 'up to date'}, {self.versions_removed} old versions removed "
            f"({self.bytes_removed / 1e6:.1f} MB), {self.seconds:.2f} s"
        )


@dataclass
class UpkeepReport:
    tables: list[TableUpkeep] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.tables)


def table_path(store: Store, table: str) -> Path:
    """The table's folder: a ``Path``, or an ``ObjectPath`` URI for an object-store store."""
    return store.path / f"{table}.lance"


def open_dataset(store: Store, table: str, session: lance.Session | None = None) -> lance.LanceDataset:
    """The latest version of ``table`` as a ``lance.LanceDataset``, opened directly (no
    LanceDB connection, table listing or version pinning: the cheap way for reads).

    ``session``: a ``lance.Session`` to share parsed metadata and index pages across opens
    (optional; without it every open reads them from disk)."""
    path = table_path(store, table)
    if not store.committed(table):
        raise StoreError(
            f"{store.path}: no table {table!r}; tables: {', '.join(store.table_names()) or 'none (run ingest first)'}"
        )
    opts = {"storage_options": store.storage_options} if store.remote else {}
    return (
        lance.dataset(str(path), session=session, **opts) if session is not None else lance.dataset(str(path), **opts)
    )


def read_slides(
    store: Store,
    table: str,
    slide_ids: Sequence[str],
    columns: Sequence[str] | None = None,
    session: lance.Session | None = None,
) -> pa.Table:
    """Rows of ``slide_ids`` in ``table`` (all columns, or ``columns``), via the scalar index
    on ``slide_id`` when there is one (see the module doc). Row order: as stored."""
    ds = open_dataset(store, table, session)
    return ds.to_table(
        columns=list(columns) if columns else None,
        filter=f"{SLIDE_COLUMN} IN ({sql_list(slide_ids)})",
        use_scalar_index=True,
    )


class SlideReader:
    """Reads a store's tables by slide, for loops that read one slide at a time.

    Every read opens the table's latest version (writes are seen). What Lance has parsed
    (manifests, file footers) is kept between reads in one ``lance.Session``, as an open h5
    file keeps its metadata, and so are the row positions of each slide in that version of
    the table (from one scan of its ``slide_id`` column; rebuilt when the version changes):
    a read is then one ``take`` of that slide's rows, whatever the number of slides.
    Memory: ``cache_bytes`` for Lance's caches, plus 8 bytes per row of each table read.
    """

    def __init__(self, store: Store, cache_bytes: int = 256 << 20):
        self.store = store
        self.session = lance.Session(index_cache_size_bytes=cache_bytes, metadata_cache_size_bytes=cache_bytes)
        self._rows: dict[str, tuple[int, dict[str, np.ndarray]]] = {}  # table -> (version, slide -> row offsets)

    def _positions(self, table: str, ds: lance.LanceDataset) -> dict[str, np.ndarray]:
        cached = self._rows.get(table)
        if cached is not None and cached[0] == ds.version:
            return cached[1]
        ids = ds.to_table(columns=[SLIDE_COLUMN], scan_in_order=True)[SLIDE_COLUMN].to_numpy(zero_copy_only=False)
        order = np.argsort(ids, kind="stable")
        uniq, starts = np.unique(ids[order], return_index=True)
        groups = np.split(order, starts[1:])
        positions = {str(u): g.astype(np.int64) for u, g in zip(uniq, groups)} if len(ids) else {}
        self._rows[table] = (ds.version, positions)
        return positions

    def read(self, table: str, slide_ids: Sequence[str], columns: Sequence[str] | None = None) -> pa.Table:
        """Rows of ``slide_ids`` in ``table`` (all columns, or ``columns``), in stored order per slide."""
        ds = open_dataset(self.store, table, self.session)
        positions = self._positions(table, ds)
        wanted = [positions[s] for s in dict.fromkeys(slide_ids) if s in positions]
        rows = np.concatenate(wanted) if wanted else np.zeros(0, np.int64)
        cols = list(columns) if columns else None
        if not len(rows):
            return ds.to_table(columns=cols, limit=0)
        return ds.take(rows, columns=cols)


def _slide_index(ds: lance.LanceDataset) -> str | None:
    for idx in ds.describe_indices():
        if list(idx.field_names) == [SLIDE_COLUMN]:
            return idx.name
    return None


def maintain_table(
    store: Store, table: str, retain: dt.timedelta = DEFAULT_RETAIN, index_type: str = SLIDE_INDEX_TYPE
) -> TableUpkeep:
    """Index, compact and prune one table (see the module doc). Idempotent: a table already
    in shape costs a few ms."""
    t0 = time.perf_counter()
    up = TableUpkeep(table)
    with store.writer("maintain"):
        ds = open_dataset(store, table)
        stats = ds.stats.dataset_stats()
        up.fragments_before, up.deleted_rows_before = stats["num_fragments"], stats["num_deleted_rows"]
        has_slides = SLIDE_COLUMN in ds.schema.names
        name = _slide_index(ds) if has_slides else None
        if not has_slides:
            up.indexed = "no slide_id column"
        elif name is None and ds.count_rows():
            ds.create_scalar_index(SLIDE_COLUMN, index_type, name=SLIDE_INDEX)
            name, up.indexed = SLIDE_INDEX, "created"
        elif name is not None and ds.stats.index_stats(name)["num_unindexed_rows"]:
            # fold new rows into the index first, so compaction can merge every fragment
            ds.optimize.optimize_indices(index_names=[name])
            up.indexed = "updated"
        ds = open_dataset(store, table)
        if up.fragments_before > 1 or up.deleted_rows_before:
            ds.optimize.compact_files(
                target_rows_per_fragment=TARGET_ROWS_PER_FRAGMENT,
                materialize_deletions=True,
                materialize_deletions_threshold=0.0,
            )
            ds = open_dataset(store, table)
        if name is not None and ds.stats.index_stats(name)["num_unindexed_rows"]:
            ds.optimize.optimize_indices(index_names=[name])
            ds = open_dataset(store, table)
        up.fragments_after = ds.stats.dataset_stats()["num_fragments"]
        cleaned = ds.cleanup_old_versions(older_than=retain)
        up.versions_removed, up.bytes_removed = int(cleaned.old_versions), int(cleaned.bytes_removed)
    up.seconds = time.perf_counter() - t0
    log.debug("upkeep %s", up.line())
    return up


def maintain(
    store: Store,
    tables: Sequence[str] | None = None,
    retain: dt.timedelta = DEFAULT_RETAIN,
    index_type: str = SLIDE_INDEX_TYPE,
) -> UpkeepReport:
    """:func:`maintain_table` for each of ``tables`` that exists (default: every table)."""
    report = UpkeepReport()
    with store.writer("maintain"):
        names = store.table_names()
        for table in names if tables is None else [t for t in dict.fromkeys(tables) if t in names]:
            report.tables.append(maintain_table(store, table, retain, index_type))
    return report


def data_files(store: Store, table: str) -> dict[str, int]:
    """``data file -> bytes`` of the latest version of ``table`` ({} if it does not exist).
    The files one run's commits added are the difference of two calls: its bytes written."""
    if not store.committed(table):
        return {}
    out = {}
    for frag in open_dataset(store, table).get_fragments():
        for f in frag.data_files():
            size = f.file_size_bytes
            if size is None and store.remote:
                raise StoreError(f"{store.path}/{table}: Lance did not record the size of data file {f.path}")
            out[f.path] = int(size) if size is not None else (table_path(store, table) / "data" / f.path).stat().st_size
    return out


def data_snapshot(store: Store, tables: Iterable[str]) -> dict[str, dict[str, int]]:
    """``table -> data file -> bytes`` of the latest version of each of ``tables``: a run's
    starting point for :func:`bytes_added`."""
    return {table: data_files(store, table) for table in tables}


def bytes_added(store: Store, before: dict[str, dict[str, int]]) -> int:
    """Bytes written since :func:`data_snapshot` gave ``before``: the data files the commits
    since then added to its tables (measured before an upkeep rewrites them)."""
    return sum(
        size for table, old in before.items() for path, size in data_files(store, table).items() if path not in old
    )


def live_bytes(store: Store, table: str) -> int:
    """Bytes on disk of the latest version's data (0 if the table does not exist)."""
    return sum(data_files(store, table).values())
