"""Per-gene metrics against scipy / sklearn / an independent CCC formula."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error, roc_auc_score

from stimage_embed.errors import InputError
from stimage_embed.evaluation import (
    ccc,
    classification_metrics,
    coverage_metrics,
    evaluate_regression,
    f1,
    interval_coverage,
    mae,
    mse,
    normalise_log1p,
    pearson,
    per_slide_classification_metrics,
    regression_metrics,
    roc_auc,
    spearman,
)


def _lin_ccc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin (1989), population moments, written out long-hand."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.log1p(
        rng.poisson(rng.gamma(2.0, 2.0, size=(120, 1)) * rng.gamma(2.0, 1.0, size=(1, 30)) + 0.5).astype(float)
    )
    p = 0.6 * t + rng.normal(0, 0.5, size=t.shape) + 0.3
    t[:, 5] = 0.0  # constant truth column (all zero)
    p[:, 7] = 1.5  # constant prediction column
    varying = [j for j in range(30) if j not in (5, 7)]
    assert np.ptp(t[:, varying], axis=0).min() > 0 and np.ptp(p[:, varying], axis=0).min() > 0
    return t, p


def test_regression_metrics_match_scipy_and_sklearn(pair):
    t, p = pair
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning spam on constant columns
        r, rho, e2, e1, c = pearson(t, p), spearman(t, p), mse(t, p), mae(t, p), ccc(t, p)
    for j in range(t.shape[1]):
        if j in (5, 7):
            assert np.isnan(r[j]) and np.isnan(rho[j])
        else:
            assert r[j] == pytest.approx(pearsonr(t[:, j], p[:, j]).statistic, abs=1e-12)
            assert rho[j] == pytest.approx(spearmanr(t[:, j], p[:, j]).statistic, abs=1e-12)
        assert e2[j] == pytest.approx(mean_squared_error(t[:, j], p[:, j]), rel=1e-12)
        assert e1[j] == pytest.approx(mean_absolute_error(t[:, j], p[:, j]), rel=1e-12)
        assert c[j] == pytest.approx(_lin_ccc(list(t[:, j]), list(p[:, j])), rel=1e-10, abs=1e-12)
    # a constant prediction has CCC 0 (defined), not NaN; identical columns give CCC 1
    assert c[7] == 0.0
    assert ccc(t[:, :3], t[:, :3]) == pytest.approx(1.0)
    assert np.isnan(ccc(np.zeros((4, 1)), np.zeros((4, 1)))[0])


def test_spearman_with_ties_matches_scipy():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 4, size=(60, 10)).astype(float)
    p = t + rng.integers(0, 3, size=t.shape)
    rho = spearman(t, p)
    ref = [spearmanr(t[:, j], p[:, j]).statistic for j in range(10)]
    np.testing.assert_allclose(rho, ref, atol=1e-12)


def test_long_format_and_bad_input(pair):
    t, p = pair
    genes = [f"g{j}" for j in range(t.shape[1])]
    df = regression_metrics(t, p, genes)
    assert df.columns == ["gene", "metric", "value"]
    assert df.height == 5 * len(genes)
    got = df.filter((pl.col("gene") == "g3") & (pl.col("metric") == "pearson"))["value"].item()
    assert got == pytest.approx(pearsonr(t[:, 3], p[:, 3]).statistic, abs=1e-12)
    with pytest.raises(InputError, match="y_pred"):
        pearson(t, p[:, :4])
    with pytest.raises(InputError, match="NaN"):
        mse(t, np.where(p > 1, np.nan, p))
    with pytest.raises(InputError, match="unknown metric"):
        regression_metrics(t, p, genes, metrics=["r2"])
    with pytest.raises(InputError, match="gene names"):
        regression_metrics(t, p, genes[:3])


def test_pooled_and_per_slide_pearson_differ_and_each_match_scipy():
    # two slides whose levels differ: within each slide the prediction is anti-correlated
    # with the truth, but pooled, the between-slide level difference dominates
    rng = np.random.default_rng(2)
    n = 50
    base = rng.normal(size=n)
    t = np.concatenate([base, base + 10])[:, None]
    p = np.concatenate([-base + rng.normal(0, 0.1, n), -base + 10 + rng.normal(0, 0.1, n)])[:, None]
    slides = np.array(["A"] * n + ["B"] * n)
    out = evaluate_regression(t, p, ["g"], slides, metrics=["pearson"])
    assert out.columns == ["scope", "slide_id", "gene", "metric", "value"]
    per = dict(out.filter(pl.col("scope") == "slide").select("slide_id", "value").iter_rows())
    pooled = out.filter(pl.col("scope") == "pooled")["value"].item()
    assert out.filter(pl.col("scope") == "pooled")["slide_id"].item() is None
    for s in ("A", "B"):
        m = slides == s
        assert per[s] == pytest.approx(pearsonr(t[m, 0], p[m, 0]).statistic, abs=1e-12)
        assert per[s] < -0.9
    assert pooled == pytest.approx(pearsonr(t[:, 0], p[:, 0]).statistic, abs=1e-12)
    assert pooled > 0.9


def test_normalise_log1p():
    rng = np.random.default_rng(3)
    counts = rng.poisson(2.0, size=(20, 8)).astype(float)
    counts[4] = 0
    lib = counts.sum(1) + rng.integers(5, 50, size=20)  # totals over ALL genes exceed the subset
    lib[4] = 0
    dense = normalise_log1p(counts, lib)
    expected = np.log1p(np.divide(counts, lib[:, None], out=np.zeros_like(counts), where=lib[:, None] > 0) * 1e4)
    np.testing.assert_allclose(dense, expected, rtol=1e-12)
    sparse = normalise_log1p(sp.csr_matrix(counts), lib)
    assert sp.issparse(sparse)
    np.testing.assert_allclose(sparse.toarray(), expected, rtol=1e-12)
    with pytest.raises(InputError, match="library_size"):
        normalise_log1p(counts, lib[:5])


def test_auc_matches_sklearn_argument_order():
    rng = np.random.default_rng(4)
    y = (rng.random((80, 12)) < 0.4).astype(int)
    score = np.clip(0.3 * y + rng.random(y.shape) * 0.8, 0, 1)
    score[:, 3] = np.round(score[:, 3], 1)  # ties
    y[:, 9] = 1  # single class
    auc = roc_auc(y, score)
    for j in range(12):
        if j == 9:
            assert np.isnan(auc[j])
            continue
        assert auc[j] == pytest.approx(roc_auc_score(y[:, j], score[:, j]), abs=1e-12)
    # hand case: scores of positives {0.9, 0.4}, negatives {0.5, 0.1}: 3 of 4 pairs ordered
    yt = np.array([[1], [0], [1], [0]])
    ys = np.array([[0.9], [0.5], [0.4], [0.1]])
    assert roc_auc(yt, ys)[0] == pytest.approx(0.75)
    assert roc_auc_score(yt[:, 0], ys[:, 0]) == pytest.approx(0.75)
    # the swapped call is a different number (and an error in sklearn): order matters
    assert roc_auc(yt, ys)[0] != pytest.approx(roc_auc_score((ys[:, 0] > 0.45).astype(int), yt[:, 0]))
    with pytest.raises(InputError, match="0/1"):
        roc_auc(ys, yt)


def test_f1_and_classification_table():
    rng = np.random.default_rng(5)
    y = (rng.random((70, 6)) < 0.5).astype(int)
    prob = np.clip(0.4 * y + rng.random(y.shape) * 0.7, 0, 1)
    y[:, 2] = 0  # single class -> NaN
    lab = (prob > 0.5).astype(int)
    got = f1(y, lab)
    for j in range(6):
        if j == 2:
            assert np.isnan(got[j])
        else:
            assert got[j] == pytest.approx(f1_score(y[:, j], lab[:, j]), abs=1e-12)
    genes = [f"g{j}" for j in range(6)]
    df = classification_metrics(y, prob, genes)
    assert set(df["metric"]) == {"auc", "f1"} and df.height == 12
    np.testing.assert_allclose(df.filter(pl.col("metric") == "f1")["value"].to_numpy(), got, equal_nan=True)
    slides = np.array(["S1"] * 35 + ["S2"] * 35)
    per = per_slide_classification_metrics(y, prob, genes, slides)
    v = per.filter((pl.col("slide_id") == "S2") & (pl.col("gene") == "g0") & (pl.col("metric") == "auc"))[
        "value"
    ].item()
    assert v == pytest.approx(roc_auc_score(y[35:, 0], prob[35:, 0]), abs=1e-12)


def test_interval_coverage_known_case():
    y = np.arange(10, dtype=float)[:, None] * np.ones((1, 2))
    lo = np.full((10, 2), 2.0)
    hi = np.full((10, 2), 6.0)
    hi[:, 1] = 2.0  # inclusive bounds: only y == 2 covered
    np.testing.assert_allclose(interval_coverage(y, lo, hi), [0.5, 0.1])  # y in {2..6}: 5/10
    df = coverage_metrics(y, {0.9: (lo - 2, hi + 2), 0.5: (lo, hi)}, ["a", "b"])
    assert df["metric"].to_list() == ["coverage_50", "coverage_50", "coverage_90", "coverage_90"]
    np.testing.assert_allclose(df["value"].to_numpy(), [0.5, 0.1, 0.9, 0.5])  # [0, 8]: 9/10; [0, 4]: 5/10
    with pytest.raises(InputError, match="lower bound above upper"):
        interval_coverage(y, hi + 1, hi)
