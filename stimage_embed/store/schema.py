"""Arrow schemas of every store table, declared once.

Units: pixel coordinates are full-resolution (level-0) image pixels; lengths in µm;
``counts`` are raw integer UMI counts (never normalised).
"""

from __future__ import annotations

import re

import pyarrow as pa

from stimage_embed.errors import InputError

SLIDES = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("patient", pa.string(), nullable=False),
        pa.field("platform", pa.string()),
        pa.field("species", pa.string()),
        pa.field("tissue", pa.string()),
        pa.field("preservation", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("image_width", pa.int32()),
        pa.field("image_height", pa.int32()),
        pa.field("um_per_px", pa.float64()),  # µm per level-0 pixel
        pa.field("um_per_px_source", pa.string()),  # metadata | catalog | estimated_from_pitch
        pa.field("um_per_px_estimate", pa.float64()),  # always computed from the spot lattice
        pa.field("px_per_array_step_x", pa.float64()),
        pa.field("px_per_array_step_y", pa.float64()),
        pa.field("spot_diameter_um", pa.float64()),
        pa.field("spot_pitch_um", pa.float64()),
        pa.field("n_spots", pa.int32()),
        pa.field("n_spots_skipped", pa.int32()),
        pa.field("n_spots_pass_qc", pa.int32()),
        pa.field("n_genes", pa.int32()),
        pa.field("total_counts", pa.int64()),
        pa.field("tissue_threshold", pa.float64()),
        pa.field("tissue_area_fraction", pa.float64()),
        pa.field("catalog_path", pa.string()),
        pa.field("source_files", pa.string()),  # JSON object
        pa.field("package_version", pa.string()),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
        # sha256 of what a slide's tiles depend on (image bytes, spot ids and centres, µm/px,
        # spot diameter); vectors carry the hash they were cut under. NULL in older stores.
        pa.field("geometry_hash", pa.string()),
        # JSON: the slide's Macenko stain estimate (default parameters) on the tissue of its
        # 2048-px thumbnail, made at ingest so the embedding pass does not recompute it.
        # NULL in older stores or with too little tissue (the pass then fits it itself).
        pa.field("stain_estimate", pa.string()),
        # the image file's content hash at ingest (``ingest.fingerprint.image_fingerprint``):
        # ``embed`` refuses to cut tiles from a file that changed since. NULL in older stores.
        pa.field("image_hash", pa.string()),
        # hash of the slide's counts (spot ids, genes, raw counts) at ingest: part of the
        # identity of every run using them (``predictions.runs``). NULL in older stores.
        pa.field("expression_hash", pa.string()),
        # tile width (µm) the embedding pass cuts around each spot; NULL: spot_diameter_um
        pa.field("tile_um", pa.float64()),
    ]
)

SPOTS = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("array_row", pa.int32()),
        pa.field("array_col", pa.int32()),
        pa.field("pixel_x", pa.float64()),  # spot centre, level-0 px (column)
        pa.field("pixel_y", pa.float64()),  # spot centre, level-0 px (row)
        pa.field("tissue_fraction", pa.float32()),  # of the spot disk covered by tissue
        pa.field("padded_fraction", pa.float32()),  # of the default tile window past the image edge
        pa.field("in_image", pa.bool_()),
        pa.field("passes_qc", pa.bool_()),  # tissue_fraction >= threshold and in_image
        pa.field("total_counts", pa.int64()),
        pa.field("n_genes_detected", pa.int32()),
        pa.field("area_um2", pa.float64()),  # the spot's own area (Xenium cell, HD bin), µm²; NULL: a disk
    ]
)

GENES = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("gene_index", pa.int32(), nullable=False),  # column index in `expression`
        pa.field("gene", pa.string(), nullable=False),  # symbol, unique per slide
        pa.field("gene_id", pa.string()),  # e.g. Ensembl id, if the source had one
        pa.field("total_counts", pa.int64()),
        pa.field("n_spots_detected", pa.int32()),
    ]
)

#: Raw counts, sparse per spot: ``counts[i]`` is the count of gene ``gene_index[i]``
#: (see ``genes``); absent genes are 0. Lossless for integer counts < 2**31.
EXPRESSION = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("gene_index", pa.list_(pa.int32())),
        pa.field("counts", pa.list_(pa.int32())),
    ]
)

