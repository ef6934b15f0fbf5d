"""``predict`` is not a dead end (issue 25, item 6): on a slide with counts it prints the
per-slide PCC summary (checked against scipy), and it predicts an image-only slide too
(predicting needs vectors, not counts). Real data: the small HER2ST store of conftest."""

from __future__ import annotations

import re
import shutil

import anndata
import numpy as np
import polars as pl
import pytest
from scipy import stats
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.inference.predict_outputs import slide_pcc
from stimage_embed.store import Store


@pytest.fixture()
def store(mini_cli_store, tmp_path):
    path, run_id, data = mini_cli_store
    shutil.copytree(path, tmp_path / "store")
    return tmp_path / "store", run_id, data


def _scipy_median_pcc(pred: pl.DataFrame) -> float:
    rs = []
    for _, g in pred.group_by("gene"):
        truth = np.log1p(g["observed"].to_numpy() / g["library_size"].to_numpy() * 1e4)
        guess = g["mean_log1p"].to_numpy().astype(np.float64)
        if truth.std() > 0 and guess.std() > 0:
            rs.append(stats.pearsonr(truth, guess).statistic)
    return float(np.median(rs))


def test_predict_prints_each_slides_pcc_against_its_counts(store):
    """Before: only a row count."""
    path, run_id, _ = store
    out = path.parent / "out"
    res = CliRunner().invoke(
        app, ["predict", "--store", str(path), "--model", run_id, "--slide", "S2", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("slide S2: PCC"))
    pred = Store(path).sql(f"SELECT * FROM predictions WHERE run_id = '{run_id}' AND slide_id = 'S2'")
    expected = _scipy_median_pcc(pred)
    assert f"median {expected:.3f}" in line, (line, expected)
    summary = slide_pcc(pred)
    assert summary["slide_id"].to_list() == ["S2"] and summary["pcc_median"][0] == pytest.approx(expected, abs=1e-6)
    # --out: the same files as infer; the AnnData holds the stored predictions
    adata = anndata.read_h5ad(out / "S2.h5ad")
    wide = pred.pivot(on="gene", index="spot_id", values="mean_log1p").sort("spot_id")
    assert list(adata.obs_names) == wide["spot_id"].to_list()
    assert np.allclose(adata.X, wide.select(list(adata.var_names)).to_numpy(), atol=1e-6)
    maps = [p for p in (out / "S2").glob("*.png") if p.stem != "leiden"]  # leiden.png: the cluster map
    assert len(maps) == 6 and (out / "S2_pseudobulk.csv").is_file()


def test_predict_on_an_image_only_slide(store):
    """Before: "has no expression (not ingested?)"."""
    path, run_id, data = store
    um = Store(path).sql("SELECT um_per_px FROM slides WHERE slide_id = 'S1'")["um_per_px"][0]
    args = ["infer", str(data / "S1.jpg"), "--model", run_id, "--out", str(path.parent / "out"), "--store", str(path)]
    res = CliRunner().invoke(app, [*args, "--slide-id", "img1", "--um-per-px", str(um), "--workers", "0"])
    assert res.exit_code == 0, res.output
    st = Store(path)
    n_tiles = st.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id = 'img1'")["n"][0]
    st.delete("predictions", "slide_id = 'img1'")
    res = CliRunner().invoke(app, ["predict", "--store", str(path), "--model", run_id, "--slide", "img1"])
    assert res.exit_code == 0, res.output
    rows = int(re.search(r"slide img1 \(image only.*\): (\d+) prediction rows", res.stdout).group(1))
    assert rows == n_tiles * 10  # every tile x the model's 10 genes
    stored = st.sql("SELECT COUNT(*) AS n FROM predictions WHERE slide_id = 'img1'")["n"][0]
    assert stored == rows
