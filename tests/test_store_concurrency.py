"""Two writers on one store at once (issue 9): the store lock serialises them, keyed writes
keep one row per key, and cleanup never removes rows another writer still owns.

Writers run as real processes (the command line) on copies of real stores: the session's
``embedded_store`` (HER2ST C4, C5 vectors) for compare/predict, and a tiny slide cut from
HER2ST C5 (12 spots) for the embedding pass.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import polars as pl
import pytest
from store_cases import BACKBONE, CHUNK, TABLE, copy_store, embed_args, finish, key_counts, mini_dataset, popen
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.errors import InputError, StoreError
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.ingest.pipeline import ingest
from stimage_embed.predictions.train_predict import predict, train
from stimage_embed.store import Store

PRED_KEY = ("run_id", "slide_id", "spot_id", "gene")
CMP_ARGS = ("--backbones", BACKBONE, "--heads", "mean", "--genes", "hvg:5", "--dataset", "her2st")
#: a second, different compare (other genes: other run ids); heads stay cheap (mean)
OTHER = CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:4", datasets=["her2st"])


@pytest.fixture(scope="module")
def mini(tmp_path_factory, real_data_root):
    """A store holding two 12-spot slides (S1 from C5, S2 from C4), no vectors."""
    root = tmp_path_factory.mktemp("mini")
    catalog = mini_dataset(root / "data", real_data_root)
    store = Store(root / "store")
    ingest(str(catalog), store, progress=False)
    return store, catalog


def _runs_complete(store: Store) -> pl.DataFrame:
    """Per committed run: prediction rows vs (QC-passing test spots x genes) expected."""
    runs = store.sql("SELECT run_id, len(genes) AS g, test_slides FROM runs WHERE split <> 'train'")
    qc = store.sql("SELECT slide_id, COUNT(*) AS n FROM spots WHERE passes_qc GROUP BY 1")
    n_qc = dict(zip(qc["slide_id"], qc["n"]))
    got = store.sql("SELECT run_id, COUNT(*) AS n FROM predictions GROUP BY 1")
    have = dict(zip(got["run_id"], got["n"]))
    return runs.with_columns(
        pl.Series("expected", [g * sum(n_qc[s] for s in t) for g, t in zip(runs["g"], runs["test_slides"])]),
        pl.Series("n", [have.get(r, 0) for r in runs["run_id"]]),
    )


# --- the lock ------------------------------------------------------------------------
def test_a_busy_store_is_refused_in_one_line_and_wait_queues(tmp_path, mini):
    store, catalog = mini
    st = copy_store(store, tmp_path / "s")
    n_spots = st.read("spots", ["spot_id"]).num_rows
    runner = CliRunner()
    held, release = threading.Event(), threading.Event()

    def hold():  # another writer (an embed) holding the store
        with Store(st.path).writer("embed"):
            held.set()
            release.wait(120)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(60)
        res = runner.invoke(app, ["ingest", str(catalog), "--store", str(st.path)])
        assert res.exit_code == 2
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and f"store {st.path} is busy (held by pid {os.getpid()}, embed)" in lines[0], res.output
        # reads need no lock
        res = runner.invoke(
            app, ["query", "SELECT COUNT(*) AS n FROM spots", "--store", str(st.path), "--format", "csv"]
        )
        assert res.exit_code == 0 and res.output.splitlines()[-1] == str(n_spots)
        # --wait queues behind the holder: released a moment later, the train gets the lock
        # and runs (failing on its own input, which proves it got past the lock)
        threading.Timer(0.5, release.set).start()
        res = runner.invoke(app, ["train", "--store", str(st.path), "--train", "NOPE", "--wait", "120"])
    finally:
        release.set()
        thread.join()
    assert res.exit_code == 2 and "training slides not in the store" in res.output and "busy" not in res.output


def test_two_embeds_at_once_store_each_key_once(tmp_path, mini):
    """Before: twice as many rows as keys (46 for 23 with 24 selected spots: each process
    appended every chunk)."""
    store, _ = mini
    st = copy_store(store, tmp_path / "s")
    args = embed_args(st.path, "--slide", "S1", "--stain", "none", "--wait", "900")
    procs = [popen(*args), popen(*args)]
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    n_spots = st.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id = 'S1'")["n"][0]
    assert key_counts(st, TABLE, ("slide_id", "spot_id")) == (n_spots, n_spots)
    written = sorted(
        json.loads(r[1].split("vectors written ")[1].split(";")[0].replace("'", '"')).get(BACKBONE, 0) for r in results
    )
    assert written == [0, n_spots]  # one pass embedded everything, the other found it done


def test_a_table_with_duplicate_keys_is_repaired_by_the_next_embed(tmp_path, mini):
    """Stores written by unsynchronised writers hold keys twice; embed restores one row per key."""
    from stimage_embed.embeddings.embed_pass import embed

    store, _ = mini
    st = copy_store(store, tmp_path / "s")
    embed(
        st,
        [BACKBONE],
        slides=["S2"],
        stain="none",
        precision="float32",
        batch_size=CHUNK,
        num_workers=0,
        progress=False,
    )
    ref = st.read(TABLE).sort_by([("spot_id", "ascending")])
    st.db.open_table(TABLE).add(ref.slice(0, CHUNK))  # what two racing writers left behind
    assert key_counts(st, TABLE, ("slide_id", "spot_id")) == (ref.num_rows + CHUNK, ref.num_rows)
    embed(
        st,
        [BACKBONE],
        slides=["S2"],
        stain="none",
        precision="float32",
        batch_size=CHUNK,
        num_workers=0,
        progress=False,
    )
    assert key_counts(st, TABLE, ("slide_id", "spot_id")) == (ref.num_rows, ref.num_rows)
    after = st.read(TABLE).sort_by([("spot_id", "ascending")])
    assert after.column("vector").equals(ref.column("vector"))  # re-embedded to the same vectors


# --- compare and predict -------------------------------------------------------------------
def test_a_second_compare_cannot_drop_a_run_in_flight(tmp_path, embedded_store):
    """Before: the second compare deleted the first one's predictions (written, runs row not
    yet), and the first then committed a run with 0 predictions."""
    path = copy_store(embedded_store, tmp_path / "s").path
    first = Store(path)
    paused, resume = threading.Event(), threading.Event()
    append = first.append

    def slow_append(name, data, schema=None):
        if name == "runs" and not paused.is_set():  # sit between the predictions and the commit marker
            paused.set()
            resume.wait(120)
        return append(name, data, schema)

    first.append = slow_append
    cfg = CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5", datasets=["her2st"])
    errors = []
    thread = threading.Thread(target=lambda: _run(errors, compare, first, cfg, progress=False))
    thread.start()
    try:
        assert paused.wait(300), errors
        try:
            compare(Store(path), OTHER, progress=False)
        except StoreError as exc:
            assert "busy (held by pid" in str(exc)
    finally:
        resume.set()
        thread.join()
    assert not errors, errors
    compare(Store(path), OTHER, progress=False)
    st = Store(path)
    runs = _runs_complete(st)
    assert runs.height == 4 and (runs["n"] == runs["expected"]).all(), runs
    assert key_counts(st, "predictions", PRED_KEY)[0] == key_counts(st, "predictions", PRED_KEY)[1]


def _run(errors, func, *args, **kwargs):
    try:
        func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported by the test thread
        errors.append(repr(exc))


def test_two_compares_at_once_commit_each_run_once(tmp_path, embedded_store):
    st = copy_store(embedded_store, tmp_path / "s")
    procs = [popen("compare", "--store", str(st.path), *CMP_ARGS, "--wait", "900") for _ in range(2)]
    results = [finish(p) for p in procs]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    assert key_counts(st, "runs", ("run_id",)) == (2, 2)
    runs = _runs_complete(st)
    assert (runs["n"] == runs["expected"]).all(), runs
    n, k = key_counts(st, "predictions", PRED_KEY)
    assert n == k == runs["expected"].sum()
    n, k = key_counts(st, "metrics", ("run_id", "scope", "slide_id", "gene", "metric"))
    assert n == k > 0


def test_compare_and_predict_at_once_keep_both(tmp_path, embedded_store):
    st = copy_store(embedded_store, tmp_path / "s")
    rid, _ = train(st, BACKBONE, "mean", "hvg:5", ["C4"])
    p_pred = popen("predict", "--store", str(st.path), "--model", rid, "--slide", "C5", "--wait", "900")
    p_cmp = popen("compare", "--store", str(st.path), *CMP_ARGS, "--wait", "900")
    results = [finish(p) for p in (p_pred, p_cmp)]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    n_c5 = st.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id = 'C5'")["n"][0]
    mine = st.sql(f"SELECT COUNT(*) AS n, COUNT(DISTINCT (spot_id, gene)) AS k FROM predictions WHERE run_id = '{rid}'")
    assert (mine["n"][0], mine["k"][0]) == (n_c5 * 5, n_c5 * 5)
    runs = _runs_complete(st)
    assert runs.height == 2 and (runs["n"] == runs["expected"]).all(), runs


def test_compare_never_purges_rows_written_by_predict(tmp_path, embedded_store):
    """Before: compare removed a model's predictions as 'uncommitted' when the store had no
    runs row for it (a model folder trained elsewhere)."""
    st = copy_store(embedded_store, tmp_path / "s")
    rid, path = train(st, BACKBONE, "mean", "hvg:5", ["C4"])
    elsewhere = tmp_path / "model"
    shutil.copytree(path, elsewhere)
    other = copy_store(embedded_store, tmp_path / "other")
    pred = predict(other, str(elsewhere), ["C5"])
    # rows of another writer with no runs row at all (e.g. image-only inference) are not compare's either
    foreign = pred.with_columns(pl.lit("f" * 20).alias("run_id"))
    other.append("predictions", foreign)
    compare(
        other, CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5", datasets=["her2st"]), progress=False
    )
    got = other.sql("SELECT run_id, COUNT(*) AS n FROM predictions GROUP BY 1")
    counts = dict(zip(got["run_id"], got["n"]))
    assert counts[rid] == pred.height and counts["f" * 20] == pred.height
    assert other.sql(f"SELECT split FROM runs WHERE run_id = '{rid}'")["split"].to_list() == ["train"]


def test_predict_replaces_its_rows_and_refuses_a_crafted_run_id(tmp_path, embedded_store):
    """Before: a run.json with run_id "x' OR '1'='1" deleted every run's predictions of the slide."""
    st = copy_store(embedded_store, tmp_path / "s")
    rid_a, path_a = train(st, BACKBONE, "mean", "hvg:5", ["C4"])
    rid_b, _ = train(st, BACKBONE, "mean", "hvg:4", ["C4"])
    n_a = predict(st, rid_a, ["C5"]).height
    n_b = predict(st, rid_b, ["C5"]).height
    predict(st, rid_a, ["C5"])  # again: replaces, never duplicates
    assert key_counts(st, "predictions", PRED_KEY) == (n_a + n_b, n_a + n_b)
    evil = tmp_path / "evil"
    shutil.copytree(path_a, evil)
    meta = json.loads((evil / "run.json").read_text())
    meta["run_id"] = "x' OR slide_id = 'C5' OR '1'='1"
    (evil / "run.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="run_id: not a run id"):
        predict(st, str(evil), ["C5"])
    got = st.sql("SELECT run_id, COUNT(*) AS n FROM predictions GROUP BY 1")
    assert dict(zip(got["run_id"], got["n"])) == {rid_a: n_a, rid_b: n_b}
