"""``search`` and ``index`` on real Lite0 vectors (HER2ST C4, C5 and MOB1): the query spot
comes back first, exact search equals scikit-learn's brute-force cosine neighbours, the
prefilter is honoured on every route, an index (forced on this small table) keeps new rows
searchable, an image region of a stored spot finds that spot, and the montage has k + 1 tiles."""

from __future__ import annotations

import shutil

import numpy as np
import polars as pl
import pytest
from sklearn.neighbors import NearestNeighbors
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.predictions.arrays import load_embeddings
from stimage_embed.search import SearchOptions, build_index, search
from stimage_embed.search.index import EXACT_BELOW, vector_index
from stimage_embed.search.montage import cut_tiles
from stimage_embed.search.where import resolve_where
from stimage_embed.store import Store
from stimage_embed.store.maintenance import maintain

BB = "efficientnet_lite0"
TABLE = f"embeddings_{BB}"
SLIDES = ["C4", "C5", "MOB1"]
EXACT = SearchOptions(use_index=False)


@pytest.fixture(scope="module")
def vectors(embedded_store):
    return load_embeddings(embedded_store, BB, SLIDES)


def _reference(keys: pl.DataFrame, X: np.ndarray, q: np.ndarray, k: int, mask: np.ndarray | None = None):
    """The k nearest (slide, spot) by scikit-learn's brute-force cosine search."""
    rows = np.flatnonzero(mask) if mask is not None else np.arange(len(X))
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(X[rows])
    dist, idx = nn.kneighbors(q[None])
    sel = keys[rows[idx[0]].tolist()]
    return list(zip(sel["slide_id"], sel["spot_id"])), dist[0]


@pytest.mark.parametrize("pos", [0, 200, 500])
def test_like_returns_the_query_first_and_equals_exact_search(embedded_store, vectors, pos):
    keys, X = vectors
    slide, spot = keys.row(pos)
    hits = search(embedded_store, BB, like=f"{slide}:{spot}", k=8, options=EXACT)
    assert (hits["slide_id"][0], hits["spot_id"][0]) == (slide, spot)
    assert hits["distance"][0] == pytest.approx(0, abs=1e-6)
    ref, dist = _reference(keys, X, X[pos], 8)
    assert list(zip(hits["slide_id"], hits["spot_id"])) == ref
    np.testing.assert_allclose(hits["distance"].to_numpy(), dist, atol=1e-5)
    assert hits.columns[:6] == ["rank", "slide_id", "spot_id", "distance", "patient", "dataset"]


def test_exclude_slide_and_prefilters_are_honoured(embedded_store, vectors):
    keys, X = vectors
    slide, spot = keys.row(10)
    spots = pl.from_arrow(embedded_store.read("spots")).join(keys, on=["slide_id", "spot_id"], how="right")
    patients = dict(pl.from_arrow(embedded_store.read("slides", ["slide_id", "patient"])).iter_rows())
    cases = {
        None: np.ones(len(keys), bool),
        "patient <> 'C'": np.array([patients[s] != "C" for s in keys["slide_id"]]),  # slides route
        "tissue_fraction >= 0.9": (spots["tissue_fraction"] >= 0.9).to_numpy(),  # the table's own column
        "passes_qc AND array_row > 10": (spots["passes_qc"] & (spots["array_row"] > 10)).to_numpy(),  # keys route
    }
    routes = set()
    for where, mask in cases.items():
        mask = mask & (keys["slide_id"] != slide).to_numpy()
        hits = search(embedded_store, BB, like=f"{slide}:{spot}", k=6, where=where, exclude_slide=True, options=EXACT)
        ref, _ = _reference(keys, X, X[10], 6, mask)
        assert list(zip(hits["slide_id"], hits["spot_id"])) == ref, where
        routes.add(resolve_where(embedded_store, where).route)
    assert routes == {"none", "slides", "table", "keys"}


