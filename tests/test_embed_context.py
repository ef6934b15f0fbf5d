"""``embed --context-um``: a wider window centred on each spot, in its own table with its
own provenance, equal to embedding that width as the tile, and leaving the spot table alone
(one real slide, C5)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.embeddings.provenance import vector_table_name
from stimage_embed.predictions.arrays import load_embeddings
from stimage_embed.store import Store

CTX = "embeddings_efficientnet_lite0__ctx300um"


@pytest.fixture(scope="module")
def context_store(tmp_path_factory, embedded_store):
    store = Store(tmp_path_factory.mktemp("ctx") / "store")
    shutil.copytree(embedded_store.path, store.path)
    res = CliRunner().invoke(
        app,
        [
            "embed",
            "--store",
            str(store.path),
            "--slide",
            "C5",
            "--context-um",
            "300",
            "--precision",
            "float32",
            "--workers",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    return store


def test_context_vectors_get_their_own_table_and_provenance(context_store, embedded_store):
    assert vector_table_name("efficientnet_lite0", 300.0) == CTX
    assert vector_table_name("efficientnet_lite0", 62.5) == "embeddings_efficientnet_lite0__ctx62p5um"
    n = context_store.sql(
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT spot_id) AS u, MIN(tile_um) AS lo, MAX(tile_um) AS hi "
        f"FROM {CTX} WHERE slide_id = 'C5'"
    )
    assert (n["n"][0], n["u"][0], n["lo"][0], n["hi"][0]) == (181, 181, 300.0, 300.0)
    prov = context_store.sql(f"SELECT * FROM provenance WHERE table_name = '{CTX}'")
    rec = json.loads(prov["json"][0])
    assert prov.height == 1 and rec["tile_um"] == 300.0 and rec["context_um"] == 300.0 and prov["tile_um"][0] == 300.0
    assert set(context_store.sql(f"SELECT DISTINCT provenance_id FROM {CTX}")["provenance_id"]) == {
        prov["provenance_id"][0]
    }
    # the spot table is untouched: same rows, same single provenance
    spot = context_store.sql("SELECT provenance_id FROM provenance WHERE table_name = 'embeddings_efficientnet_lite0'")
    assert spot.height == 1
    k0, v0 = load_embeddings(embedded_store, "efficientnet_lite0", ["C5"])
    k1, v1 = load_embeddings(context_store, "efficientnet_lite0", ["C5"])
    assert k0.equals(k1) and np.array_equal(v0, v1)


def test_context_vectors_equal_embedding_that_width_as_the_tile(context_store, ingested_store, tmp_path):
    keys, ctx = load_embeddings(context_store, "efficientnet_lite0__ctx300um", ["C5"])  # loaded as a pseudo-backbone
    ref_store = Store(tmp_path / "ref")
    shutil.copytree(ingested_store.path, ref_store.path)
    embed(
        ref_store,
        ["efficientnet_lite0"],
        slides=["C5"],
        tile_um=300.0,
        precision="float32",
        num_workers=0,
        progress=False,
    )
    rkeys, ref = load_embeddings(ref_store, "efficientnet_lite0", ["C5"])
    assert keys.equals(rkeys) and np.isfinite(ctx).all()
    np.testing.assert_allclose(ctx, ref, rtol=0, atol=2e-3)  # float16 storage; same tiles, same model
    _, spot = load_embeddings(context_store, "efficientnet_lite0", ["C5"])
    cos = (ctx * spot).sum(1) / np.linalg.norm(ctx, axis=1) / np.linalg.norm(spot, axis=1)
    assert cos.mean() < 0.99  # a different (wider) window than the 100 µm spot tile


@pytest.mark.parametrize(
    "extra,match",
    [(["--context-um", "0"], "--context-um"), (["--context-um", "300", "--tile-um", "200"], "--context-um")],
)
def test_bad_context_width_is_a_one_line_error(context_store, extra, match):
    res = CliRunner().invoke(app, ["embed", "--store", str(context_store.path), "--slide", "C5", *extra])
    assert res.exit_code != 0 and match in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_composite_backbone_joins_the_spot_and_context_vectors(context_store):
    """``a+b`` gives each spot's vectors side by side, a provenance that lists both parts,
    and is usable wherever a backbone name is (here ``train``/``predict``)."""
    from stimage_embed.errors import InputError
    from stimage_embed.predictions.arrays import load_spot_arrays, table_provenance, vector_parts
    from stimage_embed.predictions.train_predict import predict, train

    both = "efficientnet_lite0+efficientnet_lite0__ctx300um"
    k_spot, spot = load_embeddings(context_store, "efficientnet_lite0", ["C5"])
    k_ctx, ctx = load_embeddings(context_store, "efficientnet_lite0__ctx300um", ["C5"])
    keys, X = load_embeddings(context_store, both, ["C5"])
    assert keys.equals(k_spot) and X.shape == (181, spot.shape[1] + ctx.shape[1])
    np.testing.assert_array_equal(X, np.hstack([spot, ctx]))
    prov = table_provenance(context_store, both)
    assert prov["tile_um"] == [table_provenance(context_store, "efficientnet_lite0")["tile_um"], 300.0]
    arrays = load_spot_arrays(context_store, both, ["C5"], ["ERBB2"], only_qc=False)
    assert arrays.X.shape[1] == X.shape[1]
    with pytest.raises(InputError, match="composite"):
        vector_parts("efficientnet_lite0+")
    rid, _ = train(context_store, both, "ridge", "var:5", ["C5"])
    pred = predict(context_store, rid, ["C5"])
    assert pred["spot_id"].n_unique() == 181
