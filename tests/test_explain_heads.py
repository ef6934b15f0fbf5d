"""``explain`` of the two probability heads on real HER2ST (Lite0 vectors; trained on C4,
explained on C5): a ``highlow`` model (the value explained is P(high)) and a ``label`` model
(P(class) of a chosen class). The reference for the classifier function (tile -> stain ->
backbone -> head) is what ``predict`` stored for the same spots from the embedding pass's
vectors; the stain target that cannot be reproduced is refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import polars as pl
import pytest
from store_cases import copy_store
from test_heads_label import _grey_terciles
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.explain.model_fn import load_tile_model
from stimage_embed.explain.run import explain
from stimage_embed.tiles.image import SlideImage

GENE = "FASN"


@pytest.fixture(scope="module")
def prob_store(tmp_path_factory, embedded_store):
    """A copy of ``embedded_store`` with a highlow head (FASN, ERBB2) and a label head (grey
    tercile of the real H&E, label set ``tone``) trained on C4, both predicted on C5."""
    from stimage_embed.inference.label_predict import predict_labels
    from stimage_embed.predictions.train_predict import predict, train
    from stimage_embed.store.labels import add_labels

    tmp = tmp_path_factory.mktemp("explain_heads")
    store = copy_store(embedded_store, tmp / "store")
    (tmp / "genes.txt").write_text(f"{GENE}\nERBB2\n")
    hl, _ = train(store, "efficientnet_lite0", "highlow", f"file:{tmp / 'genes.txt'}", ["C4"], params={"n_jobs": 1})
    _grey_terciles(store, ["C4", "C5"]).to_csv(tmp / "tone.csv", index=False)
    add_labels(store, tmp / "tone.csv", ("slide", "spot"), "tone")
    lab, _ = train(store, "efficientnet_lite0", "label", "", ["C4"], labels="tone")
    predict(store, hl, ["C5"])
    predict_labels(store, lab, ["C5"])
    return store, hl, lab, tmp


def _c5_tiles(store, tm, spots: list[str]) -> tuple[np.ndarray, object]:
    srow = store.read("slides", ["image_path", "um_per_px"], where="slide_id = 'C5'").to_pylist()[0]
    xy = pl.from_arrow(store.read("spots", ["spot_id", "pixel_x", "pixel_y"], where="slide_id = 'C5'"))
    with SlideImage.open(srow["image_path"]) as image:
        reader, norm = tm.reader("C5", image, srow["um_per_px"]), tm.normalizer("C5", image)
        tiles = np.stack([reader.read(*xy.filter(pl.col("spot_id") == s).row(0)[1:])[0] for s in spots])
    return tiles, norm


def _tissue_spots(store, k: int) -> list[str]:
    rows = store.read("spots", ["spot_id"], where="slide_id = 'C5' AND passes_qc")["spot_id"].to_pylist()
    return sorted(rows)[:k]


def test_highlow_explains_p_high_as_predict_stored_it(prob_store, tmp_path):
    store, hl, _, _ = prob_store
    tm = load_tile_model(store, hl, device="cpu")
    assert tm.column == "prob_high"
    spots = _tissue_spots(store, 4)
    tiles, norm = _c5_tiles(store, tm, spots)
    got = tm.classifier(GENE, norm)(tiles)[:, 0]
    stored = store.sql(f"SELECT spot_id, prob_high FROM predictions WHERE run_id = '{hl}' AND gene = '{GENE}'")
    want = dict(zip(stored["spot_id"], stored["prob_high"]))
    assert np.all((got >= 0) & (got <= 1))
    np.testing.assert_allclose(got, [want[s] for s in spots], atol=0.02)  # float16 vectors, same tile path
    res = explain(store, hl, "C5", GENE, spots=spots[:1], samples=16, out=tmp_path, device="cpu")
    rows = pl.from_arrow(store.read("nuclei", where=f"run_id = '{hl}'"))
    assert rows.height == res.tiles[0].n_nuclei > 0 and set(rows["value"]) == {"prob_high"}
    assert rows["prediction"][0] == pytest.approx(want[spots[0]], abs=0.02)
    assert "(P(high))" in res.lines()[0]
    # --top K: the K tissue spots where predict stored the highest P(high)
    top = explain(store, hl, "C5", GENE, top=2, samples=8, out=tmp_path, device="cpu")
    qc = store.sql("SELECT spot_id FROM spots WHERE slide_id = 'C5' AND passes_qc")["spot_id"].to_list()
    ranked = stored.filter(pl.col("spot_id").is_in(qc)).sort("prob_high", descending=True)["spot_id"].to_list()
    assert sorted(t.spot_id for t in top.tiles) == sorted(ranked[:2])


def test_label_model_explains_p_of_the_chosen_class(prob_store, tmp_path):
    store, _, lab, _ = prob_store
    tm = load_tile_model(store, lab, device="cpu")
    assert tm.column == "prob_class" and sorted(tm.sm.genes) == ["dark", "mid", "pale"]
    spots = _tissue_spots(store, 4)
    tiles, norm = _c5_tiles(store, tm, spots)
    stored = store.sql(f"SELECT spot_id, class, prob FROM label_predictions WHERE run_id = '{lab}'")
    for cls in tm.sm.genes:
        got = tm.classifier(cls, norm)(tiles)[:, 0]
        want = dict(zip(*stored.filter(pl.col("class") == cls).select("spot_id", "prob").to_dict().values()))
        np.testing.assert_allclose(got, [want[s] for s in spots], atol=0.02)
    res = explain(store, lab, "C5", "dark", spots=spots[:1], samples=16, out=tmp_path, device="cpu")
    rows = pl.from_arrow(store.read("nuclei", where=f"run_id = '{lab}'"))
    assert set(rows["gene"]) == {"dark"} and set(rows["value"]) == {"prob_class"}
    assert 0 <= res.tiles[0].prediction <= 1 and "(P(class))" in res.lines()[0]
    base = ["explain", "--store", str(store.path), "--slide", "C5", "--spots", spots[0], "--samples", "8"]
    out = CliRunner().invoke(app, [*base, "--model", lab, "--gene", "FASN", "--device", "cpu"])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1, out.output
    assert "'FASN' is not a class of label model" in lines[0] and "dark" in lines[0]


def test_a_stain_target_that_cannot_be_reproduced_is_refused_in_one_line(prob_store, tmp_path):
    """The model folder's recorded stain target, its parameters altered: they no longer give
    the hash the training vectors carry, so explain refuses (as infer does), writing nothing."""
    store, hl, _, _ = prob_store
    folder = shutil.copytree(store.models_dir / hl, tmp_path / "tampered")
    doc = json.loads((folder / "vectors.json").read_text())
    target = doc["parts"][0]["record"]["stain"]["target"]
    key = next(k for k, v in target.items() if isinstance(v, list))
    target[key] = (np.asarray(target[key], float) * 1.5).tolist()
    (folder / "vectors.json").write_text(json.dumps(doc))
    before = pl.from_arrow(store.read("nuclei")).height if store.has_table("nuclei") else 0
    spot = _tissue_spots(store, 1)[0]
    args = ["explain", "--store", str(store.path), "--slide", "C5", "--spots", spot, "--gene", GENE]
    out = CliRunner().invoke(app, [*args, "--model", str(folder), "--samples", "8", "--out", str(tmp_path / "o")])
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert out.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.output
    assert "vectors.json" in lines[0] and "stain" in lines[0], lines[0]
    assert (pl.from_arrow(store.read("nuclei")).height if store.has_table("nuclei") else 0) == before
    assert not (tmp_path / "o").exists()
