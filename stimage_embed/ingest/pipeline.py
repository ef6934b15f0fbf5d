"""Ingest a dataset catalog into the store: read, validate, QC, then write atomically.

Every slide of the catalog is read and checked in memory first (reader validation,
image opens, µm/px, coordinates inside the image, tissue QC). Only when all slides
pass is anything written, so bad input never leaves the store half-updated. Each
table is then updated with one atomic commit that replaces the ingested slides' rows.

A (re-)ingest replaces ``genes``, ``expression``, ``spots`` and then ``slides`` (one commit
each) under a pending mark recording each table's version before it; a commit that fails
(disk full) puts the tables back at once, and a killed run is put back by the next writer
(:meth:`Store.recover`), so a failed re-ingest leaves the previous version of the slide
whole. Each slide records an ``image_hash`` (the file's content), a ``geometry_hash`` of
what its tiles depend on (image bytes, spot ids and centres, µm/px, spot diameter) and an
``expression_hash`` of its counts, so ``embed`` and ``compare`` can tell when an input changed
(:mod:`stimage_embed.ingest.fingerprint`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import scipy.sparse as sp
from tqdm.auto import tqdm

from stimage_embed import __version__
from stimage_embed.errors import InputError, StoreError
from stimage_embed.ingest.catalog import DatasetCatalog, load_catalog
from stimage_embed.ingest.fingerprint import expression_hash, geometry_hash, image_fingerprint
from stimage_embed.ingest.geometry import fit_lattice, resolve_um_per_px
from stimage_embed.ingest.readers import get_reader
from stimage_embed.ingest.types import SlideData
from stimage_embed.store import intents
from stimage_embed.store import schema as S
from stimage_embed.store.maintenance import maintain
from stimage_embed.store.store import Store, sql_list
from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.stain import MacenkoNormalizer
from stimage_embed.tiles.tissue import TISSUE_THRESHOLD, spot_tissue_fraction, tissue_mask

log = logging.getLogger(__name__)

THUMBNAIL_MAX_SIDE = 2048
INT32_MAX = np.iinfo(np.int32).max


@dataclass
class PreparedSlide:
    """A slide read and QC'd in memory, ready to be written (arrow tables per store table)."""

    slide_id: str
    tables: dict[str, pa.Table]
    summary: dict


def _padded_fractions(cx: np.ndarray, cy: np.ndarray, size: float, width: int, height: int) -> np.ndarray:
    x0, y0 = cx - size / 2, cy - size / 2
    ix = np.clip(np.minimum(x0 + size, width) - np.maximum(x0, 0), 0, None)
    iy = np.clip(np.minimum(y0 + size, height) - np.maximum(y0, 0), 0, None)
    return 1.0 - ix * iy / (size * size)


def _stain_estimate(thumb: np.ndarray, mask: np.ndarray, image_path: Path) -> str | None:
    """The slide's Macenko estimate (default parameters) on the thumbnail's tissue pixels, as
    JSON for ``slides.stain_estimate``: the embedding pass's per-slide stain fit, made here
    where the thumbnail and its tissue mask already exist. None with too little tissue."""
    try:
        est = MacenkoNormalizer().estimate_dict(thumb, mask=mask, source=str(image_path))
    except InputError:
        return None
    return json.dumps(est | {"thumbnail_px": THUMBNAIL_MAX_SIDE})


@dataclass
class _SlideQC:
    """What the image and the tissue QC tell about a slide's spots (pixels are level-0 px)."""

    width: int
    height: int
    fit: object  # lattice fit of array -> pixel coordinates (``fit_lattice``), or None
    step_um: float | None  # µm per array step (catalog)
    um_per_px: float
    um_source: str
    in_image: np.ndarray  # (n_spots,) bool: centre inside the image
    tissue: np.ndarray  # (n_spots,) fraction of the spot disk on tissue (0 outside the image)
    padded: np.ndarray  # (n_spots,) fraction of the default tile window past the image edge
    passes: np.ndarray  # (n_spots,) bool: in_image and tissue >= threshold
    tissue_area_fraction: float  # of the thumbnail
    stain_estimate: str | None  # JSON, see :func:`_stain_estimate`


def _checked_counts(catalog: DatasetCatalog, data: SlideData) -> sp.csr_matrix:
    """The slide's (spot x gene) raw counts as CSR, after checking it is not empty and fits int32."""
    if data.n_spots == 0:
        raise InputError(
            data.source_files.get("spots", catalog.source),
            "spots",
            f"slide {data.slide_id!r} has no spots under tissue with counts (empty slide)",
        )
    if data.n_genes == 0:
        raise InputError(
            data.source_files.get("counts", catalog.source), "genes", f"slide {data.slide_id!r} has no genes"
        )
    counts = data.counts.tocsr()
    if counts.nnz and counts.data.max() > INT32_MAX:
        raise InputError(
            data.source_files.get("counts"), "counts", f"count {counts.data.max()} exceeds the int32 range of the store"
        )
    return counts


