"""Visium, HEST and generic-AnnData readers on the real HER2ST section C5 rewritten in
each layout (see fixtures_formats.py): every reader must return exactly the spots,
pixel centres and raw counts of the original HER2ST tables, and reject bad input with an
InputError naming the file and the field."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from fixtures_formats import (
    SR_SPOT_DIAMETER_UM,
    Section,
    generic_anndata,
    half_resolution,
    hest_anndata,
    hest_image,
    load_section,
    visium_tables,
    write_catalog,
    write_hest_sample,
    write_spaceranger,
)

from stimage_embed.errors import InputError
from stimage_embed.ingest.readers import get_reader
from stimage_embed.ingest.readers._validate import (
    resolve_duplicate_genes,
    validate_coords,
    validate_counts,
    validate_unique,
)
from stimage_embed.ingest.types import SlideData

N_GENES_BAD = 300  # gene subset for the bad-input cases (speed)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def section(real_data_root) -> Section:
    return load_section(real_data_root, "C5")


@pytest.fixture(scope="session")
def small(section) -> Section:
    return section.subset(N_GENES_BAD)


@pytest.fixture(scope="session")
def spaceranger(section, tmp_path_factory) -> Path:
    """One outs/ with both count formats and one spatial folder per positions variant."""
    root = tmp_path_factory.mktemp("visium")
    tables = visium_tables(section)
    write_spaceranger(root / "outs", tables, positions="csv", counts="h5", um_per_px=section.um_per_px)
    write_spaceranger(root / "outs", tables, positions="csv", counts="mtx")
    for variant in ("list", "csv", "parquet"):
        paths = write_spaceranger(
            root / f"outs_{variant}", tables, positions=variant, counts="h5", um_per_px=section.um_per_px
        )
        paths["counts"].unlink()  # counts are read from outs/
    return root


@pytest.fixture(scope="session")
def hest_img(section):
    return hest_image(section)


@pytest.fixture(scope="session")
def hest_sample(section, hest_img, tmp_path_factory):
    root = tmp_path_factory.mktemp("hest")
    paths, tr, um = write_hest_sample(root, section, hest_img)
    return root, paths, tr, um


def _visium_entry(image: Path | str, counts: str, spots: str | None, **extra) -> dict:
    return {
        "id": "C5",
        "patient": "C",
        "image": str(image),
        "counts": counts,
        **({"spots": spots} if spots else {}),
        **extra,
    }


def _read(catalog) -> SlideData:
    return get_reader(catalog.reader)(catalog, catalog.slides[0])


def _expect_error(catalog, file_name: str, field: str, *also: str) -> InputError:
    with pytest.raises(InputError) as info:
        _read(catalog)
    msg = str(info.value)
    assert file_name in msg, msg
    assert info.value.field is not None and field in info.value.field, (info.value.field, msg)
    for text in also:
        assert text in msg, msg
    return info.value


def assert_matches_reference(
    slide: SlideData, sec: Section, spot_of: dict[str, str] | None = None, transform=None, check_array: bool = True
) -> list[str]:
    """Same spots, pixel centres, array coordinates and exact raw counts as HER2ST."""
    ids = [spot_of[s] for s in slide.spot_ids] if spot_of else list(slide.spot_ids)
    expected = sec.counts.index.intersection(sec.spots.index)
    assert len(ids) == len(set(ids)) == slide.n_spots == len(expected) == 181
    assert set(ids) == set(expected)
    assert isinstance(slide.counts, sp.csr_matrix) and slide.counts.dtype.kind == "i"
    assert slide.counts.shape == (slide.n_spots, slide.n_genes)
    assert len(set(slide.genes)) == slide.n_genes
    assert set(slide.genes) == set(sec.counts.columns)
    ref = sec.counts.loc[ids, list(slide.genes)].to_numpy()
    assert np.array_equal(slide.counts.toarray(), ref)
    ex, ey = sec.spots.loc[ids, "pixel_x"].to_numpy(), sec.spots.loc[ids, "pixel_y"].to_numpy()
    if transform is not None:
        ex, ey = transform.apply(ex, ey)
    assert np.array_equal(slide.pixel_x, ex) and np.array_equal(slide.pixel_y, ey)
    if check_array:
        assert np.array_equal(slide.array_col, sec.spots.loc[ids, "x"].to_numpy())
        assert np.array_equal(slide.array_row, sec.spots.loc[ids, "y"].to_numpy())
    assert Path(slide.image_path).is_file()
    return ids


# ----------------------------------------------------------------------------- _validate
def test_validate_counts_dense_and_sparse_agree():
    m = np.array([[0, 1, 2], [3, 0, 0]], dtype=float)
    for bad, what in ((np.nan, "non-finite"), (-1.0, "negative"), (0.5, "non-integer")):
        d = m.copy()
        d[1, 0] = bad
        for form in (d, sp.csr_matrix(d), sp.csc_matrix(d), sp.coo_matrix(d)):
            with pytest.raises(InputError) as info:
                validate_counts(form, "f.tsv", "counts", row_names=["s1", "s2"], col_names=["A", "B", "C"])
            msg = str(info.value)
            assert msg.startswith("f.tsv: counts: 1 " + what), msg
            assert "row 1 ('s2'), column 0 ('A')" in msg, msg
    validate_counts(sp.csr_matrix(m), "f", "counts")  # whole-number floats are raw counts
    validate_counts(m.astype(np.int32), "f", "counts")
    with pytest.raises(InputError, match="negative"):
        validate_counts(np.array([[1, -2]]), "f", "counts")


def test_validate_unique_and_coords():
    validate_unique(["a", "b"], "f", "id", "spot id")
    with pytest.raises(InputError, match=r"f: id: 1 duplicate spot id\(s\): 'a' x3"):
        validate_unique(["a", "b", "a", "a"], "f", "id", "spot id")
    validate_coords(np.array([1.0]), np.array([2.0]), "f")
    with pytest.raises(InputError, match=r"f: pixel_x/pixel_y: 1 spot centre\(s\) are not finite, e.g. 1 \('s2'\)"):
        validate_coords(np.array([1.0, np.inf]), np.array([2.0, 3.0]), "f", ids=["s1", "s2"])


def test_duplicate_gene_policies_against_anndata_and_pandas():
    from anndata.utils import make_index_unique

    genes = np.array(["A", "B", "A", "C", "A", "B"])
    ids = np.array([f"E{i}" for i in range(6)])
    rng = np.random.default_rng(1)
    dense = rng.integers(0, 5, size=(7, 6))
    counts = sp.csr_matrix(dense)
    with pytest.raises(InputError, match=r"m.h5: features/name: 2 duplicate gene name\(s\): 'A' x3, 'B' x2"):
        resolve_duplicate_genes(genes, ids, counts, "error", "m.h5", "features/name")
    g, i, c = resolve_duplicate_genes(genes, ids, counts, "make_unique", "m.h5", "features/name")
    assert list(g) == list(make_index_unique(pd.Index(genes))) and (c != counts).nnz == 0 and i is ids
    g, i, c = resolve_duplicate_genes(genes, ids, counts, "sum", "m.h5", "features/name")
    ref = pd.DataFrame(dense, columns=genes).T.groupby(level=0, sort=False).sum().T
    assert list(g) == list(ref.columns) == ["A", "B", "C"]
    assert np.array_equal(c.toarray(), ref.to_numpy())
    assert list(i) == ["E0;E2;E4", "E1;E5", "E3"]


# ----------------------------------------------------------------------------- Visium
@pytest.mark.parametrize("variant", ["list", "csv", "parquet"])
@pytest.mark.parametrize("counts", ["outs/filtered_feature_bc_matrix.h5", "outs/filtered_feature_bc_matrix"])
def test_visium_matches_her2st(spaceranger, section, variant, counts, caplog):
    cat = write_catalog(
        spaceranger / f"cat_{variant}_{Path(counts).suffix or 'mtx'}.yaml",
        "visium",
        [_visium_entry(section.image, counts, f"outs_{variant}/spatial")],
    )
    with caplog.at_level(logging.WARNING):
        slide = _read(cat)
    assert_matches_reference(slide, section, section.spot_of_barcode)
    # the two selected HER2ST spots without counts are reported, the antibody features dropped
    no_counts = set(section.spots.index) - set(section.counts.index)
    assert {section.spot_of_barcode[b] for b in slide.skipped_spots} == no_counts and len(no_counts) == 2
    assert not any(g.endswith("TotalSeqB") for g in slide.genes)
    gid = dict(zip(section.counts.columns, section.gene_ids))
    assert [gid[g] for g in slide.genes] == list(slide.gene_ids)
    sf = json.loads((spaceranger / f"outs_{variant}/spatial/scalefactors_json.json").read_text())
    assert slide.um_per_px == pytest.approx(SR_SPOT_DIAMETER_UM / sf["spot_diameter_fullres"], rel=1e-12)
    assert slide.um_per_px == pytest.approx(section.um_per_px, rel=1e-9)
    assert slide.um_per_px_source == "scalefactors"
    assert slide.source_files["spots"].endswith(
        {"list": "tissue_positions_list.csv", "csv": "tissue_positions.csv", "parquet": "tissue_positions.parquet"}[
            variant
        ]
    )


def test_visium_h5_and_mtx_agree_with_scanpy(spaceranger, section):
    """The hand-written 10x parsers against scanpy's readers on the same files."""
    import scanpy as sc

    from stimage_embed.ingest.readers.tenx_counts import read_counts

    for path, ref in (
        (
            spaceranger / "outs/filtered_feature_bc_matrix.h5",
            sc.read_10x_h5(spaceranger / "outs/filtered_feature_bc_matrix.h5"),
        ),
        (
            spaceranger / "outs/filtered_feature_bc_matrix",
            sc.read_10x_mtx(spaceranger / "outs/filtered_feature_bc_matrix", var_names="gene_ids"),
        ),
    ):
        barcodes, genes, ids, counts = read_counts(path)
        assert list(barcodes) == list(ref.obs_names)
        assert list(ids) == list(ref.var["gene_ids"] if "gene_ids" in ref.var else ref.var_names)
        assert (counts != sp.csr_matrix(ref.X)).nnz == 0


