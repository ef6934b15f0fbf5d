"""The ``label`` head registered like the other heads: ``compare --heads nb,label --labels``,
``train --head label``, ``predict`` and ``infer`` of a label model.

Known answer on REAL HER2ST tiles (C3, C4, C5 with Lite0 vectors): a label that follows the
image (tercile of each spot's mean H&E grey level within its slide, as in
``test_heads_label``) is learned well above chance (1/3); the shuffled control (training
labels permuted within slides) stays at chance. References: scikit-learn's
``balanced_accuracy_score`` / ``f1_score`` on the stored predictions, and the head's own
``predict_proba`` on the same vectors.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score
from store_cases import copy_store, table_rows
from test_heads_label import _grey_terciles
from typer.testing import CliRunner

from stimage_embed.cli import app

SLIDES = ("C3", "C4", "C5")


@pytest.fixture(scope="module")
def label_store(embedded_store, tmp_path_factory):
    """A copy of ``embedded_store`` with Lite0 vectors of C3 too, and the grey-tercile label
    set ``tone`` of the three HER2ST slides C3, C4, C5."""
    from stimage_embed.embeddings.embed_pass import embed

    tmp = tmp_path_factory.mktemp("label_cmds")
    store = copy_store(embedded_store, tmp / "store")
    embed(store, ["efficientnet_lite0"], slides=["C3"], precision="float32", num_workers=1, progress=False)
    _grey_terciles(store, SLIDES).to_csv(tmp / "tone.csv", index=False)
    res = CliRunner().invoke(
        app,
        ["labels", "add", str(tmp / "tone.csv"), "--key", "slide,spot", "--column", "tone", "--store", str(store.path)],
    )
    assert res.exit_code == 0, res.output
    return store


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_compare_nb_and_label_heads(label_store, tmp_path):
    store = label_store
    base = ["compare", "--dataset", "her2st", "--genes", "var:10", "--store", store.path]
    # bad input first: one line, exit 2, nothing written
    before = {t: table_rows(store, t, ("run_id",)) for t in ("runs",) if store.has_table(t)}
    for extra, word in ((["--heads", "nb,label"], "--labels"), (["--heads", "nb,label", "--labels", "nope"], "nope")):
        res = _cli(*base, *extra)
        assert res.exit_code == 2 and word in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert {t: table_rows(store, t, ("run_id",)) for t in ("runs",) if store.has_table(t)} == before
    assert not store.has_table("label_metrics")

    args = [*base, "--heads", "nb,label", "--labels", "tone", "--control", "shuffled", "--report", tmp_path / "rep"]
    res = _cli(*args)
    assert res.exit_code == 0, res.output
    runs = pl.from_arrow(store.read("runs")).filter(pl.col("head") == "label")
    assert runs.height == 6 and set(runs["control"]) == {"none", "shuffled"}  # 3 folds x 2 controls
    assert set(runs["gene_spec"]) == {"labels:tone"} and all(
        sorted(g) == ["dark", "mid", "pale"] for g in runs["genes"]
    )
    nb = pl.from_arrow(store.read("runs")).filter(pl.col("head") == "nb")
    assert sorted(nb["fold"]) == sorted(runs["fold"])  # the same folds as the expression head
    # the stored metrics against scikit-learn on the stored predictions
    pred = pl.from_arrow(store.read("label_predictions"))
    spots = pred.unique(["run_id", "slide_id", "spot_id"])
    probs = pred.group_by("run_id", "slide_id", "spot_id").agg(pl.col("prob").sum())
    np.testing.assert_allclose(probs["prob"].to_numpy(), 1.0, atol=1e-5)
    met = pl.from_arrow(store.read("label_metrics"))
    ba = {}
    for r in runs.iter_rows(named=True):
        g = spots.filter(pl.col("run_id") == r["run_id"])
        want = balanced_accuracy_score(g["observed"].to_numpy(), g["label"].to_numpy())
        m = met.filter((pl.col("run_id") == r["run_id"]) & (pl.col("metric") == "balanced_accuracy"))
        assert m.height == 1 and m["slide_id"][0] == r["test_slides"][0]
        assert m["value"][0] == pytest.approx(want)
        f1 = met.filter((pl.col("run_id") == r["run_id"]) & (pl.col("metric") == "f1")).sort("class")
        np.testing.assert_allclose(
            f1["value"].to_numpy(),
            f1_score(g["observed"].to_numpy(), g["label"].to_numpy(), labels=f1["class"].to_list(), average=None),
        )
        ba.setdefault(r["control"], []).append(want)
    print("balanced accuracy (chance 1/3):", {k: np.round(v, 3).tolist() for k, v in ba.items()})  # shown with -s
    assert min(ba["none"]) > 0.45
    assert all(abs(v - 1 / 3) < 0.12 for v in ba["shuffled"])
    assert "label head" in res.output and "mean macro-F1" in res.output
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "## Label head" in report and len(list((tmp_path / "rep").glob("confusion_tone_*.png"))) == 1

    # a rerun reuses every run; re-added labels (another content) recompute the label runs only
    res = _cli(*args[:-2])
    assert res.exit_code == 0 and "0 run(s) computed" in res.output, res.output
    tone = pl.from_arrow(store.read("labels")).to_pandas()
    tone.loc[0, "label"] = "pale" if tone.loc[0, "label"] != "pale" else "dark"
    tone.rename(columns={"label": "tone"}).to_csv(tmp_path / "tone2.csv", index=False)
    assert _cli("labels", "add", tmp_path / "tone2.csv", "--column", "tone", "--store", store.path).exit_code == 0
    res = _cli(*args[:-2])
    assert res.exit_code == 0 and "6 run(s) computed, 6 reused" in res.output, res.output
    # the label head alone: its runs reused, its report section in a report of its own
    res = _cli(*base, "--heads", "label", "--labels", "tone", "--report", tmp_path / "rep2")
    assert res.exit_code == 0 and "0 run(s) computed, 3 reused" in res.output, res.output
    assert "## Label head" in (tmp_path / "rep2" / "report.md").read_text()


def test_train_predict_and_infer_a_label_model(label_store, real_data_root, tmp_path):
    import anndata as ad

    from heads import load_head
    from heads.label import LabelClassifier
    from stimage_embed.predictions.arrays import load_embeddings
    from stimage_embed.predictions.label_runs import label_arrays

    store = label_store
    runs_before = table_rows(store, "runs", ("run_id",))
    for extra, word in ((["--head", "label"], "--labels"), (["--head", "label", "--labels", "nope"], "nope")):
        res = _cli("train", "--train", "C4", *extra, "--store", store.path)
        assert res.exit_code == 2 and word in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert table_rows(store, "runs", ("run_id",)) == runs_before

    res = _cli("train", "--head", "label", "--labels", "tone", "--train", "C4", "--store", store.path)
    assert res.exit_code == 0, res.output
    rid = res.output.split()[1]
    model_dir = store.path / "models" / rid
    meta = json.loads((model_dir / "run.json").read_text())
    assert meta["head"] == "label" and meta["genes"] == meta["classes"] == ["dark", "mid", "pale"]
    assert pl.from_arrow(store.read("runs")).filter(pl.col("run_id") == rid)["gene_spec"].to_list() == ["labels:tone"]

    # predict: stored probabilities equal a head fitted on the same vectors, and the saved head's own
    res = _cli("predict", "--model", rid, "--slide", "C5", "--out", tmp_path / "pred", "--store", store.path)
    assert res.exit_code == 0 and "balanced accuracy" in res.output, res.output
    assert (tmp_path / "pred" / "C5" / "class_map.png").stat().st_size > 1000
    rows = pl.from_arrow(store.read("label_predictions", where=f"run_id = '{rid}'")).sort("spot_id", "class")
    wide = rows.pivot("class", index="spot_id", values="prob").sort("spot_id")
    keys, X = load_embeddings(store, "efficientnet_lite0", ["C5"])
    order = {s: i for i, s in enumerate(keys["spot_id"].to_list())}
    X5 = X[[order[s] for s in wide["spot_id"].to_list()]]
    stored = wide.select("dark", "mid", "pale").to_numpy()
    np.testing.assert_allclose(stored, load_head(model_dir).predict_proba(X5), atol=1e-6)
    data = label_arrays(store, "efficientnet_lite0", "tone", ["C4"], only_qc=True)
    np.testing.assert_allclose(stored, LabelClassifier().fit(data.X, data.y).predict_proba(X5), atol=1e-5)
    assert set(rows["observed"].drop_nulls()) <= {"dark", "mid", "pale"}

    # infer on C5's image (a region of it) as an image-only slide
    umpp = store.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0]
    cx, cy = store.sql("SELECT median(pixel_x) x, median(pixel_y) y FROM spots WHERE slide_id = 'C5'").row(0)
    half = 600 / umpp  # a 1.2 mm square around the tissue centre
    region = f"{cx - half:.0f},{cy - half:.0f},{cx + half:.0f},{cy + half:.0f}"
    image = real_data_root / "her2st" / "images" / "C5.jpg"
    args = ["infer", image, "--model", rid, "--out", tmp_path / "inf", "--slide-id", "C5_tone", "--um-per-px", umpp]
    res = _cli(*args, "--region", region, "--workers", 0, "--store", store.path)
    assert res.exit_code == 0, res.output
    tiles = pl.from_arrow(store.read("label_predictions", where=f"run_id = '{rid}' AND slide_id = 'C5_tone'"))
    sums = tiles.group_by("spot_id").agg(pl.col("prob").sum(), pl.len())
    assert sums.height >= 20 and (sums["len"] == 3).all()
    np.testing.assert_allclose(sums["prob"].to_numpy(), 1.0, atol=1e-5)
    adata = ad.read_h5ad(tmp_path / "inf" / "C5_tone.h5ad")
    assert adata.n_obs == sums.height and list(adata.var_names) == ["dark", "mid", "pale"]
    np.testing.assert_allclose(adata.X.sum(1), 1.0, atol=1e-5)
    assert (np.asarray(adata.var_names)[adata.X.argmax(1)] == adata.obs["label"].astype(str).to_numpy()).all()
    assert (tmp_path / "inf" / "C5_tone" / "class_map.png").stat().st_size > 1000