def _check_in_image(data: SlideData, spots_file: object, width: int, height: int) -> np.ndarray:
    """(n_spots,) bool: spot centre inside the ``width`` x ``height`` px image. Raises when
    none is; warns about those outside (they fail QC)."""
    in_image = (data.pixel_x >= 0) & (data.pixel_x < width) & (data.pixel_y >= 0) & (data.pixel_y < height)
    if not in_image.any():
        raise InputError(
            spots_file,
            "pixel_x/pixel_y",
            f"no spot centre of slide {data.slide_id!r} falls inside the {width}x{height} px image "
            f"{data.image_path.name} (x in [{data.pixel_x.min():.0f}, {data.pixel_x.max():.0f}], "
            f"y in [{data.pixel_y.min():.0f}, {data.pixel_y.max():.0f}]); "
            "are the coordinates scaled (e.g. hires/lowres) or for another image?",
        )
    if not in_image.all():
        bad = data.spot_ids[~in_image]
        log.warning(
            "%s: pixel_x/pixel_y: %d spot(s) of slide %s lie outside the %dx%d image and fail QC: %s",
            spots_file,
            len(bad),
            data.slide_id,
            width,
            height,
            list(bad[:5]),
        )
    return in_image


def _slide_qc(catalog: DatasetCatalog, data: SlideData, tissue_threshold: float) -> _SlideQC:
    """Open the image: µm/px, spots inside the image, tissue fraction of each spot (on a
    thumbnail of at most :data:`THUMBNAIL_MAX_SIDE` px), padding and the QC verdict."""
    spots_file = data.source_files.get("spots", catalog.source)
    with SlideImage.open(data.image_path) as image:
        width, height = image.width, image.height
        fit = fit_lattice(data.array_col, data.array_row, data.pixel_x, data.pixel_y)
        step_um = catalog.array_step_um or catalog.spot_pitch_um
        um_per_px, um_source = resolve_um_per_px(
            data.um_per_px,
            data.um_per_px_source,
            image.um_per_px_from_metadata(),
            fit,
            step_um,
            catalog.source,
            data.slide_id,
        )
        in_image = _check_in_image(data, spots_file, width, height)
        thumb, downsample = image.thumbnail(THUMBNAIL_MAX_SIDE)
    mask = tissue_mask(thumb)
    stain_estimate = _stain_estimate(thumb, mask, data.image_path)
    radius_px = catalog.spot_diameter_um / 2 / um_per_px
    tissue = spot_tissue_fraction(mask, downsample, data.pixel_x, data.pixel_y, radius_px=radius_px, shape="disk")
    tissue = np.where(in_image, tissue, 0.0)
    window_px = (catalog.tile_um or catalog.spot_diameter_um) / um_per_px
    padded = _padded_fractions(data.pixel_x, data.pixel_y, window_px, width, height)
    return _SlideQC(
        width=width,
        height=height,
        fit=fit,
        step_um=step_um,
        um_per_px=um_per_px,
        um_source=um_source,
        in_image=in_image,
        tissue=tissue,
        padded=padded,
        passes=in_image & (tissue >= tissue_threshold),
        tissue_area_fraction=float(mask.mean()),
        stain_estimate=stain_estimate,
    )


def _spot_tables(data: SlideData, counts: sp.csr_matrix, total: np.ndarray, qc: _SlideQC) -> dict[str, pa.Table]:
    """``spots``, ``genes`` and ``expression`` rows of the slide (raw integer counts;
    ``total``: (n_spots,) int64 counts per spot)."""
    n = data.n_spots
    sid = [data.slide_id] * n
    csc = counts.tocsc()
    spots = pa.table(
        {
            "slide_id": sid,
            "spot_id": data.spot_ids.astype(str),
            "array_row": data.array_row.astype(np.int32),
            "array_col": data.array_col.astype(np.int32),
            "pixel_x": data.pixel_x.astype(np.float64),
            "pixel_y": data.pixel_y.astype(np.float64),
            "tissue_fraction": qc.tissue.astype(np.float32),
            "padded_fraction": qc.padded.astype(np.float32),
            "in_image": qc.in_image,
            "passes_qc": qc.passes,
            "total_counts": total,
            "n_genes_detected": np.diff(counts.indptr).astype(np.int32),
            "area_um2": pa.nulls(n, pa.float64()) if data.area_um2 is None else np.asarray(data.area_um2, np.float64),
        },
        schema=S.SPOTS,
    )
    gene_ids = pa.nulls(data.n_genes, pa.string()) if data.gene_ids is None else pa.array(data.gene_ids.astype(str))
    genes = pa.table(
        {
            "slide_id": [data.slide_id] * data.n_genes,
            "gene_index": np.arange(data.n_genes, dtype=np.int32),
            "gene": data.genes.astype(str),
            "gene_id": gene_ids,
            "total_counts": np.asarray(csc.sum(0)).ravel().astype(np.int64),
            "n_spots_detected": np.diff(csc.indptr).astype(np.int32),
        },
        schema=S.GENES,
    )
    offsets = pa.array(counts.indptr.astype(np.int32))
    expression = pa.table(
        {
            "slide_id": sid,
            "spot_id": data.spot_ids.astype(str),
            "gene_index": pa.ListArray.from_arrays(offsets, pa.array(counts.indices.astype(np.int32))),
            "counts": pa.ListArray.from_arrays(offsets, pa.array(counts.data.astype(np.int32))),
        },
        schema=S.EXPRESSION,
    )
    return {"spots": spots, "genes": genes, "expression": expression}


