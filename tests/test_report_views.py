"""The report's aggregates equal the store's SQL views (``stimage-embed query``) and numpy.

Small synthetic ``metrics``/``runs``/``predictions`` tables (2 backbones x 2 heads, 2 test
slides, 4 genes, one undefined Pearson) are written to a temporary store; the report
functions run on the same tables as polars frames.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from stimage_embed.evaluation.report import coverage_table, gene_scores, model_scores, top_genes
from stimage_embed.evaluation.report_tables import uncertainty_error_table
from stimage_embed.store.store import Store

GENES = ["A", "B", "C", "D"]
MODELS = [("bb1", "nb"), ("bb1", "ridge"), ("bb2", "nb"), ("bb2", "ridge")]
SLIDES = ["S1", "S2"]


@pytest.fixture(scope="module")
def tables() -> dict[str, pl.DataFrame]:
    rng = np.random.default_rng(3)
    runs, mets, preds = [], [], []
    for bb, head in MODELS:
        for slide in SLIDES:
            rid = f"{bb}-{head}-{slide}"
            runs.append(
                {
                    "run_id": rid,
                    "dataset": "d",
                    "backbone": bb,
                    "members": [bb],
                    "head": head,
                    "control": "none",
                    "split": "loso",
                    "fold": f"loso:{slide}",
                    "test_slides": [slide],
                    "gene_spec": "hvg:4",
                    "genes": GENES,
                }
            )
            for gene in GENES:
                r = (
                    float("nan")
                    if (bb, head, slide, gene) == ("bb2", "ridge", "S1", "D")
                    else float(rng.uniform(-0.2, 0.9))
                )
                vals = {"pearson": r}
                if head == "nb":
                    vals |= {"coverage_50": float(rng.uniform(0.3, 0.6)), "coverage_90": float(rng.uniform(0.7, 0.95))}
                for metric, v in vals.items():
                    mets.append(
                        {
                            "run_id": rid,
                            "dataset": "d",
                            "backbone": bb,
                            "head": head,
                            "fold": f"loso:{slide}",
                            "control": "none",
                            "scope": "slide",
                            "slide_id": slide,
                            "gene": gene,
                            "metric": metric,
                            "value": v,
                        }
                    )
            n = 57  # not a multiple of 10: uneven deciles
            preds.append(
                pl.DataFrame(
                    {
                        "run_id": rid,
                        "slide_id": slide,
                        "spot_id": [f"s{i}" for i in range(n)],
                        "gene": "A",
                        "mean": rng.gamma(2.0, 3.0, n),
                        "variance": rng.gamma(2.0, 5.0, n) if head == "nb" else None,
                        "observed": rng.poisson(5.0, n).astype(np.int32),
                    }
                ).with_columns(pl.col("mean", "variance").cast(pl.Float32))
            )
    return {"metrics": pl.DataFrame(mets), "runs": pl.DataFrame(runs), "predictions": pl.concat(preds)}


@pytest.fixture(scope="module")
def store(tables, tmp_path_factory) -> Store:
    st = Store(tmp_path_factory.mktemp("views") / "store")
    with st.writer("test"):
        for name in ("metrics", "runs", "predictions"):
            st.append(
                name, tables[name].with_columns(pl.col("value").fill_nan(None)) if name == "metrics" else tables[name]
            )
    return st


def _same(report: pl.DataFrame, view: pl.DataFrame) -> None:
    """Equal values column by column (the report renames the view's columns)."""
    assert report.width == view.width and report.height > 0
    assert_frame_equal(
        report, view.rename(dict(zip(view.columns, report.columns))), check_dtypes=False, abs_tol=1e-12, rel_tol=1e-12
    )


def test_model_and_gene_scores_match_views_and_numpy(tables, store):
    m, r = tables["metrics"], tables["runs"]
    ms = model_scores(m, r)
    _same(
        ms,
        store.sql(
            "SELECT dataset, backbone, head, pcc_mean, pcc_median, pcc_defined, pcc_values "
            "FROM model_scores ORDER BY dataset, backbone, head"
        ),
    )
    pcc = m.filter(pl.col("metric") == "pearson")
    for _, bb, head, mean_r, median_r, n_def, n_all in ms.iter_rows():
        v = pcc.filter((pl.col("backbone") == bb) & (pl.col("head") == head))["value"].to_numpy()
        assert (n_def, n_all) == (np.isfinite(v).sum(), v.size)
        assert mean_r == pytest.approx(np.nanmean(v), abs=1e-12)
        assert median_r == pytest.approx(np.nanmedian(v), abs=1e-12)
    _same(
        gene_scores(m, r),
        store.sql(
            "SELECT dataset, backbone, head, gene, pcc_mean, slides FROM gene_scores "
            "ORDER BY dataset, backbone, head, gene"
        ),
    )
    _same(
        top_genes(m, 2, r),
        store.sql(
            "SELECT dataset, backbone, head, rank, gene, pcc_mean FROM top_genes "
            "WHERE rank <= 2 ORDER BY dataset, backbone, head, rank"
        ),
    )
    # the metrics alone (no runs, no control column) give the same numbers
    _same(model_scores(m.drop("control")), ms)


def test_calibration_tables_match_views_and_numpy(tables, store):
    m, r, p = tables["metrics"], tables["runs"], tables["predictions"]
    cov = coverage_table(m, r)
    _same(
        cov,
        store.sql(
            "SELECT dataset, backbone, head, nominal, empirical, sd FROM coverage WHERE scope = 'slide' "
            "ORDER BY dataset, head, backbone, nominal"
        ),
    )
    c50 = m.filter((pl.col("metric") == "coverage_50") & (pl.col("backbone") == "bb1"))["value"].to_numpy()
    row = cov.filter((pl.col("backbone") == "bb1") & (pl.col("nominal") == 0.5)).row(0, named=True)
    assert row["empirical"] == pytest.approx(c50.mean()) and row["sd"] == pytest.approx(c50.std(ddof=1))
    ue = uncertainty_error_table(p, r, [("d", "bb1", "nb"), ("d", "bb2", "nb")])
    _same(
        ue,
        store.sql(
            "SELECT dataset, backbone, head, decile - 1, sd_mean, abs_error_mean, n FROM uncertainty_error "
            "ORDER BY dataset, backbone, head, decile"
        ),
    )
    # numpy: ten near-equal bins of the 114 (spot, slide) rows of bb1/nb ordered by sd
    q = p.join(r.select("run_id", "backbone", "head"), on="run_id").filter(
        (pl.col("backbone") == "bb1") & (pl.col("head") == "nb")
    )
    sd = np.sqrt(q["variance"].to_numpy().astype(np.float64))
    err = np.abs(q["observed"].to_numpy() - q["mean"].to_numpy().astype(np.float64))
    order = np.lexsort((err, sd))
    bins = np.array_split(order, 10)
    got = ue.filter(pl.col("backbone") == "bb1").sort("bin")
    assert got["n"].to_list() == [b.size for b in bins]
    assert np.allclose(got["sd"].to_numpy(), [sd[b].mean() for b in bins])
    assert np.allclose(got["abs_error"].to_numpy(), [err[b].mean() for b in bins])
