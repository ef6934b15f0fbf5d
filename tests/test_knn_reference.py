"""A saved ``knn`` model references its training vectors by store and content version
(issue 20): by default its folder holds no training vectors or profiles; loading it reads
them back from the training store (as the user named it, symlink kept), and predicts
exactly as a folder that copies them (``--knn-copy-vectors``). Training vectors or counts
that are gone or changed, or a store that is gone, are refused in one line (exit 2), with
the store unchanged.

Real data: HER2ST C4 (training) and C5 Lite0 vectors of the session's embedded store.
"""

from __future__ import annotations

import json
import shutil

import lance
import numpy as np
import pytest
from safetensors.numpy import load_file
from store_cases import one_error_line
from typer.testing import CliRunner

from heads import load_head
from stimage_embed.cli import app
from stimage_embed.predictions.arrays import load_spot_arrays
from stimage_embed.predictions.saved_model import load_saved_model
from stimage_embed.predictions.train_predict import train
from stimage_embed.predictions.training_ref import KEYS_FILE, REF_FILE
from stimage_embed.store import Store

BB = "efficientnet_lite0"
TABLE = f"embeddings_{BB}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, embedded_store):
    """A store copy reached through a symlink, a knn model trained on C4 there (reference,
    copied out of the store), then the same run saved self-contained (``copy_vectors``)."""
    tmp = tmp_path_factory.mktemp("knnref")
    shutil.copytree(embedded_store.path, tmp / "real_store")
    (tmp / "link").symlink_to(tmp / "real_store", target_is_directory=True)
    store = Store(tmp / "link")
    rid, folder = train(store, BB, "knn", "var:10", ["C4"], params={"ks": (5, 10), "temperatures": (0.05, 1.0)})
    ref_folder = shutil.copytree(folder, tmp / "ref_model")
    rid2, copy_folder = train(
        store, BB, "knn", "var:10", ["C4"], params={"ks": (5, 10), "temperatures": (0.05, 1.0)}, copy_vectors=True
    )
    assert rid2 == rid  # the same run: same configuration and inputs
    return {"tmp": tmp, "store": store, "rid": rid, "ref": ref_folder, "copy": copy_folder}


def _refuse(args: list[str], *needles: str) -> str:
    res = CliRunner().invoke(app, args)
    return one_error_line(res.output, res.exit_code, *needles)


def _versions(store: Store) -> dict[str, int]:
    return {n: store.table(n).version for n in store.table_names()}


def test_reference_folder_holds_no_training_arrays(trained):
    ref, copy = trained["ref"], trained["copy"]
    assert set(load_file(str(ref / "arrays.safetensors"))).isdisjoint({"X_train_", "T_train_"})
    assert {"X_train_", "T_train_"} <= set(load_file(str(copy / "arrays.safetensors")))
    assert not (copy / REF_FILE).exists() and not (copy / KEYS_FILE).exists()  # the copy replaced the reference
    doc = json.loads((ref / REF_FILE).read_text())
    assert doc["store"] == str(trained["tmp"] / "link")  # as named, not symlink-resolved
    assert doc["tables"] == [TABLE] and sorted(doc["versions"]) == ["C4"]
    assert set(doc["versions"]["C4"]) == {"expression", TABLE}
    n = json.loads((ref / "run.json").read_text())["n_train_spots"]
    assert doc["n_spots"] == n and len(__import__("polars").read_parquet(ref / KEYS_FILE)) == n


def test_reference_model_predicts_exactly_as_the_copy(trained):
    store = trained["store"]
    by_ref = load_saved_model(store, str(trained["ref"]))
    by_copy = load_saved_model(store, str(trained["copy"]))
    for attr in ("X_train_", "T_train_"):  # read back from the store, bit for bit
        np.testing.assert_array_equal(getattr(by_ref.head, attr), getattr(by_copy.head, attr))
    test = load_spot_arrays(store, BB, ["C5"], by_ref.genes, only_qc=False)
    got = by_ref.head.predict_log1p_norm(test.X)
    np.testing.assert_array_equal(got, by_copy.head.predict_log1p_norm(test.X))
    # independent: the weighted mean of the neighbours' log1p(CP10k), from sklearn on the raw training arrays
    from sklearn.neighbors import KNeighborsRegressor

    from heads import log1p_normalise

    train_arrays = load_spot_arrays(store, BB, ["C4"], by_ref.genes)
    k, t = by_ref.head.k_, by_ref.head.temperature_
    sk = KNeighborsRegressor(n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t))
    sk.fit(train_arrays.X, log1p_normalise(train_arrays.counts, train_arrays.library_size))
    np.testing.assert_allclose(got, sk.predict(test.X), rtol=1e-4, atol=1e-5)
    # a folder without its arrays cannot predict until they are attached
    with pytest.raises(Exception, match="not fitted"):
        load_head(trained["ref"]).predict_log1p_norm(test.X)


def _copy_store(trained, name: str) -> Store:
    """A fresh copy of the training store with the reference folder pointing at it."""
    tmp = trained["tmp"]
    st = Store(shutil.copytree(tmp / "real_store", tmp / name))
    folder = shutil.copytree(trained["ref"], tmp / f"model_{name}")
    doc = json.loads((folder / REF_FILE).read_text())
    (folder / REF_FILE).write_text(json.dumps({**doc, "store": str(st.path)}))
    return st, folder