def _slide_summary(
    catalog: DatasetCatalog, data: SlideData, qc: _SlideQC, total_counts: int, tissue_threshold: float
) -> dict:
    """The slide's ``slides`` row (schema :data:`stimage_embed.store.schema.SLIDES`)."""
    fit = qc.fit
    image_hash = image_fingerprint(data.image_path)
    full = image_hash.removeprefix("sha256:") if image_hash.startswith("sha256:") else None
    return {
        "dataset": catalog.name,
        "slide_id": data.slide_id,
        "patient": data.patient,
        "platform": catalog.platform,
        "species": catalog.species,
        "tissue": catalog.tissue,
        "preservation": catalog.preservation,
        "image_path": str(data.image_path),
        "image_width": qc.width,
        "image_height": qc.height,
        "um_per_px": qc.um_per_px,
        "um_per_px_source": qc.um_source,
        "um_per_px_estimate": fit.um_per_px(qc.step_um) if fit else None,
        "px_per_array_step_x": fit.px_per_step_x if fit else None,
        "px_per_array_step_y": fit.px_per_step_y if fit else None,
        "spot_diameter_um": catalog.spot_diameter_um,
        "spot_pitch_um": catalog.spot_pitch_um,
        "n_spots": data.n_spots,
        "n_spots_skipped": len(data.skipped_spots),
        "n_spots_pass_qc": int(qc.passes.sum()),
        "n_genes": data.n_genes,
        "total_counts": total_counts,
        "tissue_threshold": tissue_threshold,
        "tissue_area_fraction": qc.tissue_area_fraction,
        "catalog_path": str(catalog.source),
        "source_files": json.dumps(data.source_files, sort_keys=True),
        "package_version": __version__,
        "ingested_at": dt.datetime.now(dt.timezone.utc),
        "geometry_hash": geometry_hash(
            data.image_path,
            data.spot_ids,
            data.pixel_x,
            data.pixel_y,
            qc.um_per_px,
            catalog.tile_um or catalog.spot_diameter_um,
            full,
        ),
        "stain_estimate": qc.stain_estimate,
        "image_hash": image_hash,
        "tile_um": catalog.tile_um,
    }


def prepare_slide(catalog: DatasetCatalog, data: SlideData, tissue_threshold: float) -> PreparedSlide:
    """QC one slide read by its reader and build its rows for every store table."""
    counts = _checked_counts(catalog, data)
    qc = _slide_qc(catalog, data, tissue_threshold)
    total = np.asarray(counts.sum(1)).ravel().astype(np.int64)
    tables = _spot_tables(data, counts, total, qc)
    summary = _slide_summary(catalog, data, qc, int(total.sum()), tissue_threshold)
    summary["expression_hash"] = expression_hash(data.spot_ids, data.genes, counts)
    slides = pa.Table.from_pylist([summary], schema=S.SLIDES)
    return PreparedSlide(data.slide_id, {"slides": slides, **tables}, summary)


def _geometry_hashes(store: Store, ids: list[str]) -> dict[str, str | None]:
    """The recorded ``geometry_hash`` of slides ``ids`` (before a re-ingest overwrites them)."""
    if not store.has_table("slides") or "geometry_hash" not in store.dataset("slides").schema.names:
        return {}
    old = store.read("slides", ["slide_id", "geometry_hash"], where=f"slide_id IN ({sql_list(ids)})")
    return dict(zip(old["slide_id"].to_pylist(), old["geometry_hash"].to_pylist()))


