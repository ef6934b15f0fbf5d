"""The inference notebook (notebooks/infer_new_slide.py, jupytext percent format) executed
end to end with nbclient, as tests/test_notebook.py runs the backbone comparison: on a copy
of the ``infer_model_store`` fixture (ridge model trained on C4), inferring C5's JPEG as a
new slide on a coarse 200 µm grid.

Checks real outcomes: no cell errors; heatmaps shown inline; the notebook's summary agrees
with independent reads of the store (Lance directly, DuckDB) and its pseudo-bulk versus
bulk Pearson r with scipy on the CSV and the raw counts.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import lance
import numpy as np
import polars as pl
import pytest
from scipy import stats

from stimage_embed.store import Store

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "infer_new_slide.py"
KERNEL = "stimage-infer-notebook-test"
SLIDE = "C5_notebook"
PITCH_UM = 200.0


def _kernel_manager(tmp: Path, env: dict[str, str]):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "stimage-embed infer notebook test kernel",
        "language": "python",
        "env": env,
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL, kernel_spec_manager=ksm)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, infer_model_store, real_data_root):
    src, run_id = infer_model_store
    tmp = tmp_path_factory.mktemp("infer_notebook")
    store_dir = tmp / "store"
    shutil.copytree(src.path, store_dir)
    out = tmp / "out"
    env = {
        "STIMAGE_NOTEBOOK_STORE": str(store_dir),
        "STIMAGE_NOTEBOOK_MODEL": run_id,
        "STIMAGE_NOTEBOOK_IMAGE": str(real_data_root / "her2st" / "images" / "C5.jpg"),
        "STIMAGE_NOTEBOOK_SLIDE_ID": SLIDE,
        "STIMAGE_NOTEBOOK_PITCH_UM": str(PITCH_UM),
        "STIMAGE_NOTEBOOK_OUT": str(out),
        "STIMAGE_NOTEBOOK_WORKERS": "0",
        "STIMAGE_DATA_ROOT": str(real_data_root),
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
    }
    nb = jupytext.read(NOTEBOOK)
    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp, env), timeout=1200, allow_errors=True, resources={"metadata": {"path": str(tmp)}}
    )
    client.execute()
    return nb, Store(store_dir), out, run_id


def _tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


@pytest.mark.slow
def test_notebook_runs_and_shows_the_heatmaps(executed):
    nb, _, out, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "not every code cell ran"
    errors = [
        (i, o.get("ename"), o.get("evalue"))
        for i, c in enumerate(code)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors, errors
    heat = _tagged(nb, "heatmaps")
    shown = [o for o in heat.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(shown) == 3
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= 5  # 3 heatmaps, the scanpy map, the bulk scatter
    assert "mean_cp10k" in "".join(
        str(o.get("data", {}).get("text/plain", "")) + str(o.get("data", {}).get("text/html", ""))
        for o in _tagged(nb, "pseudobulk").get("outputs", [])
    )


@pytest.mark.slow
def test_summary_agrees_with_the_store(executed):
    _, store, out, run_id = executed
    s = json.loads((out / "summary.json").read_text())
    assert s["slide_id"] == SLIDE and s["run_id"] == run_id and s["pitch_um"] == PITCH_UM and s["tile_um"] == 100.0
    spots = pl.from_arrow(
        lance.dataset(str(store.path / "spots.lance")).to_table(
            columns=["spot_id", "passes_qc"], filter=f"slide_id = '{SLIDE}'"
        )
    )
    assert s["tiles"] == spots.height > 50 and s["tiles_pass_qc"] == int(spots["passes_qc"].sum())
    genes = json.loads((store.path / "models" / run_id / "run.json").read_text())["genes"]
    assert s["genes"] == genes
    n = store.sql(
        "SELECT COUNT(*) AS n, COUNT(DISTINCT spot_id) AS t FROM predictions WHERE run_id = "
        f"'{run_id}' AND slide_id = '{SLIDE}'"
    )
    assert s["prediction_rows"] == n["n"][0] == spots.height * len(genes) and n["t"][0] == spots.height
    for gene, path in s["heatmaps"].items():
        assert gene in genes and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(s["anndata"]).is_file()

    # pseudo-bulk vs the measured bulk of C5, recomputed from the raw counts (Lance) and the CSV
    pb = pl.read_csv(s["pseudobulk_csv"])
    genes_tab = pl.from_arrow(
        lance.dataset(str(store.path / "genes.lance")).to_table(
            columns=["gene_index", "gene"], filter="slide_id = 'C5'"
        )
    )
    expr = lance.dataset(str(store.path / "expression.lance")).to_table(
        columns=["gene_index", "counts"], filter="slide_id = 'C5'"
    )
    gi = np.concatenate([np.asarray(x, np.int64) for x in expr["gene_index"].to_pylist()])
    cnt = np.concatenate([np.asarray(x, np.float64) for x in expr["counts"].to_pylist()])
    totals = np.bincount(gi, weights=cnt, minlength=int(genes_tab["gene_index"].max()) + 1)
    index = dict(zip(genes_tab["gene"], genes_tab["gene_index"]))
    bulk = np.array([totals[index[g]] if g in index else 0.0 for g in pb["gene"]]) / cnt.sum() * 1e4
    r = stats.pearsonr(np.log1p(pb["mean_cp10k"].to_numpy()), np.log1p(bulk))[0]
    assert s["bulk_slide"] == "C5" and s["pseudobulk_vs_bulk_r"] == pytest.approx(r, abs=1e-6)
    assert r > 0.5  # the pseudo-bulk ranks the genes' levels like the measurement
