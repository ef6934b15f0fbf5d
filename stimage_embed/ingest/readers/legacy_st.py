"""Legacy Spatial Transcriptomics (100 µm spots, 200 µm pitch) in two public layouts.

``reader_options.layout``:

* ``her2st`` (Andersson et al. 2021): ``counts/<s>.tsv.gz`` spots x gene symbols, first
  column the spot id ``"{x}x{y}"``; ``spots/<s>_selection.tsv`` with ``x, y, pixel_x,
  pixel_y, selected``. Selected spots that have no counts row are reported and skipped.
* ``stutility`` (STUtility R package): counts with versioned Ensembl ids as columns,
  mapped to symbols through ``reader_options.gene_map`` (TSV with ``gene_id`` and
  ``gene_name``); the count matrix holds every array position, only spots with
  ``selected == 1`` in the alignment table are kept.

Pixel centres are in the JPEG's own (full-resolution) pixel frame. µm/px is not in the
files: the catalog layer estimates it from the spot pitch.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from stimage_embed.errors import InputError
from stimage_embed.ingest.catalog import DatasetCatalog, SlideEntry
from stimage_embed.ingest.readers._validate import require_file, validate_coords, validate_counts, validate_unique
from stimage_embed.ingest.types import SlideData

log = logging.getLogger(__name__)

LAYOUTS = ("her2st", "stutility")
SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y", "selected")


def read_counts_table(path: Path) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """Read a spots x genes TSV (first column = spot id). Returns (spot ids, genes, CSR).

    Values are checked to be finite, non-negative integers (raw UMI counts).
    """
    import pandas as pd  # pandas parses very wide TSVs (15k columns) ~2x faster than polars

    try:
        df = pd.read_csv(path, sep="\t", index_col=0, na_values=["NA", ""], keep_default_na=True)
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:  # pandas mangles duplicate names
            header = fh.readline()
    except (EOFError, zlib.error) as exc:  # gzip: "Compressed file ended before the end-of-stream marker"
        raise InputError(path, "counts", f"truncated or corrupt compressed file: {exc}") from exc
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(path, "counts", f"cannot parse counts table: {_first_line(exc)}") from exc
    if df.shape[1] == 0 or df.shape[0] == 0:
        raise InputError(path, "counts", "counts table has no genes or no spots")
    spot_ids = df.index.astype(str).to_numpy()
    genes = np.asarray(header.rstrip("\r\n").split("\t")[1:], dtype=object).astype(str)
    if len(genes) != df.shape[1]:
        raise InputError(path, "header", f"header names {len(genes)} genes but rows hold {df.shape[1]} values")
    non_numeric = [c for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if non_numeric:
        col = df[non_numeric[0]]
        example = next((v for v in col if not _is_number(str(v))), col.iloc[0])
        raise InputError(path, f"counts (gene {non_numeric[0]!r})", f"non-numeric count value {example!r}")
    values = df.to_numpy(dtype=np.float64)
    validate_counts(values, path, "counts")
    validate_unique(spot_ids, path, "spot id (first column)", "spot id")
    return spot_ids, genes, sp.csr_matrix(values.astype(np.int64))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_spot_table(path: Path) -> pl.DataFrame:
    """The spot table, with ``x, y, pixel_x, pixel_y, selected`` checked to be numbers."""
    try:
        df = pl.read_csv(path, separator="\t", infer_schema_length=0)  # all text: numbers are checked below
    except (EOFError, zlib.error) as exc:
        raise InputError(path, "spots", f"truncated or corrupt compressed file: {exc}") from exc
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise InputError(path, "spots", f"cannot parse spot table: {_first_line(exc)}") from exc
    missing = [c for c in SPOT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(path, ",".join(missing), f"spot table lacks column(s) {missing}; has {df.columns}")
    return df.with_columns(_numeric(df, c, path) for c in SPOT_COLUMNS)


def _numeric(df: pl.DataFrame, col: str, path: Path) -> pl.Series:
    """Column ``col`` as Float64; a value that is not a number is an error naming it and its line."""
    text = df[col].str.strip_chars()
    values = text.cast(pl.Float64, strict=False)
    bad = values.is_null() & text.is_not_null() & (text != "")
    if bad.any():
        rows = bad.arg_true().to_list()
        examples = ", ".join(f"line {i + 2}: {text[i]!r}" for i in rows[:5])
        raise InputError(path, col, f"{len(rows)} non-numeric value(s) ({examples})")
    return values


def _map_genes(genes: np.ndarray, gene_map: Path) -> tuple[np.ndarray, np.ndarray]:
    """Map Ensembl ids to symbols. Unmapped ids keep the id; duplicate symbols get the
    Ensembl id appended (``Symbol|ENSMUSG...``) so the vocabulary stays unique and lossless."""
    table = pl.read_csv(gene_map, separator="\t")
    for col in ("gene_id", "gene_name"):
        if col not in table.columns:
            raise InputError(gene_map, col, f"gene map lacks column {col!r}")
    lookup = dict(zip(table["gene_id"].to_list(), table["gene_name"].to_list()))
    unversioned = {k.split(".")[0]: v for k, v in lookup.items()}
    symbols = np.array([lookup.get(g) or unversioned.get(g.split(".")[0]) or g for g in genes], dtype=object)
    n_unmapped = int(sum(s == g for s, g in zip(symbols, genes)))
    if n_unmapped:
        log.warning("%s: %d gene ids have no symbol and keep their id", gene_map, n_unmapped)
    values, counts = np.unique(symbols, return_counts=True)
    dup = set(values[counts > 1])
    if dup:
        log.warning("%s: %d symbols map from several ids; made unique as 'symbol|id'", gene_map, len(dup))
        symbols = np.array([f"{s}|{g}" if s in dup else s for s, g in zip(symbols, genes)], dtype=object)
    return symbols.astype(str), genes.astype(str)


def read_slide(catalog: DatasetCatalog, entry: SlideEntry) -> SlideData:
    layout = catalog.reader_options.get("layout", "her2st")
    if layout not in LAYOUTS:
        raise InputError(catalog.source, "reader_options.layout", f"unknown layout {layout!r}; use one of {LAYOUTS}")

    def need(rel: str | None, field: str) -> Path:
        return require_file(catalog.resolve(rel), f"slides[{entry.id}].{field}", catalog.source, "legacy_st")

    image, counts_path, spots_path = (
        need(entry.image, "image"),
        need(entry.counts, "counts"),
        need(entry.spots, "spots"),
    )

    count_ids, genes, counts = read_counts_table(counts_path)
    gene_ids = None
    if layout == "stutility":
        gm = catalog.reader_options.get("gene_map")
        gene_map = require_file(
            catalog.resolve(gm) if gm else None, "reader_options.gene_map", catalog.source, "legacy_st"
        )
        genes, gene_ids = _map_genes(genes, gene_map)
    validate_unique(genes, counts_path, "gene columns", "gene name")

    spots = read_spot_table(spots_path)
    spots = spots.filter(pl.col("selected") == 1)
    key = spots.select(
        (pl.col("x").cast(pl.Int64).cast(pl.Utf8) + "x" + pl.col("y").cast(pl.Int64).cast(pl.Utf8)).alias("k")
    )["k"]
    spot_ids = key.to_numpy().astype(str)
    validate_unique(spot_ids, spots_path, "x,y", "spot id")
    px = spots["pixel_x"].cast(pl.Float64).to_numpy()
    py = spots["pixel_y"].cast(pl.Float64).to_numpy()
    validate_coords(px, py, spots_path)

    row_of = {s: i for i, s in enumerate(count_ids)}
    rows = np.array([row_of.get(s, -1) for s in spot_ids], dtype=np.int64)
    have = rows >= 0
    skipped = {s: f"selected in {spots_path.name} but no counts row in {counts_path.name}" for s in spot_ids[~have]}
    if skipped:
        log.warning(
            "%s: %d selected spot(s) without counts skipped: %s", counts_path, len(skipped), sorted(map(str, skipped))
        )
    return SlideData(
        slide_id=entry.id,
        patient=entry.patient,
        image_path=image,
        spot_ids=spot_ids[have],
        array_row=spots["y"].cast(pl.Int64).to_numpy()[have],
        array_col=spots["x"].cast(pl.Int64).to_numpy()[have],
        pixel_x=px[have],
        pixel_y=py[have],
        counts=counts[rows[have]],
        genes=genes,
        gene_ids=gene_ids,
        um_per_px=entry.um_per_px or catalog.um_per_px,
        um_per_px_source="catalog" if (entry.um_per_px or catalog.um_per_px) else None,
        skipped_spots=skipped,
        source_files={"image": str(image), "counts": str(counts_path), "spots": str(spots_path)},
    )
