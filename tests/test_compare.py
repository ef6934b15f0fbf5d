"""compare / train / predict on real cached vectors (HER2ST C4 and C5, efficientnet_lite0):
metric rows for every fold x head x gene, metrics equal an independent recomputation,
the leaderboard equals a hand-written SQL, re-runs reuse the store, saved models refuse
vectors of another provenance."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from scipy import stats

from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.predictions.train_predict import predict, train
from stimage_embed.store import Store

HEADS = ["nb", "ensemble", "highlow", "ridge", "mean"]
PARAMS = {"ensemble": {"n_members": 2}, "highlow": {"max_iter": 50, "tol": 1e-3}}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, embedded_store):
    store = Store(tmp_path_factory.mktemp("cmp") / "store")
    shutil.copytree(embedded_store.path, store.path)
    cfg = CompareConfig(
        backbones=["efficientnet_lite0"],
        heads=HEADS,
        split="loso",
        genes="var:8",
        datasets=["her2st"],
        head_params=PARAMS,
    )
    result = compare(store, cfg, progress=False)
    return store, cfg, result


def test_metric_rows_for_every_fold_head_and_gene(compared):
    store, cfg, result = compared
    assert result.computed == 2 * len(HEADS) and result.reused == 0
    runs = store.sql("SELECT fold, head, len(genes) AS g, test_slides FROM runs")
    assert sorted(set(runs["fold"])) == ["loso:C4", "loso:C5"] and runs["g"].to_list() == [8] * runs.height
    per = store.sql(
        """SELECT fold, head, metric, COUNT(DISTINCT gene) AS genes FROM metrics WHERE scope = 'slide'
           GROUP BY ALL"""
    )
    for fold in ("loso:C4", "loso:C5"):
        for head in HEADS:
            got = per.filter((pl.col("fold") == fold) & (pl.col("head") == head))
            metrics = set(got["metric"])
            if head == "highlow":
                assert metrics == {"auc", "f1"}
            else:
                assert {"pearson", "spearman", "mse", "mae", "ccc", "moran_i", "moran_bv", "iou"} <= metrics
            if head in ("nb", "ensemble"):
                assert {"coverage_50", "coverage_90"} <= metrics
            assert set(got["genes"]) == {8}, (fold, head)


def test_pearson_equals_scipy_on_the_stored_predictions(compared):
    store, _, _ = compared
    run = store.sql("SELECT run_id FROM runs WHERE head = 'nb' AND fold = 'loso:C5'")["run_id"][0]
    pred = store.sql(f"SELECT * FROM predictions WHERE run_id = '{run}'")
    met = store.sql(
        f"SELECT gene, value FROM metrics WHERE run_id = '{run}' AND metric = 'pearson' AND scope = 'slide'"
    )
    for gene, value in zip(met["gene"], met["value"]):
        g = pred.filter(pl.col("gene") == gene)
        truth = np.log1p(g["observed"].to_numpy() / g["library_size"].to_numpy() * 1e4)
        assert value == pytest.approx(stats.pearsonr(truth, g["mean_log1p"].to_numpy())[0], abs=1e-5)
    # genes were selected on the training slide only: re-selecting on C5 would differ
    assert pred["slide_id"].unique().to_list() == ["C5"]


def test_leaderboard_equals_hand_sql_and_baselines_are_present(compared):
    store, _, result = compared
    hand = store.sql(
        """SELECT backbone, head, median(value) AS pcc_median, avg(value) AS pcc_mean
           FROM metrics WHERE metric = 'pearson' AND scope = 'slide' AND value IS NOT NULL GROUP BY ALL ORDER BY head"""
    )
    board = result.leaderboard.filter(pl.col("pcc_mean").is_not_null()).sort("head")
    assert board["head"].to_list() == hand["head"].to_list() == ["ensemble", "nb", "ridge"]
    assert np.allclose(board["pcc_median"], hand["pcc_median"]) and np.allclose(board["pcc_mean"], hand["pcc_mean"])
    # the mean baseline has no Pearson (constant prediction) but is scored by MSE
    mean_row = result.leaderboard.filter(pl.col("head") == "mean")
    assert mean_row["pcc_mean"][0] is None and mean_row["mse_mean"][0] > 0
    assert result.leaderboard.filter(pl.col("head") == "highlow")["auc_mean"][0] is not None


def test_rerun_reuses_every_run(compared):
    store, cfg, result = compared
    before = store.table("metrics").count_rows()
    again = compare(store, cfg, progress=False)
    assert again.computed == 0 and again.reused == result.computed
    assert store.table("metrics").count_rows() == before


def test_fstimage_needs_two_backbones(compared):
    store, cfg, _ = compared
    with pytest.raises(InputError, match="at least two"):
        compare(store, CompareConfig(backbones=["efficientnet_lite0"], heads=["fstimage"]), progress=False)


def test_train_predict_and_provenance_refusal(compared, tmp_path):
    src, _, _ = compared
    store = Store(tmp_path / "s")
    shutil.copytree(src.path, store.path)
    rid, path = train(store, "efficientnet_lite0", "nb", "var:6", ["C4"])
    assert {p.suffix for p in path.iterdir()} <= {".json", ".safetensors"}
    pred = predict(store, rid, ["C5"])
    assert pred.height == 181 * 6 and set(pred["slide_id"]) == {"C5"}
    # predicting twice replaces, never duplicates
    predict(store, rid, ["C5"])
    assert store.sql(f"SELECT COUNT(*) AS n FROM predictions WHERE run_id = '{rid}'")["n"][0] == 181 * 6
    # the store's vectors change provenance (as if re-embedded with another stain method)
    prov = store.table("provenance")
    row = prov.to_arrow().to_pylist()[0]
    changed = json.loads(row["json"])
    changed["stain_method"] = "reinhard"
    prov.update(where=f"provenance_id = '{row['provenance_id']}'", values={"json": json.dumps(changed)})
    with pytest.raises(ProvenanceError, match="stain_method"):
        predict(store, rid, ["C5"])


def test_the_result_carries_the_paired_table_and_the_cli_and_report_bootstrap_once(compared, tmp_path, monkeypatch):
    """``compare`` returns the paired table (equal to a fresh ``paired_comparisons``); the CLI
    prints it and the report shows it without a second bootstrap, writing report.md once."""
    from typer.testing import CliRunner

    from stimage_embed.cli import app
    from stimage_embed.evaluation import paired

    store, _, result = compared
    fresh = paired.paired_comparisons(store, run_ids=result.run_ids)
    assert result.paired.height == fresh.height > 0
    assert result.paired.sort("a_head", "b_head").equals(fresh.sort("a_head", "b_head"))
    calls, opened = [], []
    real_pair, real_open = paired.compare_pair, type(tmp_path).open
    monkeypatch.setattr(paired, "compare_pair", lambda *a, **k: calls.append(1) or real_pair(*a, **k))
    monkeypatch.setattr(type(tmp_path), "open", lambda p, *a, **k: opened.append((p.name, a)) or real_open(p, *a, **k))
    args = ["compare", "--heads", "nb,ridge", "--genes", "var:8", "--dataset", "her2st", "--store", str(store.path)]
    res = CliRunner().invoke(app, [*args, "--report", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "0 run(s) computed, 4 reused" in res.output and "paired comparisons" in res.output
    assert len(calls) == 1  # nb vs ridge: one pair, bootstrapped once for the CLI and the report
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Paired comparisons" in md and "| nb " in md.split("## Paired comparisons")[1]
    assert not [a for name, a in opened if name == "report.md" and a and "a" in a[0]]  # never appended to
