"""Visium (real Space Ranger files), Visium HD and Xenium readers against scanpy / pandas.

References: ``scanpy.read_visium`` / ``scanpy.read_10x_h5`` / ``scanpy.read_10x_mtx`` on the
same files (spatialdata-io is not installed: it pins botocore below the venv's boto3; see
docs/visium_hd_xenium.md), pandas ``groupby().sum()`` for bin aggregation, scipy ``cdist``
for pseudo-spots. Real files: ``shared/data/formats``; synthetic parts are named as such.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_formats import write_catalog
from fixtures_hd import HD_REAL, bin_pixels, synthetic_hd
from PIL import Image

from stimage_embed.errors import CatalogError, InputError
from stimage_embed.ingest.readers import get_reader

sc = pytest.importorskip("scanpy")


def _read(cat):
    return get_reader(cat.reader)(cat, cat.slides[0])


def _err(cat, *texts: str) -> InputError:
    with pytest.raises(InputError) as info:
        _read(cat)
    msg = str(info.value)
    assert "\n" not in msg and all(t in msg for t in texts), msg
    return info.value


@pytest.fixture(scope="module")
def formats(real_data_root) -> Path:
    return real_data_root / "formats"


# ----------------------------------------------------------------------------- Visium (real)
def test_visium_real_spaceranger_matches_scanpy(formats, tmp_path):
    root = formats / "visium_spaceranger"
    entry = {
        "id": "V1",
        "patient": "p",
        "image": str(root / "spatial/tissue_lowres_image.png"),  # reader checks it exists; no full-res image
        "counts": str(root / "filtered_feature_bc_matrix.h5"),
    }
    slide = _read(write_catalog(tmp_path / "c.yaml", "visium", [entry]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.read_visium(root)
    ref = ref[ref.obs["in_tissue"] == 1]
    assert slide.n_spots == ref.n_obs and slide.n_genes == ref.n_vars
    order = pd.Index(ref.obs_names).get_indexer(slide.spot_ids)
    assert (order >= 0).all()
    xy = np.asarray(ref.obsm["spatial"], dtype=float)[order]  # scanpy: (pxl_col, pxl_row) full-res
    np.testing.assert_array_equal(np.column_stack([slide.pixel_x, slide.pixel_y]), xy)
    assert np.array_equal(slide.gene_ids, ref.var["gene_ids"].to_numpy())
    np.testing.assert_array_equal(slide.counts.toarray(), ref.X[order].toarray())
    np.testing.assert_array_equal(slide.array_row, ref.obs["array_row"].to_numpy()[order])
    sf = next(iter(ref.uns["spatial"].values()))["scalefactors"]
    assert slide.um_per_px == pytest.approx(65.0 / sf["spot_diameter_fullres"])


# ----------------------------------------------------------------------------- Visium HD
def _hd_catalog(tmp_path: Path, binned: Path, bin_um, image: Path | None = None):
    img = image or tmp_path / "he.png"
    if not img.exists():
        Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(img)
    entry = {"id": "HD1", "patient": "p", "image": str(img), "counts": str(binned)}
    extra = {} if bin_um is None else {"bin_um": bin_um}
    return write_catalog(tmp_path / "hd.yaml", "visium_hd", [entry], platform="visium_hd", tile_um=112, **extra)


def _mtx_reference(folder: Path):
    """scanpy.read_10x_mtx fails on this fixture (its *.tsv.gz are plain, quoted text): read it
    with scipy.io.mmread and pandas instead."""
    import anndata as ad
    import scipy.io
    import scipy.sparse as sp

    m = scipy.io.mmread(folder / "matrix.mtx.gz")
    bc = pd.read_csv(folder / "barcodes.tsv.gz", sep="\t", header=None, compression=None)[0]
    ft = pd.read_csv(folder / "features.tsv.gz", sep="\t", header=None, compression=None)
    return ad.AnnData(
        sp.csr_matrix(m.T), obs=pd.DataFrame(index=bc.to_numpy()), var=pd.DataFrame(index=ft[1].to_numpy())
    )


@pytest.mark.parametrize("fmt", ["h5", "mtx"])
def test_visium_hd_real_square_002um_matches_scanpy(formats, tmp_path, fmt):
    binned = formats / HD_REAL / ".."
    slide = _read(_hd_catalog(tmp_path, binned.resolve(), 2))
    folder = formats / HD_REAL
    if fmt == "mtx":  # the same bins through the mtx folder
        (tmp_path / "b/square_002um").mkdir(parents=True)
        (tmp_path / "b/square_002um/spatial").symlink_to(folder / "spatial")
        (tmp_path / "b/square_002um/filtered_feature_bc_matrix").symlink_to(folder / "filtered_feature_bc_matrix")
        slide = _read(_hd_catalog(tmp_path, tmp_path / "b", 2))
        ref = _mtx_reference(folder / "filtered_feature_bc_matrix")
    else:
        ref = sc.read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    pos = pd.read_parquet(folder / "spatial/tissue_positions.parquet").set_index("barcode")
    pos = pos.loc[ref.obs_names]
    pos = pos[pos["in_tissue"] == 1]
    assert sorted(slide.spot_ids) == sorted(pos.index)
    p = pos.loc[slide.spot_ids]
    np.testing.assert_allclose(slide.pixel_x, p["pxl_col_in_fullres"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(slide.pixel_y, p["pxl_row_in_fullres"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(slide.counts.toarray(), ref[slide.spot_ids].X.toarray())
    assert list(slide.genes) == list(ref.var_names)
    sf = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    assert slide.um_per_px == sf["microns_per_pixel"] and slide.area_um2[0] == 4.0


@pytest.mark.parametrize("bin_um,fmt", [(8, "h5"), (16, "mtx"), (6, "h5")])
def test_visium_hd_sums_2um_bins_exactly(tmp_path, bin_um, fmt):
    """Synthetic 2 µm bins (counts simulated) summed to ``bin_um``: equal to a pandas groupby."""
    folder, counts, with_counts, genes = synthetic_hd(tmp_path / "binned_outputs", fmt=fmt)
    slide = _read(_hd_catalog(tmp_path, tmp_path / "binned_outputs", bin_um))
    pos = pd.read_parquet(folder / "spatial/tissue_positions.parquet")
    k = bin_um // 2
    members = pos.iloc[with_counts].reset_index(drop=True)
    frame = pd.DataFrame(counts.toarray(), columns=genes)
    frame["id"] = [
        f"s_{bin_um:03d}um_{r // k:05d}_{c // k:05d}-1" for r, c in zip(members.array_row, members.array_col)
    ]
    ref = frame.groupby("id").sum()
    assert sorted(slide.spot_ids) == sorted(ref.index)
    np.testing.assert_array_equal(slide.counts.toarray(), ref.loc[slide.spot_ids].to_numpy())
    assert slide.counts.sum() == counts.sum()
    # centre of the coarse bin = the affine image of its centre in µm (all k x k members listed)
    full = (pos.array_row.max() + 1) // k * k  # coarse bins cut by the grid edge have fewer members
    inner = (slide.array_row + 1) * k <= full
    inner &= (slide.array_col + 1) * k <= (pos.array_col.max() + 1) // k * k
    ex, ey = bin_pixels(slide.array_row * k + (k - 1) / 2, slide.array_col * k + (k - 1) / 2, 2, 0.5)
    np.testing.assert_allclose(slide.pixel_x[inner], ex[inner], atol=1e-6)
    np.testing.assert_allclose(slide.pixel_y[inner], ey[inner], atol=1e-6)
    assert (slide.area_um2 == bin_um**2).all()


def test_visium_hd_bad_input(tmp_path, formats):
    with pytest.raises(CatalogError, match=r"bin_um.*multiple of the 2 µm"):
        _hd_catalog(tmp_path, tmp_path, 5)
    (tmp_path / "empty_binned").mkdir()
    _err(_hd_catalog(tmp_path, tmp_path / "empty_binned", 8), "square_008um", "missing bin folder")
    synthetic_hd(tmp_path / "b")
    (tmp_path / "b/square_002um/spatial/tissue_positions.parquet").unlink()
    _err(_hd_catalog(tmp_path, tmp_path / "b", 8), "tissue_positions.parquet")


# ----------------------------------------------------------------------------- Xenium
#: µm per Xenium morphology pixel (the reader's default)
PIXEL_UM = 0.2125


def _known_alignment() -> tuple[np.ndarray, np.ndarray]:
    """(M: H&E px -> morphology px, A = M^-1), a rotation + scale + shift (synthetic)."""
    th, s = np.deg2rad(10.0), 0.2
    a = np.array([[s * np.cos(th), -s * np.sin(th), -700.0], [s * np.sin(th), s * np.cos(th), -1000.0], [0, 0, 1]])
    return np.linalg.inv(a), a


def _checker(x_um: np.ndarray, y_um: np.ndarray, square_um: float = 40.0) -> np.ndarray:
    return ((np.floor(x_um / square_um) + np.floor(y_um / square_um)) % 2).astype(np.uint8) * 255


def _xenium_case(tmp_path: Path, formats: Path, matrix: np.ndarray | None = None, size=(800, 900), **extra):
    """A synthetic H&E whose pixel (u, v) shows a 40 µm checkerboard of the Xenium frame,
    placed through ``matrix`` (H&E px -> morphology px of 0.2125 µm): real cells, synthetic image."""
    m, _ = _known_alignment()
    matrix = m if matrix is None else matrix
    uu, vv = np.meshgrid(np.arange(size[1]) + 0.0, np.arange(size[0]) + 0.0)
    um = (m @ np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)]))[:2] * PIXEL_UM
    img = _checker(um[0], um[1]).reshape(size)
    Image.fromarray(np.stack([img] * 3, -1)).save(tmp_path / "he.png")
    np.savetxt(tmp_path / "align.csv", matrix, delimiter=",")
    entry = {
        "id": "X1",
        "patient": "p",
        "image": str(tmp_path / "he.png"),
        "counts": str(formats / "xenium/cell_feature_matrix.h5"),
        "alignment": str(tmp_path / "align.csv"),
    }
    opts = {"spot_diameter_um": 10, "spot_pitch_um": 100, **extra}
    return write_catalog(tmp_path / "x.yaml", "xenium", [entry], platform="xenium", **opts)


def test_xenium_cells_match_reference_and_land_on_the_image(formats, tmp_path):
    slide = _read(_xenium_case(tmp_path, formats))
    ref = sc.read_10x_h5(formats / "xenium/cell_feature_matrix.h5", gex_only=False)
    cells = pd.read_parquet(formats / "xenium/cells.parquet").set_index("cell_id")
    gex = ref[:, ref.var["feature_types"] == "Gene Expression"]
    assert slide.n_spots == ref.n_obs == len(cells)
    assert list(slide.genes) == list(gex.var_names)
    assert not any(g.startswith(("NegControl", "BLANK", "Unassigned")) for g in slide.genes)
    np.testing.assert_array_equal(slide.counts.toarray(), gex[slide.spot_ids].X.toarray())
    np.testing.assert_allclose(slide.area_um2, cells.loc[slide.spot_ids, "cell_area"])
    # placement: the independent forward map (skimage) of the reader's pixels gives the µm centroids
    from skimage.transform import AffineTransform

    m, _ = _known_alignment()
    back = AffineTransform(matrix=m)(np.column_stack([slide.pixel_x, slide.pixel_y])) * PIXEL_UM
    np.testing.assert_allclose(back, cells.loc[slide.spot_ids, ["x_centroid", "y_centroid"]], atol=1e-6)
    assert slide.um_per_px == pytest.approx(PIXEL_UM / 0.2)
    # the synthetic image shows, under each cell (away from checker edges), the checker of its µm centroid
    img = np.asarray(Image.open(tmp_path / "he.png"))[..., 0]
    xy = cells.loc[slide.spot_ids, ["x_centroid", "y_centroid"]].to_numpy()
    away = (np.abs((xy / 40.0) - np.round(xy / 40.0)) * 40.0 > 3.0).all(1)
    seen = img[np.rint(slide.pixel_y).astype(int), np.rint(slide.pixel_x).astype(int)]
    assert away.sum() > 300 and np.array_equal(seen[away], _checker(xy[away, 0], xy[away, 1]))


def test_xenium_pseudo_spots_sum_cells_on_a_hex_lattice(formats, tmp_path):
    from scipy.spatial.distance import cdist

    cat = _xenium_case(tmp_path, formats, pseudo_spots_um=55)
    spots = _read(cat)
    (tmp_path / "c").mkdir()
    cells = _read(_xenium_case(tmp_path / "c", formats))
    m, _ = _known_alignment()
    centres, cell_um = (
        (m @ np.stack([d.pixel_x, d.pixel_y, np.ones(d.n_spots)]))[:2].T * PIXEL_UM for d in (spots, cells)
    )
    d = cdist(centres, cell_um)
    member = d <= 27.5
    assert (member.sum(0) <= 1).all()  # 100 µm pitch: a cell belongs to at most one 55 µm spot
    np.testing.assert_array_equal(spots.counts.toarray(), member.astype(np.int64) @ cells.counts.toarray())
    nn = np.sort(cdist(centres, centres), 1)[:, 1]
    assert np.allclose(nn[nn < 150], 100.0) and (nn < 150).mean() > 0.8  # hex lattice, 100 µm pitch
    assert spots.n_spots >= 15 and np.allclose(spots.area_um2, np.pi * 27.5**2)


def test_xenium_bad_input(formats, tmp_path):
    m, _ = _known_alignment()
    (tmp_path / "a").mkdir()
    cat = _xenium_case(tmp_path / "a", formats)
    np.savetxt(tmp_path / "a/align.csv", m[:2], delimiter=",")
    _err(cat, "align.csv", "3x3 affine", "2x3")
    bad = m.copy()
    bad[2] = [0.001, 0.0, 1.0]
    np.savetxt(tmp_path / "a/align.csv", bad, delimiter=",")
    _err(cat, "align.csv", "not an affine matrix")
    (tmp_path / "b").mkdir()
    _err(_xenium_case(tmp_path / "b", formats, size=(300, 300)), "align.csv", "fall outside", "300x300")
    cat = _xenium_case(tmp_path / "b", formats, size=(300, 300), reader_options={"cells_outside": "drop"})
    assert 0 < _read(cat).n_spots < 526


# ----------------------------------------------------------------------------- ingest + tile width
def test_visium_hd_ingest_keeps_bins_and_tiles_apart(real_data_root, tmp_path):
    """Synthetic 2 µm bins over a crop of the REAL HER2ST C5 image: ingest stores each 8 µm
    bin with its area and the slide's tile_um; the embedding plan cuts 112 µm tiles. A missing
    bin folder is one error line (exit 2) and leaves the store as it was."""
    import polars as pl
    from typer.testing import CliRunner

    from stimage_embed.cli import app
    from stimage_embed.embeddings.embed_plan import select_spots, work_list
    from stimage_embed.store import Store

    with Image.open(real_data_root / "her2st/images/C5.jpg") as im:
        im.draft("RGB", (im.width // 4, im.height // 4))  # JPEG decoded at 1/4 scale: fast, still real H&E
        im.crop((1000, 1000, 1400, 1400)).save(tmp_path / "he.png")
    synthetic_hd(tmp_path / "binned_outputs", grid_shape=(40, 48))
    cat = _hd_catalog(tmp_path, tmp_path / "binned_outputs", 8, image=tmp_path / "he.png")
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", str(cat.source), "--store", str(tmp_path / "store")])
    assert res.exit_code == 0, res.output
    store = Store(tmp_path / "store")
    slides = pl.from_arrow(store.read("slides"))
    spots = pl.from_arrow(store.read("spots"))
    assert slides["tile_um"].to_list() == [112.0] and slides["spot_diameter_um"].to_list() == [55.0]
    assert spots.height == 10 * 12 and (spots["area_um2"] == 64.0).all()
    slide_tab, sel = select_spots(store, None, only_qc=False)
    jobs, chunks = work_list(slide_tab, sel, None, 32, {"efficientnet_lite0": set()})
    assert jobs["HD1"].tile_um == 112.0 and sum(len(c.spot_ids) for c in chunks) == 120
    jobs, _ = work_list(slide_tab, sel, 56.0, 32, {"efficientnet_lite0": set()})
    assert jobs["HD1"].tile_um == 56.0  # --tile-um still wins
    before = spots.sort("spot_id").to_dicts()
    (tmp_path / "bad").mkdir()
    (tmp_path / "nothing").mkdir()
    bad = _hd_catalog(tmp_path / "bad", tmp_path / "nothing", 8)
    res = runner.invoke(app, ["ingest", str(bad.source), "--store", str(tmp_path / "store")])
    assert res.exit_code == 2 and "missing bin folder" in res.output, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]  # (the rest: the progress bar)
    assert len(errors) == 1 and "Traceback" not in res.output and "nothing/square_008um" in errors[0]
    assert pl.from_arrow(store.read("spots")).sort("spot_id").to_dicts() == before
