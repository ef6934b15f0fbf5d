"""Survival and response on a real cohort: GSE7390 (scikit-survival's ``load_breast_cancer``:
198 patients, 76 genes of a prognostic signature, distant-metastasis-free survival; shipped
with the package, no network).

The analysis is built on lifelines (Cox, KM, log-rank) and sklearn (SVC); the references
are independent: scikit-survival's concordance index, log-rank test and Cox fit, and a
nested CV hand-built from sklearn parts. The response label is the real ER status
(positive vs negative) of the cohort. Run through the CLI (``clinical add``, ``survival
--expr FILE``, ``response``) on a store holding only the clinical table.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.downstream import SYNTHETIC_NOTE, nested_cv_auc, survival_analysis, survival_frame

sksurv_datasets = pytest.importorskip("sksurv.datasets")
from sksurv.compare import compare_survival  # noqa: E402
from sksurv.linear_model import CoxPHSurvivalAnalysis  # noqa: E402
from sksurv.metrics import concordance_index_censored  # noqa: E402

REPEATS = 4  # CV repeats in the tests (the CLI default is 100, STimage's protocol)


@pytest.fixture(scope="module")
def cohort():
    x, y = sksurv_datasets.load_breast_cancer()
    genes = [c for c in x.columns if c.startswith("X")]
    ids = [f"GSE7390_{i:03d}" for i in range(len(x))]
    expr = pl.DataFrame({"patient": ids, **{g: x[g].to_numpy() for g in genes}})
    clin = pl.DataFrame(
        {
            "patient": ids,
            "dmfs_time": y["t.tdm"],
            "dmfs_event": y["e.tdm"].astype(int),
            "er": x["er"].astype(str).tolist(),
        }
    )
    return x, y, genes, expr, clin


@pytest.fixture(scope="module")
def analysed(cohort):
    _, _, genes, expr, clin = cohort
    frame = survival_frame(
        expr.rename({"patient": "unit"}), clin.rename({"patient": "unit"}), "dmfs_time", "dmfs_event"
    )
    return frame, survival_analysis(frame, genes, n_repeats=REPEATS)


def test_univariate_c_index_and_cox_equal_scikit_survival(cohort, analysed):
    x, y, genes, _, _ = cohort
    _, res = analysed
    uni = res.univariate
    assert uni.height == len(genes) == 76 and uni["n"].unique().to_list() == [198]
    assert uni["n_events"][0] == int(y["e.tdm"].sum()) == 51
    for row in uni.iter_rows(named=True):
        v = x[row["gene"]].to_numpy() * np.sign(row["coef"])
        ref = concordance_index_censored(y["e.tdm"], y["t.tdm"], v)[0]
        assert row["c_index"] == pytest.approx(ref, abs=1e-9), row["gene"]
    # the Cox fit itself (z-scored gene) against scikit-survival's Cox on the best gene
    g = uni["gene"][0]
    z = (x[[g]] - x[g].mean()) / x[g].std(ddof=0)
    ref_coef = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit(z, y).coef_[0]
    assert uni["coef"][0] == pytest.approx(ref_coef, abs=1e-4)
    assert uni["hazard_ratio"][0] == pytest.approx(np.exp(ref_coef), rel=1e-4)
    assert uni["p"].is_sorted() and 0 < uni["p"][0] < 0.05


def test_logrank_of_risk_groups_equals_scikit_survival(cohort, analysed):
    x, y, _, _, _ = cohort
    _, res = analysed
    g = res.groups
    assert g.height == 198 and sorted(g["group"].value_counts()["count"].to_list()) == [99, 99]
    order = {u: i for i, u in enumerate(f"GSE7390_{i:03d}" for i in range(len(x)))}
    group = np.empty(len(x), object)
    group[[order[u] for u in g["unit"]]] = g["group"].to_numpy()
    chisq, p = compare_survival(y, group)
    assert res.logrank["statistic"] == pytest.approx(chisq, rel=1e-9)
    assert res.logrank["p"] == pytest.approx(p, rel=1e-9)
    # the high-risk group has the higher risk scores
    assert g.filter(pl.col("group") == "high")["risk"].min() > g.filter(pl.col("group") == "low")["risk"].max()


def test_multivariate_cv_fold_equals_scikit_survival(cohort, analysed):
    from sklearn.model_selection import KFold

    _, y, _, _, _ = cohort
    frame, res = analysed
    top = res.multivariate["gene"].to_list()
    assert top == res.univariate["gene"].head(5).to_list()
    assert res.cv.height == 3 * REPEATS
    assert res.multivariate["c_index_mean"][0] == pytest.approx(res.cv["c_index"].mean())
    lo, hi = res.multivariate["ci_low"][0], res.multivariate["ci_high"][0]
    assert lo <= res.cv.group_by("repeat").agg(pl.col("c_index").mean())["c_index"].max() and lo <= hi
    # repeat 1, fold 2 rebuilt with scikit-survival (Cox fit and concordance)
    tr, te = list(KFold(3, shuffle=True, random_state=1).split(frame))[2]
    xs = frame[top].to_numpy()
    mu, sd = xs[tr].mean(0), xs[tr].std(0)
    yy = np.array(list(zip(frame["_event"].astype(bool), frame["_time"])), dtype=[("e", bool), ("t", float)])
    model = CoxPHSurvivalAnalysis(alpha=0.0, ties="breslow").fit((xs[tr] - mu) / sd, yy[tr])
    risk = model.predict((xs[te] - mu) / sd)
    ref = concordance_index_censored(yy["e"][te], yy["t"][te], risk)[0]
    got = res.cv.filter((pl.col("repeat") == 1) & (pl.col("fold") == 2))["c_index"][0]
    assert got == pytest.approx(ref, abs=1e-6)


def test_nested_cv_auc_equals_a_hand_built_sklearn_pipeline(cohort):
    x, _, genes, _, _ = cohort
    y = (x["er"] == "positive").to_numpy().astype(int)  # real ER status: 134 positive, 64 negative
    grid = {"svc__C": [0.1, 10.0], "svc__gamma": ["scale", 1e-3]}  # a smaller grid than the CLI's, for time
    res = nested_cv_auc(x[genes].to_numpy(), y, seed=0, grid=grid)
    # the reference is built from sklearn parts here, not with the module's svm_search
    outer = StratifiedKFold(5, shuffle=True, random_state=0)
    inner = StratifiedKFold(5, shuffle=True, random_state=0)
    pipe = Pipeline([("scale", StandardScaler()), ("svm", SVC(kernel="rbf"))])
    ref_grid = {"svm__C": grid["svc__C"], "svm__gamma": grid["svc__gamma"]}
    search = GridSearchCV(pipe, ref_grid, cv=inner, scoring="roc_auc")
    ref = cross_val_score(search, x[genes].to_numpy(), y, cv=outer, scoring="roc_auc")
    np.testing.assert_allclose(res.folds["auc"].to_numpy(), ref, rtol=1e-12)
    assert res.auc_mean == pytest.approx(ref.mean()) and res.folds.height == 5
    assert res.folds["n_test"].sum() == 198 and set(res.folds["C"]) <= {0.1, 10.0}


def test_cli_end_to_end_writes_tables_and_figures(tmp_path, cohort, analysed):
    _, _, _, expr, clin = cohort
    clin.write_csv(tmp_path / "clinical.csv")
    expr.write_parquet(tmp_path / "expr.parquet")
    store, out = str(tmp_path / "store"), tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["clinical", "add", str(tmp_path / "clinical.csv"), "--store", store])
    assert res.exit_code == 0 and "198 row(s) inserted" in res.stdout, res.output
    args = ["survival", "--expr", str(tmp_path / "expr.parquet"), "--time", "dmfs_time", "--event", "dmfs_event"]
    extra = ["--top", "76", "--by", "er", "--repeats", str(REPEATS), "--out", str(out), "--store", store]
    res = runner.invoke(app, [*args, *extra])
    assert res.exit_code == 0, res.output
    uni = pl.read_parquet(out / "univariate.parquet")
    assert {"gene", "c_index", "hazard_ratio", "p"} <= set(uni.columns) and uni.height == 76
    _, ref = analysed
    assert uni.sort("gene")["c_index"].to_list() == pytest.approx(ref.univariate.sort("gene")["c_index"].to_list())
    multi = pl.read_parquet(out / "multivariate.parquet")
    assert multi["gene"].to_list() == ref.multivariate["gene"].to_list()
    for png in ("km_risk_groups.png", "km_er.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["logrank"]["p"] == pytest.approx(ref.logrank["p"]) and not summary["synthetic"]
    assert summary["by"]["er"]["groups"] == 2
    x, y, _, _, _ = cohort  # the KM-by-ER log-rank test against scikit-survival's
    chisq, p = compare_survival(y, x["er"].astype(str).to_numpy())
    assert summary["by"]["er"]["statistic"] == pytest.approx(chisq, rel=1e-9)
    assert summary["by"]["er"]["p"] == pytest.approx(p, rel=1e-9)
    args = ["response", "--label", "er", "--positive", "positive", "--expr", str(tmp_path / "expr.parquet")]
    res = runner.invoke(app, [*args, "--top", "76", "--store", store, "--out", str(out)])
    assert res.exit_code == 0 and "nested CV AUC" in res.stdout, res.output
    assert (out / "roc.png").exists() and pl.read_parquet(out / "response_folds.parquet").height == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time", "os_time", "--event", "dmfs_event"], "os_time: no such clinical column"),
        (["--time", "dmfs_time", "--event", "dmfs_event", "--genes", "NOPE"], "--genes"),
        (["--time", "dmfs_time", "--event", "dmfs_event", "--top", "5", "--folds", "100"], "too few for 100-fold CV"),
    ],
)
def test_cli_bad_options_one_line(tmp_path, cohort, args, message):
    _, _, _, expr, clin = cohort
    clin.write_csv(tmp_path / "clinical.csv")
    expr.write_parquet(tmp_path / "expr.parquet")
    store = str(tmp_path / "store")
    runner = CliRunner()
    runner.invoke(app, ["clinical", "add", str(tmp_path / "clinical.csv"), "--store", store])
    res = runner.invoke(app, ["survival", "--expr", str(tmp_path / "expr.parquet"), *args, "--store", store])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.output


def test_cli_marks_a_synthetic_clinical_table_synthetic(tmp_path, cohort):
    """A SYNTHETIC clinical table (seeded random outcomes, ``synthetic = 1``) on the real
    GSE7390 expression: the printed output and every summary say SYNTHETIC; a real one does not."""
    _, _, _, expr, clin = cohort
    rng = np.random.default_rng(0)
    n = clin.height
    synthetic = pl.DataFrame(
        {
            "patient": clin["patient"],
            "time": rng.exponential(60.0, n).round(1),
            "event": rng.integers(0, 2, n),
            "response": np.where(rng.random(n) < 0.4, "pCR", "RD"),
            "synthetic": [1] * n,
        }
    )
    synthetic.write_csv(tmp_path / "SYNTHETIC_clinical.csv")
    expr.write_parquet(tmp_path / "expr.parquet")
    store, out = str(tmp_path / "store"), tmp_path / "out"
    runner = CliRunner()
    res = runner.invoke(app, ["clinical", "add", str(tmp_path / "SYNTHETIC_clinical.csv"), "--store", store])
    assert res.exit_code == 0, res.output
    common = ["--expr", str(tmp_path / "expr.parquet"), "--top", "5", "--store", store, "--out", str(out)]
    res = runner.invoke(app, ["survival", "--time", "time", "--event", "event", "--repeats", "2", *common])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0] == SYNTHETIC_NOTE
    summary = json.loads((out / "summary.json").read_text())
    assert summary["synthetic"] is True and summary["note"] == SYNTHETIC_NOTE
    res = runner.invoke(app, ["response", "--label", "response", "--positive", "pCR", *common])
    assert res.exit_code == 0 and "(SYNTHETIC clinical data)" in res.stdout, res.output
    assert json.loads((out / "response_summary.json").read_text())["note"] == SYNTHETIC_NOTE


def test_expression_file_csv_equals_parquet_and_bad_files_one_line(tmp_path, cohort):
    from stimage_embed.downstream import file_expression
    from stimage_embed.errors import InputError

    _, _, genes, expr, _ = cohort
    expr.write_parquet(tmp_path / "e.parquet")
    expr.write_csv(tmp_path / "e.csv")
    a, b = file_expression(tmp_path / "e.parquet"), file_expression(tmp_path / "e.csv")
    assert a.height == 198 * len(genes) and a.columns == b.columns
    np.testing.assert_allclose(a.sort("unit", "gene")["value"], b.sort("unit", "gene")["value"], rtol=1e-12)
    (tmp_path / "dup.csv").write_text("patient,g1\nA,1\nA,2\n")
    (tmp_path / "text.csv").write_text("patient,g1\nA,high\nB,2\n")
    for name, needle in (("dup.csv", "duplicate key 'A'"), ("text.csv", "g1: gene columns must be numeric")):
        with pytest.raises(InputError, match=needle) as err:
            file_expression(tmp_path / name)
        assert name in str(err.value) and len(str(err.value).splitlines()) == 1
