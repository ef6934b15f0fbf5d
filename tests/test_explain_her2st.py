"""``explain`` on real HER2ST with an ``nb`` head trained on C4's Lite0 vectors, explaining C5
tiles: the unperturbed tile reproduces the stored pipeline's prediction, explanations are
reproducible with a fixed seed, LIME weights agree in sign with occluding each top nucleus,
the ``nuclei`` table answers SQL, and bad input gets one line (exit code 2)."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.explain.lime_tile import explain_tile, occlusion_deltas
from stimage_embed.explain.model_fn import load_tile_model
from stimage_embed.explain.run import explain
from stimage_embed.explain.segment import SEGMENTERS, HedSegmenter
from stimage_embed.store import Store
from stimage_embed.tiles.image import SlideImage

SAMPLES = 64  # LIME samples per tile in these tests (the default is 1000)
GENE = "FASN"  # a tumour-cell (lipogenesis) gene of the STimage panel


@pytest.fixture(scope="module")
def nb_store(tmp_path_factory, embedded_store):
    """A copy of ``embedded_store`` with an nb head on C4 (STimage's 14-gene panel). (store, run_id)."""
    from stimage_embed.predictions.train_predict import train

    path = tmp_path_factory.mktemp("explain") / "store"
    shutil.copytree(embedded_store.path, path)
    store = Store(path)
    run_id, _ = train(store, "efficientnet_lite0", "nb", "panel:stimage14", ["C4"])
    return store, run_id


def _c5_spots(store: Store, qc: bool) -> list[str]:
    where = "slide_id = 'C5' AND " + ("passes_qc" if qc else "NOT passes_qc")
    return sorted(store.read("spots", ["spot_id"], where=where)["spot_id"].to_pylist())


def test_unperturbed_tile_reproduces_the_stored_prediction(nb_store):
    store, run_id = nb_store
    tm = load_tile_model(store, run_id, device="cpu")
    spots = _c5_spots(store, qc=True)[:4]
    vec = store.read("embeddings_efficientnet_lite0", ["spot_id", "vector"], where="slide_id = 'C5'").to_pylist()
    stored = {r["spot_id"]: np.asarray(r["vector"], np.float32) for r in vec}
    srow = store.read("slides", ["image_path", "um_per_px"], where="slide_id = 'C5'").to_pylist()[0]
    xy = pl.from_arrow(store.read("spots", ["spot_id", "pixel_x", "pixel_y"], where="slide_id = 'C5'"))
    with SlideImage.open(srow["image_path"]) as image:
        reader, norm = tm.reader("C5", image, srow["um_per_px"]), tm.normalizer("C5", image)
        tiles = np.stack([reader.read(*xy.filter(pl.col("spot_id") == s).row(0)[1:])[0] for s in spots])
    got = tm.classifier(GENE, norm)(tiles)[:, 0]
    want = tm.predict_vectors(np.stack([stored[s] for s in spots]), [GENE])[:, 0]
    assert np.allclose(got, want, atol=0.02), (got, want)  # float16 vectors, same tile path
    # and what `predict` stores for those spots from the embedding pass's vectors (whole pipeline)
    from stimage_embed.predictions.train_predict import predict

    pred = predict(store, run_id, ["C5"]).filter(pl.col("gene") == GENE)
    by_spot = dict(zip(pred["spot_id"], pred["mean_log1p"]))
    assert np.allclose(got, [by_spot[s] for s in spots], atol=0.02), (got, by_spot)


def test_reproducible_with_a_seed_and_stored_for_sql(nb_store, tmp_path):
    store, run_id = nb_store
    spot = _c5_spots(store, qc=True)[10]
    a = explain(store, run_id, "C5", GENE, spots=[spot], samples=SAMPLES, seed=7, out=tmp_path, device="cpu")
    rows_a = pl.from_arrow(store.read("nuclei", where=f"spot_id = '{spot}'")).sort("nucleus")
    b = explain(store, run_id, "C5", GENE, spots=[spot], samples=SAMPLES, seed=7, out=tmp_path, device="cpu")
    rows_b = pl.from_arrow(store.read("nuclei", where=f"spot_id = '{spot}'")).sort("nucleus")
    assert a.tiles[0].n_nuclei == rows_a.height == rows_b.height > 5  # replaced, not appended
    assert np.array_equal(rows_a["weight"].to_numpy(), rows_b["weight"].to_numpy())
    assert rows_a["r2"][0] == rows_b["r2"][0] and b.tiles[0].overlay.is_file()
    sql = store.sql("SELECT gene, corr(area_um2, weight) AS r, COUNT(*) AS n FROM nuclei GROUP BY gene")
    assert sql["gene"].to_list() == [GENE] and sql["n"][0] == rows_a.height and -1 <= sql["r"][0] <= 1
    assert sql["r"][0] == pytest.approx(np.corrcoef(rows_a["area_um2"], rows_a["weight"])[0, 1], abs=1e-9)
    # STimage's question through the CLI, as the issue writes it
    q = "SELECT gene, corr(area_um2, weight) FROM nuclei GROUP BY gene"
    res = CliRunner().invoke(app, ["query", q, "--store", str(store.path), "--format", "csv"])
    assert res.exit_code == 0, res.output
    gene, r = res.stdout.strip().splitlines()[-1].split(",")
    assert gene == GENE and float(r) == pytest.approx(sql["r"][0], abs=1e-9)


def test_weights_agree_with_occlusion_for_most_top_nuclei(nb_store):
    """For the 5 nuclei with the largest |weight| on each of 3 tiles, hiding the nucleus alone
    moves the prediction against the weight's sign (weight = effect of keeping it)."""
    store, run_id = nb_store
    tm = load_tile_model(store, run_id, device="cpu")
    srow = store.read("slides", ["image_path", "um_per_px"], where="slide_id = 'C5'").to_pylist()[0]
    xy = pl.from_arrow(store.read("spots", ["spot_id", "pixel_x", "pixel_y"], where="slide_id = 'C5'"))
    agree, total = 0, 0
    with SlideImage.open(srow["image_path"]) as image:
        reader, norm = tm.reader("C5", image, srow["um_per_px"]), tm.normalizer("C5", image)
        fn = tm.classifier(GENE, norm)
        for spot in _c5_spots(store, qc=True)[20:23]:
            tile, _ = reader.read(*xy.filter(pl.col("spot_id") == spot).row(0)[1:])
            labels = HedSegmenter().segment(tile, tm.tile_um / tm.tile_px)
            ex = explain_tile(tile, labels, fn, num_samples=2 * SAMPLES, seed=0)
            top = [int(k) for k in np.argsort(-np.abs(ex.nucleus_weights))[:5]]
            deltas = occlusion_deltas(tile, ex, fn, top)
            agree += int(np.sum(np.sign(ex.weights[top]) == -np.sign(deltas)))
            total += len(top)
    rate = agree / total
    print(f"sign agreement LIME weight vs occlusion, top-5 nuclei of 3 C5 tiles: {agree}/{total} = {rate:.2f}")
    assert rate > 0.5  # most top nuclei (measured 9/15 here; see docs/explain.md for more samples)


def test_no_nucleus_found_is_explained_over_background_and_said(nb_store, tmp_path):
    store, run_id = nb_store
    SEGMENTERS.register("test_finds_none", lambda _w: HedSegmenter(min_h=10.0))
    try:
        spot = _c5_spots(store, qc=True)[0]
        res = explain(
            store, run_id, "C5", GENE, spots=[spot], samples=16, out=tmp_path, device="cpu", segmenter="test_finds_none"
        )
    finally:
        SEGMENTERS.factories.pop("test_finds_none")
    assert res.tiles[0].n_nuclei == 0 and res.rows_written == 0
    assert any("no nucleus found: explained over background regions only" in line for line in res.lines())


def _cli_error(*args: str) -> str:
    result = CliRunner().invoke(app, ["explain", *args])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output
    return lines[0]


def test_bad_input_one_line_each(nb_store, tmp_path):
    store, run_id = nb_store
    base = ["--store", str(store.path), "--slide", "C5", "--out", str(tmp_path), "--samples", "8", "--device", "cpu"]
    before = store.table_names()
    spot = _c5_spots(store, qc=True)[0]
    assert "unknown model 'nope'" in _cli_error(*base, "--model", "nope", "--gene", GENE, "--spots", spot)
    assert "'NOTAGENE' is not predicted" in _cli_error(*base, "--model", run_id, "--gene", "NOTAGENE", "--spots", spot)
    outside = _c5_spots(store, qc=False)[0]
    msg = _cli_error(*base, "--model", run_id, "--gene", GENE, "--spots", outside)
    assert "outside the tissue" in msg and outside in msg
    assert "not a spot of slide" in _cli_error(*base, "--model", run_id, "--gene", GENE, "--spots", "99x99")
    assert "either --spots" in _cli_error(*base, "--model", run_id, "--gene", GENE)
    other = tmp_path / "other_weights.pth"
    other.write_bytes(b"not the weights the model was trained with")
    msg = _cli_error(*base, "--model", run_id, "--gene", GENE, "--spots", spot, "--weights", str(other))
    assert "sha256" in msg and "--weights" in msg  # the backbone cannot be reproduced: refused as infer does
    for seg, needle in (("cellpose", "no weights given"), ("stardist", "weights not found")):
        extra = ["--segmenter", seg] + (["--segmenter-weights", str(tmp_path / "absent")] if seg == "stardist" else [])
        msg = _cli_error(*base, "--model", run_id, "--gene", GENE, "--spots", spot, *extra)
        assert seg in msg and needle in msg
    assert store.table_names() == before  # nothing written
