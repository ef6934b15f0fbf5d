"""Writers killed between their commits (issue 9): every writing command is SIGKILLed at
several points (``STIMAGE_FAULT``: the store kills the process before/after a chosen
commit), the next writer repairs what was left under the store lock, and a re-run
restores exactly the state of an uninterrupted run. Also: re-ingest and re-embed keep
vectors consistent with their slides (``--overwrite --slide``, moved spots, the default
stain template).

Data: two tiny slides cut from HER2ST C5 and C4 (12 spots each, tests/store_cases.py),
and the session's ``embedded_store`` where a macenko-normalised table is needed.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from store_cases import (
    BACKBONE,
    CHUNK,
    TABLE,
    cli,
    copy_store,
    embed_args,
    key_counts,
    killed,
    mini_dataset,
    table_rows,
)

from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.embeddings.provenance import existing_provenance
from stimage_embed.errors import ProvenanceError
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.ingest.pipeline import ingest
from stimage_embed.predictions.train_predict import predict, train
from stimage_embed.store import Store
from stimage_embed.store import schema as S

FAST = dict(stain="none", precision="float32", batch_size=CHUNK, num_workers=0, progress=False)
KEYS = {
    "slides": ("slide_id",),
    "spots": ("slide_id", "spot_id"),
    "genes": ("slide_id", "gene_index"),
    "expression": ("slide_id", "spot_id"),
}


@pytest.fixture(scope="module")
def mini(tmp_path_factory, real_data_root):
    """(ingested store, the same with S1/S2 embedded (no stain normalisation), catalog)."""
    root = tmp_path_factory.mktemp("mini")
    catalog = mini_dataset(root / "data", real_data_root)
    ingested = Store(root / "ingested")
    ingest(str(catalog), ingested, progress=False)
    embedded = copy_store(ingested, root / "embedded")
    embed(embedded, [BACKBONE], **FAST)
    return ingested, embedded, catalog


def _core_state(store: Store) -> dict[str, list[dict]]:
    """Every row of the ingest tables (``ingested_at`` aside: the time of the run)."""
    out = {}
    for name, keys in KEYS.items():
        rows = table_rows(store, name, keys)
        out[name] = [{k: v for k, v in r.items() if k != "ingested_at"} for r in rows]
    return out


def _vectors(store: Store, slide: str) -> tuple[list[str], np.ndarray]:
    t = pl.from_arrow(store.read(TABLE, ["spot_id", "vector"], where=f"slide_id = '{slide}'")).sort("spot_id")
    return t["spot_id"].to_list(), np.stack(t["vector"].to_numpy())


# --- ingest --------------------------------------------------------------------------------
def test_ingest_killed_between_commits_is_undone_and_a_rerun_completes_it(tmp_path, mini, real_data_root):
    """Before: a kill after `genes` left 31,563 gene rows (and a half-created `expression`
    table that made every later command fail) with no `slides` row; since issue 18 a
    re-ingest killed between its commits is put back to the previous version of the slide
    by the next writer (issue 18 item 6), here a re-ingest with S1's spots moved."""
    ingested, _, _ = mini
    reference = _core_state(ingested)
    st = copy_store(ingested, tmp_path / "s")
    # a table whose creation a crash interrupted: a folder without any commit
    (st.path / "predictions.lance" / "data").mkdir(parents=True)
    (st.path / "predictions.lance" / "data" / ".tmp_killed").write_bytes(b"")
    assert "predictions" not in st.table_names()
    moved = mini_dataset(tmp_path / "moved", real_data_root, slides={"S1": "C5"}, shift_px={"S1": 60.0})
    args = ("ingest", str(moved), "--store", str(st.path), "--slide", "S1")
    for fault in ("after:genes@1", "after:spots@1"):
        assert killed(cli(*args, check=False, fault=fault))
        assert st.pending("ingest"), fault
        with st.writer("test"):  # any writer puts the tables back under the lock
            pass
        assert st.pending("ingest") == [] and _core_state(st) == reference, fault
    assert not (st.path / "predictions.lance").exists()  # removed by the writer's recovery
    # killed inside the recovery itself (after restoring genes): the next writer finishes it
    assert killed(cli(*args, check=False, fault="after:spots@1"))
    assert killed(cli(*args, check=False, fault="after:genes@1"))
    with st.writer("test"):
        pass
    assert _core_state(st) == reference
    cli(*args)
    new = _core_state(st)
    s1 = [r for r in new["spots"] if r["slide_id"] == "S1"]
    old = [r for r in reference["spots"] if r["slide_id"] == "S1"]
    assert [r["pixel_x"] - o["pixel_x"] for r, o in zip(s1, old)] == pytest.approx([60.0] * len(old))


