"""Generic AnnData (``.h5ad``) with spot centres in ``obsm['spatial']``, plus an image.

Catalog entry fields
--------------------
* ``counts``: the ``.h5ad`` file.
* ``image``: the full-resolution H&E image whose pixel frame ``obsm['spatial']`` uses.
* ``um_per_px`` (entry, else ``catalog.um_per_px``): µm per full-resolution pixel. The
  h5ad carries no reliable scale, so it comes from the catalog; without it the ingest
  pipeline estimates it from the spot lattice (only possible with ``array_row/col``).

Conventions
-----------
* ``obsm['spatial']``: (n_spots, 2) **full-resolution pixel** centres in (x, y) =
  (column, row) order, the scanpy / squidpy / HEST convention. Coordinates scaled to a
  hires/lowres image are *not* detected here; the pipeline flags spots outside the image.
* Counts: ``X`` or ``layers[<reader_options.layer>]``; must be raw integer counts (float
  storage of whole numbers is accepted). Normalised / log values raise an error naming
  the field, so pass ``layer: counts`` when ``X`` holds normalised data.
* Spot ids: ``obs_names``; genes: ``var_names`` or ``var[<reader_options.gene_symbols>]``;
  gene ids from ``var['gene_ids']`` / ``var['gene_id']`` when present.
* Under tissue: when ``obs`` has ``in_tissue``, only spots with ``in_tissue == 1`` are kept.
* Array coordinates: ``obs['array_row']`` / ``obs['array_col']`` when present; else
  derived as ``round(pixel_y / step_px)`` / ``round(pixel_x / step_px)`` with
  ``step_px = (catalog.array_step_um or catalog.spot_pitch_um) / um_per_px``. This
  assumes an axis-aligned lattice; it is only used for grid bookkeeping (neighbours,
  the pipeline's lattice fit), never for pixel positions.

``reader_options``: ``layer`` (default ``None`` = ``X``), ``spatial_key`` (default
``"spatial"``), ``gene_symbols`` (a ``var`` column, default ``None`` = ``var_names``),
``duplicate_genes`` (``"error"`` default, ``"make_unique"``, ``"sum"``; AnnData var
names are expected to be unique already).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from stimage_embed.errors import InputError
from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
from stimage_embed.ingest.readers._validate import (
    DUPLICATE_GENE_POLICIES,
    option_choice,
    require_file,
    resolve_duplicate_genes,
    validate_coords,
    validate_counts,
    validate_unique,
)
from stimage_embed.ingest.types import SlideData

log = logging.getLogger(__name__)

GENE_ID_COLUMNS = ("gene_ids", "gene_id")


@dataclass
class SpotTable:
    """Spots read from an h5ad, already restricted to spots under tissue."""

    spot_ids: np.ndarray
    pixel_x: np.ndarray  # full-resolution px
    pixel_y: np.ndarray  # full-resolution px
    array_row: np.ndarray | None  # None when obs has no array coordinates
    array_col: np.ndarray | None
    counts: sp.csr_matrix  # raw integer counts, int64
    genes: np.ndarray
    gene_ids: np.ndarray | None


def _count_matrix(adata: ad.AnnData, path: Path, layer: str | None) -> tuple[np.ndarray | sp.spmatrix, str]:
    """``(matrix, field)``: ``X`` or ``layers[layer]`` (dense or sparse), checked to exist."""
    field = "X" if layer is None else f"layers[{layer!r}]"
    if layer is None:
        x = adata.X
    elif layer not in adata.layers:
        raise InputError(path, field, f"no such layer; layers: {list(adata.layers.keys())}")
    else:
        x = adata.layers[layer]
    if x is None:
        raise InputError(path, field, "no count matrix")
    if not (sp.issparse(x) or isinstance(x, np.ndarray)):
        raise InputError(path, field, f"unsupported matrix type {type(x).__name__}")
    return x, field


def _gene_names(adata: ad.AnnData, path: Path, gene_symbols: str | None) -> tuple[np.ndarray, str, np.ndarray | None]:
    """``(genes, field, gene_ids)``: ``var_names`` or the ``var[gene_symbols]`` column, and the
    gene ids of the first :data:`GENE_ID_COLUMNS` column present (else ``None``)."""
    if gene_symbols is None:
        genes, gene_field = np.asarray(adata.var_names).astype(str), "var_names"
    elif gene_symbols in adata.var.columns:
        genes, gene_field = adata.var[gene_symbols].astype(str).to_numpy(), f"var[{gene_symbols!r}]"
    else:
        raise InputError(path, f"var[{gene_symbols!r}]", f"no such column; var columns: {list(adata.var.columns)}")
    id_col = next((c for c in GENE_ID_COLUMNS if c in adata.var.columns), None)
    return genes, gene_field, (adata.var[id_col].astype(str).to_numpy() if id_col else None)


def _raw_counts(adata: ad.AnnData, x, path: Path, field: str, layer: str | None, spot_ids, genes) -> sp.csr_matrix:
    """``x`` validated as raw counts (a hint to pick the raw layer when ``X`` is normalised),
    as int64 CSR without stored zeros."""
    try:
        validate_counts(x, path, field, row_names=spot_ids, col_names=genes)
    except InputError as exc:
        if layer is None and "non-integer" in exc.reason:
            hint = (
                f"; X looks normalised: set reader_options.layer to the raw-count layer "
                f"(layers: {list(adata.layers.keys())})"
            )
            raise InputError(path, field, exc.reason + hint) from exc
        raise
    counts = sp.csr_matrix(x, dtype=np.int64)
    counts.eliminate_zeros()
    return counts


def _array_coords(obs: pd.DataFrame, keep: np.ndarray, path: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``obs``' integer ``array_row`` / ``array_col`` of the kept spots, ``(None, None)`` without them."""
    if "array_row" not in obs.columns or "array_col" not in obs.columns:
        return None, None
    try:
        rows = pd.to_numeric(obs["array_row"], errors="raise").to_numpy()[keep]
        cols = pd.to_numeric(obs["array_col"], errors="raise").to_numpy()[keep]
    except (ValueError, TypeError) as exc:
        raise InputError(path, "obs[array_row/array_col]", f"not numeric: {exc}") from exc
    if not (np.isfinite(rows).all() and np.isfinite(cols).all()):
        raise InputError(path, "obs[array_row/array_col]", "array coordinates must be finite")
    return rows.astype(np.int64), cols.astype(np.int64)