def test_visium_spatial_folder_defaults_and_catalog_override(spaceranger, section, tmp_path):
    # spots omitted -> outs/spatial next to the counts; catalog µm/px wins over scalefactors
    cat = write_catalog(
        spaceranger / "cat_default.yaml",
        "visium",
        [_visium_entry(section.image, "outs/filtered_feature_bc_matrix.h5", None)],
        um_per_px=0.5,
    )
    slide = _read(cat)
    assert slide.source_files["spots"].endswith("outs/spatial/tissue_positions.csv")
    assert (slide.um_per_px, slide.um_per_px_source) == (0.5, "catalog")
    # a positions file given directly, no scalefactors next to it -> µm/px left to the pipeline
    tables = visium_tables(section.subset(50))
    p = write_spaceranger(tmp_path / "outs", tables, positions="parquet", counts="h5")
    cat = write_catalog(
        tmp_path / "cat.yaml",
        "visium",
        [_visium_entry(section.image, "outs/filtered_feature_bc_matrix.h5", "outs/spatial/tissue_positions.parquet")],
    )
    slide = _read(cat)
    assert (
        slide.n_spots == 181 and slide.um_per_px is None and slide.um_per_px_source is None and p["positions"].is_file()
    )


@pytest.mark.parametrize("policy", ["error", "make_unique", "sum"])
def test_visium_duplicate_gene_symbols(small, tmp_path, policy):
    tables = visium_tables(small)
    names = list(tables.counts.columns)
    a, b = names[5], names[9]
    names[9] = a  # two Ensembl ids, one symbol (as in real 10x feature lists)
    tables.counts.columns = names
    write_spaceranger(tmp_path / "outs", tables, positions="csv", counts="h5")
    cat = write_catalog(
        tmp_path / "cat.yaml",
        "visium",
        [_visium_entry(small.image, "outs/filtered_feature_bc_matrix.h5", "outs/spatial")],
        reader_options={"duplicate_genes": policy},
    )
    if policy == "error":
        _expect_error(cat, "filtered_feature_bc_matrix.h5", "features/name", repr(a))
        return
    slide = _read(cat)
    ref = small.counts.loc[[small.spot_of_barcode[s] for s in slide.spot_ids]]
    col = {g: j for j, g in enumerate(slide.genes)}
    if policy == "make_unique":
        assert slide.n_genes == N_GENES_BAD and f"{a}-1" in col
        assert np.array_equal(slide.counts[:, col[f"{a}-1"]].toarray().ravel(), ref[b].to_numpy())
    else:
        assert slide.n_genes == N_GENES_BAD - 1 and b not in col
        assert np.array_equal(slide.counts[:, col[a]].toarray().ravel(), (ref[a] + ref[b]).to_numpy())
        assert slide.gene_ids[col[a]] == f"{small.gene_ids[5]};{small.gene_ids[9]}"


