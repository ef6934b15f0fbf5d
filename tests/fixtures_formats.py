"""Fixture builders: the real HER2ST section C5 written in other published layouts.

Every builder takes plain tables (so a test can corrupt them first) and writes files the
way the producing software does:

* Space Ranger ``outs/``: ``filtered_feature_bc_matrix.h5`` (10x HDF5 v3 schema, written
  with h5py), ``filtered_feature_bc_matrix/`` (``scipy.io.mmwrite`` + gzip), the three
  positions variants (``tissue_positions_list.csv`` headerless, ``tissue_positions.csv``
  with header, ``tissue_positions.parquet``) and ``scalefactors_json.json``.
* A HEST-1k sample: ``st/<id>.h5ad``, ``wsis/<id>.tif`` (tiled pyramidal TIFF with
  reduced levels in successive IFDs, the generic-TIFF layout OpenSlide reads) and
  ``metadata/<id>.json``. The TIFF is a crop of the real ``C5.jpg`` decoded at half
  resolution, so the h5ad's pixel centres are ``(pixel - offset) / 2``.
* A generic h5ad (``X`` log-normalised, raw counts in ``layers['counts']``) next to the
  real ``C5.jpg``.

The spots and counts are the real HER2ST ones. Synthetic parts, needed only because the
legacy ST files lack them: 10x barcodes (random, seeded), Ensembl-like gene ids, a few
off-tissue positions and two antibody-capture features (the reader must drop both).
"""

from __future__ import annotations

import gzip
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp
import yaml
from PIL import Image

from stimage_embed.ingest.catalog import DatasetCatalog, load_catalog

#: µm spanned by Space Ranger's ``spot_diameter_fullres`` (its docs: "theoretical 65 µm spot").
SR_SPOT_DIAMETER_UM = 65.0
LEGACY_PITCH_UM = 200.0


@dataclass
class Section:
    """A real HER2ST section as published (the reference every reader is compared to)."""

    slide_id: str
    image: Path
    counts: pd.DataFrame  # spots x genes, raw int64 counts, index = "{x}x{y}" spot id
    spots: pd.DataFrame  # selected spots, index = spot id; columns x, y, pixel_x, pixel_y
    um_per_px: float  # least-squares lattice estimate (200 µm pitch), full-res image
    barcodes: dict[str, str] = field(default_factory=dict)  # spot id -> synthetic 10x barcode
    gene_ids: np.ndarray | None = None  # synthetic Ensembl-like id per gene
    spare_barcodes: list[str] = field(default_factory=list)  # unused barcodes (off-tissue positions)

    @property
    def spot_of_barcode(self) -> dict[str, str]:
        return {b: s for s, b in self.barcodes.items()}

    def subset(self, n_genes: int) -> Section:
        """The same section restricted to its first ``n_genes`` genes (faster bad-input cases)."""
        return Section(
            self.slide_id,
            self.image,
            self.counts.iloc[:, :n_genes].copy(),
            self.spots,
            self.um_per_px,
            self.barcodes,
            None if self.gene_ids is None else self.gene_ids[:n_genes],
            self.spare_barcodes,
        )


def load_section(data_root: Path, slide_id: str = "C5") -> Section:
    base = data_root / "her2st"
    counts = pd.read_csv(base / "counts" / f"{slide_id}.tsv.gz", sep="\t", index_col=0)
    counts.index = counts.index.astype(str)
    spots = pd.read_csv(base / "spots" / f"{slide_id}_selection.tsv", sep="\t")
    spots = spots[spots["selected"] == 1]
    spots.index = spots["x"].astype(str) + "x" + spots["y"].astype(str)
    design = np.column_stack([spots["x"], spots["y"], np.ones(len(spots))]).astype(float)
    coef, *_ = np.linalg.lstsq(design, spots[["pixel_x", "pixel_y"]].to_numpy(float), rcond=None)
    px_per_step = np.sqrt(np.hypot(*coef[0]) * np.hypot(*coef[1]))
    rng = np.random.default_rng(5)
    letters = np.array(list("ACGT"))
    codes = ["".join(letters[rng.integers(0, 4, 16)]) + "-1" for _ in range(len(spots) + 50)]
    codes = list(dict.fromkeys(codes))
    barcodes = dict(zip(spots.index, codes))
    gene_ids = np.array([f"ENSG{i:011d}" for i in range(counts.shape[1])])
    return Section(
        slide_id,
        base / "images" / f"{slide_id}.jpg",
        counts.astype(np.int64),
        spots,
        float(LEGACY_PITCH_UM / px_per_step),
        barcodes,
        gene_ids,
        codes[len(spots) :],
    )