def test_cli_predict_with_the_reference_works(trained):
    st, folder = _copy_store(trained, "ok")
    res = CliRunner().invoke(app, ["predict", "--store", str(st.path), "--model", str(folder), "--slide", "C5"])
    assert res.exit_code == 0, res.output
    assert "prediction rows written" in res.output


@pytest.mark.parametrize("change", ["vectors_deleted", "spot_deleted", "counts_reingested", "store_gone"])
def test_gone_or_changed_training_data_is_refused_in_one_line(trained, change):
    st, folder = _copy_store(trained, change)
    where = st.path
    if change == "vectors_deleted":
        st.delete(TABLE, "slide_id = 'C4'")
        needles = ["C4", "gone"]
    elif change == "spot_deleted":
        spot = st.read(TABLE, ["spot_id"], where="slide_id = 'C4'")["spot_id"][0].as_py()
        st.delete(TABLE, f"slide_id = 'C4' AND spot_id = '{spot}'")
        needles = ["C4", "changed"]
    elif change == "counts_reingested":  # what a re-ingest with other counts records
        lance.dataset(str(st.path / "slides.lance")).update(
            {"expression_hash": "'0000000000000000'"}, where="slide_id = 'C4'"
        )
        needles = ["counts of training slide C4 changed"]
    else:
        shutil.rmtree(where)
        needles = ["is gone"]
    # predict into another store (the training store may be gone): nothing written anywhere
    other = trained["tmp"] / "real_store"
    before = _versions(Store(other))
    line = _refuse(
        ["predict", "--store", str(other), "--model", str(folder), "--slide", "C5"],
        str(where),
        "stimage-embed train",
        "--knn-copy-vectors",
        *needles,
    )
    assert REF_FILE in line
    assert _versions(Store(other)) == before
    assert not where.exists() if change == "store_gone" else where.is_dir()  # never re-created


@pytest.mark.parametrize("head", [["ridge"], ["label", "--labels", "any"]])
def test_copy_option_only_for_heads_with_training_vectors(trained, head):
    st = trained["store"]
    before = _versions(st)
    args = ["train", "--store", str(st.path), "--head", *head, "--train", "C4", "--knn-copy-vectors"]
    _refuse(args, "--knn-copy-vectors", "knn")
    assert _versions(st) == before


def test_search_shows_a_runs_predicted_expression(trained):
    """``search --genes G --predicted RUN``: the hits' predicted log1p(CP10k) by that run, equal
    to the saved head's own prediction on the hits' vectors; an unknown run or gene: one line."""
    from stimage_embed.predictions.train_predict import predict
    from stimage_embed.search import search

    st, folder = _copy_store(trained, "search")
    predict(st, str(folder), ["C5"])
    sm = load_saved_model(st, str(folder))
    genes = sm.genes[:3]
    spot = st.read(TABLE, ["spot_id"], where="slide_id = 'C5'")["spot_id"][0].as_py()
    hits = search(st, BB, like=f"C5:{spot}", k=5, where="slide_id = 'C5'", genes=genes, predicted=sm.run_id)
    test = load_spot_arrays(st, BB, ["C5"], sm.genes, only_qc=False)
    row = {s: i for i, s in enumerate(test.keys["spot_id"].to_list())}
    want = sm.head.predict_log1p_norm(test.X[[row[s] for s in hits["spot_id"].to_list()]])[:, :3]
    np.testing.assert_allclose(hits.select(genes).to_numpy(), want, rtol=1e-5, atol=1e-5)
    base = ["search", "--store", str(st.path), "--like", f"C5:{spot}"]
    _refuse([*base, "--genes", genes[0], "--predicted", "0123456789abcdef0123"], "--predicted", "no run")
    _refuse([*base, "--genes", "NOT_A_GENE", "--predicted", sm.run_id], "--genes", "not predicted")


def test_infer_with_the_reference_equals_the_copy_and_refuses_a_gone_store(trained):
    """``infer`` on a fresh store: the reference folder (training vectors read from the training
    store) predicts a small real C5 region exactly as the self-contained copy; once the
    training store is gone, one line, nothing written."""
    from stimage_embed.inference.infer import infer

    tmp = trained["tmp"]
    st, folder = _copy_store(trained, "infer")
    slide = st.read("slides", ["image_path", "um_per_px"], where="slide_id = 'C5'").to_pylist()[0]
    region = (3800.0, 3300.0, 4250.0, 3750.0)  # level-0 px of C5.jpg: a few tiles of tissue
    preds = {}
    for name, model in (("ref", folder), ("copy", trained["copy"])):
        out_store = Store(tmp / f"infer_{name}")
        kw = dict(slide_id="C5_region", um_per_px=slide["um_per_px"], region=region, num_workers=0)
        infer(out_store, slide["image_path"], str(model), tmp / f"out_{name}", **kw)
        preds[name] = out_store.sql(
            "SELECT spot_id, gene, mean_log1p FROM predictions WHERE slide_id = 'C5_region' ORDER BY spot_id, gene"
        )
    assert preds["ref"].height > 0
    assert preds["ref"].equals(preds["copy"])
    shutil.rmtree(st.path)
    target = Store(tmp / "infer_ref")
    before = _versions(target)
    args = ["infer", slide["image_path"], "--store", str(target.path), "--um-per-px", str(slide["um_per_px"])]
    _refuse([*args, "--model", str(folder), "--out", str(tmp / "out_gone")], "is gone", str(st.path))
    assert _versions(target) == before and not (tmp / "out_gone").exists()
