"""The predicted arm on the real shared sections: pseudo-bulk agreement of leave-one-slide-out
predictions (``compare`` over the HER2ST sections with vectors, C4 and C5), its section in
the ``compare`` report, and the predicted expression per unit from the ``predictions``
table, each against an independent computation (scipy Pearson on counts read with
``Store.expression_matrix``)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats
from store_cases import copy_store

from stimage_embed.downstream import predicted_expression
from stimage_embed.evaluation.compare import CompareConfig, compare
from stimage_embed.evaluation.pseudobulk_agreement import agreement_summary, pseudobulk_agreement
from stimage_embed.evaluation.report_driver import write_compare_report

SLIDES = ["C4", "C5"]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, embedded_store):
    store = copy_store(embedded_store, tmp_path_factory.mktemp("agree") / "store")
    cfg = CompareConfig(backbones=["efficientnet_lite0"], heads=["ridge", "mean"], genes="var:20", datasets=["her2st"])
    result = compare(store, cfg, progress=False)
    ids = ", ".join(f"'{r}'" for r in result.run_ids)
    runs = store.sql(f"SELECT * FROM runs WHERE run_id IN ({ids})")
    pred = store.sql(f"SELECT * FROM predictions WHERE run_id IN ({ids})")
    return store, result, runs, pred


def _reference(store, pred: pl.DataFrame, run_id: str, slide: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predicted and measured log1p CPM of one (run, slide), measured from the raw counts."""
    p = pred.filter((pl.col("run_id") == run_id) & (pl.col("slide_id") == slide))
    genes = sorted(p["gene"].unique().to_list())
    keys, _, counts, lib = store.expression_matrix([slide], genes)
    spots = set(p["spot_id"].unique().to_list())
    rows = np.array([s in spots for s in keys["spot_id"].to_list()])
    measured = np.log1p(np.asarray(counts[rows].sum(0)).ravel() / lib[rows].sum() * 1e6)
    by_gene = p.group_by("gene").agg((pl.col("mean_log1p").cast(pl.Float64).exp() - 1).mean()).sort("gene")
    predicted = np.log1p(by_gene["mean_log1p"].to_numpy() * 100)
    return predicted, measured, genes


def test_within_slide_pcc_equals_scipy_on_the_counts(compared):
    store, _, runs, pred = compared
    per_slide, per_gene = pseudobulk_agreement(pred, runs)
    assert per_slide.height == 2 * len(SLIDES)  # (ridge, mean) x held-out slide
    for row in per_slide.iter_rows(named=True):
        run = runs.filter((pl.col("head") == row["head"]) & pl.col("test_slides").list.contains(row["slide_id"]))[
            "run_id"
        ][0]
        predicted, measured, genes = _reference(store, pred, run, row["slide_id"])
        assert row["n_genes"] == len(genes) == 20
        assert row["pcc"] == pytest.approx(stats.pearsonr(predicted, measured)[0], abs=1e-9)
    # two slides: no per-gene PCC across slides (needs 3)
    assert per_gene["n_slides"].max() <= 2 and per_gene["pcc"].is_nan().all()
    summary = agreement_summary(per_slide, per_gene)
    assert set(summary["head"]) == {"ridge", "mean"} and set(summary["slides"]) == {2}


def test_agreement_lands_in_the_compare_report(compared, tmp_path):
    store, result, runs, pred = compared
    path = write_compare_report(store, result, tmp_path / "report", max_slides=0)
    md = path.read_text()
    assert "## Pseudo-bulk agreement" in md
    per_slide, _ = pseudobulk_agreement(pred, runs)
    ridge = per_slide.filter(pl.col("head") == "ridge")["pcc"].median()
    section = md.split("## Pseudo-bulk agreement")[1]
    assert f"{ridge:.3f}" in section


def test_predicted_expression_per_slide_and_patient(compared):
    store, _, runs, pred = compared
    ridge = runs.filter(pl.col("head") == "ridge")["run_id"].to_list()
    by_slide = predicted_expression(store, "slide_id", ridge)
    assert set(by_slide["unit"]) == set(SLIDES)
    for slide in SLIDES:
        p = pred.filter(pl.col("run_id").is_in(ridge) & (pl.col("slide_id") == slide))
        ref = p.group_by("gene").agg(((pl.col("mean_log1p").cast(pl.Float64).exp() - 1).mean() * 100).log1p())
        got = by_slide.filter(pl.col("unit") == slide).join(ref, on="gene")
        assert got.height == p["gene"].n_unique()
        np.testing.assert_allclose(got["value"], got["mean_log1p"], rtol=1e-9)
    # patient C: C4 and C5 combined by spot-weighted mean of predicted CP10k (genes both folds chose)
    by_patient = predicted_expression(store, "patient", ridge)
    assert set(by_patient["unit"]) == {"C"}
    both = pred.filter(pl.col("run_id").is_in(ridge))
    common = by_patient.filter(pl.col("n_slides") == 2)["gene"].to_list()
    for gene in common[:5]:
        g = both.filter(pl.col("gene") == gene)["mean_log1p"].cast(pl.Float64).to_numpy()
        want = np.log1p(np.expm1(g).mean() * 100)
        assert by_patient.filter(pl.col("gene") == gene)["value"][0] == pytest.approx(want, rel=1e-9)
    # several runs predicting one slide (ridge and mean) must be chosen between
    with pytest.raises(ValueError, match="several runs"):
        predicted_expression(store, "slide_id")