def read_h5ad_spots(
    path: Path,
    layer: str | None = None,
    spatial_key: str = "spatial",
    gene_symbols: str | None = None,
    duplicate_genes: str = "error",
) -> SpotTable:
    """Read and validate the spots, counts and genes of an h5ad (see module doc)."""
    try:
        adata = ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(path, "counts", f"not a readable .h5ad file: {exc}") from exc
    x, field = _count_matrix(adata, path, layer)
    spot_ids = np.asarray(adata.obs_names).astype(str)
    genes, gene_field, gene_ids = _gene_names(adata, path, gene_symbols)
    counts = _raw_counts(adata, x, path, field, layer, spot_ids, genes)
    validate_unique(spot_ids, path, "obs_names", "spot id")
    genes, gene_ids, counts = resolve_duplicate_genes(genes, gene_ids, counts, duplicate_genes, path, gene_field)

    sfield = f"obsm[{spatial_key!r}]"
    if spatial_key not in adata.obsm:
        raise InputError(path, sfield, f"no spot coordinates; obsm keys: {list(adata.obsm.keys())}")
    xy = np.asarray(adata.obsm[spatial_key], dtype=float)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise InputError(path, sfield, f"expected (n_spots, 2) pixel coordinates, got shape {xy.shape}")

    obs = adata.obs
    keep = np.ones(adata.n_obs, dtype=bool)
    if "in_tissue" in obs.columns:
        keep = pd.to_numeric(obs["in_tissue"], errors="coerce").to_numpy() == 1
        if not keep.all():
            log.info("%s: %d spot(s) with in_tissue != 1 dropped", path, int((~keep).sum()))
    validate_coords(xy[keep, 0], xy[keep, 1], path, sfield, ids=spot_ids[keep])
    rows, cols = _array_coords(obs, keep, path)
    kept = counts[np.flatnonzero(keep)]
    return SpotTable(spot_ids[keep], xy[keep, 0].copy(), xy[keep, 1].copy(), rows, cols, kept, genes, gene_ids)