PROVENANCE = pa.schema(
    [
        pa.field("provenance_id", pa.string(), nullable=False),  # sha256 prefix of the JSON
        pa.field("table_name", pa.string(), nullable=False),
        pa.field("backbone", pa.string(), nullable=False),
        pa.field("spec_hash", pa.string()),
        pa.field("weights_sha256", pa.string()),
        pa.field("transform", pa.string()),  # JSON
        pa.field("tile_um", pa.float64()),
        pa.field("tile_px", pa.int32()),
        pa.field("stain_method", pa.string()),
        pa.field("stain_template", pa.string()),
        pa.field("package_version", pa.string()),
        pa.field("json", pa.string()),  # the full provenance record
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)


#: optional columns of a vector table: nullable, written by the embedding pass, added (as
#: NULL for existing rows) to an older table on its next write
EMBEDDING_OPTIONAL = (
    pa.field("geometry_hash", pa.string()),  # the slide's geometry_hash when embedded (NULL: older rows)
)


def embedding_schema(dim: int, optional: bool = False) -> pa.Schema:
    """Vectors of one backbone: float16, keyed by (slide_id, spot_id). ``optional``: with
    the optional columns (``EMBEDDING_OPTIONAL``), as the embedding pass writes them."""
    return pa.schema(
        [
            pa.field("slide_id", pa.string(), nullable=False),
            pa.field("spot_id", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float16(), dim)),
            pa.field("tissue_fraction", pa.float32()),
            pa.field("padded_fraction", pa.float32()),
            pa.field("tile_um", pa.float32()),  # physical tile width, µm
            pa.field("um_per_px", pa.float32()),  # µm per level-0 px of the source image
            pa.field("provenance_id", pa.string(), nullable=False),
            *(EMBEDDING_OPTIONAL if optional else ()),
        ]
    )


#: backbone names usable in a table name and unquoted in SQL
BACKBONE_NAME = re.compile(r"[A-Za-z0-9_]+")


#: every vector table is ``embeddings_<backbone>``
EMBEDDING_PREFIX = "embeddings_"


def embedding_table_name(backbone: str) -> str:
    if not BACKBONE_NAME.fullmatch(backbone or ""):
        raise InputError(
            None,
            "backbone",
            f"invalid backbone name {backbone!r} (letters, digits and '_' only; see `stimage-embed backbones`)",
        )
    return f"{EMBEDDING_PREFIX}{backbone}"


#: a context table's suffix on its backbone's name (``x__ctx300um``, ``x__ctx62p5um``;
#: ``embeddings.provenance.CONTEXT_SUFFIX``) and the separator of a composite source ``a+b``
_CONTEXT_SUFFIX = re.compile(r"__ctx[0-9p]+um$")
_COMPOSITE = "+"


def source_backbones(source: str) -> str:
    """The real backbone name(s) of a vector source (``runs.vector_source``): ``x`` for ``x``
    and its context table ``x__ctx300um``; a composite's distinct backbones in order, joined
    by ``+`` (``x+x__ctx300um`` -> ``x``; ``a+b`` -> ``a+b``)."""
    names = [_CONTEXT_SUFFIX.sub("", part.strip()) for part in source.split(_COMPOSITE)]
    return _COMPOSITE.join(dict.fromkeys(names))


#: One row per trained head on one fold (the unit the evaluation caches on).
RUNS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),  # hash of the configuration below
        pa.field("dataset", pa.string()),
        # real backbone name(s) of the vectors read (``source_backbones`` of ``vector_source``), or
        # for a head spanning backbones its name ("fstimage", the cross-backbone ensemble)
        pa.field("backbone", pa.string()),
        pa.field("members", pa.list_(pa.string())),  # backbones averaged (fstimage) / [backbone]
        pa.field("head", pa.string()),  # nb | ensemble | highlow | ridge | mean | fstimage
        pa.field("control", pa.string()),  # none | shuffled (vectors permuted among each slide's spots)
        pa.field("split", pa.string()),
        pa.field("fold", pa.string()),
        pa.field("train_slides", pa.list_(pa.string())),
        pa.field("test_slides", pa.list_(pa.string())),
        pa.field("gene_spec", pa.string()),
        pa.field("genes", pa.list_(pa.string())),
        pa.field("head_params", pa.string()),  # JSON
        pa.field("provenance_ids", pa.list_(pa.string())),  # of the vectors used
        pa.field("n_train_spots", pa.int32()),
        pa.field("fit_seconds", pa.float64()),
        pa.field("model_dir", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
        # hash of the configuration without the inputs' content: runs of one configuration on
        # changed inputs share it; the newest is current, older ones superseded (``runs_status``)
        pa.field("config_id", pa.string()),
        # JSON: per slide, the content version of the counts and of each vector table used
        # (``predictions.runs.input_versions``), part of ``run_id``. NULL in older stores.
        pa.field("input_versions", pa.string()),
        # the vector source the run read: a table's backbone ``x``, a context table ``x__ctx300um``
        # or a composite ``a+b``; NULL for a head spanning backbones (it reads other runs).
        # Stores written before it are migrated on open (``store.conform.migrate_runs``).
        pa.field("vector_source", pa.string()),
    ]
)