def _bad_visium(
    small: Section,
    tmp_path: Path,
    mutate,
    counts: str = "h5",
    positions: str = "csv",
    spots: str = "outs/spatial",
    image: Path | str | None = None,
):
    tables = visium_tables(small)
    mutate(tables)
    write_spaceranger(tmp_path / "outs", tables, positions=positions, counts=counts, um_per_px=small.um_per_px)
    cpath = "outs/filtered_feature_bc_matrix.h5" if counts == "h5" else "outs/filtered_feature_bc_matrix"
    return write_catalog(tmp_path / "cat.yaml", "visium", [_visium_entry(image or small.image, cpath, spots)])


def _set(tables, row: int, col: int, value: float) -> None:
    tables.counts = tables.counts.astype(float)
    tables.counts.iat[row, col] = value


@pytest.mark.parametrize("counts", ["h5", "mtx"])
@pytest.mark.parametrize("value,what", [(np.nan, "non-finite"), (-3.0, "negative"), (2.5, "non-integer")])
def test_visium_bad_count_values(small, tmp_path, counts, value, what):
    cat = _bad_visium(small, tmp_path, lambda t: _set(t, 7, 11, value), counts=counts)
    file_name, field = (
        ("filtered_feature_bc_matrix.h5", "matrix/data") if counts == "h5" else ("matrix.mtx.gz", "counts")
    )
    err = _expect_error(cat, file_name, field, what, small.counts.columns[11])
    assert small.barcodes[small.counts.index[7]] in str(err)


