"""The ``knn`` head on real Lite0 vectors (HER2ST C4, C5): its neighbours and weighted means
against scikit-learn, the grouped CV choice, the approximate path, the shuffled-vector
control through ``compare``, and a saved model's round trip through ``train``/``predict``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors

from heads import load_head, log1p_normalise, save_head
from heads.knn import KNNRegressor, exact_neighbours, unit_rows
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.predictions.arrays import load_spot_arrays
from stimage_embed.predictions.genes import select_genes
from stimage_embed.predictions.registry import head_names
from stimage_embed.store import Store

BB = "efficientnet_lite0"


@pytest.fixture(scope="module")
def arrays(embedded_store):
    keys, gl, counts, lib = embedded_store.expression_matrix(["C4"])
    genes = select_genes("var:20", counts, gl, keys["slide_id"].to_numpy(), ["C4"], library_size=lib)
    return load_spot_arrays(embedded_store, BB, ["C4"], genes), load_spot_arrays(embedded_store, BB, ["C5"], genes)


def test_knn_is_registered():
    assert "knn" in head_names(spans_backbones=False)


def test_exact_neighbours_equal_sklearn_brute_cosine(arrays):
    train, test = arrays
    idx, sim = exact_neighbours(unit_rows(test.X), unit_rows(train.X), 7)
    dist, ref = NearestNeighbors(n_neighbors=7, metric="cosine", algorithm="brute").fit(train.X).kneighbors(test.X)
    np.testing.assert_allclose(1 - sim, dist, atol=1e-5)
    assert (idx == ref).mean() > 0.99  # float ties aside


def test_prediction_equals_sklearn_weighted_knn(arrays):
    train, test = arrays
    k, t = 10, 0.05
    head = KNNRegressor(ks=(k,), temperatures=(t,), cv=2).fit(
        train.X, train.counts, groups=None, library_size=train.library_size
    )
    target = log1p_normalise(train.counts, train.library_size)
    ref = KNeighborsRegressor(
        n_neighbors=k, metric="cosine", algorithm="brute", weights=lambda d: np.exp((1 - d) / t)
    ).fit(train.X, target)
    np.testing.assert_allclose(head.predict_log1p_norm(test.X), ref.predict(test.X), rtol=1e-4, atol=1e-5)
    counts = head.predict(test.X, library_size=test.library_size)
    np.testing.assert_allclose(
        np.log1p(counts / test.library_size[:, None] * 1e4), head.predict_log1p_norm(test.X), atol=1e-6
    )


def test_cv_choice_is_the_minimum_and_grouped(arrays):
    train, test = arrays
    X = np.vstack([train.X, test.X])
    Y = np.vstack([train.counts, test.counts])
    lib = np.concatenate([train.library_size, test.library_size])
    groups = np.array(["C4"] * len(train.X) + ["C5"] * len(test.X))
    head = KNNRegressor(ks=(3, 20), temperatures=(0.05, 1.0)).fit(X, Y, groups=groups, library_size=lib)
    i, j = np.unravel_index(np.argmin(head.cv_mse_), head.cv_mse_.shape)
    assert (head.k_, head.temperature_) == ((3, 20)[i], (0.05, 1.0)[j])
    assert head.cv_mse_.shape == (2, 2) and np.isfinite(head.cv_mse_).all()
    # grouped: the CV error is the error of predicting one slide from the other
    only_c4 = KNNRegressor(ks=(head.k_,), temperatures=(head.temperature_,)).fit(
        train.X, train.counts, library_size=train.library_size
    )
    err = ((only_c4.predict_log1p_norm(test.X) - log1p_normalise(test.counts, test.library_size)) ** 2).mean()
    assert err == pytest.approx(head.cv_mse_[i, j], rel=0.5)


def test_approximate_path_agrees_with_exact(arrays):
    train, test = arrays
    kw = dict(ks=(10,), temperatures=(0.1,), cv=2)
    exact = KNNRegressor(**kw).fit(train.X, train.counts, library_size=train.library_size)
    ann = KNNRegressor(ann_above=50, **kw).fit(train.X, train.counts, library_size=train.library_size)
    assert (exact.search_, ann.search_) == ("exact", "ann")
    a, b = exact.predict_log1p_norm(test.X), ann.predict_log1p_norm(test.X)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98


def test_save_load_round_trip(arrays, tmp_path):
    train, test = arrays
    head = KNNRegressor(ks=(5,), temperatures=(0.1,), cv=2).fit(train.X, train.counts, library_size=train.library_size)
    back = load_head(save_head(head, tmp_path / "m", provenance={"backbone": BB}))
    np.testing.assert_array_equal(back.predict_log1p_norm(test.X), head.predict_log1p_norm(test.X))


def test_knn_passes_the_shuffled_control(tmp_path, embedded_store):
    store = Store(tmp_path / "store")
    shutil.copytree(embedded_store.path, store.path)
    cfg = CompareConfig(
        backbones=[BB],
        heads=["knn"],
        genes="var:20",
        datasets=["her2st"],
        train_slides=["C4"],
        test_slides=["C5"],
        controls=["shuffled"],
    )
    compare(store, cfg, progress=False)
    scores = store.sql(
        """SELECT coalesce(r.control, 'none') AS control, avg(m.value) AS value, count(m.value) AS n
           FROM metrics m JOIN runs r USING (run_id)
           WHERE m.scope = 'slide' AND m.metric = 'pearson' AND r.head = 'knn' GROUP BY ALL"""
    )
    ctrl = scores.filter(pl.col("control") == "shuffled")
    real = scores.filter(pl.col("control") == "none")
    assert ctrl["n"][0] == 20 and real["n"][0] == 20
    assert abs(ctrl["value"][0]) < 0.05, ctrl
    assert real["value"][0] > ctrl["value"][0] + 0.05, (real, ctrl)


def test_train_and_predict_a_saved_knn_model(tmp_path, embedded_store):
    from stimage_embed.predictions.saved_model import load_saved_model
    from stimage_embed.predictions.train_predict import predict, train

    store = Store(tmp_path / "store")
    shutil.copytree(embedded_store.path, store.path)
    rid, path = train(store, BB, "knn", "var:20", ["C4"])
    assert (path / "arrays.safetensors").is_file()
    pred = predict(store, rid, ["C5"])
    assert pred["gene"].n_unique() == 20 and pred["mean_log1p"].is_finite().all()
    genes = json.loads((path / "run.json").read_text())["genes"]
    test = load_spot_arrays(store, BB, ["C5"], genes, only_qc=False)
    want = load_saved_model(store, rid).head.predict_log1p_norm(test.X)  # training vectors read back by reference
    got = pred.pivot("gene", index=["slide_id", "spot_id"], values="mean_log1p").sort("slide_id", "spot_id")
    assert got["spot_id"].to_list() == test.keys["spot_id"].to_list()
    np.testing.assert_allclose(got.select(genes).to_numpy(), want, rtol=1e-5, atol=1e-6)