# ----------------------------------------------------------------------------- Space Ranger
@dataclass
class VisiumTables:
    """Tables as Space Ranger would hold them; edit them before writing to corrupt input."""

    counts: pd.DataFrame  # barcodes x features (int, or float to hold NaN)
    gene_ids: np.ndarray
    feature_types: np.ndarray
    positions: pd.DataFrame  # POSITION_COLUMNS order


def visium_tables(sec: Section, n_off_tissue: int = 4, n_antibodies: int = 2) -> VisiumTables:
    counts = sec.counts.copy()
    counts.index = [sec.barcodes[s] for s in counts.index]
    rng = np.random.default_rng(0)
    for i in range(n_antibodies):
        counts[f"CD{i + 3}_TotalSeqB"] = rng.integers(0, 50, len(counts))
    types = np.array(["Gene Expression"] * sec.counts.shape[1] + ["Antibody Capture"] * n_antibodies)
    ids = np.concatenate([sec.gene_ids, [f"AB{i}" for i in range(n_antibodies)]])
    pos = pd.DataFrame(
        {
            "barcode": [sec.barcodes[s] for s in sec.spots.index],
            "in_tissue": 1,
            "array_row": sec.spots["y"].to_numpy(),
            "array_col": sec.spots["x"].to_numpy(),
            "pxl_row_in_fullres": sec.spots["pixel_y"].to_numpy(),
            "pxl_col_in_fullres": sec.spots["pixel_x"].to_numpy(),
        }
    )
    spare = sec.spare_barcodes[:n_off_tissue]
    off = pd.DataFrame(
        {
            "barcode": spare,
            "in_tissue": 0,
            "array_row": np.arange(len(spare)),
            "array_col": 0,
            "pxl_row_in_fullres": 100.0 + 291.0 * np.arange(len(spare)),
            "pxl_col_in_fullres": 100.0,
        }
    )
    return VisiumTables(counts, ids, types, pd.concat([pos, off], ignore_index=True))


def write_10x_h5(path: Path, counts: pd.DataFrame, gene_ids: np.ndarray, feature_types: np.ndarray) -> Path:
    """10x HDF5 v3: ``matrix/`` with a features x barcodes CSC matrix and ``features/``."""
    values = counts.to_numpy()
    csc = sp.csc_matrix(values.T)  # features x barcodes, barcode-major; NaN entries are kept as stored values
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        m = f.create_group("matrix")
        m.create_dataset(
            "data", data=csc.data.astype(np.float32 if values.dtype.kind == "f" else np.int32), compression="gzip"
        )
        m.create_dataset("indices", data=csc.indices.astype(np.int64), compression="gzip")
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        m.create_dataset("barcodes", data=np.array(counts.index, dtype="S"))
        feats = m.create_group("features")
        feats.create_dataset("id", data=np.array(gene_ids, dtype="S"))
        feats.create_dataset("name", data=np.array(counts.columns, dtype="S"))
        feats.create_dataset("feature_type", data=np.array(feature_types, dtype="S"))
        feats.create_dataset("genome", data=np.array(["GRCh38"] * len(gene_ids), dtype="S"))
        feats.create_dataset("_all_tag_keys", data=np.array(["genome"], dtype="S"))
    return path