def derive_array_coords(pixel_x: np.ndarray, pixel_y: np.ndarray, step_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(array_row, array_col) = round(pixel_y / step_px), round(pixel_x / step_px)."""
    return np.rint(pixel_y / step_px).astype(np.int64), np.rint(pixel_x / step_px).astype(np.int64)


def build_slide(
    catalog: DatasetCatalog,
    entry: SlideEntry,
    table: SpotTable,
    image: Path,
    h5ad: Path,
    um_per_px: float | None,
    um_source: str | None,
    sources: dict[str, str],
) -> SlideData:
    """SlideData from a :class:`SpotTable`; derives array coordinates when missing."""
    rows, cols = table.array_row, table.array_col
    if rows is None or cols is None:
        if um_per_px is None:
            raise InputError(
                catalog.source,
                f"slides[{entry.id}].um_per_px",
                f"{h5ad.name} has no obs['array_row'/'array_col'], so array coordinates are derived "
                "from pixel centres; that needs µm per pixel: set um_per_px",
            )
        step_px = (catalog.array_step_um or catalog.spot_pitch_um) / um_per_px
        rows, cols = derive_array_coords(table.pixel_x, table.pixel_y, step_px)
        log.info("%s: array coordinates derived from pixel centres with a step of %.1f px", h5ad, step_px)
    return SlideData(
        slide_id=entry.id,
        patient=entry.patient,
        image_path=image,
        spot_ids=table.spot_ids,
        array_row=rows,
        array_col=cols,
        pixel_x=table.pixel_x,
        pixel_y=table.pixel_y,
        counts=table.counts,
        genes=table.genes,
        gene_ids=table.gene_ids,
        um_per_px=um_per_px,
        um_per_px_source=um_source if um_per_px is not None else None,
        source_files=sources,
    )


def read_options(catalog: DatasetCatalog) -> dict:
    """The h5ad options shared by the ``anndata`` and ``hest`` readers, checked."""
    opts = catalog.reader_options
    for key in ("layer", "gene_symbols"):
        if opts.get(key) is not None and not isinstance(opts[key], str):
            raise InputError(catalog.source, f"reader_options.{key}", f"must be a string, got {opts[key]!r}")
    spatial_key = opts.get("spatial_key", "spatial")
    if not isinstance(spatial_key, str):
        raise InputError(catalog.source, "reader_options.spatial_key", f"must be a string, got {spatial_key!r}")
    return {
        "layer": opts.get("layer"),
        "spatial_key": spatial_key,
        "gene_symbols": opts.get("gene_symbols"),
        "duplicate_genes": option_choice(opts, "duplicate_genes", "error", DUPLICATE_GENE_POLICIES, catalog.source),
    }


def read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData:
    options = read_options(catalog)
    where = f"slides[{entry.id}]"
    image = require_file(catalog.resolve(entry.image), f"{where}.image", catalog.source, "anndata")
    h5ad = require_file(catalog.resolve(entry.counts), f"{where}.counts", catalog.source, "anndata")
    table = read_h5ad_spots(h5ad, **options)
    um = entry.um_per_px or catalog.um_per_px
    return build_slide(
        catalog,
        entry,
        table,
        image,
        h5ad,
        um,
        "catalog",
        {"image": str(image), "counts": str(h5ad), "spots": str(h5ad)},
    )