def test_clinical_joins_predictions_in_sql(compared, tmp_path):
    """The clinical table (keyed by slide, and by patient) joins the predictions in SQL; the
    SQL's per-(slide, gene) means equal polars' over the same rows."""
    from stimage_embed.downstream import add_clinical

    store, _, runs, pred = compared
    (tmp_path / "s.csv").write_text("slide_id,time,event,synthetic\nC4,12,1,1\nC5,30,0,1\n")
    (tmp_path / "p.csv").write_text("patient,time,event,synthetic\nC,40,1,1\n")
    add_clinical(store, tmp_path / "s.csv", "slide_id")
    add_clinical(store, tmp_path / "p.csv", "patient")
    ridge = runs.filter(pl.col("head") == "ridge")["run_id"].to_list()
    ids = ", ".join(f"'{r}'" for r in ridge)
    by_slide = store.sql(
        f"""SELECT c.key AS slide_id, c.time, p.gene, AVG(p.mean_log1p) AS m, COUNT(*) AS n
            FROM clinical c JOIN predictions p ON p.slide_id = c.slide_id
            WHERE c.key_kind = 'slide_id' AND p.run_id IN ({ids}) GROUP BY ALL ORDER BY slide_id, gene"""
    )
    ref = (
        pred.filter(pl.col("run_id").is_in(ridge))
        .group_by("slide_id", "gene")
        .agg(pl.col("mean_log1p").cast(pl.Float64).mean().alias("ref"), pl.len().alias("n_ref"))
    )
    got = by_slide.join(ref, on=["slide_id", "gene"], how="inner")
    assert got.height == by_slide.height == ref.height and set(by_slide["time"]) == {12.0, 30.0}
    np.testing.assert_allclose(got["m"], got["ref"], rtol=1e-6)
    assert (got["n"] == got["n_ref"]).all()
    by_patient = store.sql(
        f"""SELECT c.key AS patient, COUNT(DISTINCT p.slide_id) AS slides, COUNT(*) AS n
            FROM clinical c JOIN slides s ON s.patient = c.patient
            JOIN predictions p ON p.slide_id = s.slide_id
            WHERE c.key_kind = 'patient' AND p.run_id IN ({ids}) GROUP BY ALL"""
    )
    assert by_patient.to_dicts() == [
        {"patient": "C", "slides": 2, "n": pred.filter(pl.col("run_id").is_in(ridge)).height}
    ]


def test_predicted_expression_from_infer_pseudobulk(tmp_path, infer_model_store, real_data_root):
    """``--expr predicted`` on image-only slides: ``infer`` on two crops of C5, each its own
    unit; the value equals log1p(100 x mean expm1) of the AnnData ``X`` over QC-passing tiles,
    and the clinical table joins the ``pseudobulk`` table in SQL."""
    import shutil

    import anndata as ad

    from stimage_embed.downstream import add_clinical
    from stimage_embed.inference.infer import infer
    from stimage_embed.store import Store

    src, run_id = infer_model_store
    shutil.copytree(src.path, tmp_path / "store")
    store = Store(tmp_path / "store")
    umpp = store.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0]
    files = {}
    for sid, x0 in (("C5_a", 3800.0), ("C5_b", 4400.0)):
        res = infer(
            store, real_data_root / "her2st/images/C5.jpg", run_id, tmp_path / "out", slide_id=sid,
            um_per_px=umpp, region=(x0, 3800.0, x0 + 600.0, 4400.0), n_top_genes=0, num_workers=0, device="cpu",
        )  # fmt: skip
        files[sid] = res.anndata
    long = predicted_expression(store, "patient", [run_id])
    assert set(long["unit"]) == set(files)  # image-only slides have no patient: each slide is its unit
    for sid, path in files.items():
        a = ad.read_h5ad(path)
        x = np.asarray(a.X, np.float64)[a.obs["passes_qc"].to_numpy(bool)]
        ref = dict(zip(map(str, a.var_names), np.log1p(100 * np.expm1(x).mean(axis=0))))
        got = long.filter(pl.col("unit") == sid)
        assert got.height == len(ref) and (got["n_spots"] == len(x)).all() and (got["n_slides"] == 1).all()
        np.testing.assert_allclose(got["value"], [ref[g] for g in got["gene"]], rtol=1e-5)
    (tmp_path / "c.csv").write_text("slide_id,time,event,synthetic\nC5_a,10,1,1\nC5_b,20,0,1\n")
    add_clinical(store, tmp_path / "c.csv", "slide_id")
    joined = store.sql(
        "SELECT c.key, c.time, COUNT(*) AS genes FROM clinical c JOIN pseudobulk p ON p.slide_id = c.slide_id "
        "GROUP BY ALL ORDER BY c.key"
    )
    n_genes = long["gene"].n_unique()
    assert joined.to_dicts() == [
        {"key": "C5_a", "time": 10.0, "genes": n_genes},
        {"key": "C5_b", "time": 20.0, "genes": n_genes},
    ]