def write_10x_mtx(folder: Path, counts: pd.DataFrame, gene_ids: np.ndarray, feature_types: np.ndarray) -> Path:
    """``matrix.mtx.gz`` (features x barcodes), ``barcodes.tsv.gz``, ``features.tsv.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    values = counts.to_numpy().T
    m = sp.coo_matrix(values)
    field_ = "real" if values.dtype.kind == "f" else "integer"
    raw = folder / "matrix.mtx"
    scipy.io.mmwrite(raw, m, field=field_)
    with open(raw, "rb") as src, gzip.open(folder / "matrix.mtx.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as fh:
        fh.write("".join(f"{b}\n" for b in counts.index))
    with gzip.open(folder / "features.tsv.gz", "wt") as fh:
        fh.write("".join(f"{i}\t{n}\t{t}\n" for i, n, t in zip(gene_ids, counts.columns, feature_types)))
    return folder


def write_positions(spatial: Path, positions: pd.DataFrame, variant: str) -> Path:
    """``variant``: ``"list"`` (SR < 2, no header), ``"csv"`` (SR >= 2), ``"parquet"`` (SR >= 3 / HD)."""
    spatial.mkdir(parents=True, exist_ok=True)
    if variant == "list":
        path = spatial / "tissue_positions_list.csv"
        positions.to_csv(path, header=False, index=False)
    elif variant == "csv":
        path = spatial / "tissue_positions.csv"
        positions.to_csv(path, index=False)
    elif variant == "parquet":
        path = spatial / "tissue_positions.parquet"
        positions.to_parquet(path, index=False)
    else:
        raise ValueError(variant)
    return path


def write_scalefactors(spatial: Path, um_per_px: float) -> Path:
    path = spatial / "scalefactors_json.json"
    path.write_text(
        json.dumps(
            {
                "spot_diameter_fullres": SR_SPOT_DIAMETER_UM / um_per_px,
                "tissue_hires_scalef": 0.2,
                "fiducial_diameter_fullres": 1.6 * SR_SPOT_DIAMETER_UM / um_per_px,
                "tissue_lowres_scalef": 0.06,
            }
        )
    )
    return path


def write_spaceranger(
    outs: Path, tables: VisiumTables, *, positions: str = "csv", counts: str = "h5", um_per_px: float | None = None
) -> dict[str, Path]:
    """A Space Ranger ``outs/`` folder. Returns the paths written (``counts``, ``spatial``, ...)."""
    spatial = outs / "spatial"
    pos = write_positions(spatial, tables.positions, positions)
    if counts == "h5":
        c = write_10x_h5(outs / "filtered_feature_bc_matrix.h5", tables.counts, tables.gene_ids, tables.feature_types)
    else:
        c = write_10x_mtx(outs / "filtered_feature_bc_matrix", tables.counts, tables.gene_ids, tables.feature_types)
    paths = {"counts": c, "spatial": spatial, "positions": pos}
    if um_per_px is not None:
        paths["scalefactors"] = write_scalefactors(spatial, um_per_px)
    return paths


# ----------------------------------------------------------------------------- HEST
@dataclass
class HestTransform:
    """h5ad pixel = (HER2ST pixel / 2) - offset; the TIFF is the real image at half size."""

    offset_x: float
    offset_y: float
    scale: float = 0.5

    def apply(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(x) * self.scale - self.offset_x, np.asarray(y) * self.scale - self.offset_y


def half_resolution(jpeg: Path) -> Image.Image:
    """The JPEG decoded at 1/2 scale in the DCT domain (fast; the same decode every time)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a 92 MP H&E scan is legitimate
        with Image.open(jpeg) as im:
            im.draft("RGB", (im.width // 2, im.height // 2))
            return im.convert("RGB")


def write_pyramidal_tiff(path: Path, rgb: np.ndarray, um_per_px: float, n_levels: int = 3, tile: int = 256) -> Path:
    """Tiled JPEG pyramid, reduced levels (2x each) in successive IFDs, resolution tags in µm."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    res = 1e4 / um_per_px  # pixels per centimetre
    level = rgb
    with tifffile.TiffWriter(path) as tif:
        for i in range(n_levels):
            tif.write(
                level,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=1 if i else 0,
                resolution=(res / 2**i, res / 2**i),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path


def hest_anndata(sec: Section, tr: HestTransform, barcoded: bool = False, n_off_tissue: int = 3) -> ad.AnnData:
    """The h5ad HEST writes for an ST sample: X raw counts (float32 CSR), obs with array
    and pixel columns plus ``in_tissue``, ``obsm['spatial']`` in full-res px of the TIFF."""
    ids = sec.counts.index.intersection(sec.spots.index, sort=False)
    spots = sec.spots.loc[ids]
    x, y = tr.apply(spots["pixel_x"].to_numpy(), spots["pixel_y"].to_numpy())
    obs = pd.DataFrame(
        {
            "in_tissue": 1,
            "array_row": spots["y"].to_numpy(),
            "array_col": spots["x"].to_numpy(),
            "pxl_col_in_fullres": x,
            "pxl_row_in_fullres": y,
        },
        index=[sec.barcodes[i] for i in ids] if barcoded else list(ids),
    )
    X = sp.csr_matrix(sec.counts.loc[ids].to_numpy(np.float32))
    xy = np.column_stack([x, y])
    if n_off_tissue:
        off = pd.DataFrame(
            {
                "in_tissue": 0,
                "array_row": np.arange(n_off_tissue),
                "array_col": 0,
                "pxl_col_in_fullres": 10.0,
                "pxl_row_in_fullres": 10.0 + np.arange(n_off_tissue),
            },
            index=[f"off{i}" for i in range(n_off_tissue)],
        )
        obs = pd.concat([obs, off])
        X = sp.vstack([X, sp.csr_matrix((n_off_tissue, X.shape[1]), dtype=np.float32)]).tocsr()
        xy = np.vstack([xy, off[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()])
    var = pd.DataFrame({"gene_ids": sec.gene_ids}, index=sec.counts.columns)
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = xy
    return adata


@dataclass
class HestImage:
    """The sample's full-resolution image: a crop of the real JPEG at half scale."""

    rgb: np.ndarray
    transform: HestTransform
    um_per_px: float


def hest_image(sec: Section, margin: int = 200) -> HestImage:
    half = half_resolution(sec.image)
    x0 = int(max(sec.spots["pixel_x"].min() / 2 - margin, 0))
    y0 = int(max(sec.spots["pixel_y"].min() / 2 - margin, 0))
    x1 = int(min(sec.spots["pixel_x"].max() / 2 + margin, half.width))
    y1 = int(min(sec.spots["pixel_y"].max() / 2 + margin, half.height))
    tr = HestTransform(float(x0), float(y0))
    return HestImage(np.asarray(half.crop((x0, y0, x1, y1))), tr, sec.um_per_px / tr.scale)


def write_hest_sample(
    root: Path, sec: Section, image: HestImage | None = None, sample_id: str = "SPA_C5", adata: ad.AnnData | None = None
) -> tuple[dict[str, Path], HestTransform, float]:
    """``st/``, ``wsis/``, ``metadata/`` for one sample. Returns (paths, transform, µm/px of the TIFF)."""
    image = image or hest_image(sec)
    rgb, tr, um = image.rgb, image.transform, image.um_per_px
    paths = {
        "h5ad": root / "st" / f"{sample_id}.h5ad",
        "tif": root / "wsis" / f"{sample_id}.tif",
        "metadata": root / "metadata" / f"{sample_id}.json",
    }
    write_pyramidal_tiff(paths["tif"], rgb, um)
    if adata is None:
        adata = hest_anndata(sec, tr)
    thumb = np.asarray(Image.fromarray(rgb).reduce(8))
    adata.uns["spatial"] = {
        "ST": {
            "images": {"downscaled_fullres": thumb},
            "scalefactors": {"tissue_downscaled_fullres_scalef": 1 / 8, "spot_diameter_fullres": 100 / um},
        }
    }
    paths["h5ad"].parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(paths["h5ad"])
    paths["metadata"].parent.mkdir(parents=True, exist_ok=True)
    paths["metadata"].write_text(
        json.dumps(
            {
                "id": sample_id,
                "st_technology": "Spatial Transcriptomics",
                "species": "Homo sapiens",
                "organ": "Breast",
                "pixel_size_um_estimated": um,
                "pixel_size_um_embedded": None,
                "spot_diameter": 100.0,
                "inter_spot_dist": 200.0,
                "fullres_px_width": rgb.shape[1],
                "fullres_px_height": rgb.shape[0],
                "spots_under_tissue": int(adata.n_obs),
                "patient": "C",
            }
        )
    )
    return paths, tr, um


# ----------------------------------------------------------------------------- generic AnnData
def generic_anndata(sec: Section, with_array_coords: bool = True) -> ad.AnnData:
    """Raw counts in ``layers['counts']``, log1p CP10k in ``X`` (as after scanpy preprocessing)."""
    ids = sec.counts.index.intersection(sec.spots.index, sort=False)
    raw = sp.csr_matrix(sec.counts.loc[ids].to_numpy(np.int64))
    lib = np.maximum(np.asarray(raw.sum(1)).ravel(), 1)  # gene subsets leave some spots empty
    norm = sp.diags(1e4 / lib) @ raw.astype(np.float64)
    obs = pd.DataFrame(index=list(ids))
    if with_array_coords:
        obs["array_row"] = sec.spots.loc[ids, "y"].to_numpy()
        obs["array_col"] = sec.spots.loc[ids, "x"].to_numpy()
    adata = ad.AnnData(X=norm.log1p().tocsr().astype(np.float32), obs=obs, var=pd.DataFrame(index=sec.counts.columns))
    adata.layers["counts"] = raw
    adata.obsm["spatial"] = sec.spots.loc[ids, ["pixel_x", "pixel_y"]].to_numpy(float)
    return adata


# ----------------------------------------------------------------------------- catalogs
def write_catalog(path: Path, reader: str, slides: list[dict], platform: str = "visium", **extra) -> DatasetCatalog:
    """Write a catalog YAML whose root is its own folder and load it."""
    cat = {
        "name": f"fixture_{reader}",
        "reader": reader,
        "root": ".",
        "platform": platform,
        "spot_diameter_um": 100 if platform == "legacy_st" else 55,
        "spot_pitch_um": 200 if platform == "legacy_st" else 100,
        "species": "human",
        "tissue": "breast",
        "slides": slides,
    }
    cat.update(extra)
    path.write_text(yaml.safe_dump(cat))
    return load_catalog(path)
