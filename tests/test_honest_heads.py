"""Predictions come from the image vectors alone (real HER2ST C4/C5 vectors):

* a predicted value does not change when a test spot's counts or library size change;
* the shuffled-vector leak control (vectors permuted among each slide's spots) scores
  about 0 for every head, FSTimage included, and every head beats its own control;
* the leaderboard keeps controls, splits and gene specs apart; paired comparisons.
"""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest

from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.evaluation.paired import bootstrap_mean_ci, compare_pair, paired_comparisons
from stimage_embed.predictions.arrays import SpotArrays, load_spot_arrays, shuffled_within_slides
from stimage_embed.predictions.fstimage import combine_backbones
from stimage_embed.predictions.genes import select_genes
from stimage_embed.predictions.runner import fit_head, make_head, predict_head
from stimage_embed.store import Store

BACKBONES = ["efficientnet_lite0", "efficientnet_lite1"]
HEADS = ["nb", "ensemble", "highlow", "ridge", "mean", "fstimage"]
#: light settings (CI has 2 cores); the behaviour under test does not depend on them
_PATH = {"alphas": (1.0, 10.0, 100.0), "cv": 2}
PARAMS = {
    "nb": _PATH,
    "ensemble": {"n_members": 2, **_PATH},
    "highlow": {"max_iter": 30, "tol": 1e-3},
    "ridge": {"alphas": (10.0, 1000.0, 100000.0)},
}


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory, embedded_store):
    """The embedded store (Lite0: C4, C5, MOB1) plus Lite1 vectors of C4 and C5."""
    from stimage_embed.embeddings.embed_pass import embed

    store = Store(tmp_path_factory.mktemp("honest") / "store")
    shutil.copytree(embedded_store.path, store.path)
    embed(store, ["efficientnet_lite1"], slides=["C4", "C5"], precision="float32", num_workers=1, progress=False)
    return store


@pytest.fixture(scope="module")
def controlled(two_backbones):
    cfg = CompareConfig(
        backbones=BACKBONES,
        heads=HEADS,
        genes="var:20",
        datasets=["her2st"],
        train_slides=["C4"],
        test_slides=["C5"],
        head_params=PARAMS,
        controls=["shuffled"],
    )
    result = compare(two_backbones, cfg, progress=False)
    return two_backbones, result


def _arrays(store: Store, genes: list[str]) -> tuple[SpotArrays, SpotArrays]:
    return (
        load_spot_arrays(store, "efficientnet_lite0", ["C4"], genes),
        load_spot_arrays(store, "efficientnet_lite0", ["C5"], genes),
    )


@pytest.mark.parametrize("head", ["nb", "ensemble", "highlow", "ridge", "mean"])
def test_prediction_does_not_change_with_the_test_spots_counts(embedded_store, head):
    keys, gl, counts, lib = embedded_store.expression_matrix(["C4"])
    genes = select_genes("var:10", counts, gl, keys["slide_id"].to_numpy(), ["C4"], library_size=lib)
    train, test = _arrays(embedded_store, genes)
    model = fit_head(head, make_head(head, PARAMS.get(head)), train)
    rng = np.random.default_rng(0)
    tampered = SpotArrays(
        keys=test.keys,
        X=test.X,
        counts=rng.integers(0, 500, test.counts.shape),
        library_size=test.library_size * rng.uniform(0.1, 10.0, test.library_size.shape),
        genes=test.genes,
        provenance=test.provenance,
    )
    blind = SpotArrays(
        keys=test.keys, X=test.X, counts=None, library_size=None, genes=test.genes, provenance=test.provenance
    )
    column = "prob_high" if head == "highlow" else "mean_log1p"
    a = predict_head(head, model, test)[column].to_numpy()
    assert np.isfinite(a).all()
    np.testing.assert_array_equal(predict_head(head, model, tampered)[column].to_numpy(), a)
    no_truth = predict_head(head, model, blind)
    np.testing.assert_array_equal(no_truth[column].to_numpy(), a)
    assert no_truth["observed"].null_count() == no_truth.height


def test_fstimage_does_not_change_with_the_test_spots_counts(two_backbones):
    keys, gl, counts, lib = two_backbones.expression_matrix(["C4"])
    genes = select_genes("var:10", counts, gl, keys["slide_id"].to_numpy(), ["C4"], library_size=lib)
    preds, tampered = {}, {}
    for bb in BACKBONES:
        train = load_spot_arrays(two_backbones, bb, ["C4"], genes)
        test = load_spot_arrays(two_backbones, bb, ["C5"], genes)
        model = fit_head("nb", make_head("nb", PARAMS["nb"]), train)
        preds[bb] = predict_head("nb", model, test)
        other = SpotArrays(
            keys=test.keys,
            X=test.X,
            counts=test.counts * 3,
            library_size=test.library_size * 7,
            genes=test.genes,
            provenance=test.provenance,
        )
        tampered[bb] = predict_head("nb", model, other)
    a = combine_backbones(preds)["mean_log1p"].to_numpy()
    np.testing.assert_array_equal(combine_backbones(tampered)["mean_log1p"].to_numpy(), a)
    # the combined rate is the average of the member rates
    rates = np.mean(
        [
            np.expm1(p.sort("slide_id", "spot_id", "gene")["mean_log1p"].to_numpy().astype(np.float64))
            for p in preds.values()
        ],
        axis=0,
    )
    comb = combine_backbones(preds).sort("slide_id", "spot_id", "gene")["mean_log1p"].to_numpy()
    np.testing.assert_allclose(np.expm1(comb.astype(np.float64)), rates, rtol=1e-5, atol=1e-6)


