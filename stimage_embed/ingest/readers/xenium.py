"""10x Xenium: cells (or Visium-like pseudo-spots) on an H&E registered to the Xenium frame.

Catalog fields
--------------
* ``slides[].counts``: ``cell_feature_matrix.h5`` (10x HDF5 v3) or the
  ``cell_feature_matrix/`` mtx folder. Only ``Gene Expression`` features are kept, and
  any feature whose name starts with a control prefix (:data:`CONTROL_PREFIXES`:
  ``NegControlProbe_``, ``NegControlCodeword_``, ``BLANK_``, ``UnassignedCodeword_``,
  ``DeprecatedCodeword_``, ``Intergenic_``, ``antisense_``) is dropped whatever its type.
* ``slides[].spots``: ``cells.parquet`` (or ``cells.csv[.gz]``): ``cell_id``,
  ``x_centroid``, ``y_centroid`` (**µm**, Xenium frame), ``cell_area`` (µm²). Defaults to
  ``cells.parquet`` next to the matrix.
* ``slides[].image``: the H&E image; ``slides[].alignment``: 10x's H&E alignment matrix
  CSV (Xenium Explorer's ``*_imagealignment.csv``): a 3x3 affine ``M`` taking an H&E
  pixel ``(x, y, 1)`` to Xenium morphology-image pixels, which are
  ``reader_options.xenium_pixel_um`` µm (default 0.2125, the Xenium morphology pixel).
  A cell at ``(x_um, y_um)`` is drawn at H&E pixel ``M^-1 (x_um / p, y_um / p, 1)``.
  Without ``alignment`` the image is taken to be in the morphology frame (``M = I``).
* ``pseudo_spots_um`` (dataset): when set, cells are grouped onto a hex lattice of
  ``spot_pitch_um`` (Visium: 100 µm) with spots of this diameter (Visium: 55 µm); a cell
  whose centroid lies within ``pseudo_spots_um / 2`` of a lattice point belongs to that
  spot, cells between spots are not captured (as on a Visium slide) and counts are summed.

µm per H&E pixel = ``p * sqrt(|det M[:2, :2]|)`` unless the catalog gives ``um_per_px``.
Cells outside the image are an error (``reader_options.cells_outside: drop`` drops them).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from stimage_embed.errors import InputError
from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
from stimage_embed.ingest.readers._validate import N_EXAMPLES, option_choice, require_file, validate_coords
from stimage_embed.ingest.readers.tenx_counts import read_counts
from stimage_embed.ingest.types import SlideData
from stimage_embed.ingest.xenium_geometry import hex_pseudo_spots, read_alignment, um_to_image_px
from stimage_embed.tiles.image import SlideImage

log = logging.getLogger(__name__)

CONTROL_PREFIXES = (
    "NegControlProbe_",
    "NegControlCodeword_",
    "BLANK_",
    "UnassignedCodeword_",
    "DeprecatedCodeword_",
    "Intergenic_",
    "antisense_",
)
XENIUM_PIXEL_UM = 0.2125
CELL_COLUMNS = ("cell_id", "x_centroid", "y_centroid", "cell_area")


def read_cells(path: Path) -> pd.DataFrame:
    """``cells.parquet`` / ``cells.csv[.gz]`` with :data:`CELL_COLUMNS` (µm, µm²)."""
    try:
        df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, "spots", f"cannot read the Xenium cells table: {exc}") from exc
    missing = [c for c in CELL_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, ",".join(missing), f"cells table lacks column(s) {missing}; has {list(df.columns)}")
    df = df[list(CELL_COLUMNS)].copy()
    df["cell_id"] = df["cell_id"].map(lambda v: v.decode() if isinstance(v, bytes) else str(v))
    if df["cell_id"].duplicated().any():
        raise InputError(
            path, "cell_id", f"duplicate cell ids {df['cell_id'][df['cell_id'].duplicated()][:5].tolist()}"
        )
    return df.set_index("cell_id")


def gene_counts(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]:
    """(cell ids, genes, gene ids, cells x genes raw counts) with control features dropped."""
    cells, genes, ids, counts = read_counts(path)
    keep = np.array([not g.startswith(CONTROL_PREFIXES) for g in genes])
    if not keep.any():
        raise InputError(path, "features/name", "every feature is a control probe / codeword")
    if not keep.all():
        log.info("%s: dropping %d control feature(s): %s", path, (~keep).sum(), genes[~keep][:N_EXAMPLES].tolist())
    return cells, genes[keep], ids[keep], counts[:, np.flatnonzero(keep)].tocsr()


def _cell_table(catalog: DatasetCatalog, entry: SlideEntry, counts_path: Path) -> tuple[Path, pd.DataFrame]:
    if entry.spots:
        cells_path = require_file(catalog.resolve(entry.spots), f"slides[{entry.id}].spots", catalog.source, "xenium")
    else:
        folder = counts_path.parent
        cells_path = next(
            (folder / n for n in ("cells.parquet", "cells.csv.gz", "cells.csv") if (folder / n).is_file()), None
        )
        if cells_path is None:
            raise InputError(folder, "spots", "no cells.parquet / cells.csv.gz next to the cell-feature matrix")
    return cells_path, read_cells(cells_path)


def _inside(px: np.ndarray, py: np.ndarray, image: Path, ids: np.ndarray, where: Path, policy: str) -> np.ndarray:
    """(n,) bool: the centre lies inside the image; raises on any outside unless ``policy == "drop"``."""
    with SlideImage.open(image) as img:
        w, h = img.width, img.height
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    if not inside.all() and policy == "error":
        raise InputError(
            where,
            "x_centroid/y_centroid",
            f"{int((~inside).sum())} of {len(px)} cell(s) fall outside the {w}x{h} px image {image.name} "
            f"(e.g. {ids[~inside][:N_EXAMPLES].tolist()}); wrong alignment matrix or image? "
            "(reader_options.cells_outside: drop keeps the others)",
        )
    return inside


def read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData:
    """Read one Xenium slide: one spot per cell, or per hex pseudo-spot (see the module doc)."""
    opts = catalog.reader_options
    where = f"slides[{entry.id}]"
    policy = option_choice(opts, "cells_outside", "error", ("error", "drop"), catalog.source)
    pixel_um = float(opts.get("xenium_pixel_um", XENIUM_PIXEL_UM))
    image = require_file(catalog.resolve(entry.image), f"{where}.image", catalog.source, "xenium")
    counts_path = require_file(
        catalog.resolve(entry.counts), f"{where}.counts", catalog.source, "xenium", directory_ok=True
    )
    cell_ids, genes, gene_ids, counts = gene_counts(counts_path)
    cells_path, cells = _cell_table(catalog, entry, counts_path)
    row = cells.index.get_indexer(cell_ids)
    if (row < 0).any():
        raise InputError(
            counts_path, "barcodes", f"{int((row < 0).sum())} cell(s) not in {cells_path.name}: {cell_ids[row < 0][:5]}"
        )
    xy_um = cells[["x_centroid", "y_centroid"]].to_numpy(np.float64)[row]
    area = cells["cell_area"].to_numpy(np.float64)[row]
    validate_coords(xy_um[:, 0], xy_um[:, 1], cells_path, "x_centroid/y_centroid", ids=cell_ids)
    if entry.alignment:
        align_path = require_file(catalog.resolve(entry.alignment), f"{where}.alignment", catalog.source, "xenium")
        matrix = read_alignment(align_path)
    else:
        align_path, matrix = None, np.eye(3)
    px, py = um_to_image_px(xy_um, matrix, pixel_um)
    inside = _inside(px, py, image, cell_ids, align_path or cells_path, policy)
    um = entry.um_per_px or catalog.um_per_px or pixel_um * float(np.sqrt(abs(np.linalg.det(matrix[:2, :2]))))
    pitch = catalog.spot_pitch_um
    if catalog.pseudo_spots_um:
        ps = hex_pseudo_spots(xy_um[inside], counts[np.flatnonzero(inside)], pitch, catalog.pseudo_spots_um)
        ids, ar, ac, counts = ps.spot_ids, ps.array_row, ps.array_col, ps.counts
        px, py = um_to_image_px(ps.centres_um, matrix, pixel_um)
        area = np.full(len(ids), np.pi * (catalog.pseudo_spots_um / 2) ** 2)
        log.info("%s: %d cells grouped into %d pseudo-spots", cells_path, ps.n_cells, len(ids))
    else:
        keep = np.flatnonzero(inside)
        ids, counts, px, py, area = cell_ids[keep], counts[keep], px[keep], py[keep], area[keep]
        ar, ac = (np.rint(xy_um[keep, 1] / pitch).astype(np.int64), np.rint(xy_um[keep, 0] / pitch).astype(np.int64))
    sources = {"image": str(image), "counts": str(counts_path), "spots": str(cells_path)}
    if align_path is not None:
        sources["alignment"] = str(align_path)
    return SlideData(
        slide_id=entry.id,
        patient=entry.patient,
        image_path=image,
        spot_ids=np.asarray(ids).astype(str),
        array_row=ar,
        array_col=ac,
        pixel_x=px,
        pixel_y=py,
        counts=counts.tocsr(),
        genes=genes,
        gene_ids=gene_ids,
        um_per_px=um,
        um_per_px_source="catalog" if (entry.um_per_px or catalog.um_per_px) else "alignment",
        source_files=sources,
        area_um2=area,
    )
