"""The ``clinical`` table: typed rows upserted by key in one commit, visible to SQL joined to
slides, and bad files refused with one line while the store stays as it was.

Also the measured patient pseudo-bulk (summed counts -> log1p CPM) against an independent
read of the counts (``Store.expression_matrix``, scipy sparse sums) on the real HER2ST
sections, where patient C has two of the sections read (C2, C3) and patient B one (B4).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from store_cases import copy_store, finish, popen, table_rows
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.downstream import add_clinical, measured_expression, read_clinical


@pytest.fixture()
def store(tmp_path, ingested_store):
    return copy_store(ingested_store, tmp_path / "store")


def _csv(path, text: str):
    path.write_text(text)
    return path


def test_add_types_upserts_and_joins_slides_in_sql(tmp_path, store):
    a = _csv(tmp_path / "a.csv", "patient,time,event,subtype,age,os_time\nB,10.5,1,HER2,50,12\nC,20,0,HER2,61,\n")
    res = add_clinical(store, a, "patient")
    assert (res.inserted, res.updated, res.unknown_keys) == (2, 0, [])
    schema = store.table("clinical").schema
    assert schema.field("time").type == "double" and schema.field("event").type == "int8"
    assert schema.field("age").type == "double" and schema.field("subtype").type == "string"
    # a second file: C updated (time, a new column), Z inserted and reported unknown; age of C kept
    before = table_rows(store, "clinical", ("key",))
    b = _csv(tmp_path / "b.csv", "patient,time,grade\nC,25,high\nZ,5,low\n")
    res = add_clinical(store, b, "patient")
    assert (res.inserted, res.updated, res.unknown_keys) == (1, 1, ["Z"])
    rows = {r["key"]: r for r in read_clinical(store, "patient").to_dicts()}
    assert set(rows) == {"B", "C", "Z"}
    assert rows["C"]["time"] == 25.0 and rows["C"]["age"] == 61.0 and rows["C"]["grade"] == "high"
    assert rows["C"]["event"] == 0 and rows["C"]["os_time"] is None and rows["B"]["grade"] is None
    assert rows["Z"]["age"] is None and rows["B"]["event"] == 1
    # the rows changed in ONE commit: the version before it (the new column added) holds the old rows
    version = store.table("clinical").version
    old = pl.from_arrow(store.dataset("clinical").checkout_version(version - 1).to_table()).sort("key")
    assert old.drop("grade").to_dicts() == before and old["grade"].null_count() == old.height
    # SQL: the clinical rows join the slides of their patient
    joined = store.sql(
        "SELECT s.slide_id, c.time FROM slides s JOIN clinical c ON c.patient = s.patient "
        "WHERE c.key_kind = 'patient' ORDER BY s.slide_id"
    )
    assert joined.to_dicts() == [
        {"slide_id": "B4", "time": 10.5},
        *({"slide_id": s, "time": 25.0} for s in ("C2", "C3", "C4", "C5")),
    ]


def test_slide_keys_take_the_patient_from_slides(tmp_path, store):
    f = _csv(tmp_path / "s.csv", "slide_id,response\nC3,pCR\nC4,RD\nX9,RD\n")
    res = add_clinical(store, f, "slide_id")
    assert res.unknown_keys == ["X9"]
    got = store.sql("SELECT key, slide_id, patient, response FROM clinical ORDER BY key").to_dicts()
    assert got == [
        {"key": "C3", "slide_id": "C3", "patient": "C", "response": "pCR"},
        {"key": "C4", "slide_id": "C4", "patient": "C", "response": "RD"},
        {"key": "X9", "slide_id": "X9", "patient": "X9", "response": "RD"},
    ]


BAD = {
    "missing key column": ("id,time,event\nB,1,0\n", "patient"),
    "duplicate keys": ("patient,time,event\nB,1,0\nC,2,1\nB,3,0\n", "duplicate key(s) B on line(s) 2, 4"),
    "non-numeric time": ("patient,time,event\nB,1,0\nC,soon,1\n", "line 3: time 'soon' is not a number"),
    "event not 0/1": ("patient,time,event\nB,1,0\nC,2,2\n", "line 3: event '2' is not 0 or 1"),
    "negative time": ("patient,dfs_time,event\nB,-4,0\n", "dfs_time: line 2: negative time -4"),
    "event column by suffix": ("patient,time,os_event\nB,1,yes\n", "os_event: line 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_get_one_line_and_write_nothing(tmp_path, store, case):
    good = _csv(tmp_path / "good.csv", "patient,time,event\nB,7,1\n")
    add_clinical(store, good, "patient")
    before = table_rows(store, "clinical", ("key",))
    version = store.table("clinical").version
    text, expected = BAD[case]
    bad = _csv(tmp_path / "bad.csv", text)
    res = CliRunner().invoke(app, ["clinical", "add", str(bad), "--key", "patient", "--store", str(store.path)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    assert str(bad) in lines[0] and expected in lines[0], lines[0]
    assert store.table("clinical").version == version and table_rows(store, "clinical", ("key",)) == before


def test_cli_add_reports_counts_and_unknown_keys(tmp_path, store):
    f = _csv(tmp_path / "c.csv", "patient,time,event\nB,1,0\nQ,2,1\n")
    res = CliRunner().invoke(app, ["clinical", "add", str(f), "--store", str(store.path)])
    assert res.exit_code == 0, res.output
    assert "2 row(s) inserted, 0 updated" in res.stdout and "1 key(s) not in the store's slides" in res.stdout


def test_measured_pseudobulk_is_log1p_cpm_of_summed_counts(store):
    long = measured_expression(store, "patient", slides=["B4", "C2", "C3"])
    assert set(long["unit"].unique()) == {"B", "C"}
    for patient, slides in {"B": ["B4"], "C": ["C2", "C3"]}.items():
        keys, genes, counts, _ = store.expression_matrix(slides)
        qc = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "passes_qc"]))
        keep = keys.join(qc, on=["slide_id", "spot_id"], how="left")["passes_qc"].to_numpy()
        summed = np.asarray(counts[keep].sum(axis=0)).ravel().astype(float)
        ref = dict(zip(genes, np.log1p(summed / summed.sum() * 1e6), strict=True))
        got = long.filter(pl.col("unit") == patient)
        assert got["n_slides"].max() == len(slides)
        vals = dict(zip(got["gene"], got["value"], strict=True))
        common = [g for g in genes if summed[genes.index(g)] > 0]
        assert set(common) <= set(vals)
        np.testing.assert_allclose([vals[g] for g in common], [ref[g] for g in common], rtol=1e-9)


def test_two_processes_adding_at_once_both_land(tmp_path):
    """Two ``clinical add`` processes on one store: the writer lock serialises them, every
    row of both files is there once, the shared key holds one of the two versions whole."""
    a = _csv(
        tmp_path / "a.csv", "patient,time,event,site\n" + "".join(f"A{i},{i},1,x\n" for i in range(30)) + "S,1,1,a\n"
    )
    b = _csv(
        tmp_path / "b.csv", "patient,time,event,site\n" + "".join(f"B{i},{i},0,y\n" for i in range(30)) + "S,2,0,b\n"
    )
    store = tmp_path / "store"
    procs = [popen("clinical", "add", str(f), "--store", str(store), "--wait", "120") for f in (a, b)]
    for proc in procs:
        code, _, err = finish(proc)
        assert code == 0, err
    from stimage_embed.store import Store

    rows = pl.from_arrow(Store(store).read("clinical")).sort("key")
    assert rows.height == 61 and rows["key"].n_unique() == 61
    s = rows.filter(pl.col("key") == "S").row(0, named=True)
    assert (s["time"], s["event"], s["site"]) in {(1.0, 1, "a"), (2.0, 0, "b")}
