"""`infer`: predictions on a slide that has only an image, on the real HER2ST data.

C5's JPEG is inferred as a new slide (``C5_image``) with a ridge model trained on C4
(``infer_model_store``); its grid predictions are checked against the same model's
spot-level predictions of the ingested C5, against the head applied by hand to the
vectors read from Lance, and the outputs (AnnData through scanpy, heatmaps, pseudo-bulk)
against independent reads of the store. A pyramidal TIFF written from a crop of C5 goes
through OpenSlide with µm/px from its metadata, reading only tile-sized regions at full
resolution. Bad inputs fail with one clear line and leave the store and the output
folder untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import anndata as ad
import lance
import numpy as np
import polars as pl
import pytest
from PIL import Image
from scipy import stats
from scipy.spatial import cKDTree
from typer.testing import CliRunner

from heads import load_head
from stimage_embed.cli import app
from stimage_embed.errors import StimageError
from stimage_embed.inference.infer import infer
from stimage_embed.predictions.train_predict import predict, train
from stimage_embed.store import Store

SLIDE = "C5_image"
EXTRA_GENE_COUNT = 2  # --genes beyond the top ones
#: grid pitch of the C5 inference, µm: half the 100 µm tile width, so the nearest tile to any
#: spot is within 35 µm (at the default pitch = tile width it can be 71 µm away; see the
#: consistency test)
PITCH_UM = 50.0


def _in_region(df: pl.DataFrame, region: tuple[float, float, float, float]) -> pl.DataFrame:
    x0, y0, x1, y1 = region
    return df.filter(
        (pl.col("pixel_x") >= x0) & (pl.col("pixel_x") < x1) & (pl.col("pixel_y") >= y0) & (pl.col("pixel_y") < y1)
    )


@pytest.fixture(scope="module")
def c5(tmp_path_factory, infer_model_store, real_data_root):
    """C5.jpg inferred as a new slide with a 50 µm grid pitch (100 µm tiles)."""
    src, run_id = infer_model_store
    path = tmp_path_factory.mktemp("infer_c5") / "store"
    shutil.copytree(src.path, path)
    store = Store(path)
    umpp = store.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0]
    region = (0.0, 0.0, 9272.0, 9901.0)  # the whole image, passed to check the option end to end
    genes = json.loads((store.path / "models" / run_id / "run.json").read_text())["genes"]
    out = path.parent / "out"
    logging.getLogger("stimage_embed").setLevel(logging.WARNING)
    result = infer(
        store,
        real_data_root / "her2st" / "images" / "C5.jpg",
        run_id,
        out,
        slide_id=SLIDE,
        um_per_px=umpp,
        pitch_um=PITCH_UM,
        region=region,
        genes=genes[-EXTRA_GENE_COUNT:],
        num_workers=1,
    )
    return {
        "store": store,
        "run_id": run_id,
        "result": result,
        "out": out,
        "umpp": umpp,
        "genes": genes,
        "region": region,
    }


def _grid_predictions(store: Store, run_id: str, slide: str) -> pl.DataFrame:
    return store.sql(
        f"SELECT spot_id, gene, mean_log1p FROM predictions WHERE run_id = '{run_id}' AND slide_id = '{slide}'"
    )


def _stored_vectors(store: Store, spot_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(X, rows)``: the Lite0 vectors of the image-only slide read straight from Lance, and
    the row of each of ``spot_ids`` in ``X``."""
    tab = lance.dataset(str(store.path / "embeddings_efficientnet_lite0.lance")).to_table(
        columns=["spot_id", "vector"], filter=f"slide_id = '{SLIDE}'"
    )
    X = np.asarray(tab["vector"].combine_chunks().values.to_numpy(zero_copy_only=False), np.float32).reshape(
        tab.num_rows, -1
    )
    order = pl.DataFrame({"spot_id": tab["spot_id"].to_pylist(), "i": np.arange(tab.num_rows)})
    rows = (
        pl.DataFrame({"spot_id": spot_ids}).join(order, on="spot_id", how="left", maintain_order="left")["i"].to_numpy()
    )
    return X, rows


