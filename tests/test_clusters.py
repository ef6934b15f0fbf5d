"""Leiden clusters of predicted profiles: recovery of synthetic groups (synthetic), agreement
with Leiden on the measured profiles of a real HER2ST section against a shuffled baseline
(sklearn's adjusted Rand index), the ``cluster`` verb and its table, and ``infer``'s
``obs['leiden']``."""

from __future__ import annotations

import shutil

import anndata as ad
import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.metrics import adjusted_rand_score
from sklearn.preprocessing import scale
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.evaluation.clusters import cluster_run, leiden_labels, top_genes
from stimage_embed.store import Store


@pytest.fixture(scope="module")
def pred_store(tmp_path_factory, infer_model_store):
    """A copy of ``infer_model_store`` (ridge on C4) with the model's predictions on C5."""
    from stimage_embed.predictions.train_predict import predict

    src, run_id = infer_model_store
    path = tmp_path_factory.mktemp("clusters") / "store"
    shutil.copytree(src.path, path)
    store = Store(path)
    with store.writer("predict"):
        predict(store, run_id, ["C5"])
    return store, run_id


def test_leiden_recovers_separated_groups_synthetic():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (3, 12))
    truth = np.repeat([0, 1, 2], 40)
    X = centres[truth] + rng.normal(0, 0.5, (120, 12))
    labels = leiden_labels(X, resolution=0.5, seed=0)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    assert labels[0] in {"0", "1", "2"} and leiden_labels(X, 0.5, 0).tolist() == labels.tolist()
    tops = top_genes(X, labels, [f"g{j}" for j in range(12)], n=2)
    means = pd.DataFrame(scale(X)).groupby(truth).mean()  # sklearn's z-scores, pandas' group means
    assert tops[labels[0]] == [f"g{j}" for j in means.loc[0].sort_values(ascending=False).index[:2]]


def test_predicted_clusters_follow_measured_clusters_on_c5(pred_store):
    """ARI(Leiden on predicted, Leiden on measured log1p CP10k of the same C5 spots, same genes)
    must beat the 99th percentile of the ARI with the predicted labels shuffled among spots."""
    store, run_id = pred_store
    res = cluster_run(store, run_id, ["C5"], resolution=0.5, seed=0)
    cl = pl.from_arrow(store.read("clusters", where=f"run_id = '{run_id}'")).sort("spot_id")
    genes = store.sql(f"SELECT DISTINCT gene FROM predictions WHERE run_id = '{run_id}'")["gene"].sort().to_list()
    keys, genes, counts, lib = store.expression_matrix(["C5"], genes)
    measured = np.log1p(counts.toarray() / lib[:, None] * 1e4)
    order = {s: i for i, s in enumerate(keys["spot_id"].to_list())}
    rows = [order[s] for s in cl["spot_id"]]
    truth = leiden_labels(measured[rows], resolution=0.5, seed=0)
    pred = cl["leiden"].to_numpy()
    ari = adjusted_rand_score(truth, pred)
    rng = np.random.default_rng(0)
    null = [adjusted_rand_score(truth, rng.permutation(pred)) for _ in range(200)]
    print(
        f"C5 Leiden predicted vs measured: ARI {ari:.3f}; shuffled ARI mean {np.mean(null):.3f}, "
        f"99th pct {np.quantile(null, 0.99):.3f}; {len(res.sizes)} predicted, {len(set(truth))} measured clusters"
    )
    assert ari > np.quantile(null, 0.99)


def test_cluster_verb_writes_a_table_sql_reads(pred_store, tmp_path):
    store, run_id = pred_store
    result = CliRunner().invoke(
        app, ["cluster", "--run", run_id, "--slide", "C5", "--store", str(store.path), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "Leiden clusters" in result.output and (tmp_path / "C5_leiden.png").is_file()
    n_spots = store.sql(f"SELECT COUNT(DISTINCT spot_id) AS n FROM predictions WHERE run_id = '{run_id}'")["n"][0]
    q = store.sql(f"SELECT COUNT(*) AS n, COUNT(DISTINCT spot_id) AS s FROM clusters WHERE run_id = '{run_id}'")
    assert q["n"][0] == q["s"][0] == n_spots  # one row per spot, replaced on re-run
    bad = CliRunner().invoke(app, ["cluster", "--run", "nope", "--store", str(store.path)])
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1 and "no predictions of run 'nope'" in lines[0]


def test_infer_adds_leiden_to_its_anndata(tmp_path, infer_model_store, real_data_root):
    from stimage_embed.inference.infer import infer

    src, run_id = infer_model_store
    shutil.copytree(src.path, tmp_path / "store")
    store = Store(tmp_path / "store")
    res = infer(
        store,
        real_data_root / "her2st/images/C5.jpg",
        run_id,
        tmp_path / "out",
        slide_id="C5_leiden",
        um_per_px=store.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0],
        region=(3800.0, 3800.0, 4700.0, 4700.0),  # ~36 tiles
        num_workers=0,
    )
    adata = ad.read_h5ad(res.anndata)
    assert "leiden" in adata.obs and adata.obs["leiden"].notna().all()
    assert set(adata.uns["leiden_top_genes"]) == set(adata.obs["leiden"].astype(str))
    assert (tmp_path / "out/C5_leiden/leiden.png").is_file()
    tab = store.sql(f"SELECT spot_id, leiden FROM clusters WHERE run_id = '{run_id}' AND slide_id = 'C5_leiden'")
    got = dict(zip(tab["spot_id"], tab["leiden"]))
    assert got == dict(zip(adata.obs_names, adata.obs["leiden"].astype(str)))