#: Predictions, long: one row per (run, slide, spot, gene).
#: ``mean_log1p``: the prediction on the scale metrics use, log1p(CP10k) =
#: log1p(count / library_size * 1e4), from the image vectors only (NB heads: log1p of the
#: predicted rate * 1e4). ``mean``/``variance``/quantiles: the count-scale predictive NB at
#: the spot's observed ``library_size`` (a technical covariate; only for interval coverage).
PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("gene", pa.string(), nullable=False),
        pa.field("mean", pa.float32()),
        pa.field("mean_log1p", pa.float32()),
        pa.field("variance", pa.float32()),  # predictive variance (total), counts^2
        pa.field("epistemic", pa.float32()),  # between-member variance of means
        pa.field("aleatoric", pa.float32()),  # mean of member variances
        pa.field("q05", pa.float32()),
        pa.field("q25", pa.float32()),
        pa.field("q75", pa.float32()),
        pa.field("q95", pa.float32()),
        pa.field("prob_high", pa.float32()),  # classifiers: P(z-scored expression > 0)
        pa.field("observed", pa.int32()),  # raw count, when known
        pa.field("library_size", pa.float32()),  # total raw counts of the spot (all genes)
    ]
)

#: Metrics, long: one row per (run, slide or pooled, gene, metric).
METRICS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("backbone", pa.string()),
        pa.field("head", pa.string()),
        pa.field("fold", pa.string()),
        pa.field("control", pa.string()),  # none | shuffled (see RUNS)
        pa.field("scope", pa.string()),  # slide | pooled
        pa.field("slide_id", pa.string()),  # '' when pooled over the fold's test slides
        pa.field("gene", pa.string()),
        pa.field(
            "metric", pa.string()
        ),  # pearson | spearman | mse | mae | ccc | moran_i | moran_bv | iou | auc | f1 | coverage_50 | coverage_90
        pa.field("value", pa.float64()),
    ]
)

#: Pseudo-bulk of an image-only slide (``infer``): per (run, slide, gene), the mean over the
#: QC-passing tiles of the predicted log1p(CP10k) and of the predicted CP10k (expm1 of it).
PSEUDOBULK = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("gene", pa.string(), nullable=False),
        pa.field("n_tiles", pa.int32()),  # tiles averaged (passing tissue QC)
        pa.field("mean_log1p", pa.float64()),  # mean predicted log1p(CP10k)
        pa.field("sd_log1p", pa.float64()),  # its standard deviation across tiles
        pa.field("mean_cp10k", pa.float64()),  # mean of expm1(predicted log1p(CP10k)): counts per 10^4
    ]
)

#: The store's one stain target (at most one row): the template slide every stain-normalised
#: vector table is normalised against, recorded by the first normalising ``embed``
#: (``embeddings.stain_target``). ``chosen_by``: explicit | rule | recorded (older stores).
STAIN_TARGET = pa.schema(
    [
        pa.field("template_slide", pa.string(), nullable=False),
        pa.field("chosen_by", pa.string()),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC")),
    ]
)

CORE_TABLES = {
    "slides": SLIDES,
    "spots": SPOTS,
    "genes": GENES,
    "expression": EXPRESSION,
    "provenance": PROVENANCE,
    "runs": RUNS,
    "predictions": PREDICTIONS,
    "metrics": METRICS,
    "pseudobulk": PSEUDOBULK,
    "stain_target": STAIN_TARGET,
}
