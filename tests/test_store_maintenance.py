"""Store upkeep (store/maintenance.py): after many small commits, one compact fragment and a
slide_id index covering every row; reads by slide go through the index and return exactly
what a plain scan returns; ingest and embed leave their tables maintained."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from stimage_embed.predictions.arrays import load_embeddings
from stimage_embed.store import Store
from stimage_embed.store import schema as S
from stimage_embed.store.maintenance import SLIDE_INDEX, SlideReader, data_files, maintain, open_dataset, read_slides

DIM = 8


def _rows(slide: str, n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    vec = rng.standard_normal((n, DIM)).astype(np.float16)
    return pa.table(
        {
            "slide_id": [slide] * n,
            "spot_id": [f"{slide}_{i:04d}" for i in range(n)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float16()), DIM),
            "tissue_fraction": pa.array(np.ones(n), pa.float32()),
            "padded_fraction": pa.array(np.zeros(n), pa.float32()),
            "tile_um": pa.array(np.full(n, 100.0), pa.float32()),
            "um_per_px": pa.array(np.full(n, 0.5), pa.float32()),
            "provenance_id": ["p"] * n,
        }
    )


@pytest.fixture()
def fragmented(tmp_path) -> Store:
    """A vector table written like the pass writes it: many small commits, slides interleaved."""
    store = Store(tmp_path / "s")
    with store.writer("test"):
        for k in range(12):
            store.append(
                "embeddings_x",
                _rows(f"S{k % 4}", 25, k).set_column(
                    1, "spot_id", pa.array([f"S{k % 4}_{k:02d}_{i:02d}" for i in range(25)])
                ),
                schema=S.embedding_schema(DIM),
            )
    return store


def _plain(store: Store, table: str, slides: list[str]) -> pa.Table:
    """The reference: a scan of every fragment without any index."""
    ds = open_dataset(store, table)
    t = ds.to_table(use_scalar_index=False)
    return t.filter(pa.compute.is_in(t["slide_id"], pa.array(slides))).sort_by(
        [("slide_id", "ascending"), ("spot_id", "ascending")]
    )


def test_upkeep_compacts_indexes_and_keeps_the_rows(fragmented: Store) -> None:
    table = "embeddings_x"
    ds = open_dataset(fragmented, table)
    assert len(ds.get_fragments()) == 12 and not ds.describe_indices()
    before = _plain(fragmented, table, ["S0", "S1", "S2", "S3"])
    report = maintain(fragmented, [table], retain=dt.timedelta(0))
    up = report.tables[0]
    assert (up.fragments_before, up.fragments_after, up.indexed) == (12, 1, "created")
    assert up.versions_removed > 0
    ds = open_dataset(fragmented, table)
    assert len(ds.get_fragments()) == 1
    stats = ds.stats.index_stats(SLIDE_INDEX)
    assert stats["num_indexed_rows"] == 300 and stats["num_unindexed_rows"] == 0
    assert _plain(fragmented, table, ["S0", "S1", "S2", "S3"]).equals(before)
    # the read by slide is resolved through the index, and returns what a plain scan returns
    plan = ds.scanner(filter="slide_id IN ('S2')", use_scalar_index=True).explain_plan()
    assert "ScalarIndexQuery" in plan
    for slides in (["S2"], ["S3", "S0"], ["nope"]):
        got = read_slides(fragmented, table, slides).sort_by([("slide_id", "ascending"), ("spot_id", "ascending")])
        assert got.equals(_plain(fragmented, table, slides))


def test_upkeep_is_idempotent_and_folds_new_rows_into_the_index(fragmented: Store) -> None:
    table = "embeddings_x"
    maintain(fragmented, [table])
    again = maintain(fragmented, [table]).tables[0]
    assert (again.fragments_before, again.fragments_after, again.indexed) == (1, 1, "")
    with fragmented.writer("test"):
        fragmented.append(table, _rows("S9", 10, 99), schema=S.embedding_schema(DIM))
        fragmented.delete(table, "slide_id = 'S1'")
    up = maintain(fragmented, [table]).tables[0]
    assert up.indexed == "updated" and up.fragments_after == 1 and up.deleted_rows_before > 0
    ds = open_dataset(fragmented, table)
    assert ds.stats.dataset_stats()["num_deleted_rows"] == 0
    assert ds.stats.index_stats(SLIDE_INDEX)["num_unindexed_rows"] == 0
    assert read_slides(fragmented, table, ["S9"]).num_rows == 10
    assert read_slides(fragmented, table, ["S1"]).num_rows == 0


def test_slide_reader_reads_the_same_rows_and_sees_new_writes(fragmented: Store) -> None:
    table = "embeddings_x"
    maintain(fragmented, [table])
    reader = SlideReader(fragmented)
    order = [("slide_id", "ascending"), ("spot_id", "ascending")]
    for _ in range(2):  # the second read uses what the first one parsed
        assert (
            reader.read(table, ["S1", "S3"])
            .sort_by(order)
            .equals(read_slides(fragmented, table, ["S1", "S3"]).sort_by(order))
        )
    with fragmented.writer("test"):
        fragmented.append(
            table,
            _rows("S1", 3, 5).set_column(1, "spot_id", pa.array(["new0", "new1", "new2"])),
            schema=S.embedding_schema(DIM),
        )
    assert reader.read(table, ["S1"]).num_rows == 75 + 3
    keys, X = load_embeddings(fragmented, "x", ["S1"], reader=reader)
    assert keys.height == 78 and keys["spot_id"].is_sorted() and X.shape == (78, DIM)


def test_data_files_count_only_new_commits(fragmented: Store) -> None:
    table = "embeddings_x"
    old = data_files(fragmented, table)
    with fragmented.writer("test"):
        fragmented.append(table, _rows("S7", 40, 7), schema=S.embedding_schema(DIM))
    new = {p: b for p, b in data_files(fragmented, table).items() if p not in old}
    assert len(new) == 1 and sum(new.values()) > 40 * DIM * 2
    assert data_files(fragmented, "no_such_table") == {}


def test_read_of_a_table_without_index_still_works(tmp_path) -> None:
    """An older store (no upkeep yet): the same rows, by a full scan."""
    store = Store(tmp_path / "s")
    with store.writer("test"):
        for k in range(3):
            store.append("embeddings_y", _rows(f"T{k}", 5, k), schema=S.embedding_schema(DIM))
    keys, X = load_embeddings(store, "y", ["T1", "T2"])
    assert keys["slide_id"].to_list() == ["T1"] * 5 + ["T2"] * 5 and X.shape == (10, DIM) and X.dtype == np.float32


def test_ingest_and_embed_leave_their_tables_maintained(embedded_store: Store) -> None:
    """The session's stores were written by ingest and embed: every per-slide table is one
    fragment (or a few large ones) with a complete slide_id index."""
    for table in ("slides", "spots", "genes", "expression", "embeddings_efficientnet_lite0"):
        ds = open_dataset(embedded_store, table)
        assert len(ds.get_fragments()) == 1, table
        assert ds.stats.index_stats(SLIDE_INDEX)["num_unindexed_rows"] == 0, table
    keys, X = load_embeddings(embedded_store, "efficientnet_lite0", ["C5"])
    assert keys.height == 181 and (keys["slide_id"] == "C5").all() and keys["spot_id"].is_sorted()