def test_shuffle_permutes_vectors_within_each_slide(embedded_store):
    arrays = load_spot_arrays(embedded_store, "efficientnet_lite0", ["C4", "C5"], ["ERBB2"])
    sh = shuffled_within_slides(arrays, seed=0)
    slides = arrays.keys["slide_id"].to_numpy()
    for s in ("C4", "C5"):
        m = slides == s
        # the same multiset of vectors per slide, not in the same rows
        np.testing.assert_array_equal(np.sort(sh.X[m], axis=0), np.sort(arrays.X[m], axis=0))
        assert (np.abs(sh.X[m] - arrays.X[m]).sum(axis=1) > 0).mean() > 0.9
    np.testing.assert_array_equal(sh.counts, arrays.counts)


def _control_scores(store: Store) -> pl.DataFrame:
    return store.sql(
        """SELECT r.head, r.backbone, coalesce(r.control, 'none') AS control, m.metric, avg(m.value) AS value,
                  COUNT(m.value) AS n
           FROM metrics m JOIN runs r USING (run_id)
           WHERE m.scope = 'slide' AND m.metric IN ('pearson', 'auc')
           GROUP BY ALL"""
    )


def test_shuffled_control_scores_about_zero_for_every_head(controlled):
    store, _ = controlled
    scores = _control_scores(store)
    for head in HEADS:
        for bb in ["fstimage"] if head == "fstimage" else BACKBONES:
            sel = scores.filter((pl.col("head") == head) & (pl.col("backbone") == bb))
            metric = "auc" if head == "highlow" else "pearson"
            ctrl = sel.filter((pl.col("control") == "shuffled") & (pl.col("metric") == metric))
            real = sel.filter((pl.col("control") == "none") & (pl.col("metric") == metric))
            if head == "mean":  # a constant prediction has no correlation: NULL, on both
                assert ctrl.height == 0 or ctrl["n"][0] == 0
                continue
            assert ctrl.height == 1 and ctrl["n"][0] == 20, (head, bb)
            centre = 0.5 if metric == "auc" else 0.0
            assert abs(ctrl["value"][0] - centre) < 0.05, (head, bb, ctrl["value"][0])
            assert real["value"][0] > ctrl["value"][0] + 0.05, (head, bb, real["value"][0], ctrl["value"][0])


def test_leaderboard_keeps_controls_and_gene_specs_apart(controlled):
    store, result = controlled
    board = result.leaderboard
    assert {"split", "gene_spec", "control"} <= set(board.columns)
    assert set(board["control"]) == {"none", "shuffled"}
    assert board.filter(pl.col("control") == "none").height == len(BACKBONES) * 5 + 1
    # a compare with another gene spec adds rows; it is never averaged into the first
    cfg = CompareConfig(
        backbones=["efficientnet_lite0"],
        heads=["mean"],
        genes="mean:5",
        datasets=["her2st"],
        train_slides=["C4"],
        test_slides=["C5"],
        head_params=PARAMS,
    )
    compare(store, cfg, progress=False)
    view = store.sql(
        "SELECT gene_spec, genes FROM leaderboard "
        "WHERE head = 'mean' AND control = 'none' AND backbone = 'efficientnet_lite0'"
    )
    # one row per gene spec, each scoring its own number of genes
    assert sorted(zip(view["gene_spec"], view["genes"])) == [("mean:5", 5), ("var:20", 20)]


def test_paired_comparisons_match_a_hand_bootstrap(controlled):
    store, result = controlled
    paired = paired_comparisons(store, run_ids=result.run_ids)
    row = paired.filter((pl.col("a_head") == "nb") | (pl.col("b_head") == "nb")).filter(
        ((pl.col("a_head") == "ridge") | (pl.col("b_head") == "ridge"))
        & (pl.col("a_backbone") == "efficientnet_lite0")
        & (pl.col("b_backbone") == "efficientnet_lite0")
    )
    assert row.height == 1
    r = row.row(0, named=True)
    vals = store.sql(
        """SELECT r.head, m.fold, m.slide_id, m.gene, m.value FROM metrics m JOIN runs r USING (run_id)
           WHERE m.metric = 'pearson' AND m.scope = 'slide' AND r.control = 'none' AND r.backbone = 'efficientnet_lite0'
             AND r.head IN ('nb', 'ridge') AND r.gene_spec = 'var:20'"""
    )
    a = vals.filter(pl.col("head") == r["a_head"]).sort("fold", "slide_id", "gene")["value"].to_numpy()
    b = vals.filter(pl.col("head") == r["b_head"]).sort("fold", "slide_id", "gene")["value"].to_numpy()
    assert r["n_pairs"] == len(a) == 20
    assert r["diff"] == pytest.approx(np.mean(a - b))
    lo, hi = bootstrap_mean_ci(a - b, n_boot=2000, seed=0)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    assert r["verdict"] == ("tie" if lo <= 0 <= hi else "a")


def test_bootstrap_ci_covers_the_mean_and_ties_on_noise():
    rng = np.random.default_rng(1)
    diff = rng.normal(0.1, 0.05, size=400)
    lo, hi = bootstrap_mean_ci(diff, n_boot=1000, seed=3)
    se = diff.std(ddof=1) / np.sqrt(diff.size)
    assert lo < diff.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    a = rng.normal(0.3, 0.1, size=200)
    assert compare_pair(a + 0.05, a)["verdict"] == "a"
    assert compare_pair(a, a + rng.normal(0, 0.1, size=200))["verdict"] == "tie"
