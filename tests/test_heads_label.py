"""The label head (multinomial elastic net), its metrics, the labels table and CLI.

References: scikit-learn (``LogisticRegression`` + ``StandardScaler``, ``f1_score``,
``balanced_accuracy_score``, ``confusion_matrix``). Known answer on REAL HER2ST tiles: a
label that follows the image (tercile of each spot's mean H&E grey level within its
slide) is learned from Lite0 vectors well above chance across slides; the same labels
shuffled within each training slide stay at chance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score
from sklearn.preprocessing import StandardScaler
from store_cases import copy_store, table_rows
from typer.testing import CliRunner

from heads.label import LabelClassifier
from stimage_embed.evaluation.label_metrics import label_scores, plot_confusion
from stimage_embed.predictions.registry import head_names, head_spec


def _blobs(n=300, dim=12, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, dim)) + 3.0 * np.eye(k, dim)[y]
    return X.astype(np.float32), np.array(["a", "b", "c"])[y]


def test_label_head_contract_and_sklearn_reference():
    X, y = _blobs()
    head = LabelClassifier(C=0.5, l1_ratio=0.3)
    with pytest.raises(NotFittedError):
        head.predict(X)
    assert clone(head).get_params() == head.get_params()
    assert head.fit(X, y) is head and list(head.classes_) == ["a", "b", "c"]
    ref = LogisticRegression(
        C=0.5, l1_ratio=0.3, solver="saga", class_weight="balanced", max_iter=300, tol=1e-3, random_state=0
    )
    Xs = StandardScaler().fit_transform(X)
    ref.fit(Xs, y)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Xs), atol=1e-6)
    assert np.array_equal(head.predict(X), ref.predict(Xs))
    assert head.coef_.shape == (3, 12) and (head.predict(X) == y).mean() > 0.8
    with pytest.raises(ValueError, match="at least 2 classes"):
        LabelClassifier().fit(X, np.full(len(y), "a"))
    with pytest.raises(ValueError, match="features"):
        head.predict(X[:, :5])
    # registered once, kept out of the gene-expression heads' defaults
    assert head_spec("label").output == "label" and "label" not in head_names()
    assert head_names(output="label") == ("label",)


def test_label_metrics_match_sklearn(tmp_path):
    rng = np.random.default_rng(1)
    y_true = rng.choice(["t", "s", "r", "q"], 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.choice(["t", "s", "r", "x"], 200))  # "x": never true
    s = label_scores(y_true, y_pred)
    labels = sorted(set(y_true))
    assert list(s.classes) == labels
    assert s.macro_f1 == pytest.approx(f1_score(y_true, y_pred, labels=labels, average="macro"))
    np.testing.assert_allclose(s.per_class_f1, f1_score(y_true, y_pred, labels=labels, average=None))
    assert s.balanced_accuracy == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    np.testing.assert_array_equal(s.confusion, confusion_matrix(y_true, y_pred, labels=labels))
    assert plot_confusion(s, tmp_path / "cm.png").stat().st_size > 1000


def _grey_terciles(store, slide_ids=("C4", "C5")) -> pd.DataFrame:
    """Per spot: the tercile (within its slide) of the mean grey level of the 100 µm window
    around it in the REAL H&E; a label that follows an image feature."""
    from stimage_embed.tiles.image import SlideImage

    slides = pl.from_arrow(store.read("slides")).filter(pl.col("slide_id").is_in(list(slide_ids)))
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y"]))
    rows = []
    for s in slides.iter_rows(named=True):
        sp_ = spots.filter(pl.col("slide_id") == s["slide_id"])
        size = 100.0 / s["um_per_px"]
        with SlideImage.open(s["image_path"]) as img:
            grey = [img.read_window(x, y, size, 32)[0].mean() for x, y in zip(sp_["pixel_x"], sp_["pixel_y"])]
        cut = np.quantile(grey, [1 / 3, 2 / 3])
        names = np.array(["dark", "mid", "pale"])[np.digitize(grey, cut)]
        rows.append(pd.DataFrame({"slide": s["slide_id"], "spot": sp_["spot_id"].to_list(), "tone": names}))
    return pd.concat(rows, ignore_index=True)


def test_label_head_learns_an_image_feature_and_shuffled_stays_at_chance(embedded_store, tmp_path):
    from stimage_embed.cli import app

    store = copy_store(embedded_store, tmp_path / "store")
    table = _grey_terciles(store)
    table.to_csv(tmp_path / "tone.csv", index=False)
    runner = CliRunner()
    before = table_rows(store, "spots", ("slide_id", "spot_id"))
    # bad input: unknown keys and a missing column -> one line, exit 2, nothing written
    bad = table.copy()
    bad.loc[3, "spot"] = "no_such_spot"
    bad.to_csv(tmp_path / "bad.csv", index=False)
    args = ["labels", "add", str(tmp_path / "bad.csv"), "--key", "slide,spot", "--column", "tone", "--store"]
    res = runner.invoke(app, [*args, str(store.path)])
    assert res.exit_code == 2 and "bad.csv" in res.output and "no_such_spot" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and not store.has_table("labels")
    res = runner.invoke(app, [*args[:-3], "--column", "cell_type", "--store", str(store.path)])
    assert res.exit_code == 2 and "cell_type" in res.output and not store.has_table("labels"), res.output
    res = runner.invoke(app, [*args[:2], str(tmp_path / "tone.csv"), *args[3:], str(store.path)])
    assert res.exit_code == 0 and f"{len(table)} label(s)" in res.output, res.output
    assert table_rows(store, "spots", ("slide_id", "spot_id")) == before

    from stimage_embed.predictions.label_runs import run_labels

    scores = {}
    for control in ("none", "shuffled_labels"):
        runs = run_labels(store, "efficientnet_lite0", "tone", control=control)
        assert [r.fold for r in runs] == ["C4", "C5"]
        scores[control] = [label_scores(r.y_true, r.y_pred) for r in runs]
    for control, ss in scores.items():
        print(control, [(round(s.balanced_accuracy, 3), round(s.macro_f1, 3), s.n) for s in ss])  # shown with -s
    # chance is 1/3; with ~180-600 test spots a null balanced accuracy has SD < 0.035
    for s in scores["none"]:
        assert s.balanced_accuracy > 0.45 and s.macro_f1 > 0.4, (s.balanced_accuracy, s.macro_f1)
    for s in scores["shuffled_labels"]:
        assert abs(s.balanced_accuracy - 1 / 3) < 0.12, s.balanced_accuracy
    res = runner.invoke(
        app, ["labels", "compare", "--labels", "tone", "--store", str(store.path), "--plots", str(tmp_path)]
    )
    assert res.exit_code == 0 and "mean macro-F1" in res.output, res.output
    assert len(list(tmp_path.glob("confusion_tone_*.png"))) == 1  # pooled over the held-out slides
    runs = store.sql("SELECT control, fold FROM runs WHERE head = 'label' ORDER BY ALL")
    assert runs.rows() == [("none", "loso:C4"), ("none", "loso:C5"), ("shuffled", "loso:C4"), ("shuffled", "loso:C5")]
