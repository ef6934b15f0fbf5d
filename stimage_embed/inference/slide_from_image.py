"""An image without counts becomes a slide of the store: one ``slides`` row and one
``spots`` row per grid tile (no ``genes``/``expression`` rows).

* Whole-slide formats (svs, ndpi, mrxs, tiled/pyramidal TIFF ...) open through OpenSlide;
  µm/px comes from the file's metadata (``openslide.mpp-x``), or ``--um-per-px``.
* JPEG/PNG open through the raster path; µm/px must be given (``--um-per-px``).

The slide's ``spot_diameter_um`` is the tile width (µm) and ``spot_pitch_um`` the grid
pitch, so the embedding pass cuts the model's tile width; ``platform`` and, by default,
``dataset`` are ``image_only``; ``n_genes = 0`` and count columns are NULL.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from stimage_embed import __version__
from stimage_embed.errors import InputError, StoreError
from stimage_embed.inference.grid import TileGrid
from stimage_embed.inference.scale import SCALE_HINT, compare_scale, raster_um_per_px
from stimage_embed.ingest.pipeline import geometry_hash
from stimage_embed.paths import SAFE_ID_RULE, safe_id
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list
from stimage_embed.tiles.image import RASTER_SUFFIXES, SlideImage, raster_size

log = logging.getLogger(__name__)

IMAGE_ONLY = "image_only"
THUMBNAIL_MAX_SIDE = 2048


@dataclass
class ImageInfo:
    """What infer needs from an image: path, level-0 size (px), µm/px and its source,
    backend (``raster`` or ``openslide:<vendor>``), a thumbnail and its downsample
    (level-0 px per thumbnail px)."""

    path: Path
    width: int
    height: int
    um_per_px: float
    um_per_px_source: str
    backend: str
    thumbnail: np.ndarray
    downsample: float


def probe_image(path: str | Path, um_per_px: float | None = None) -> Path:
    """Cheap checks before decoding anything: the file exists, a JPEG/PNG has a valid header,
    and µm/px is known (given, or a whole-slide format that may carry it). Returns the
    resolved path; raises :class:`InputError` naming the file and what is wrong."""
    import openslide

    path = Path(path).expanduser().resolve()
    if um_per_px is not None and not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise InputError(path, "--um-per-px", f"must be positive and finite, got {um_per_px}")
    if not path.is_file():
        raise InputError(path, "image", "image file does not exist")
    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError as exc:
        raise InputError(path, "image", f"cannot read image header: {exc}") from exc
    if vendor is None:
        if path.suffix.lower() in RASTER_SUFFIXES:
            raster_size(path)  # InputError for a file that is not a JPEG/PNG
        if um_per_px is None and raster_um_per_px(path) is None:
            raise InputError(
                path,
                "--um-per-px",
                f"µm per pixel is unknown (this JPEG/PNG/raster carries no usable scale); give it with --um-per-px: "
                f"{SCALE_HINT}",
            )
    return path


def read_image(path: str | Path, um_per_px: float | None = None, thumbnail_side: int = THUMBNAIL_MAX_SIDE) -> ImageInfo:
    """Open ``path``, resolve µm/px (``um_per_px`` > file metadata), take a thumbnail; close it.

    Whole-slide files are read region by region (the thumbnail from a low pyramid level);
    plain rasters are decoded once here (and again, per worker, by the embedding pass).
    Raises :class:`InputError` for an unreadable image or missing / invalid µm/px.
    """
    path = probe_image(path, um_per_px)
    with SlideImage.open(path) as img:
        meta, where = img.um_per_px_from_metadata(), "openslide.mpp-x metadata"
        if meta is None and img.backend == "raster":
            meta, where = raster_um_per_px(path), "resolution tag"
        if um_per_px is None and meta is None:
            raise InputError(
                path,
                "--um-per-px",
                f"µm per pixel is unknown (a {img.backend} slide without scale metadata); give it with --um-per-px: "
                f"{SCALE_HINT}",
            )
        if um_per_px is not None and meta is not None:
            compare_scale(path, um_per_px, meta, where)
        value, source = (float(um_per_px), "argument") if um_per_px is not None else (float(meta), "metadata")
        thumb, ds = img.thumbnail(thumbnail_side)
        return ImageInfo(
            path, img.width, img.height, value, source, img.backend, np.ascontiguousarray(thumb), float(ds)
        )


def spots_table(slide_id: str, grid: TileGrid, width: int, height: int) -> pa.Table:
    """``spots`` rows of the grid tiles (counts columns NULL)."""
    n = len(grid)
    return pa.table(
        {
            "slide_id": [slide_id] * n,
            "spot_id": grid.spot_ids.astype(str),
            "array_row": grid.row.astype(np.int32),
            "array_col": grid.col.astype(np.int32),
            "pixel_x": grid.x.astype(np.float64),
            "pixel_y": grid.y.astype(np.float64),
            "tissue_fraction": grid.tissue_fraction.astype(np.float32),
            "padded_fraction": grid.padded_fraction(width, height).astype(np.float32),
            "in_image": np.ones(n, bool),
            "passes_qc": grid.passes_qc,
            "total_counts": pa.nulls(n, pa.int64()),
            "n_genes_detected": pa.nulls(n, pa.int32()),
            "area_um2": pa.nulls(n, pa.float64()),  # a grid tile: no own area
        },
        schema=S.SPOTS,
    )


def slides_table(
    slide_id: str,
    image: ImageInfo,
    grid: TileGrid,
    tissue_threshold: float,
    mask_fraction: float,
    dataset: str = IMAGE_ONLY,
    patient: str | None = None,
) -> pa.Table:
    """The ``slides`` row of an image-only slide."""
    row = {
        "dataset": dataset,
        "slide_id": slide_id,
        "patient": patient or slide_id,
        "platform": IMAGE_ONLY,
        "species": None,
        "tissue": None,
        "preservation": "unknown",
        "image_path": str(image.path),
        "image_width": image.width,
        "image_height": image.height,
        "um_per_px": image.um_per_px,
        "um_per_px_source": image.um_per_px_source,
        "um_per_px_estimate": None,
        "px_per_array_step_x": grid.pitch_px,
        "px_per_array_step_y": grid.pitch_px,
        "spot_diameter_um": grid.tile_um,
        "spot_pitch_um": grid.pitch_um,
        "n_spots": len(grid),
        "n_spots_skipped": 0,
        "n_spots_pass_qc": int(grid.passes_qc.sum()),
        "n_genes": 0,
        "total_counts": None,
        "tissue_threshold": tissue_threshold,
        "tissue_area_fraction": mask_fraction,
        "catalog_path": None,
        "source_files": json.dumps({"image": str(image.path), "backend": image.backend}),
        "package_version": __version__,
        "ingested_at": dt.datetime.now(dt.timezone.utc),
        "geometry_hash": geometry_hash(image.path, grid.spot_ids, grid.x, grid.y, image.um_per_px, grid.tile_um),
    }
    return pa.Table.from_pylist([row], schema=S.SLIDES)


def check_slide_id(store: Store, slide_id: str, image_path: Path) -> bool:
    """Refuse an id that belongs to a slide with counts; True if an image-only slide with
    this id exists already (it will be replaced)."""
    if not safe_id(slide_id):
        raise InputError(image_path, "--slide-id", f"invalid slide id {slide_id!r} ({SAFE_ID_RULE})")
    if not store.has_table("slides"):
        return False
    row = pl.from_arrow(
        store.read("slides", ["slide_id", "dataset", "platform"], where=f"slide_id IN ({sql_list([slide_id])})")
    )
    if row.height == 0:
        return False
    if row["platform"][0] != IMAGE_ONLY:
        raise InputError(
            image_path,
            "--slide-id",
            f"slide {slide_id!r} already exists in the store with counts (dataset {row['dataset'][0]!r}); "
            "choose another --slide-id",
        )
    return True


def forget_slide_outputs(store: Store, slide_id: str) -> None:
    """Delete a slide's vectors (every backbone), predictions (expression, labels) and pseudo-bulk rows."""
    where = f"slide_id IN ({sql_list([slide_id])})"
    for name in store.table_names():
        if name.startswith(S.EMBEDDING_PREFIX) or name in ("predictions", "pseudobulk", "label_predictions"):
            store.delete(name, where)