def test_visium_duplicate_barcodes(small, tmp_path):
    def dup_matrix(t):
        t.counts.index = [t.counts.index[0]] + list(t.counts.index[1:-1]) + [t.counts.index[0]]

    cat = _bad_visium(small, tmp_path / "m", dup_matrix)
    _expect_error(cat, "filtered_feature_bc_matrix.h5", "barcodes", "duplicate barcode")

    def dup_positions(t):
        t.positions = pd.concat([t.positions, t.positions.iloc[[3]]], ignore_index=True)

    cat = _bad_visium(small, tmp_path / "p", dup_positions, positions="parquet")
    _expect_error(cat, "tissue_positions.parquet", "barcode", "duplicate barcode", small.barcodes[small.spots.index[3]])


def test_visium_barcodes_without_positions(small, tmp_path):
    lost = small.barcodes[small.counts.index[4]]

    def drop(t):
        t.positions = t.positions[t.positions["barcode"] != lost]

    cat = _bad_visium(small, tmp_path, drop, positions="list")
    _expect_error(cat, "filtered_feature_bc_matrix.h5", "barcodes", "tissue_positions_list.csv", lost)


def test_visium_missing_files(small, tmp_path):
    cat = _bad_visium(small, tmp_path / "a", lambda t: None, spots="outs/spatial/no_such_positions.csv")
    _expect_error(cat, "no_such_positions.csv", "spots", "does not exist")
    (tmp_path / "a/outs/empty_spatial").mkdir()
    cat = write_catalog(
        tmp_path / "a/cat2.yaml",
        "visium",
        [_visium_entry(small.image, "outs/filtered_feature_bc_matrix.h5", "outs/empty_spatial")],
    )
    _expect_error(cat, "empty_spatial", "spots", "tissue_positions.csv")
    cat = _bad_visium(small, tmp_path / "b", lambda t: None, image="images/C5_missing.jpg")
    _expect_error(cat, "C5_missing.jpg", "image", "does not exist")
    cat = write_catalog(tmp_path / "b/cat3.yaml", "visium", [_visium_entry(small.image, "outs/raw.h5", "outs/spatial")])
    _expect_error(cat, "raw.h5", "counts", "does not exist")


