"""A saved model folder is portable (issue 25 item 7): it carries the training vectors'
provenance, tile width and fitted stain target (``vectors.json``), so ``infer`` on another
store, one without the template slide and with no (or another) stain target recorded,
embeds and predicts exactly as in the store the model was trained in.

Real data: a ridge model trained on HER2ST C4's Lite0 vectors (``infer_model_store``),
copied out of its store, infers a region of the real C5 image in the training store (the
reference: its stain target is refitted from the template slide there) and in two other
stores; the predictions and vectors must agree. A folder whose recorded weights sha256
differs, and one without ``vectors.json`` on a foreign store, are refused in one line.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import lance
import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.embeddings.provenance import VectorProvenance, existing_provenance
from stimage_embed.embeddings.stain_target import record as record_stain_target
from stimage_embed.embeddings.stain_target import recorded
from stimage_embed.inference.infer import infer
from stimage_embed.store import Store

SLIDE = "C5_region"
#: level-0 px box of C5.jpg: a patch of tissue of about 40 grid tiles (100 µm tiles)
REGION = (3800.0, 3300.0, 4900.0, 4400.0)


def _predictions(store: Store, run_id: str) -> pl.DataFrame:
    return store.sql(
        f"SELECT spot_id, gene, mean_log1p FROM predictions WHERE run_id = '{run_id}' AND slide_id = '{SLIDE}' "
        "ORDER BY spot_id, gene"
    )


def _vectors(store: Store) -> np.ndarray:
    tab = lance.dataset(str(store.path / "embeddings_efficientnet_lite0.lance")).to_table(
        columns=["spot_id", "vector"], filter=f"slide_id = '{SLIDE}'"
    )
    order = np.argsort(np.asarray(tab["spot_id"].to_pylist()))
    vec = tab["vector"].combine_chunks()
    return vec.values.to_numpy(zero_copy_only=False).reshape(tab.num_rows, -1).astype(np.float32)[order]


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, infer_model_store, real_data_root):
    """The model folder copied out of its store; ``infer`` of the same C5 region in the
    training store (A), a fresh empty store (B) and a store of other slides whose recorded
    stain target is another slide's (C)."""
    from store_cases import mini_dataset

    from stimage_embed.ingest.pipeline import ingest

    src, run_id = infer_model_store
    tmp = tmp_path_factory.mktemp("portable")
    folder = shutil.copytree(src.path / "models" / run_id, tmp / "shared_model")
    store_a = Store(shutil.copytree(src.path, tmp / "A"))
    umpp = store_a.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0]
    store_c = Store(tmp / "C")
    ingest(str(mini_dataset(tmp / "data", real_data_root)), store_c, progress=False)
    record_stain_target(store_c, "S1", "explicit")  # another target than the model's (template C4)
    image = real_data_root / "her2st" / "images" / "C5.jpg"
    logging.getLogger("stimage_embed").setLevel(logging.WARNING)
    stores = {"A": store_a, "B": Store(tmp / "B"), "C": store_c}
    for name, store in stores.items():
        model = run_id if name == "A" else str(folder)  # A: by run id, through the store's own folder
        infer(store, image, model, tmp / f"out_{name}", slide_id=SLIDE, um_per_px=umpp, region=REGION, num_workers=0)
    return {
        "stores": stores,
        "run_id": run_id,
        "folder": folder,
        "image": image,
        "umpp": umpp,
        "tmp": tmp,
        "data_root": real_data_root,
    }


def test_the_folder_carries_the_vectors_record_and_stain_target(runs):
    doc = json.loads((runs["folder"] / "vectors.json").read_text())
    (part,) = doc["parts"]
    rec = part["record"]
    stored = existing_provenance(runs["stores"]["A"], "embeddings_efficientnet_lite0")[0]
    assert VectorProvenance.of(rec) == VectorProvenance.of(stored) and VectorProvenance.of(rec).id
    assert rec["stain"]["target_hash"] == rec["stain_target"] and rec["stain"]["target"]  # the fitted parameters
    assert part["tile_um"] > 0 and rec["weights_sha256"] and rec["precision"]


