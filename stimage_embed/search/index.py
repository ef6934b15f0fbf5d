"""``stimage-embed index``: a LanceDB vector index on ``embeddings_<backbone>``.

Default: IVF_HNSW_SQ (IVF partitions, an HNSW graph per partition over 8-bit scalar-quantised
vectors), cosine distance. LanceDB indexes the table's float16 vectors as they are stored.

Keeping it up: rows appended after the build (``embed``) are searched exactly next to the
index until folded in, so results stay correct in the meantime; running ``index`` again folds
them in (``optimize_indices``: new rows are assigned to the existing partitions, no
retraining, no full rebuild). ``rebuild=True`` retrains from scratch.

Below :data:`EXACT_BELOW` rows an index does not pay (exact search of the whole table is
about as fast, see docs/search.md for the measurement): ``index`` then builds nothing unless
forced, and :func:`stimage_embed.search.query.search` searches exactly.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from stimage_embed.errors import InputError, StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store
from stimage_embed.store.vector_index import index_config as store_index_config

log = logging.getLogger(__name__)

VECTOR_COLUMN = "vector"
METRIC = "cosine"
INDEX_TYPES = ("IVF_HNSW_SQ", "IVF_PQ", "IVF_HNSW_PQ", "IVF_SQ", "IVF_FLAT")
DEFAULT_INDEX_TYPE = "IVF_HNSW_SQ"
#: tables with fewer rows are searched exactly (an index does not pay; measured, docs/search.md)
EXACT_BELOW = 5_000
#: rows per IVF partition the default partition count aims at (an HNSW graph per partition)
ROWS_PER_PARTITION = 25_000


@dataclass
class IndexReport:
    """What :func:`build_index` did: ``action`` created | updated | up to date | exact
    (no index: below :data:`EXACT_BELOW` rows)."""

    table: str
    rows: int
    action: str
    index_type: str | None = None
    num_partitions: int | None = None
    seconds: float = 0.0

    def line(self) -> str:
        if self.action == "exact":
            return (
                f"{self.table}: {self.rows} rows < {EXACT_BELOW}: searched exactly, no index built "
                "(--force builds one anyway)"
            )
        parts = f", {self.num_partitions} partitions" if self.num_partitions else ""
        return (
            f"{self.table}: {self.rows} rows, {self.index_type} ({METRIC}{parts}) {self.action} in {self.seconds:.1f} s"
        )


def vector_table(store: Store, backbone: str):
    """The LanceDB table of ``backbone``'s vectors; a one-line error if it is missing or empty."""
    name = S.embedding_table_name(backbone)
    if not store.has_table(name):
        raise InputError(
            None, "--backbone", f"{store.path}: no vectors of {backbone!r} (no table {name}); run `stimage-embed embed`"
        )
    tbl = store.table(name)
    if tbl.count_rows() == 0:
        raise InputError(
            None, "--backbone", f"{store.path}/{name}: the table has no vectors; run `stimage-embed embed`"
        )
    return tbl


def vector_index(tbl) -> object | None:
    """The table's index on the vector column (LanceDB ``IndexConfig``), or None."""
    for idx in tbl.list_indices():
        if list(idx.columns) == [VECTOR_COLUMN]:
            return idx
    return None


def default_partitions(rows: int) -> int:
    """IVF partitions for ``rows`` vectors: about :data:`ROWS_PER_PARTITION` rows each."""
    return max(1, math.ceil(rows / ROWS_PER_PARTITION))


def index_config(index_type: str, num_partitions: int):
    """The LanceDB index configuration of ``index_type`` (cosine, ``num_partitions`` IVF partitions)."""
    return store_index_config(index_type, num_partitions, METRIC)


def build_index(
    store: Store,
    backbone: str,
    index_type: str = DEFAULT_INDEX_TYPE,
    num_partitions: int | None = None,
    force: bool = False,
    rebuild: bool = False,
) -> IndexReport:
    """Build or update the vector index of ``backbone`` (see the module doc), under the
    store's writer lock."""
    if index_type not in INDEX_TYPES:
        raise InputError(None, "--index-type", f"{index_type!r}; choose from {', '.join(INDEX_TYPES)}")
    if num_partitions is not None and num_partitions <= 0:
        raise InputError(None, "--partitions", f"must be > 0, got {num_partitions}")
    with store.writer("index"):
        tbl = vector_table(store, backbone)
        rows = tbl.count_rows()
        report = IndexReport(tbl.name, rows, "exact")
        existing = vector_index(tbl)
        if existing is None and rows < EXACT_BELOW and not force:
            return report
        t0 = time.perf_counter()
        if existing is not None and not rebuild:
            stats = tbl.index_stats(existing.name)
            report.index_type = stats.index_type
            if stats.num_unindexed_rows:
                store.dataset(tbl.name).optimize.optimize_indices(index_names=[existing.name])
                report.action = "updated"
            else:
                report.action = "up to date"
        else:
            parts = num_partitions or default_partitions(rows)
            if parts > rows:
                raise StoreError(f"{tbl.name}: {parts} partitions for {rows} rows; give fewer --partitions")
            tbl.create_index(VECTOR_COLUMN, config=index_config(index_type, parts), replace=True)
            report.action, report.index_type, report.num_partitions = "created", index_type, parts
        report.seconds = time.perf_counter() - t0
    log.info("%s", report.line())
    return report
