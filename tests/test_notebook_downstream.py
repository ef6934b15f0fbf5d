"""The downstream notebook (notebooks/downstream.py, jupytext percent format) executed end
to end with nbclient on a copy of the ``infer_model_store`` fixture (HER2ST ingested, C4/C5
Lite0 vectors, a ridge model on C4), so it cannot rot.

Checks: no cell errors; the GSE7390 (real) numbers it reports equal scikit-survival's
(best gene's c-index, log-rank statistic of its risk groups); the predicted arm's slides
are in the store's ``pseudobulk`` table and every output built on the generated clinical
table says SYNTHETIC; the agreement table covers the held-out sections.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from test_notebook import _kernel_manager, _outputs_text, _tagged

from stimage_embed.store import Store

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
sksurv_datasets = pytest.importorskip("sksurv.datasets")

NOTEBOOK = __import__("pathlib").Path(__file__).resolve().parents[1] / "notebooks" / "downstream.py"
REPEATS = 3


@pytest.fixture(scope="module")
def executed(tmp_path_factory, infer_model_store):
    src, run_id = infer_model_store
    tmp = tmp_path_factory.mktemp("notebook_downstream")
    store_dir = tmp / "store"
    shutil.copytree(src.path, store_dir)
    out = tmp / "out"
    env = {
        "STIMAGE_NOTEBOOK_STORE": str(store_dir),
        "STIMAGE_NOTEBOOK_MODEL": run_id,
        "STIMAGE_NOTEBOOK_OUT": str(out),
        "STIMAGE_NOTEBOOK_REPEATS": str(REPEATS),
        "STIMAGE_NOTEBOOK_WORKERS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    nb = jupytext.read(NOTEBOOK)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp, env), timeout=1200, allow_errors=True, resources={"metadata": {"path": str(tmp)}}
    )
    client.execute()
    return nb, Store(store_dir), out, run_id


@pytest.mark.slow
def test_runs_without_errors(executed):
    nb, _, _, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [
        (o.get("ename"), o.get("evalue")) for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors, errors
    assert all(c.get("execution_count") for c in code)


@pytest.mark.slow
def test_gse7390_numbers_equal_scikit_survival(executed):
    from sksurv.compare import compare_survival
    from sksurv.metrics import concordance_index_censored

    _, _, out, _ = executed
    x, y = sksurv_datasets.load_breast_cancer()
    s = json.loads((out / "summary.json").read_text())["gse7390_survival"]
    assert s["units"] == 198 and s["events"] == 51 and s["genes_tested"] == 76 and not s["synthetic"]
    uni = pl.read_parquet(out / "gse7390_survival" / "univariate.parquet")
    best = uni.row(0, named=True)
    ref = concordance_index_censored(y["e.tdm"], y["t.tdm"], x[best["gene"]].to_numpy() * np.sign(best["coef"]))[0]
    assert s["best_gene_c_index"] == pytest.approx(ref, abs=1e-9)
    groups = pl.read_parquet(out / "gse7390_survival" / "risk_groups.parquet")
    order = {f"GSE7390_{i:03d}": i for i in range(len(x))}
    labels = np.empty(len(x), object)
    labels[[order[u] for u in groups["unit"]]] = groups["group"].to_numpy()
    chisq, p = compare_survival(y, labels)
    assert s["logrank"]["statistic"] == pytest.approx(chisq, rel=1e-9) and s["logrank"]["p"] == pytest.approx(p)
    r = json.loads((out / "summary.json").read_text())["gse7390_response"]
    assert len(r["auc_per_fold"]) == 5 and r["auc_mean"] == pytest.approx(np.mean(r["auc_per_fold"]))


@pytest.mark.slow
def test_predicted_arm_is_marked_synthetic_and_reads_the_pseudobulk(executed):
    nb, store, out, run_id = executed
    for tag in ("synthetic_clinical", "synthetic_survival", "synthetic_response"):
        assert "SYNTHETIC" in _outputs_text(_tagged(nb, tag)), tag
    summary = json.loads((out / "summary.json").read_text())
    for key in ("synthetic_survival", "synthetic_response"):
        assert summary[key]["synthetic"] is True and "SYNTHETIC" in summary[key]["note"]
    assert summary["synthetic_survival"]["units"] == 8
    pb = pl.from_arrow(store.read("pseudobulk", where=f"run_id = '{run_id}'"))
    crops = sorted(s for s in pb["slide_id"].unique().to_list() if "_crop" in s)
    assert len(crops) == 8
    clinical = pl.from_arrow(store.read("clinical"))
    assert sorted(clinical["key"].to_list()) == crops and set(clinical["synthetic"].to_list()) == {1.0}
    # the risk groups cover the crops, and the joined SQL output names the synthetic flag
    groups = pl.read_parquet(out / "SYNTHETIC_survival" / "risk_groups.parquet")
    assert sorted(groups["unit"].to_list()) == crops
    assert "synthetic" in _outputs_text(_tagged(nb, "sql_join"))


@pytest.mark.slow
def test_agreement_covers_the_held_out_sections(executed):
    _, _, out, _ = executed
    rows = json.loads((out / "summary.json").read_text())["agreement"]
    assert {(r["head"], r["slide_id"]) for r in rows} == {(h, s) for h in ("ridge", "mean") for s in ("C4", "C5")}
    assert all(-1 <= r["pcc"] <= 1 and r["n_genes"] == 20 for r in rows)


def test_imports_only_the_public_api():
    """Every ``stimage_embed`` import of the notebook is a top-level public name (``__all__``)."""
    import ast

    import stimage_embed

    tree = ast.parse(NOTEBOOK.read_text())  # jupytext percent format: plain Python
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stimage_embed"):
            assert node.module == "stimage_embed", f"internal module imported: {node.module}"
            used += [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("stimage_embed") for a in node.names), "import stimage_embed.x"
    assert used and set(used) <= set(stimage_embed.__all__), sorted(set(used) - set(stimage_embed.__all__))