@pytest.mark.parametrize("other", ["B", "C"])
def test_infer_on_another_store_equals_infer_in_the_training_store(runs, other):
    a, b = runs["stores"]["A"], runs["stores"][other]
    pa_, pb_ = _predictions(a, runs["run_id"]), _predictions(b, runs["run_id"])
    assert pa_.height > 0 and pa_.height == pb_.height
    assert pa_["spot_id"].to_list() == pb_["spot_id"].to_list() and pa_["gene"].to_list() == pb_["gene"].to_list()
    assert np.allclose(pa_["mean_log1p"].to_numpy(), pb_["mean_log1p"].to_numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(_vectors(a), _vectors(b), atol=1e-3)
    # the vectors carry the model's provenance, the store's own stain target is not touched
    (rec,) = existing_provenance(b, "embeddings_efficientnet_lite0")
    assert VectorProvenance.of(rec) == VectorProvenance.of(existing_provenance(a, "embeddings_efficientnet_lite0")[0])
    assert (recorded(b) or {}).get("template_slide") == {"B": None, "C": "S1"}[other]


def _cli(*args: str) -> tuple[int, list[str]]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, [x for x in res.output.splitlines() if x.strip()]


def test_a_folder_with_other_weights_no_record_or_a_foreign_table_is_refused_in_one_line(runs):
    store, tmp = runs["stores"]["B"], runs["tmp"]
    other = shutil.copytree(runs["folder"], tmp / "other_weights")
    for name, key in (("head.json", "provenance"), ("vectors.json", None)):
        doc = json.loads((other / name).read_text())
        if key:
            doc[key]["weights_sha256"] = json.dumps("0" * 64)
        else:
            doc["parts"][0]["record"]["weights_sha256"] = "0" * 64
        (other / name).write_text(json.dumps(doc))
    legacy = shutil.copytree(runs["folder"], tmp / "legacy")
    (legacy / "vectors.json").unlink()
    # a store whose Lite0 table holds vectors normalised against its own target (S1, not C4)
    from store_cases import mini_dataset

    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.ingest.pipeline import ingest

    own = Store(tmp / "F")
    ingest(str(mini_dataset(tmp / "data_f", runs["data_root"])), own, progress=False)
    embed(own, ["efficientnet_lite0"], precision="float32", num_workers=0, progress=False)
    before_own = _tree(own.path)
    args = ["infer", str(runs["image"]), "--store", str(own.path), "--um-per-px", str(runs["umpp"])]
    code, lines = _cli(*args, "--model", str(runs["folder"]), "--out", str(tmp / "out_F"))
    assert code == 2 and len(lines) == 1 and "another provenance" in lines[0] and "stain_template" in lines[0], lines
    assert _tree(own.path) == before_own and not (tmp / "out_F").exists()
    before = _tree(store.path)
    # B (which holds vectors of the model's provenance now) for other weights; a new store for the legacy folder
    for target, folder, needle in ((store.path, other, "--weights PATH"), (tmp / "D", legacy, "no vectors.json")):
        args = ["infer", str(runs["image"]), "--store", str(target), "--um-per-px", str(runs["umpp"])]
        code, lines = _cli(*args, "--model", str(folder), "--out", str(tmp / f"out_{folder.name}"))
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
        assert not (tmp / f"out_{folder.name}").exists()
    assert _tree(store.path) == before


@pytest.mark.slow
def test_a_knn_folder_carries_its_training_vectors_and_works_elsewhere(runs):
    """Saved with ``--knn-copy-vectors``, a knn model folder holds a copy of its training vectors
    (and profiles), so it also works on another store, with the same predictions (by default
    it references them in the training store instead: tests/test_knn_reference.py)."""
    from stimage_embed.predictions.train_predict import train

    a, tmp = runs["stores"]["A"], runs["tmp"]
    rid, folder = train(a, "efficientnet_lite0", "knn", "var:5", ["C4"], copy_vectors=True)  # --knn-copy-vectors
    head = json.loads((folder / "head.json").read_text())["head"]
    assert head["class"] == "KNNRegressor" and "X_train_" in head["arrays"]  # the training vectors travel
    other = Store(tmp / "E")
    for store, model in ((a, rid), (other, str(folder))):
        infer(store, runs["image"], model, tmp / "out_knn", slide_id=SLIDE, um_per_px=runs["umpp"], region=REGION)
    pa_, pe_ = _predictions(a, rid), _predictions(other, rid)
    assert pa_.height > 0 and pa_["spot_id"].to_list() == pe_["spot_id"].to_list()
    assert np.allclose(pa_["mean_log1p"].to_numpy(), pe_["mean_log1p"].to_numpy(), rtol=1e-5, atol=1e-6)