def test_visium_bad_options_and_positions_columns(small, tmp_path):
    cat = _bad_visium(small, tmp_path, lambda t: None)
    cat.reader_options["duplicate_genes"] = "keep"
    _expect_error(cat, "cat.yaml", "reader_options.duplicate_genes", "keep")
    cat.reader_options.clear()
    pos = tmp_path / "outs/spatial/tissue_positions.csv"
    pd.read_csv(pos).drop(columns=["pxl_row_in_fullres"]).to_csv(pos, index=False)
    _expect_error(cat, "tissue_positions.csv", "pxl_row_in_fullres", "lacks column")
    h5 = tmp_path / "outs/filtered_feature_bc_matrix.h5"
    h5.write_bytes(b"not hdf5")
    _expect_error(cat, "filtered_feature_bc_matrix.h5", "counts", "HDF5")


def test_visium_nan_pixel_coordinates(small, tmp_path):
    def nan_px(t):
        t.positions.loc[2, "pxl_col_in_fullres"] = np.nan

    cat = _bad_visium(small, tmp_path, nan_px)
    _expect_error(cat, "tissue_positions.csv", "pxl_col_in_fullres", "not finite")


# ----------------------------------------------------------------------------- HEST
def test_hest_matches_her2st(hest_sample, section):
    root, paths, tr, um = hest_sample
    cat = write_catalog(
        root / "cat.yaml",
        "hest",
        [{"id": "C5", "patient": "C", "image": "wsis/SPA_C5.tif", "counts": "st/SPA_C5.h5ad"}],
        platform="legacy_st",
    )
    slide = _read(cat)
    ids = assert_matches_reference(slide, section, transform=tr)  # 3 off-tissue obs dropped
    assert slide.um_per_px == um and slide.um_per_px_source == "metadata"
    assert slide.source_files["metadata"] == str(paths["metadata"])
    assert slide.gene_ids is not None and len(slide.gene_ids) == slide.n_genes
    # the pyramid is what OpenSlide reads, and the h5ad pixels land on the same tissue as
    # the HER2ST pixels in the original JPEG (1/2-scale decode)
    import openslide

    with openslide.OpenSlide(str(paths["tif"])) as osr:
        assert osr.level_count == 3
        w, h = osr.dimensions
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(um, rel=1e-6)
        assert ((slide.pixel_x > 0) & (slide.pixel_x < w) & (slide.pixel_y > 0) & (slide.pixel_y < h)).all()
        half = np.asarray(half_resolution(section.image), dtype=float)
        for k in range(0, len(ids), 30):
            x, y = int(slide.pixel_x[k]), int(slide.pixel_y[k])
            tif = np.asarray(osr.read_region((x - 8, y - 8), 0, (16, 16)).convert("RGB"), dtype=float)
            jx, jy = x + int(tr.offset_x), y + int(tr.offset_y)
            assert np.abs(tif - half[jy - 8 : jy + 8, jx - 8 : jx + 8]).mean() < 8.0


