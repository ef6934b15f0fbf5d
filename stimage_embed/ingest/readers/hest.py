"""One HEST-1k sample (Jaume et al., NeurIPS 2024; github.com/mahmoodlab/HEST).

A HEST-1k download holds, per sample id: ``st/<id>.h5ad`` (AnnData, ``X`` raw counts,
``obsm['spatial']`` spot centres in full-resolution pixels, x = column, y = row;
Visium / ST samples also carry ``obs`` ``array_row``, ``array_col``, ``in_tissue``),
``wsis/<id>.tif`` (pyramidal generic TIFF, level 0 = full resolution) and
``metadata/<id>.json``.

Catalog entry fields: ``counts`` = the h5ad, ``image`` = the TIFF, ``metadata`` = the
JSON (default: ``../metadata/<stem>.json`` next to the h5ad's folder, HEST's layout).

Metadata keys used (names as written by the HEST library, ``HESTData.save`` and the
HEST-1k metadata table): ``pixel_size_um_estimated`` and ``pixel_size_um_embedded``
(µm per level-0 pixel; ``None``/NaN when unknown), ``st_technology`` (logged and checked
against the catalog platform), ``inter_spot_dist`` / ``spot_diameter`` (µm; logged only).

µm per pixel: ``entry.um_per_px`` > ``catalog.um_per_px`` (source ``"catalog"``) > the
first usable key of ``reader_options.pixel_size_keys`` (source ``"metadata"``), default
``["pixel_size_um_estimated", "pixel_size_um_embedded"]``: HEST's own reader
(``read_HESTData``) uses ``pixel_size_um_estimated`` as the sample's pixel size; the
embedded value is the scanner's TIFF tag, which HEST found unreliable on some sources.

Other ``reader_options`` as for the ``anndata`` reader (``layer``, ``spatial_key``,
``gene_symbols``, ``duplicate_genes`` default ``"error"``).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from stimage_embed.errors import InputError
from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
from stimage_embed.ingest.readers._validate import require_file
from stimage_embed.ingest.readers.anndata_reader import build_slide, read_h5ad_spots, read_options
from stimage_embed.ingest.types import SlideData

log = logging.getLogger(__name__)

PIXEL_SIZE_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
#: HEST ``st_technology`` -> catalog ``platform`` values it is compatible with.
TECHNOLOGY_PLATFORMS = {
    "visium": ("visium",),
    "visium hd": ("visium_hd",),
    "spatial transcriptomics": ("legacy_st",),
    "xenium": ("other",),
}


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, "metadata", f"not a readable JSON file: {exc}") from exc
    if not isinstance(meta, dict):
        raise InputError(path, "metadata", "HEST metadata must be a JSON object")
    return meta


def pixel_size_from_metadata(
    meta: dict[str, Any], path: Path, keys: tuple[str, ...] = PIXEL_SIZE_KEYS
) -> tuple[float, str] | None:
    """(µm per level-0 pixel, key used) from the first key that holds a positive number."""
    for key in keys:
        value = meta.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        try:
            v = float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(path, key, f"not a number: {value!r}") from exc
        if not math.isfinite(v) or v <= 0:
            raise InputError(path, key, f"must be a positive number of µm per pixel, got {value!r}")
        return v, key
    return None


def read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData:
    options = read_options(catalog)
    keys = catalog.reader_options.get("pixel_size_keys", list(PIXEL_SIZE_KEYS))
    if not isinstance(keys, (list, tuple)) or not all(k in PIXEL_SIZE_KEYS for k in keys):
        raise InputError(
            catalog.source, "reader_options.pixel_size_keys", f"must be a list drawn from {PIXEL_SIZE_KEYS}"
        )
    where = f"slides[{entry.id}]"
    image = require_file(catalog.resolve(entry.image), f"{where}.image", catalog.source, "hest")
    h5ad = require_file(catalog.resolve(entry.counts), f"{where}.counts", catalog.source, "hest")
    if entry.metadata:
        meta_path = require_file(catalog.resolve(entry.metadata), f"{where}.metadata", catalog.source, "hest")
    else:
        meta_path = h5ad.parent.parent / "metadata" / f"{h5ad.stem}.json"
        if not meta_path.is_file():
            raise InputError(
                meta_path,
                f"{where}.metadata",
                "HEST metadata JSON not found at the default location; set metadata in the catalog entry",
            )
    meta = read_metadata(meta_path)
    tech = str(meta.get("st_technology", "")).strip().lower()
    if tech in TECHNOLOGY_PLATFORMS and catalog.platform not in TECHNOLOGY_PLATFORMS[tech]:
        log.warning(
            "%s: st_technology %r but the catalog says platform %r", meta_path, meta["st_technology"], catalog.platform
        )
    log.debug(
        "%s: st_technology=%s inter_spot_dist=%s µm spot_diameter=%s µm",
        meta_path,
        meta.get("st_technology"),
        meta.get("inter_spot_dist"),
        meta.get("spot_diameter"),
    )

    table = read_h5ad_spots(h5ad, **options)
    um, source = entry.um_per_px or catalog.um_per_px, "catalog"
    if um is None:
        found = pixel_size_from_metadata(meta, meta_path, tuple(keys))
        if found is not None:
            um, source = found[0], "metadata"
            log.debug("%s: µm/px %.4f from %s", meta_path, um, found[1])
        else:
            log.warning("%s: no usable %s; µm/px left to the pipeline", meta_path, " / ".join(keys))
    return build_slide(
        catalog,
        entry,
        table,
        image,
        h5ad,
        um,
        source,
        {"image": str(image), "counts": str(h5ad), "spots": str(h5ad), "metadata": str(meta_path)},
    )