# --------------------------------------------------------------------------- consistency
@pytest.mark.slow
def test_grid_predictions_agree_with_spot_predictions_on_c5(c5, capsys):
    """At the grid tile nearest each measured C5 spot, the grid prediction agrees with the
    same model's prediction for the spot itself: median Pearson r over genes >= 0.7.

    With the 50 µm pitch the nearest tile is at most 35 µm from the spot (median 24 µm).
    At the default pitch (100 µm, the tile width) the offset depends on the grid's phase
    against the spot lattice, and r with it (0.61-0.71 over the four phases, measured)."""
    store, run_id = c5["store"], c5["run_id"]
    spot_pred = predict(store, run_id, ["C5"], all_spots=False)  # QC-passing spots of the ingested C5
    spots = store.sql("SELECT slide_id, spot_id, pixel_x, pixel_y FROM spots WHERE slide_id IN ('C5', 'C5_image')")
    tiles = spots.filter(pl.col("slide_id") == SLIDE)
    c5_spots = _in_region(spots.filter(pl.col("slide_id") == "C5"), c5["region"])
    c5_spots = c5_spots.filter(pl.col("spot_id").is_in(spot_pred["spot_id"].unique().to_list()))
    assert c5_spots.height > 170
    dist, idx = cKDTree(tiles.select("pixel_x", "pixel_y").to_numpy()).query(
        c5_spots.select("pixel_x", "pixel_y").to_numpy()
    )
    pitch_px = PITCH_UM / c5["umpp"]
    assert np.median(dist) <= pitch_px / 2 * np.sqrt(2)  # within a grid cell of the spot
    pairs = pl.DataFrame({"spot_id": c5_spots["spot_id"], "tile": tiles["spot_id"].to_numpy()[idx]})
    grid = _grid_predictions(store, run_id, SLIDE).rename({"spot_id": "tile", "mean_log1p": "grid"})
    j = (
        spot_pred.select("spot_id", "gene", pl.col("mean_log1p").alias("spot"))
        .join(pairs, on="spot_id")
        .join(grid, on=["tile", "gene"])
    )
    assert j.height == c5_spots.height * len(c5["genes"])
    r = {g: stats.pearsonr(d["spot"], d["grid"])[0] for (g,), d in j.group_by("gene")}
    median_r = float(np.median(list(r.values())))
    with capsys.disabled():
        print(
            f"\n[infer consistency] C5: median Pearson r over {len(r)} genes = {median_r:.3f} "
            f"({c5_spots.height} spots, nearest tile at median {np.median(dist) * c5['umpp']:.0f} µm)"
        )
    assert median_r >= 0.7, sorted(r.items(), key=lambda kv: kv[1])