def register_slide(
    store: Store,
    slide_id: str,
    image: ImageInfo,
    grid: TileGrid,
    tissue_threshold: float,
    mask_fraction: float,
    dataset: str = IMAGE_ONLY,
    patient: str | None = None,
) -> bool:
    """Write (or replace) the image-only slide's ``spots`` and ``slides`` rows; call it under
    the store's writer lock. As ``ingest``, the ``slides`` row is the commit marker: an old
    one is removed first and the new one written last. Returns True when a previous
    registration had the same geometry (image bytes, tiles, µm/px, tile width: its
    ``geometry_hash``), so its cached vectors and predictions stay valid; otherwise the
    slide's old vectors, predictions and pseudo-bulk rows are deleted."""
    spots = spots_table(slide_id, grid, image.width, image.height)
    slides = slides_table(slide_id, image, grid, tissue_threshold, mask_fraction, dataset, patient)
    existed = check_slide_id(store, slide_id, image.path)
    keep = False
    if existed:
        old = store.read("slides", ["geometry_hash"], where=f"slide_id IN ({sql_list([slide_id])})")[
            "geometry_hash"
        ].to_pylist()
        keep = bool(old) and old[0] == slides["geometry_hash"][0].as_py()
        if not keep:
            log.info(
                "slide %s: image or grid changed since the last infer; dropping its cached vectors and predictions",
                slide_id,
            )
            forget_slide_outputs(store, slide_id)
        store.delete("slides", f"slide_id IN ({sql_list([slide_id])})")
    try:
        store.replace_slides("spots", spots, [slide_id])
        store.replace_slides("slides", slides, [slide_id])
    except (OSError, ValueError) as exc:
        raise StoreError(f"{store.path}: cannot register slide {slide_id!r}: {exc}") from exc
    return keep
