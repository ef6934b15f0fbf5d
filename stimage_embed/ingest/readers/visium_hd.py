"""10x Visium HD: Space Ranger ``binned_outputs/square_XXXum`` folders, summed to ``bin_um``.

Catalog fields
--------------
* ``bin_um`` (dataset): the bin size, µm, a multiple of 2 (8, 16, 32 ...; default 8). A
  ``square_XXXum`` folder of that size is read as is; otherwise the largest folder whose
  size divides ``bin_um`` (at worst ``square_002um``) is summed ``k x k`` bins at a time,
  ``k = bin_um / size``: bin ``(r, c)`` of the coarse grid holds the source bins with
  ``array_row // k == r`` and ``array_col // k == c`` (the way Space Ranger's 8 / 16 µm
  bins group the 2 µm ones). Counts are summed exactly (integer sparse product).
* ``slides[].counts``: the ``binned_outputs/`` folder (or one ``square_XXXum`` inside it).
* ``slides[].image``: the full-resolution H&E given to Space Ranger (the frame of
  ``pxl_*_in_fullres``); must exist.

Each ``square_XXXum`` holds ``filtered_feature_bc_matrix.h5`` (or the mtx folder),
``spatial/tissue_positions.parquet`` (header row; ``pxl_row_in_fullres``,
``pxl_col_in_fullres`` in full-resolution px) and ``spatial/scalefactors_json.json``
(``microns_per_pixel``, µm per full-resolution px).

Output
------
One spot per coarse bin holding at least one in-tissue source bin with counts; id
``s_{bin:03d}um_{row:05d}_{col:05d}-1``; centre = mean full-resolution pixel centre of all
``k x k`` source bins listed in the positions file (in or out of tissue), which is the
coarse bin's centre; ``area_um2 = bin_um²``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import scipy.sparse as sp

from stimage_embed.errors import CatalogError, InputError
from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
from stimage_embed.ingest.readers._validate import (
    DUPLICATE_GENE_POLICIES,
    N_EXAMPLES,
    option_choice,
    require_file,
    resolve_duplicate_genes,
    validate_coords,
)
from stimage_embed.ingest.readers.tenx_counts import read_counts
from stimage_embed.ingest.readers.visium import SCALEFACTORS_FILE, read_positions, um_per_px_from_scalefactors
from stimage_embed.ingest.types import SlideData

log = logging.getLogger(__name__)

NATIVE_BIN_UM = 2
DEFAULT_BIN_UM = 8
_FOLDER = re.compile(r"^square_(\d{3})um$")


def bin_folders(binned: Path) -> dict[int, Path]:
    """``{bin size in µm: folder}`` of the ``square_XXXum`` folders in ``binned`` (or ``binned``
    itself when it is one)."""
    m = _FOLDER.match(binned.name)
    if m:
        return {int(m.group(1)): binned}
    found = {}
    if binned.is_dir():
        for d in binned.iterdir():
            mm = _FOLDER.match(d.name)
            if mm and d.is_dir():
                found[int(mm.group(1))] = d
    return found


def choose_source(binned: Path, bin_um: int) -> tuple[int, Path]:
    """(source bin size µm, its folder): the largest ``square_XXXum`` dividing ``bin_um``."""
    folders = bin_folders(binned)
    usable = sorted(s for s in folders if bin_um % s == 0)
    if not usable:
        have = ", ".join(f.name for f in folders.values()) or "none"
        raise InputError(
            binned / f"square_{bin_um:03d}um",
            "counts",
            f"missing bin folder: no square_{bin_um:03d}um nor a finer square_XXXum dividing {bin_um} µm "
            f"(e.g. square_{NATIVE_BIN_UM:03d}um) in {binned} (found: {have})",
        )
    return usable[-1], folders[usable[-1]]


def _counts_path(folder: Path) -> Path:
    h5 = folder / "filtered_feature_bc_matrix.h5"
    mtx = folder / "filtered_feature_bc_matrix"
    if h5.is_file():
        return h5
    if mtx.is_dir():
        return mtx
    raise InputError(folder, "counts", "no filtered_feature_bc_matrix.h5 nor filtered_feature_bc_matrix/ folder")


def aggregation_matrix(rows: np.ndarray, cols: np.ndarray, k: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """(coarse x source 0/1 CSR, coarse rows, coarse cols) grouping source bins
    ``(rows, cols)`` (array indices) ``k x k`` at a time; coarse bins sorted by (row, col)."""
    key = np.column_stack([rows // k, cols // k]).astype(np.int64)
    uniq, inverse = np.unique(key, axis=0, return_inverse=True)
    inverse = inverse.ravel()
    m = sp.csr_matrix((np.ones(len(rows), np.int64), (inverse, np.arange(len(rows)))), shape=(len(uniq), len(rows)))
    return m, uniq[:, 0], uniq[:, 1]


def _coarse_centres(pos: pl.DataFrame, k: int) -> pl.DataFrame:
    """Mean full-res px centre of every coarse bin over all listed source bins."""
    return (
        pos.with_columns((pl.col("array_row") // k).alias("r"), (pl.col("array_col") // k).alias("c"))
        .group_by("r", "c")
        .agg(pl.col("pxl_col_in_fullres").mean().alias("x"), pl.col("pxl_row_in_fullres").mean().alias("y"))
    )


def _bin_um(catalog: DatasetCatalog) -> int:
    b = DEFAULT_BIN_UM if catalog.bin_um is None else catalog.bin_um
    if abs(b / NATIVE_BIN_UM - round(b / NATIVE_BIN_UM)) > 1e-9:
        raise CatalogError(catalog.source, "bin_um", f"must be a multiple of {NATIVE_BIN_UM} µm, got {b:g}")
    return int(round(b))


def read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData:
    """Read one Visium HD slide at ``catalog.bin_um`` (see the module doc)."""
    policy = option_choice(
        catalog.reader_options, "duplicate_genes", "make_unique", DUPLICATE_GENE_POLICIES, catalog.source
    )
    where = f"slides[{entry.id}]"
    bin_um = _bin_um(catalog)
    for name in ("spots", "metadata"):
        if getattr(entry, name):
            raise CatalogError(
                catalog.source, f"{where}.{name}", "visium_hd reads spatial/ inside the bin folder: remove"
            )
    image = require_file(catalog.resolve(entry.image), f"{where}.image", catalog.source, "visium_hd")
    binned = require_file(
        catalog.resolve(entry.counts), f"{where}.counts", catalog.source, "visium_hd", directory_ok=True
    )
    src_um, folder = choose_source(binned, bin_um)
    k = bin_um // src_um
    counts_path = _counts_path(folder)
    pos_path = folder / "spatial" / "tissue_positions.parquet"
    if not pos_path.is_file():
        raise InputError(pos_path, "spots", "missing Visium HD positions file (spatial/tissue_positions.parquet)")
    barcodes, genes, gene_ids, counts = read_counts(counts_path)
    genes, gene_ids, counts = resolve_duplicate_genes(genes, gene_ids, counts, policy, counts_path, "features/name")
    pos = read_positions(pos_path)
    row = pd.Index(pos["barcode"].to_numpy()).get_indexer(barcodes)
    if (row < 0).any():
        raise InputError(
            counts_path,
            "barcodes",
            f"{int((row < 0).sum())} barcode(s) have no row in {pos_path}: {barcodes[row < 0][:N_EXAMPLES].tolist()}",
        )
    keep = np.flatnonzero(pos["in_tissue"].to_numpy()[row] == 1)
    rows = row[keep]
    ar, ac = pos["array_row"].to_numpy()[rows], pos["array_col"].to_numpy()[rows]
    agg, cr, cc = aggregation_matrix(ar, ac, k)
    summed = (agg @ counts[keep]).tocsr()
    summed.sort_indices()
    centres = _coarse_centres(pos, k)
    look = pl.DataFrame({"r": cr, "c": cc}).join(centres, on=["r", "c"], how="left", maintain_order="left")
    px, py = look["x"].to_numpy().astype(np.float64), look["y"].to_numpy().astype(np.float64)
    validate_coords(px, py, pos_path, "pxl_col_in_fullres/pxl_row_in_fullres")
    ids = np.array([f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(cr, cc)], dtype=object).astype(str)
    um, source = entry.um_per_px or catalog.um_per_px, "catalog"
    sf_path = pos_path.parent / SCALEFACTORS_FILE
    if um is None and sf_path.is_file():
        um, source = um_per_px_from_scalefactors(sf_path), "scalefactors"
    log.info(
        "%s: %d square_%03dum bins summed %dx%d into %d %d-µm bins", folder, len(keep), src_um, k, k, len(ids), bin_um
    )
    return SlideData(
        slide_id=entry.id,
        patient=entry.patient,
        image_path=image,
        spot_ids=ids,
        array_row=cr.astype(np.int64),
        array_col=cc.astype(np.int64),
        pixel_x=px,
        pixel_y=py,
        counts=summed,
        genes=genes,
        gene_ids=gene_ids,
        um_per_px=um,
        um_per_px_source=source if um is not None else None,
        source_files={"image": str(image), "counts": str(counts_path), "spots": str(pos_path)}
        | ({"metadata": str(sf_path)} if sf_path.is_file() else {}),
        area_um2=np.full(len(ids), float(bin_um) ** 2),
    )
