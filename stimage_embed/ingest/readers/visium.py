"""10x Visium / Visium HD: a Space Ranger ``outs/`` folder.

Catalog entry fields
--------------------
* ``image``: the full-resolution H&E image given to Space Ranger (the frame of the
  ``pxl_*_in_fullres`` coordinates); must exist.
* ``counts``: ``filtered_feature_bc_matrix.h5`` (10x HDF5 v3 layout: ``matrix/data``,
  ``indices``, ``indptr``, ``shape``, ``barcodes``, ``features/{id,name,feature_type}``)
  or the ``filtered_feature_bc_matrix/`` folder (``matrix.mtx[.gz]``,
  ``barcodes.tsv[.gz]``, ``features.tsv[.gz]``; Space Ranger < 2 ``genes.tsv`` also
  read). A raw matrix works too: barcodes not under tissue are dropped.
  Only features of type ``"Gene Expression"`` are kept (antibody / probe-control
  features are not genes).
* ``spots``: the ``spatial/`` folder or one positions file. In a folder the first found
  of ``tissue_positions.parquet`` (Visium HD / SR >= 3), ``tissue_positions.csv``
  (SR >= 2, with header) and ``tissue_positions_list.csv`` (SR < 2, no header) is used.
  Columns: ``barcode, in_tissue, array_row, array_col, pxl_row_in_fullres,
  pxl_col_in_fullres``. Defaults to ``spatial/`` next to ``counts``.
* ``metadata``: ``scalefactors_json.json``; defaults to the one in the spatial folder.

Output
------
Spots = barcodes with ``in_tissue == 1`` that have a count column. ``pixel_x =
pxl_col_in_fullres``, ``pixel_y = pxl_row_in_fullres`` (full-resolution pixels).
In-tissue barcodes without counts are reported in ``skipped_spots``; a count-matrix
barcode without any positions row is an error (wrong positions file).

µm per pixel
------------
``entry.um_per_px`` > ``catalog.um_per_px`` (source ``"catalog"``) > scalefactors
(source ``"scalefactors"``): ``microns_per_pixel`` when present (Visium HD), else
``D / spot_diameter_fullres`` where ``D`` = ``reader_options.spot_diameter_fullres_um``,
default **65 µm**: Space Ranger documents ``spot_diameter_fullres`` as the pixels spanning
"a theoretical 65 µm spot" (Space Ranger 1.3 output docs), not the 55 µm capture spot;
using 55 under-estimates µm/px by ~15 %. Without scalefactors ``um_per_px`` is ``None``
and the ingest pipeline estimates it from the spot lattice.

``reader_options``
------------------
* ``duplicate_genes``: ``"make_unique"`` (default; like scanpy's
  ``var_names_make_unique``, logged), ``"sum"`` or ``"error"``. Real 10x feature lists
  repeat some symbols under different Ensembl ids, so renaming is the default here.
* ``spot_diameter_fullres_um``: see above.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
from stimage_embed.ingest.readers._validate import (
    DUPLICATE_GENE_POLICIES,
    N_EXAMPLES,
    option_choice,
    require_file,
    resolve_duplicate_genes,
    validate_coords,
    validate_unique,
)
from stimage_embed.ingest.readers.tenx_counts import read_counts
from stimage_embed.ingest.types import SlideData

log = logging.getLogger(__name__)

#: Positions files in order of preference inside a ``spatial/`` folder.
POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
SCALEFACTORS_FILE = "scalefactors_json.json"
#: Space Ranger: ``spot_diameter_fullres`` spans "a theoretical 65 µm spot".
SPOT_DIAMETER_FULLRES_UM = 65.0


# ----------------------------------------------------------------------------- spots
def find_positions_file(spots: Path) -> Path:
    """The positions file itself, or the preferred one inside a ``spatial/`` folder."""
    if spots.is_file():
        return spots
    if spots.is_dir():
        for name in POSITION_FILES:
            if (spots / name).is_file():
                return spots / name
        raise InputError(
            spots, "spots", f"no positions file in the spatial folder (looked for {', '.join(POSITION_FILES)})"
        )
    raise InputError(spots, "spots", "positions file or spatial folder does not exist")


def read_positions(path: Path) -> pl.DataFrame:
    """Read a Space Ranger positions table (parquet, csv with header, or headerless csv).

    A csv is read with a header when its first field is ``barcode``; otherwise the
    columns are taken in the Space Ranger 1.x order (:data:`POSITION_COLUMNS`).
    """
    try:
        if path.suffix == ".parquet":
            df = pl.read_parquet(path)
        else:
            with open(path, encoding="utf-8") as fh:
                first = fh.readline()
            if first.split(",")[0].strip().strip('"') == "barcode":
                df = pl.read_csv(path, infer_schema_length=0)
            else:
                df = pl.read_csv(path, has_header=False, infer_schema_length=0)
                if df.width != len(POSITION_COLUMNS):
                    raise InputError(
                        path,
                        "columns",
                        f"headerless positions file must have {len(POSITION_COLUMNS)} "
                        f"columns {POSITION_COLUMNS}, found {df.width}",
                    )
                df.columns = list(POSITION_COLUMNS)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        raise InputError(path, "spots", f"cannot parse positions file: {exc}") from exc
    missing = [c for c in POSITION_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, ",".join(missing), f"positions file lacks column(s) {missing}; has {df.columns}")
    casts = {
        "barcode": pl.Utf8,
        "in_tissue": pl.Int64,
        "array_row": pl.Int64,
        "array_col": pl.Int64,
        "pxl_row_in_fullres": pl.Float64,
        "pxl_col_in_fullres": pl.Float64,
    }
    out = {}
    for col, dtype in casts.items():
        try:
            out[col] = df[col].cast(dtype, strict=True)
        except pl.exceptions.PolarsError as exc:
            raise InputError(path, col, f"cannot read as {dtype}: {exc}") from exc
    df = pl.DataFrame(out)
    validate_unique(df["barcode"].to_numpy(), path, "barcode", "barcode")
    return df


# ----------------------------------------------------------------------------- µm / px
def um_per_px_from_scalefactors(path: Path, spot_diameter_um: float = SPOT_DIAMETER_FULLRES_UM) -> float | None:
    """µm per full-resolution pixel from ``scalefactors_json.json`` (see module doc)."""
    try:
        sf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, "metadata", f"not a readable JSON file: {exc}") from exc
    if not isinstance(sf, dict):
        raise InputError(path, "metadata", "scalefactors must be a JSON object")
    for key, value in (
        ("microns_per_pixel", sf.get("microns_per_pixel")),
        ("spot_diameter_fullres", sf.get("spot_diameter_fullres")),
    ):
        if value is None:
            continue
        try:
            v = float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(path, key, f"not a number: {value!r}") from exc
        if not np.isfinite(v) or v <= 0:
            raise InputError(path, key, f"must be a positive number, got {value!r}")
        return v if key == "microns_per_pixel" else spot_diameter_um / v
    log.warning("%s: neither microns_per_pixel nor spot_diameter_fullres; µm/px left to the lattice estimate", path)
    return None


# ----------------------------------------------------------------------------- reader
def _slide_files(catalog: DatasetCatalog, entry: SlideEntry) -> tuple[Path, Path, Path, Path | None]:
    """``(image, counts, positions, scalefactors or None)`` of one slide: the catalog's paths,
    the positions in ``<counts folder>/spatial`` and the scale factors next to them by default."""
    where = f"slides[{entry.id}]"
    image = require_file(catalog.resolve(entry.image), f"{where}.image", catalog.source, "visium")
    counts_path = require_file(
        catalog.resolve(entry.counts), f"{where}.counts", catalog.source, "visium", directory_ok=True
    )
    spots_arg = catalog.resolve(entry.spots) if entry.spots else counts_path.parent / "spatial"
    pos_path = find_positions_file(spots_arg)
    if entry.metadata:
        sf_path: Path | None = require_file(
            catalog.resolve(entry.metadata), f"{where}.metadata", catalog.source, "visium"
        )
    else:
        guess = pos_path.parent / SCALEFACTORS_FILE
        sf_path = guess if guess.is_file() else None
    return image, counts_path, pos_path, sf_path


def _positions_of(barcodes: np.ndarray, pos: pl.DataFrame, counts_path: Path, pos_path: Path) -> np.ndarray:
    """The positions row of every barcode of the count matrix (each must have one)."""
    row = pd.Index(pos["barcode"].to_numpy()).get_indexer(barcodes)
    if (row < 0).any():
        missing = barcodes[row < 0]
        raise InputError(
            counts_path,
            "barcodes",
            f"{len(missing)} barcode(s) of the count matrix have no row in the "
            f"positions file {pos_path}: {missing[:N_EXAMPLES].tolist()}; is it the positions file of "
            "another sample?",
        )
    return row


def _skipped_without_counts(pos: pl.DataFrame, row: np.ndarray, pos_path: Path, counts_path: Path) -> dict[str, str]:
    """``{barcode: reason}`` of the in-tissue positions that have no counts (logged once)."""
    has_counts = np.zeros(pos.height, dtype=bool)
    has_counts[row] = True
    no_counts = pos["barcode"].to_numpy()[(pos["in_tissue"].to_numpy() == 1) & ~has_counts]
    skipped = {b: f"in_tissue=1 in {pos_path.name} but no counts in {counts_path.name}" for b in no_counts}
    if skipped:
        log.warning(
            "%s: %d in-tissue barcode(s) without counts skipped: %s",
            counts_path,
            len(skipped),
            no_counts[:N_EXAMPLES].tolist(),
        )
    return skipped


def read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData:
    """One Visium slide: the in-tissue barcodes that have counts, their full-resolution pixel
    centres and array indices, raw counts, and µm/px (catalog, else scale factors)."""
    opts = catalog.reader_options
    policy = option_choice(opts, "duplicate_genes", "make_unique", DUPLICATE_GENE_POLICIES, catalog.source)
    diameter_um = float(opts.get("spot_diameter_fullres_um", SPOT_DIAMETER_FULLRES_UM))
    image, counts_path, pos_path, sf_path = _slide_files(catalog, entry)

    barcodes, genes, gene_ids, counts = read_counts(counts_path)
    genes, gene_ids, counts = resolve_duplicate_genes(genes, gene_ids, counts, policy, counts_path, "features/name")
    pos = read_positions(pos_path)
    row = _positions_of(barcodes, pos, counts_path, pos_path)
    keep = np.flatnonzero(pos["in_tissue"].to_numpy()[row] == 1)
    if len(keep) < len(barcodes):
        log.info(
            "%s: %d barcode(s) with counts are not under tissue (in_tissue=0) and are dropped",
            counts_path,
            len(barcodes) - len(keep),
        )
    rows = row[keep]
    px = pos["pxl_col_in_fullres"].to_numpy()[rows]
    py = pos["pxl_row_in_fullres"].to_numpy()[rows]
    validate_coords(px, py, pos_path, "pxl_col_in_fullres/pxl_row_in_fullres", ids=barcodes[keep])
    skipped = _skipped_without_counts(pos, row, pos_path, counts_path)

    um, source = entry.um_per_px or catalog.um_per_px, "catalog"
    if um is None and sf_path is not None:
        um, source = um_per_px_from_scalefactors(sf_path, diameter_um), "scalefactors"
    sources = {"image": str(image), "counts": str(counts_path), "spots": str(pos_path)}
    if sf_path is not None:
        sources["metadata"] = str(sf_path)
    return SlideData(
        slide_id=entry.id,
        patient=entry.patient,
        image_path=image,
        spot_ids=barcodes[keep],
        array_row=pos["array_row"].to_numpy()[rows],
        array_col=pos["array_col"].to_numpy()[rows],
        pixel_x=px.astype(np.float64),
        pixel_y=py.astype(np.float64),
        counts=counts[keep],
        genes=genes,
        gene_ids=gene_ids,
        um_per_px=um,
        um_per_px_source=source if um is not None else None,
        skipped_spots=skipped,
        source_files=sources,
    )