# --------------------------------------------------------------------------- the slide
@pytest.mark.slow
def test_image_becomes_a_slide_without_counts(c5):
    store, res = c5["store"], c5["result"]
    sl = store.sql(f"SELECT * FROM slides WHERE slide_id = '{SLIDE}'")
    assert sl.height == 1
    row = sl.row(0, named=True)
    assert row["platform"] == "image_only" and row["n_genes"] == 0 and row["total_counts"] is None
    assert row["um_per_px"] == pytest.approx(c5["umpp"]) and row["um_per_px_source"] == "argument"
    assert row["spot_diameter_um"] == 100.0  # the model's tile width
    assert row["spot_pitch_um"] == PITCH_UM
    assert (row["image_width"], row["image_height"]) == (9272, 9901)
    for table in ("genes", "expression"):
        assert store.sql(f"SELECT COUNT(*) AS n FROM {table} WHERE slide_id = '{SLIDE}'")["n"][0] == 0
    tiles = store.sql(f"SELECT * FROM spots WHERE slide_id = '{SLIDE}'")
    assert (
        tiles.height == res.n_tiles == row["n_spots"]
        and int(tiles["passes_qc"].sum()) == res.n_pass_qc == row["n_spots_pass_qc"]
    )
    assert (tiles["passes_qc"] == (tiles["tissue_fraction"] >= 0.7)).all() and (tiles["tissue_fraction"] >= 0.1).all()
    # tiles on the lattice: centres = tile/2 + index * pitch (level-0 px)
    tile, step = 100.0 / c5["umpp"], PITCH_UM / c5["umpp"]
    assert np.allclose(tiles["pixel_x"], tile / 2 + tiles["array_col"] * step)
    assert np.allclose(tiles["pixel_y"], tile / 2 + tiles["array_row"] * step)
    # tissue: the ingested C5's QC-passing spots sit on tiles that mostly pass QC too
    spots = _in_region(
        store.sql("SELECT pixel_x, pixel_y FROM spots WHERE slide_id = 'C5' AND passes_qc"), c5["region"]
    )
    _, idx = cKDTree(tiles.select("pixel_x", "pixel_y").to_numpy()).query(spots.to_numpy())
    assert tiles["passes_qc"].to_numpy()[idx].mean() > 0.9
    # vectors carry the model's provenance
    prov = store.sql(f"""SELECT DISTINCT e.provenance_id, p.stain_template, p.tile_px
                         FROM embeddings_efficientnet_lite0 e JOIN provenance p USING (provenance_id)
                         WHERE e.slide_id IN ('{SLIDE}', 'C4')""")
    assert prov.height == 1


@pytest.mark.slow
def test_predictions_equal_the_head_applied_to_the_stored_vectors(c5):
    store, run_id = c5["store"], c5["run_id"]
    tab = lance.dataset(str(store.path / "embeddings_efficientnet_lite0.lance")).to_table(
        columns=["slide_id", "spot_id", "vector"], filter=f"slide_id = '{SLIDE}'"
    )
    X = np.asarray(tab["vector"].combine_chunks().values.to_numpy(zero_copy_only=False), np.float32).reshape(
        tab.num_rows, -1
    )
    head = load_head(store.path / "models" / run_id)
    want = pl.DataFrame(head.predict_log1p_norm(X), schema=c5["genes"]).with_columns(
        pl.Series("spot_id", tab["spot_id"].to_pylist())
    )
    want = want.unpivot(index="spot_id", variable_name="gene", value_name="want")
    got = _grid_predictions(store, run_id, SLIDE)
    j = got.join(want, on=["spot_id", "gene"])
    assert got.height == j.height == c5["result"].n_tiles * len(c5["genes"]) == c5["result"].prediction_rows
    assert np.allclose(j["mean_log1p"], j["want"], atol=1e-5)
    assert (
        store.sql(f"SELECT COUNT(*) AS n FROM predictions WHERE slide_id = '{SLIDE}' AND observed IS NOT NULL")["n"][0]
        == 0
    )