def _hest_case(small: Section, img, tmp_path: Path, adata=None, meta: dict | None = None, **entry):
    paths, tr, um = write_hest_sample(tmp_path, small, img, adata=adata)
    if meta is not None:
        m = json.loads(paths["metadata"].read_text())
        m.update(meta)
        paths["metadata"].write_text(json.dumps(m))
    e = {"id": "C5", "patient": "C", "image": "wsis/SPA_C5.tif", "counts": "st/SPA_C5.h5ad", **entry}
    return write_catalog(tmp_path / "cat.yaml", "hest", [e], platform="legacy_st"), tr, um


def test_hest_pixel_size_keys(small, hest_img, tmp_path):
    cat, tr, um = _hest_case(
        small, hest_img, tmp_path / "a", meta={"pixel_size_um_estimated": None, "pixel_size_um_embedded": 0.25}
    )
    assert (_read(cat).um_per_px, _read(cat).um_per_px_source) == (0.25, "metadata")
    cat.reader_options["pixel_size_keys"] = ["pixel_size_um_embedded", "pixel_size_um_estimated"]
    json_path = tmp_path / "a/metadata/SPA_C5.json"
    json_path.write_text(json.dumps({**json.loads(json_path.read_text()), "pixel_size_um_estimated": 1.5}))
    assert _read(cat).um_per_px == 0.25
    cat.reader_options.clear()
    assert _read(cat).um_per_px == 1.5
    cat, *_ = _hest_case(small, hest_img, tmp_path / "b", meta={"pixel_size_um_estimated": float("nan")}, um_per_px=0.7)
    assert (_read(cat).um_per_px, _read(cat).um_per_px_source) == (0.7, "catalog")
    cat, *_ = _hest_case(small, hest_img, tmp_path / "c", meta={"pixel_size_um_estimated": None})
    slide = _read(cat)
    assert slide.um_per_px is None and slide.n_spots == 181
    cat, *_ = _hest_case(small, hest_img, tmp_path / "d", meta={"pixel_size_um_estimated": -1})
    _expect_error(cat, "SPA_C5.json", "pixel_size_um_estimated", "positive")


def _hest_bad_x(small, tr, mutate):
    adata = hest_anndata(small, tr)
    X = adata.X.toarray()
    mutate(X)
    adata.X = sp.csr_matrix(X)
    return adata


@pytest.mark.parametrize("value,what", [(np.nan, "non-finite"), (-1.0, "negative"), (0.25, "non-integer")])
def test_hest_bad_counts(small, hest_img, tmp_path, value, what):
    tr = hest_img.transform

    def put(X):
        X[10, 20] = value

    cat, *_ = _hest_case(small, hest_img, tmp_path / "bad", adata=_hest_bad_x(small, tr, put))
    _expect_error(cat, "SPA_C5.h5ad", "X", what, small.counts.columns[20])


@pytest.mark.filterwarnings("ignore:(Observation|Variable) names are not unique")
def test_hest_duplicates_and_missing(small, hest_img, tmp_path):
    tr = hest_img.transform
    adata = hest_anndata(small, tr)
    adata.obs_names = [adata.obs_names[0]] + list(adata.obs_names[1:])[:-1] + [adata.obs_names[0]]
    cat, *_ = _hest_case(small, hest_img, tmp_path / "dspot", adata=adata)
    _expect_error(cat, "SPA_C5.h5ad", "obs_names", "duplicate spot id", adata.obs_names[0])
    adata = hest_anndata(small, tr)
    adata.var_names = list(adata.var_names[:-1]) + [adata.var_names[0]]
    cat, *_ = _hest_case(small, hest_img, tmp_path / "dgene", adata=adata)
    _expect_error(cat, "SPA_C5.h5ad", "var_names", "duplicate gene name", adata.var_names[0])
    cat, *_ = _hest_case(small, hest_img, tmp_path / "img", image="wsis/OTHER.tif")
    _expect_error(cat, "OTHER.tif", "image", "does not exist")
    cat, *_ = _hest_case(small, hest_img, tmp_path / "meta", metadata="metadata/missing.json")
    _expect_error(cat, "missing.json", "metadata", "does not exist")
    adata = hest_anndata(small, tr)
    del adata.obsm["spatial"]
    cat, *_ = _hest_case(small, hest_img, tmp_path / "nospatial", adata=adata)
    _expect_error(cat, "SPA_C5.h5ad", "obsm['spatial']", "no spot coordinates")