def test_a_table_whose_creation_was_killed_is_replaced_on_the_next_write(tmp_path):
    store = Store(tmp_path / "s")
    (store.path / "runs.lance" / "data").mkdir(parents=True)
    assert store.table_names() == []
    store.append("runs", pa.Table.from_pylist([{"run_id": "a" * 20}], schema=S.RUNS))
    assert store.table_names() == ["runs"] and store.table("runs").count_rows() == 1


# --- embed ---------------------------------------------------------------------------------
def test_embed_killed_at_its_commits_resumes_to_the_uninterrupted_vectors(tmp_path, mini):
    """Includes a run killed between its provenance commit and its first vectors: before, that
    record labelled the vectors of the next run (table_provenance returned it)."""
    ingested, embedded, _ = mini
    ref_ids, ref_vec = _vectors(embedded, "S1")
    st = copy_store(ingested, tmp_path / "s")
    args = embed_args(st.path, "--slide", "S1", "--stain", "none")
    # 1. another configuration (150 µm tiles), killed between provenance and the first vectors
    assert killed(cli(*args, "--tile-um", "150", check=False, fault="after:provenance"))
    assert st.read("provenance").num_rows == 1
    assert not st.has_table(TABLE) or st.table(TABLE).count_rows() == 0
    # 2.-3. the default configuration, killed after its first chunk twice
    assert killed(cli(*args, check=False, fault=f"after:{TABLE}@1"))
    assert key_counts(st, TABLE, ("slide_id", "spot_id")) == (CHUNK, CHUNK)
    provs = existing_provenance(st, TABLE)
    assert [p["tile_um"] for p in provs] == ["spot_diameter"], "a provenance no vector uses labels the table"
    assert killed(cli(*args, check=False, fault=f"after:{TABLE}@1"))
    assert key_counts(st, TABLE, ("slide_id", "spot_id")) == (2 * CHUNK, 2 * CHUNK)
    # 4. the re-run completes the table: one row per key, vectors of an uninterrupted run
    cli(*args)
    ids, vec = _vectors(st, "S1")
    assert ids == ref_ids and np.array_equal(vec, ref_vec)
    prov = st.sql(f"SELECT provenance_id FROM provenance WHERE table_name = '{TABLE}'")["provenance_id"].to_list()
    assert prov == st.sql(f"SELECT DISTINCT provenance_id FROM {TABLE}")["provenance_id"].to_list()


def test_overwrite_with_slide_replaces_only_that_slide(tmp_path, mini):
    """Before: `embed --overwrite --slide S1` dropped every other slide's vectors."""
    _, embedded, _ = mini
    st = copy_store(embedded, tmp_path / "s")
    before = {s: _vectors(st, s) for s in ("S1", "S2")}
    with pytest.raises(ProvenanceError, match="omit --slide"):
        embed(st, [BACKBONE], slides=["S1"], overwrite=True, tile_um=150.0, **FAST)
    report = embed(st, [BACKBONE], slides=["S1"], overwrite=True, **FAST)
    assert report.vectors == {BACKBONE: len(before["S1"][0])}
    for s in ("S1", "S2"):
        ids, vec = _vectors(st, s)
        assert ids == before[s][0] and np.array_equal(vec, before[s][1]), s


def test_reingesting_moved_spots_invalidates_and_reembeds_their_vectors(tmp_path, mini, real_data_root):
    """Before: the old vectors stayed, and `embed` reported "embedded 0 tiles"."""
    _, embedded, _ = mini
    st = copy_store(embedded, tmp_path / "s")
    old_ids, old_vec = _vectors(st, "S1")
    s2 = _vectors(st, "S2")
    moved = mini_dataset(tmp_path / "moved", real_data_root, slides={"S1": "C5"}, shift_px={"S1": 60.0})
    ingest(str(moved), st, progress=False)
    # the re-ingest invalidated S1's vectors (and only S1's): no stale vector can be trained on
    assert st.sql(f"SELECT COUNT(*) AS n FROM {TABLE} WHERE slide_id = 'S1'")["n"][0] == 0
    report = embed(st, [BACKBONE], slides=["S1"], **FAST)
    assert report.vectors == {BACKBONE: len(old_ids)}
    ids, vec = _vectors(st, "S1")
    assert ids == old_ids and not np.array_equal(vec, old_vec)
    h = st.sql(
        f"""SELECT DISTINCT e.geometry_hash = s.geometry_hash AS same FROM {TABLE} e JOIN slides s USING (slide_id)"""
    )
    assert h["same"].to_list() == [True]
    ids2, vec2 = _vectors(st, "S2")
    assert ids2 == s2[0] and np.array_equal(vec2, s2[1])
    # embedding again finds everything current
    assert embed(st, [BACKBONE], **FAST).vectors == {}