def test_forced_index_finds_new_rows_and_updates(tmp_path, embedded_store, vectors):
    keys, X = vectors
    store = Store(tmp_path / "store")
    shutil.copytree(embedded_store.path, store.path)
    mob = store.read(TABLE, where="slide_id = 'MOB1'")
    store.delete(TABLE, "slide_id = 'MOB1'")
    made = build_index(store, BB, num_partitions=2, force=True)
    assert made.action == "created" and made.rows == len(keys) - mob.num_rows
    store.append(TABLE, mob, schema=store.table(TABLE).schema)  # rows added after the build (as `embed` does),
    maintain(store, [TABLE])  # then the store's upkeep after `embed` (compaction: the index is remapped)
    tbl = store.table(TABLE)
    assert tbl.index_stats(vector_index(tbl).name).num_unindexed_rows == mob.num_rows
    indexed = SearchOptions(use_index=True, nprobes=2)
    pos = int(np.flatnonzero(keys["slide_id"] == "MOB1")[3])
    like = ":".join(keys.row(pos))
    assert search(store, BB, like=like, k=5, options=indexed).row(0)[1:3] == keys.row(pos)
    assert build_index(store, BB).action == "updated"
    tbl = store.table(TABLE)
    assert tbl.index_stats(vector_index(tbl).name).num_unindexed_rows == 0
    hits = search(store, BB, like=like, k=10, options=indexed)
    ref, _ = _reference(keys, X, X[pos], 10)
    assert len(set(zip(hits["slide_id"], hits["spot_id"])) & set(ref)) >= 9  # recall@10 on the real vectors
    # the default (auto) below EXACT_BELOW rows: exact, although an index exists
    assert len(keys) < EXACT_BELOW
    auto = search(store, BB, like=like, k=10)
    assert list(zip(auto["slide_id"], auto["spot_id"])) == ref


def test_image_region_of_a_stored_spot_finds_it(embedded_store):
    from stimage_embed.search.image_query import embed_region

    slide = pl.from_arrow(embedded_store.read("slides", where="slide_id = 'C5'"))
    spot = pl.from_arrow(embedded_store.read("spots", where="slide_id = 'C5' AND passes_qc")).row(5, named=True)
    q = embed_region(
        embedded_store, BB, slide["image_path"][0], slide["um_per_px"][0], spot["pixel_x"], spot["pixel_y"]
    )
    hits = search(embedded_store, BB, vector=q.vector, k=3, options=EXACT)
    assert hits.row(0)[1:3] == ("C5", spot["spot_id"])
    assert hits["distance"][0] < 1e-3


def test_cli_writes_hits_and_a_montage_of_k_plus_1_tiles(tmp_path, embedded_store, vectors):
    from PIL import Image

    from stimage_embed.search.montage import TILE_PX, montage

    keys, _ = vectors
    like = ":".join(keys.row(3))
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app, ["search", "--store", str(embedded_store.path), "--like", like, "--k", "4", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    hits = pl.read_parquet(out / "hits.parquet")
    assert hits.height == 4 and "(5 tiles)" in res.output
    assert Image.open(out / "montage.png").size[0] > 4 * 100
    m = montage(embedded_store, hits, None, like, 100.0)
    assert m.tiles.shape == (5, TILE_PX, TILE_PX, 3)
    ref = cut_tiles(embedded_store, hits.head(1), 100.0)[0]  # the query is its own nearest hit
    np.testing.assert_array_equal(m.tiles[0], ref)
    np.testing.assert_array_equal(m.tiles[1], ref)


def test_index_below_the_threshold_builds_nothing(embedded_store):
    before = embedded_store.table(TABLE).version
    res = CliRunner().invoke(app, ["index", "--store", str(embedded_store.path)])
    assert res.exit_code == 0, res.output
    assert "searched exactly, no index built" in res.output
    assert embedded_store.table(TABLE).version == before
    assert vector_index(embedded_store.table(TABLE)) is None