def _invalidate_moved_vectors(store: Store, new_hashes: dict[str, str], old_hashes: dict[str, str | None]) -> None:
    """Delete the vectors of re-ingested slides whose geometry hash changed (moved spots,
    another image or µm/px): they no longer match their spots. ``embed`` cuts them again.
    Vectors already stamped with the new hash stay; a slide recorded without a hash (older
    store) cannot be compared and keeps its vectors. Runs after the slides are committed: if
    it fails, ``embed`` (``provenance.repair``) and ``compare`` still see the vectors as stale."""
    changed = {s: new_hashes[s] for s, h in old_hashes.items() if h is not None and h != new_hashes[s]}
    for table in (t for t in store.table_names() if t.startswith(S.EMBEDDING_PREFIX)):
        stamped = "geometry_hash" in store.dataset(table).schema.names
        for sid, new in changed.items():
            keep = f" AND (geometry_hash IS NULL OR geometry_hash != {sql_list([new])})" if stamped else ""
            n = store.delete(table, f"slide_id = {sql_list([sid])}{keep}")
            if n:
                log.warning(
                    "%s: slide %s moved (its geometry hash changed): %d vector(s) deleted, `embed` cuts them again",
                    table,
                    sid,
                    n,
                )


def _write_slides(store: Store, prepared: list[PreparedSlide]) -> None:
    """Replace the slides' rows in ``genes``, ``expression``, ``spots`` and ``slides`` (one
    commit each, ``slides`` last), all or nothing: each table's version is recorded first in
    a pending mark (``store.intents``); if a commit fails (e.g. disk full) the tables are put
    back to those versions at once, and after a crash the next writer does it
    (:meth:`Store.recover`). So a failed re-ingest leaves the previous slide whole."""
    ids = [p.slide_id for p in prepared]
    names = ("genes", "expression", "spots", "slides")
    before = intents.table_versions(store, names)
    key = f"{int(time.time() * 1e6)}-{os.getpid()}"
    intents.mark(store, "ingest", key, {"versions": before, "slides": ids})
    try:
        for name in names:
            store.replace_slides(name, pa.concat_tables([p.tables[name] for p in prepared]), ids)
    except BaseException:
        try:
            intents.restore_versions(store, before)
            intents.clear(store, "ingest", key)
        except (OSError, RuntimeError, StoreError) as exc:  # e.g. still no space: the next writer restores
            log.error("%s: could not restore the tables yet (%s); the next writer will", store.path, exc)
        raise
    intents.clear(store, "ingest", key)


def ingest(
    catalog: DatasetCatalog | str | Path,
    store: Store,
    tissue_threshold: float = TISSUE_THRESHOLD,
    slides: list[str] | None = None,
    data_root: str | Path | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Ingest (or re-ingest) a catalog's slides. Returns one summary row per slide.

    All slides are validated before the first write; then each table gets one atomic
    commit replacing these slides' rows (re-ingest never duplicates).
    """
    if not isinstance(catalog, DatasetCatalog):
        catalog = load_catalog(catalog, data_root)
    if not 0.0 <= tissue_threshold <= 1.0:
        raise InputError(None, "tissue_threshold", f"must be in [0, 1], got {tissue_threshold}")
    entries = catalog.slides if slides is None else [catalog.slide(s) for s in slides]
    reader = get_reader(catalog.reader)

    with store.writer("ingest"):
        if store.has_table("slides"):
            existing = pl.from_arrow(store.read("slides", ["slide_id", "dataset"]))
            clash = existing.filter(
                pl.col("slide_id").is_in([e.id for e in entries]) & (pl.col("dataset") != catalog.name)
            )
            if clash.height:
                raise StoreError(
                    f"{catalog.source}: slides.id: slide id(s) {clash['slide_id'].to_list()} "
                    "already belong to dataset(s) "
                    f"{clash['dataset'].unique().to_list()} in {store.path}; slide ids must be unique across the store"
                )

        prepared: list[PreparedSlide] = []
        for entry in tqdm(entries, desc=f"ingest {catalog.name}", unit="slide", disable=not progress):
            data = reader(catalog, entry)
            prepared.append(prepare_slide(catalog, data, tissue_threshold))
        ids = [p.slide_id for p in prepared]
        old_hashes = _geometry_hashes(store, ids)
        _write_slides(store, prepared)
        _invalidate_moved_vectors(store, {p.slide_id: p.summary["geometry_hash"] for p in prepared}, old_hashes)
        # upkeep after the writes: slide_id index, compaction, old versions (store/maintenance.py)
        maintain(store, ["genes", "expression", "spots", "slides"])
    return pl.DataFrame([p.summary for p in prepared]).drop(
        "source_files", "catalog_path", "package_version", "stain_estimate", "image_hash", "expression_hash"
    )