# ----------------------------------------------------------------------------- generic AnnData
def _anndata_case(sec: Section, tmp_path: Path, adata, options: dict | None = None, image=None, **entry):
    tmp_path.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(tmp_path / "C5.h5ad")
    e = {"id": "C5", "patient": "C", "image": str(image or sec.image), "counts": "C5.h5ad", **entry}
    return write_catalog(
        tmp_path / "cat.yaml", "anndata", [e], platform="legacy_st", reader_options=options or {"layer": "counts"}
    )


def test_anndata_matches_her2st(section, tmp_path):
    cat = _anndata_case(section, tmp_path / "a", generic_anndata(section), um_per_px=0.69)
    slide = _read(cat)
    assert_matches_reference(slide, section)
    assert (slide.um_per_px, slide.um_per_px_source) == (0.69, "catalog")
    # X holds log-normalised values: reading X instead of the counts layer is refused
    cat.reader_options.clear()
    _expect_error(cat, "C5.h5ad", "X", "non-integer", "layer")


def test_anndata_derived_array_coords(section, tmp_path):
    cat = _anndata_case(section, tmp_path, generic_anndata(section, with_array_coords=False))
    _expect_error(cat, "cat.yaml", "slides[C5].um_per_px", "array_row")
    cat.um_per_px = section.um_per_px
    slide = _read(cat)
    ids = assert_matches_reference(slide, section, check_array=False)
    step_px = 200.0 / section.um_per_px
    assert np.array_equal(slide.array_col, np.rint(slide.pixel_x / step_px))
    # the derived grid is the HER2ST grid up to a shift for (nearly) every spot
    dc = slide.array_col - section.spots.loc[ids, "x"].to_numpy()
    dr = slide.array_row - section.spots.loc[ids, "y"].to_numpy()
    assert np.mean(dc == np.bincount(dc - dc.min()).argmax() + dc.min()) > 0.95
    assert np.mean(dr == np.bincount(dr - dr.min()).argmax() + dr.min()) > 0.95


@pytest.mark.filterwarnings("ignore:(Observation|Variable) names are not unique")
def test_anndata_bad_input(small, tmp_path):
    a = generic_anndata(small)
    raw = a.layers["counts"].toarray().astype(float)
    raw[3, 4] = np.nan
    a.layers["counts"] = sp.csr_matrix(raw)
    _expect_error(
        _anndata_case(small, tmp_path / "nan", a), "C5.h5ad", "layers['counts']", "non-finite", small.counts.columns[4]
    )
    a = generic_anndata(small)
    raw = a.layers["counts"].toarray()
    raw[0, 2] = -1
    a.layers["counts"] = raw
    _expect_error(_anndata_case(small, tmp_path / "neg", a), "C5.h5ad", "layers['counts']", "negative")
    a = generic_anndata(small)
    a.var_names = [a.var_names[1]] + list(a.var_names[1:])
    _expect_error(_anndata_case(small, tmp_path / "dupg", a), "C5.h5ad", "var_names", "duplicate gene name")
    a = generic_anndata(small)
    a.obs_names = [a.obs_names[1]] + list(a.obs_names[1:])
    _expect_error(_anndata_case(small, tmp_path / "dups", a), "C5.h5ad", "obs_names", "duplicate spot id")
    _expect_error(
        _anndata_case(small, tmp_path / "img", generic_anndata(small), image=tmp_path / "none.jpg"),
        "none.jpg",
        "image",
        "does not exist",
    )
    _expect_error(
        _anndata_case(small, tmp_path / "layer", generic_anndata(small), options={"layer": "raw"}),
        "C5.h5ad",
        "layers['raw']",
        "no such layer",
    )
    a = generic_anndata(small)
    a.obsm["spatial"][5, 1] = np.nan
    _expect_error(_anndata_case(small, tmp_path / "xy", a), "C5.h5ad", "obsm['spatial']", "not finite")
