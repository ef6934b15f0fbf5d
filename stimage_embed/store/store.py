"""The store: a LanceDB database in a directory, one table per kind of record.

Writes replace whole slides atomically per table: a ``merge_insert`` keyed on
(slide_id, ...) that updates, inserts and deletes the slide's old rows in ONE Lance
commit, so a reader never sees a slide twice or half-written, and a crash leaves the
previous version intact.

Writers are serialised by the store's lock (:mod:`stimage_embed.store.lock`): a writing
command holds it for its whole run (:meth:`Store.writer`), and every single commit
takes it too, re-entrantly. The first writer to take the lock repairs what a killed
writer may have left (:meth:`Store.recover`). Readers never take it.

A store is a local folder or an object-store URI (``s3://bucket/prefix``, see
:mod:`stimage_embed.store.uri`); on object storage there is no file lock, and concurrent
writers rely on Lance's optimistic commits and keyed writes (see ``store.lock``). Model
folders (``train``) live under ``<store>/models`` for a local store, and in a local
``--models-dir`` (``$STIMAGE_MODELS_DIR``) for an object-store store.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp

from stimage_embed.errors import InputError, StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.conform import conform, migrate_runs
from stimage_embed.store.keyed import StoredKeys
from stimage_embed.store.lock import ObjectStoreLock, StoreLock, crash_point
from stimage_embed.store.sql import run_sql
from stimage_embed.store.uri import StoreLocation

log = logging.getLogger(__name__)

#: key columns per table (besides slide_id); used by replace_slides.
TABLE_KEYS = {
    "slides": ("slide_id",),
    "spots": ("slide_id", "spot_id"),
    "genes": ("slide_id", "gene_index"),
    "expression": ("slide_id", "spot_id"),
}
#: per-slide tables whose rows only count once the slide's ``slides`` row exists
SLIDE_CHILD_TABLES = ("genes", "expression", "spots")
PENDING_DIR = ".pending"
#: where model folders go when the store is on object storage (or to override <store>/models)
MODELS_DIR_ENV = "STIMAGE_MODELS_DIR"


def sql_list(values: Iterable[str]) -> str:
    return ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)


def _fill_missing(data: pa.Table, table_schema: pa.Schema) -> pa.Table:
    """``data`` in the column order of an existing table, with NULLs for nullable columns
    the table has and the writer does not know (optional columns of newer code)."""
    for f in table_schema:
        if f.name not in data.column_names and f.nullable:
            data = data.append_column(f, pa.nulls(data.num_rows, f.type))
    return data.select([f.name for f in table_schema if f.name in data.column_names])


class Store:
    """A stimage-embed store at ``path``: a folder or an ``s3://bucket/prefix`` URI (created
    on first write)."""

    def __init__(self, path: str | Path = "store", lock_wait: float = 0.0, models_dir: str | Path | None = None):
        """``lock_wait``: seconds a write waits for another writer's lock before failing.
        ``models_dir``: local folder of model folders (default ``<store>/models``; required,
        or ``$STIMAGE_MODELS_DIR``, for a store on object storage)."""
        self.location = StoreLocation(path)
        self.path = self.location.path
        self.remote = self.location.remote
        self.lock_wait = lock_wait
        self._models_dir = models_dir
        self._db: lancedb.DBConnection | None = None
        self._lock = ObjectStoreLock(self.location.uri) if self.remote else StoreLock(self.path)
        self._commits: Counter[str] = Counter()  # commits per table by this object (crash points)
        self._keys = StoredKeys(self)  # the keys of local tables written by key (write_keyed)

    # -- connection ---------------------------------------------------------------
    @functools.cached_property
    def slide_reader(self):
        """This object's :class:`~stimage_embed.store.maintenance.SlideReader`: reads by slide
        keep the tables' parsed metadata and each version's slide row positions (one scan of
        ``slide_id`` per table version), so one slide's vectors cost about an h5 read."""
        from stimage_embed.store.maintenance import SlideReader

        return SlideReader(self)

    @property
    def uri(self) -> str:
        """The store's location as Lance takes it (local path or object-store URI)."""
        return self.location.uri

    @property
    def storage_options(self) -> dict[str, str] | None:
        """Lance ``storage_options`` of the store (object stores: endpoint, region, ...)."""
        return self.location.storage_options()

    @property
    def models_dir(self) -> Path:
        """Local folder of model folders: ``models_dir`` > ``$STIMAGE_MODELS_DIR`` >
        ``<store>/models`` (local stores only)."""
        explicit = self._models_dir or os.environ.get(MODELS_DIR_ENV)
        if explicit:
            return Path(explicit).expanduser().resolve()
        if self.remote:
            raise InputError(
                None,
                "--models-dir",
                f"the store {self.uri} is on object storage: give a local folder for "
                f"model folders with --models-dir (or ${MODELS_DIR_ENV})",
            )
        return self.path / "models"

    @property
    def db(self) -> lancedb.DBConnection:
        if self._db is None:
            if self.remote:
                self.location.check()
                self._db = lancedb.connect(self.uri, storage_options=self.storage_options)
            else:
                self.path.mkdir(parents=True, exist_ok=True)
                self._db = lancedb.connect(str(self.path))
        return self._db

    def exists(self) -> bool:
        self.location.check()
        return any(n.endswith(".lance") for n in self.location.listdir(""))

    def table_names(self) -> list[str]:
        """Tables with at least one commit (a table whose creation was killed has none)."""
        self.location.check()
        if not self.location.is_dir():
            return []
        return sorted(n for n in self.db.list_tables().tables if self.committed(n))

    def committed(self, name: str) -> bool:
        """Whether table ``name`` has a committed version (one listing of its versions folder;
        unlike :meth:`has_table`, the store's location is not checked first)."""
        return any(n.endswith(".manifest") for n in self.location.listdir(f"{name}.lance/_versions"))

    def has_table(self, name: str) -> bool:
        """Whether ``name`` has a committed version (one listing, not the whole store's)."""
        self.location.check()
        return self.committed(name)

    def table(self, name: str):
        if not self.has_table(name):
            raise StoreError(
                f"{self.path}: no table {name!r}; tables: {', '.join(self.table_names()) or 'none (run ingest first)'}"
            )
        return self.db.open_table(name)

    def dataset(self, name: str):
        """The underlying ``lance.LanceDataset`` (latest version)."""
        return self.table(name).to_lance()

    # -- the writer lock ----------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, verb: str, wait: float | None = None, repair: bool = True) -> Iterator[Store]:
        """Hold the store's writer lock for a whole command (re-entrant). The outermost
        acquisition first repairs what a killed writer left (:meth:`recover`), unless
        ``repair=False`` (the write batches of a command that repaired the store at its start)."""
        outer = self._lock.acquire(verb, self.lock_wait if wait is None else wait)
        try:
            if outer and repair:
                self.recover()
            yield self
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def _commit(self, table: str | None = None) -> Iterator[None]:
        """The lock around one commit (re-entrant; no recovery). With ``table``: crash points
        ``before:<table>`` / ``after:<table>`` (``@N``: the N-th commit to it), see
        :func:`~stimage_embed.store.lock.crash_point`."""
        self._lock.acquire("write", self.lock_wait)
        try:
            if table:
                self._commits[table] += 1
                crash_point(f"before:{table}", self._commits[table])
            yield
            if table:
                crash_point(f"after:{table}", self._commits[table])
        finally:
            self._lock.release()

    def recover(self) -> None:
        """Repair what a killed writer may have left (under the lock; ``store.intents.recover``)."""
        from stimage_embed.store.intents import recover

        with self._commit():
            recover(self)
            migrate_runs(self)  # stores written before runs.vector_source

    # -- intents: markers of multi-commit writes in flight --------------------------
    def pending(self, kind: str) -> list[str]:
        """Keys of ``kind`` with a pending mark (``store.intents``: marks of writes in flight)."""
        return [k for k in self.location.listdir(f"{PENDING_DIR}/{kind}") if not k.endswith(".tmp")]

    # -- reading ------------------------------------------------------------------
    def sql(self, query: str, file_access: bool = True) -> pl.DataFrame:
        """Run DuckDB SQL over every table of the store; returns a polars DataFrame.
        ``file_access=False`` for SQL from users: no file, network or extension access."""
        return run_sql(self, query, file_access=file_access)

    def read(self, name: str, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table:
        """Scan a table with optional projection and a Lance SQL filter."""
        return self.dataset(name).to_table(columns=list(columns) if columns else None, filter=where)

    def slide_ids(self) -> list[str]:
        if not self.has_table("slides"):
            return []
        return sorted(self.read("slides", ["slide_id"])["slide_id"].to_pylist())

    # -- writing (each method is one commit, under the lock) --------------------
    def replace_slides(
        self, name: str, data: pa.Table, slide_ids: Sequence[str], schema: pa.Schema | None = None
    ) -> None:
        """Make ``data`` the only rows of ``slide_ids`` in table ``name`` (one commit)."""
        self.replace_where(
            name,
            data,
            TABLE_KEYS.get(name, ("slide_id", "spot_id")),
            f"slide_id IN ({sql_list(slide_ids)})",
            schema=schema,
        )

    def replace_where(
        self, name: str, data: pa.Table | pl.DataFrame, keys: Sequence[str], scope: str, schema: pa.Schema | None = None
    ) -> None:
        """Make ``data`` the only rows matching the Lance filter ``scope`` in table ``name``,
        in ONE commit: a ``merge_insert`` on ``keys`` that updates matching keys, inserts new
        ones and deletes the scope's other rows. One row per key whatever happened before."""
        schema = schema or S.CORE_TABLES[name]
        data = self._conform_data(data, schema)
        with self._commit(name):
            if not self.has_table(name):
                self._create(name, data, schema)
                return
            tbl = self._conformed_table(name, schema)
            data = _fill_missing(data, tbl.schema)
            (
                tbl.merge_insert(list(keys))
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(scope)
                .execute(data)
            )

    def insert_new(
        self, name: str, data: pa.Table | pl.DataFrame, keys: Sequence[str], schema: pa.Schema | None = None
    ) -> int:
        """Insert the rows whose ``keys`` are not in table ``name`` yet (one commit; rows whose
        key exists are skipped), so a table keyed this way never holds a key twice.
        Returns the number of rows inserted."""
        schema = schema or S.CORE_TABLES[name]
        data = self._conform_data(data, schema)
        with self._commit(name):
            if not self.has_table(name):
                self._create(name, data, schema)
                return data.num_rows
            tbl = self._conformed_table(name, schema)
            res = tbl.merge_insert(list(keys)).when_not_matched_insert_all().execute(_fill_missing(data, tbl.schema))
            return int(getattr(res, "num_inserted_rows", data.num_rows))

    def write_keyed(
        self,
        name: str,
        data: pa.Table | pl.DataFrame,
        keys: Sequence[str],
        schema: pa.Schema | None = None,
        replacing: str | None = None,
    ) -> int:
        """Store the rows of ``data`` whose ``keys`` table ``name`` lacks, in ONE commit: a key
        already stored is skipped, so the table never holds a key twice. Returns the rows
        written. ``replacing``: a Lance filter of old rows the same commit replaces
        (:meth:`replace_where`). On a local store the stored keys are subtracted under the
        lock, then the rest appended (the keys are read once per table version and kept
        up to date: no join with the whole table at each commit); on object storage, which
        has no cross-process lock, it is a keyed insert (:meth:`insert_new`)."""
        if replacing is not None:
            self.replace_where(name, data, keys, replacing, schema=schema)
            return len(data)
        if self.remote:
            return self.insert_new(name, data, keys, schema=schema)
        data, keys = self._conform_data(data, schema or S.CORE_TABLES[name]), tuple(keys)
        with self._commit():
            state, stored = self._keys.get(name, keys)
            fresh = [key not in stored for key in zip(*(data[k].to_pylist() for k in keys))]
            data = data.filter(pa.array(fresh, pa.bool_()))
            if data.num_rows:
                self.append(name, data, schema=schema)
                self._keys.added(name, keys, state, stored, list(zip(*(data[k].to_pylist() for k in keys))))
        return data.num_rows

    def append(self, name: str, data: pa.Table | pl.DataFrame, schema: pa.Schema | None = None) -> None:
        """Append rows to table ``name`` (created with its declared schema if missing); one commit."""
        schema = schema or S.CORE_TABLES[name]
        table = self._conform_data(data, schema)
        with self._commit(name):
            if self.has_table(name):
                tbl = self._conformed_table(name, schema)
                tbl.add(_fill_missing(table, tbl.schema))
            else:
                self._create(name, table, schema)

    def ensure_table(self, name: str, schema: pa.Schema) -> None:
        """Create ``name`` empty with ``schema`` if missing (one commit), else add the nullable
        columns ``schema`` gained since it was created."""
        if self.has_table(name):
            with self._commit():
                self._conformed_table(name, schema)
        else:
            self.append(name, schema.empty_table(), schema=schema)

    def append_fragments(self, name: str, fragments: Sequence) -> None:
        """Commit data files written elsewhere (``lance.FragmentMetadata``, e.g. by Ray
        workers) to table ``name`` as ONE Lance append; the table must exist. Files never
        committed stay invisible (Lance's cleanup reclaims them)."""
        import lance

        uri = str(self.path / f"{name}.lance")
        with self._commit(name):
            version = self.table(name).version
            lance.LanceDataset.commit(
                uri,
                lance.LanceOperation.Append(list(fragments)),
                read_version=version,
                storage_options=self.storage_options,
            )

    def delete(self, name: str, where: str) -> int:
        """Delete the rows of ``name`` matching the Lance filter ``where`` (one commit, none if
        nothing matches). Returns the number of rows deleted."""
        with self._commit():
            if not self.has_table(name):
                return 0
            tbl = self.db.open_table(name)
            n = tbl.count_rows(where)
            if n:
                with self._commit(name):
                    tbl.delete(where)
            return n

    def drop_table(self, name: str) -> None:
        self._keys.forget(name)
        with self._commit(name):
            if self.has_table(name):
                self.db.drop_table(name)

    @staticmethod
    def _conform_data(data: pa.Table | pl.DataFrame, schema: pa.Schema) -> pa.Table:
        return conform(data, schema)

    def _create(self, name: str, data: pa.Table, schema: pa.Schema) -> None:
        if self.location.is_dir(f"{name}.lance"):  # a creation killed before its first commit
            self.location.remove_tree(f"{name}.lance")
        self.db.create_table(name, data=data, schema=schema)

    def _conformed_table(self, name: str, schema: pa.Schema):
        """The table, with nullable columns the declared schema gained since it was created
        added (as nulls for existing rows), so older stores accept new writes."""
        tbl = self.db.open_table(name)
        have = set(tbl.schema.names)
        new = [f for f in schema if f.name not in have]
        if new:
            bad = [f.name for f in new if not f.nullable]
            if bad:
                raise StoreError(f"{self.path}/{name}: the table lacks required column(s) {bad}; rebuild it")
            log.info("%s/%s: adding column(s) %s", self.path, name, [f.name for f in new])
            tbl.add_columns(new)
        return tbl

    # -- matrices for heads -------------------------------------------------------
    def expression_matrix(
        self, slide_ids: Sequence[str], genes: Sequence[str] | None = None
    ) -> tuple[pl.DataFrame, list[str], sp.csr_matrix, np.ndarray]:
        """Raw counts of ``slide_ids`` as a CSR (spots x genes), aligned by gene symbol
        (:func:`stimage_embed.store.matrices.expression_matrix`)."""
        from stimage_embed.store.matrices import expression_matrix

        return expression_matrix(self, slide_ids, genes)