# --------------------------------------------------------------------------- outputs
@pytest.mark.slow
def test_anndata_for_scanpy_and_squidpy(c5):
    store, res = c5["store"], c5["result"]
    adata = ad.read_h5ad(res.anndata)
    tiles = store.sql(
        f"SELECT spot_id, pixel_x, pixel_y, tissue_fraction, passes_qc FROM spots WHERE slide_id = '{SLIDE}'"
    )
    assert adata.shape == (res.n_tiles, len(c5["genes"])) and list(adata.var_names) == c5["genes"]
    t = tiles.to_pandas().set_index("spot_id").loc[adata.obs_names]
    assert np.allclose(adata.obsm["spatial"], t[["pixel_x", "pixel_y"]].to_numpy())  # level-0 px
    assert (
        np.allclose(adata.obs["tissue_fraction"], t["tissue_fraction"])
        and (adata.obs["passes_qc"] == t["passes_qc"]).all()
    )
    # X = predicted log1p(CP10k), as in the predictions table
    pred = _grid_predictions(store, c5["run_id"], SLIDE).pivot(on="gene", index="spot_id", values="mean_log1p")
    pred = pred.to_pandas().set_index("spot_id").loc[adata.obs_names, c5["genes"]]
    assert np.allclose(adata.X, pred.to_numpy(), atol=1e-6)
    assert adata.uns["stimage_embed"]["X"] == "mean_log1p" and adata.uns["stimage_embed"]["run_id"] == c5["run_id"]
    sp = adata.uns["spatial"][SLIDE]
    hires, sf = sp["images"]["hires"], sp["scalefactors"]
    assert hires.dtype == np.uint8 and hires.shape[2] == 3
    assert hires.shape[1] / sf["tissue_hires_scalef"] == pytest.approx(9272, rel=2e-3)
    assert hires.shape[0] / sf["tissue_hires_scalef"] == pytest.approx(9901, rel=2e-3)
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 / c5["umpp"])

    sc = pytest.importorskip("scanpy")
    gene = c5["genes"][0]
    axes = sc.pl.spatial(adata, color=gene, show=False)
    ax = axes[0] if isinstance(axes, list) else axes
    # scanpy drew one circle per tile, as wide as the tile, at obsm['spatial'] * tissue_hires_scalef,
    # coloured by X, over the hires image
    coll = [c for c in ax.collections if len(c.get_paths()) == adata.n_obs]
    assert len(coll) == 1, "no collection with one circle per tile"
    paths = coll[0].get_paths()
    centres = np.array([(p.vertices.max(0) + p.vertices.min(0)) / 2 for p in paths])
    radii = np.array([(p.vertices.max(0) - p.vertices.min(0)) / 2 for p in paths])
    dist, idx = cKDTree(adata.obsm["spatial"] * sf["tissue_hires_scalef"]).query(centres)
    assert dist.max() < 1e-6 and len(set(idx)) == adata.n_obs
    assert np.allclose(radii, sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"] / 2)
    assert np.allclose(np.asarray(coll[0].get_array(), np.float64), adata.X[idx, 0], atol=1e-6)
    assert ax.images and ax.images[0].get_array().shape[:2] == hires.shape[:2]


@pytest.mark.slow
def test_heatmaps_for_top_and_requested_genes(c5):
    res = c5["result"]
    requested = c5["genes"][-EXTRA_GENE_COUNT:]
    assert set(requested) <= set(res.heatmaps) and len(res.heatmaps) >= 6
    adata = ad.read_h5ad(res.anndata)
    qc = adata.obs["passes_qc"].to_numpy()
    var = adata.X[qc].var(axis=0)
    top = [c5["genes"][i] for i in np.argsort(-var)[:6]]
    assert set(top) <= set(res.heatmaps)
    for gene, path in res.heatmaps.items():
        assert path == c5["out"] / SLIDE / f"{gene}.png"
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 500 and im.height > 300


@pytest.mark.slow
def test_pseudobulk_csv_and_table(c5):
    store, res = c5["store"], c5["result"]
    csv = pl.read_csv(res.pseudobulk_csv)
    tab = store.sql(f"SELECT * FROM pseudobulk WHERE run_id = '{c5['run_id']}' AND slide_id = '{SLIDE}' ORDER BY gene")
    assert csv.height == tab.height == len(c5["genes"])
    adata = ad.read_h5ad(res.anndata)
    qc = adata.obs["passes_qc"].to_numpy()
    X = np.asarray(adata.X, np.float64)[qc]
    ref = pl.DataFrame({"gene": list(adata.var_names), "m": X.mean(0), "cp": np.expm1(X).mean(0)}).sort("gene")
    for df in (csv.sort("gene"), tab):
        assert df["gene"].to_list() == ref["gene"].to_list() and (df["n_tiles"] == res.n_pass_qc).all()
        assert np.allclose(df["mean_log1p"], ref["m"], rtol=1e-5) and np.allclose(
            df["mean_cp10k"], ref["cp"], rtol=1e-5
        )


@pytest.mark.slow
def test_rerun_reuses_vectors_and_replaces_predictions(c5, real_data_root):
    store, run_id = c5["store"], c5["run_id"]
    before = _grid_predictions(store, run_id, SLIDE)
    res = infer(
        store,
        real_data_root / "her2st" / "images" / "C5.jpg",
        run_id,
        c5["out"] / "rerun",
        slide_id=SLIDE,
        um_per_px=c5["umpp"],
        pitch_um=PITCH_UM,
        region=c5["region"],
        n_top_genes=1,
        num_workers=0,
    )
    assert res.tiles_embedded == 0 and res.n_tiles == c5["result"].n_tiles
    after = _grid_predictions(store, run_id, SLIDE)
    assert after.height == before.height == after.unique(["spot_id", "gene"]).height
    n_vec = store.sql(f"SELECT COUNT(*) AS n FROM embeddings_efficientnet_lite0 WHERE slide_id = '{SLIDE}'")["n"][0]
    assert n_vec == res.n_tiles


@pytest.mark.slow
def test_nb_model_gives_uncertainty_layers(c5, real_data_root):
    """An NB model on the same slide: its vectors are reused; layers hold the uncertainty."""
    store = c5["store"]
    rid, path = train(store, "efficientnet_lite0", "nb", "var:5", ["C4"], params={"alpha": 1.0})
    res = infer(
        store,
        real_data_root / "her2st" / "images" / "C5.jpg",
        rid,
        c5["out"] / "nb",
        slide_id=SLIDE,
        um_per_px=c5["umpp"],
        pitch_um=PITCH_UM,
        region=c5["region"],
        n_top_genes=1,
        num_workers=0,
    )
    assert res.tiles_embedded == 0
    adata = ad.read_h5ad(res.anndata)
    assert {"variance", "q05", "q95"} <= set(adata.layers)
    assert np.all(adata.layers["variance"] > 0) and np.all(adata.layers["q05"] <= adata.layers["q95"])
    head = load_head(path)
    X, rows = _stored_vectors(store, list(adata.obs_names))
    assert np.allclose(adata.X, np.log1p(head.predict_rate(X[rows]) * 1e4), atol=1e-4)  # image only: no library size


@pytest.mark.slow
def test_context_model_reads_the_grid_neighbours(c5, real_data_root):
    """A context head (own vector + lattice-neighbour rings) on an image-only slide: ``infer``
    predicts the slide's tiles in one batch with their centres in µm, so every interior tile
    has neighbours. Its predictions equal the saved head applied by hand to the stored
    vectors at the grid centres (pixel x/y times µm/px), and differ from the same head with
    no neighbours (no coordinates)."""
    store = c5["store"]
    rid, path = train(store, "efficientnet_lite0", "context", "var:5", ["C4"], params={"alpha": 1.0})
    res = infer(
        store,
        real_data_root / "her2st" / "images" / "C5.jpg",
        rid,
        c5["out"] / "context",
        slide_id=SLIDE,
        um_per_px=c5["umpp"],
        pitch_um=PITCH_UM,
        region=c5["region"],
        n_top_genes=1,
        num_workers=0,
    )
    assert res.tiles_embedded == 0
    adata = ad.read_h5ad(res.anndata)
    head = load_head(path)
    X, rows = _stored_vectors(store, list(adata.obs_names))
    spots = store.sql(f"SELECT spot_id, pixel_x, pixel_y FROM spots WHERE slide_id = '{SLIDE}'")
    grid = pl.DataFrame({"spot_id": list(adata.obs_names)}).join(spots, on="spot_id", how="left", maintain_order="left")
    coords = grid.select("pixel_x", "pixel_y").to_numpy().astype(np.float64) * float(c5["umpp"])
    groups = np.full(len(rows), SLIDE)
    expected = np.log1p(head.predict_rate(X[rows], groups=groups, coords=coords) * 1e4)
    assert np.allclose(adata.X, expected, atol=1e-4)
    alone = np.log1p(head.predict_rate(X[rows], groups=groups, coords=None) * 1e4)
    assert np.abs(expected - alone).max() > 1e-3  # the neighbours changed the predictions


# --------------------------------------------------------------------------- other verbs
@pytest.mark.slow
def test_other_verbs_with_an_image_only_slide(c5):
    runner = CliRunner()
    st = str(c5["store"].path)
    info = runner.invoke(app, ["info", "--store", st])
    assert info.exit_code == 0, info.output
    assert "image_only" in info.output and "pseudobulk" in info.output
    q = runner.invoke(
        app,
        [
            "query",
            "--store",
            st,
            "--format",
            "csv",
            f"SELECT COUNT(*) AS n FROM expression_long WHERE slide_id = '{SLIDE}'",
        ],
    )
    assert q.exit_code == 0 and q.output.strip().splitlines()[-1] == "0"
    p = runner.invoke(app, ["predict", "--store", st, "--model", c5["run_id"], "--slide", SLIDE])
    # predicting needs vectors, not counts (issue 25): the image-only slide is predicted again
    assert p.exit_code == 0 and f"slide {SLIDE} (image only" in p.output, p.output


# --------------------------------------------------------------------------- pyramidal TIFF
@pytest.mark.slow
def test_pyramidal_tiff_through_openslide_streams_tiles(tmp_path, infer_model_store, real_data_root, monkeypatch):
    import openslide
    from fixtures_formats import write_pyramidal_tiff

    src, run_id = infer_model_store
    store = Store(tmp_path / "store")
    shutil.copytree(src.path, store.path)
    umpp = store.sql("SELECT um_per_px FROM slides WHERE slide_id = 'C5'")["um_per_px"][0]
    with Image.open(real_data_root / "her2st" / "images" / "C5.jpg") as im:
        crop = np.asarray(
            im.convert("RGB").crop((1000, 1000, 1000 + 4200, 1000 + 4200))
        )  # > 2 x 2048: thumbnail from level 1
    tif = write_pyramidal_tiff(tmp_path / "C5_crop.tif", crop, umpp, n_levels=4)

    reads: list[tuple[int, tuple[int, int]]] = []
    real_read = openslide.OpenSlide.read_region

    def spy(self, location, level, size):
        reads.append((level, size))
        return real_read(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", spy)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app,
        [
            "infer",
            str(tif),
            "--model",
            run_id,
            "--store",
            str(store.path),
            "--out",
            str(out),
            "--pitch-um",
            "500",
            "--workers",
            "0",
            "--top-genes",
            "2",
        ],
    )
    assert r.exit_code == 0, r.output
    row = store.sql("SELECT * FROM slides WHERE slide_id = 'C5_crop'").row(0, named=True)
    assert row["um_per_px"] == pytest.approx(umpp, rel=1e-6) and row["um_per_px_source"] == "metadata"
    assert json.loads(row["source_files"])["backend"].startswith("openslide")
    n = store.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id = 'C5_crop'")["n"][0]
    maps = [p for p in (out / "C5_crop").glob("*.png") if p.stem != "leiden"]  # leiden.png: the cluster map
    assert n >= 10 and (out / "C5_crop.h5ad").is_file() and len(maps) == 2
    # streaming: full-resolution reads are tile windows (+ a few px of margin), never the slide
    window = 100.0 / umpp
    level0 = [s for lvl, s in reads if lvl == 0]
    assert len(level0) >= n
    assert max(w * h for w, h in level0) <= (np.ceil(window) + 6) ** 2
    assert all(lvl > 0 for lvl, s in reads if s[0] * s[1] > (np.ceil(window) + 6) ** 2)


# --------------------------------------------------------------------------- bad input
def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def _bad_cases(tmp: Path, real_data_root: Path, run_id: str, store: Store) -> dict[str, tuple[dict, str]]:
    jpeg = real_data_root / "her2st" / "images" / "C5.jpg"
    garbage = tmp / "garbage.jpg"
    garbage.write_bytes(b"this is not an image\n" * 100)
    truncated = tmp / "truncated.jpg"
    truncated.write_bytes(jpeg.read_bytes()[:300_000])
    blank = tmp / "blank.png"
    rng = np.random.default_rng(0)
    Image.fromarray((245 + rng.integers(0, 3, (3000, 3000, 3))).astype(np.uint8)).save(blank)
    # models whose backbone weights are missing here: a gated hub backbone absent from the
    # (offline) cache, and a Lite0 model trained on weights with another sha256
    model = store.path / "models" / run_id
    gated = tmp / "model_uni"
    shutil.copytree(model, gated)
    meta = json.loads((gated / "run.json").read_text())
    (gated / "run.json").write_text(json.dumps({**meta, "backbone": "uni"}))
    other = tmp / "model_other_weights"
    shutil.copytree(model, other)
    doc = json.loads((other / "head.json").read_text())
    doc["provenance"]["weights_sha256"] = json.dumps("0" * 64)
    (other / "head.json").write_text(json.dumps(doc))
    umpp = 0.6857
    return {
        "unreadable image": ({"image": garbage, "um_per_px": umpp}, "not a JPEG, PNG or TIFF"),
        "truncated image": ({"image": truncated, "um_per_px": umpp}, "truncated"),
        "missing image": ({"image": tmp / "nope.svs"}, "does not exist"),
        "no um/px for a JPEG": ({"image": jpeg}, "--um-per-px"),
        "unknown model": ({"image": jpeg, "um_per_px": umpp, "model": "0123456789abcdef0000"}, "unknown model"),
        "gated weights missing": ({"image": jpeg, "um_per_px": umpp, "model": str(gated)}, "HF_HUB_OFFLINE"),
        "other weights": ({"image": jpeg, "um_per_px": umpp, "model": str(other)}, "--weights PATH"),
        "no tissue": ({"image": blank, "um_per_px": 0.5}, "no tissue detected"),
        "unknown gene": ({"image": jpeg, "um_per_px": umpp, "genes": ["NOT_A_GENE"]}, "NOT_A_GENE"),
        "region without tissue": (
            {"image": jpeg, "um_per_px": umpp, "slide_id": "C5_corner", "region": (8000, 9000, 9272, 9901)},
            "in --region",
        ),
        "slide id of a slide with counts": ({"image": jpeg, "um_per_px": umpp, "slide_id": "C5"}, "already exists"),
    }


def test_bad_input_fails_cleanly_and_writes_nothing(tmp_path, infer_model_store, real_data_root, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hf_cache"))
    src, run_id = infer_model_store
    store = Store(tmp_path / "store")
    shutil.copytree(src.path, store.path)
    cases = _bad_cases(tmp_path, real_data_root, run_id, store)
    before = _tree(store.path)
    out = tmp_path / "out"
    for name, (kwargs, needle) in cases.items():
        kwargs = {"model": run_id, **kwargs}
        with pytest.raises(StimageError) as err:
            infer(store, kwargs.pop("image"), kwargs.pop("model"), out, **kwargs)
        msg = str(err.value)
        assert needle in msg, (name, msg)
        assert "\n" not in msg, (name, msg)
        assert not out.exists(), name
        assert _tree(store.path) == before, name


def test_cli_prints_one_line_and_exit_code_2(tmp_path, infer_model_store, real_data_root):
    src, run_id = infer_model_store
    r = CliRunner().invoke(
        app,
        [
            "infer",
            str(real_data_root / "her2st" / "images" / "C5.jpg"),
            "--model",
            run_id,
            "--store",
            str(src.path),
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 2
    lines = [x for x in r.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--um-per-px" in lines[0]
    assert not (tmp_path / "out").exists()