def test_the_default_stain_template_is_the_one_the_table_recorded(tmp_path, embedded_store, real_data_root):
    """Before: adding slide A0 (sorting before B4) made it the default template, and the
    next embed was refused (stain_template: table has 'B4', this run has 'A0')."""
    st = copy_store(embedded_store, tmp_path / "s")
    recorded = {p["stain_template"] for p in existing_provenance(st, TABLE)}
    extra = mini_dataset(tmp_path / "extra", real_data_root, slides={"A0": "C3"}, name="extra")
    ingest(str(extra), st, progress=False)
    assert st.slide_ids()[0] == "A0" and recorded == {"B4"}
    embed(st, [BACKBONE], slides=["A0"], precision="float32", num_workers=0, progress=False)
    pids = st.sql(
        f"SELECT slide_id, COUNT(DISTINCT provenance_id) AS p, any_value(provenance_id) AS pid FROM {TABLE} GROUP BY 1"
    )
    assert set(pids["p"]) == {1} and pids["pid"].n_unique() == 1 and "A0" in pids["slide_id"].to_list()


# --- train, predict, compare ----------------------------------------------------------------
def test_train_killed_around_its_runs_commit_is_restored_by_a_rerun(tmp_path, mini):
    _, embedded, _ = mini
    st = copy_store(embedded, tmp_path / "s")
    args = ("train", "--store", str(st.path), "--head", "mean", "--genes", "hvg:5", "--train", "S2")
    assert killed(cli(*args, check=False, fault="before:runs"))  # model saved, runs row not yet
    assert not st.has_table("runs")
    [folder] = list((st.path / "models").iterdir())
    arrays = (folder / "arrays.safetensors").read_bytes()
    assert killed(cli(*args, check=False, fault="after:runs"))  # committed, then killed
    cli(*args)
    assert st.sql("SELECT run_id FROM runs")["run_id"].to_list() == [folder.name]
    assert (folder / "arrays.safetensors").read_bytes() == arrays


def test_predict_killed_at_its_commit_never_loses_rows(tmp_path, mini):
    """Before: predict deleted the run's rows, then appended; a kill in between lost them."""
    _, embedded, _ = mini
    st = copy_store(embedded, tmp_path / "s")
    rid, _ = train(st, BACKBONE, "mean", "hvg:5", ["S2"])
    predict(st, rid, ["S1"])
    order = ("run_id", "slide_id", "spot_id", "gene")
    reference = table_rows(st, "predictions", order)
    args = ("predict", "--store", str(st.path), "--model", rid, "--slide", "S1")
    for fault in ("before:predictions", "after:predictions"):
        assert killed(cli(*args, check=False, fault=fault))
        assert table_rows(st, "predictions", order) == reference, fault
    cli(*args)
    assert table_rows(st, "predictions", order) == reference


def test_compare_killed_between_its_commits_is_cleaned_and_completed(tmp_path, mini):
    _, embedded, _ = mini
    ref = copy_store(embedded, tmp_path / "ref")
    compare(ref, CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5"), progress=False)
    st = copy_store(embedded, tmp_path / "s")
    args = ("compare", "--store", str(st.path), "--backbones", BACKBONE, "--heads", "mean", "--genes", "hvg:5")
    # killed after the first run's predictions, then after the (recomputed) first run's metrics
    assert killed(cli(*args, check=False, fault="after:predictions@1"))
    assert st.pending("compare") and not st.has_table("runs")
    assert killed(cli(*args, check=False, fault="after:metrics@1"))
    assert (
        key_counts(st, "predictions", ("run_id", "slide_id", "spot_id", "gene"))[0] == st.read("predictions").num_rows
    )
    cli(*args)
    assert st.pending("compare") == []
    for name, order in (
        ("runs", ("run_id",)),
        ("predictions", ("run_id", "slide_id", "spot_id", "gene")),
        ("metrics", ("run_id", "scope", "slide_id", "gene", "metric")),
    ):
        drop = {"created_at", "fit_seconds"}
        got = [{k: v for k, v in r.items() if k not in drop} for r in table_rows(st, name, order)]
        want = [{k: v for k, v in r.items() if k not in drop} for r in table_rows(ref, name, order)]
        assert got == want, name
