"""``stimage-embed search``: the k spots of a vector table nearest a query, by cosine distance.

The query is a spot already in the store (``like="SLIDE:SPOT"``), a vector, or a region of a
new image (:mod:`stimage_embed.search.image_query`). The ``where`` predicate
(:mod:`stimage_embed.search.where`) and ``exclude_slide`` are applied as a LanceDB
*prefilter* (before the nearest-neighbour search, so k hits come back whenever k spots
match).

Index or exact: with a vector index (``stimage-embed index``) on a table of at least
:data:`~stimage_embed.search.index.EXACT_BELOW` rows, LanceDB searches the index
(``nprobes`` partitions; rows added since the build are searched exactly alongside) for
``refine`` x k candidates; otherwise it scans every (prefiltered) row exactly. Either way
the candidates' distances are recomputed exactly in float32 from their stored vectors
(``1 - cos``) and the k nearest kept: the reported distances are exact, and with the index
off the result is the exact k nearest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.paths import DEFAULT_BACKBONE
from stimage_embed.search.index import EXACT_BELOW, METRIC, VECTOR_COLUMN, vector_index, vector_table
from stimage_embed.search.where import resolve_where
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

#: candidates fetched per hit from the index before the exact re-ranking
DEFAULT_REFINE = 4
#: IVF partitions probed per query
DEFAULT_NPROBES = 20


@dataclass(frozen=True)
class SearchOptions:
    """How to search: ``use_index`` None = auto (index when present and the table has at
    least ``EXACT_BELOW`` rows), False = exact, True = the index (error if none)."""

    use_index: bool | None = None
    nprobes: int = DEFAULT_NPROBES
    refine: int = DEFAULT_REFINE


def parse_like(like: str) -> tuple[str, str]:
    """``"SLIDE:SPOT"`` -> (slide, spot); spot ids may contain ':' (split at the first)."""
    slide, sep, spot = like.partition(":")
    if not sep or not slide or not spot:
        raise InputError(None, "--like", f"expected SLIDE:SPOT, got {like!r}")
    return slide, spot


def spot_vector(store: Store, backbone: str, like: str) -> tuple[str, str, np.ndarray]:
    """(slide, spot, float32 vector) of a stored spot; one-line errors for unknown ones."""
    slide, spot = parse_like(like)
    tbl = vector_table(store, backbone)
    if slide not in store.slide_ids():
        raise InputError(None, "--like", f"unknown slide {slide!r} in {store.path}")
    rows = store.read(
        tbl.name, [VECTOR_COLUMN], where=f"slide_id = {sql_list([slide])} AND spot_id = {sql_list([spot])}"
    )
    if rows.num_rows == 0:
        raise InputError(None, "--like", f"slide {slide!r} has no spot {spot!r} with {backbone} vectors")
    return slide, spot, _matrix(rows[VECTOR_COLUMN])[0]


def _matrix(column) -> np.ndarray:
    vec = column.combine_chunks()
    return vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size).astype(np.float32)


def cosine_distance(X: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``1 - cos(x_i, q)`` per row of ``X`` (float32 in, float64 out; a zero vector is at 1)."""
    X64, q64 = np.asarray(X, np.float64), np.asarray(q, np.float64)
    den = np.linalg.norm(X64, axis=1) * np.linalg.norm(q64)
    return 1.0 - np.divide(X64 @ q64, den, out=np.zeros(len(X64)), where=den > 0)


def _use_index(tbl, opts: SearchOptions) -> bool:
    has = vector_index(tbl) is not None
    if opts.use_index is None:
        return has and tbl.count_rows() >= EXACT_BELOW
    if opts.use_index and not has:
        raise InputError(None, "--index", f"{tbl.name} has no vector index; run `stimage-embed index`")
    return bool(opts.use_index)


def nearest(tbl, q: np.ndarray, k: int, lance_filter: str | None, opts: SearchOptions) -> pl.DataFrame:
    """(slide_id, spot_id, distance) of the k nearest rows to ``q`` (see the module doc)."""
    indexed = _use_index(tbl, opts)
    query = tbl.search(np.asarray(q, np.float32), vector_column_name=VECTOR_COLUMN).distance_type(METRIC)
    if lance_filter:
        query = query.where(lance_filter, prefilter=True)
    if indexed:
        query = query.nprobes(opts.nprobes)
    else:
        query = query.bypass_vector_index()
    fetch = k * max(opts.refine, 1) if indexed else k + max(10, k)  # exact: margin for float16 ties
    hits = query.select(["slide_id", "spot_id", VECTOR_COLUMN, "_distance"]).limit(fetch).to_arrow()
    d = np.maximum(cosine_distance(_matrix(hits[VECTOR_COLUMN]), q), 0.0) if hits.num_rows else np.zeros(0)
    out = pl.DataFrame(
        {"slide_id": hits["slide_id"].to_pylist(), "spot_id": hits["spot_id"].to_pylist(), "distance": d},
        schema={"slide_id": pl.String, "spot_id": pl.String, "distance": pl.Float64},
    )
    return out.sort("distance", "slide_id", "spot_id").head(k)


def _with_metadata(store: Store, hits: pl.DataFrame) -> pl.DataFrame:
    slides = pl.from_arrow(store.read("slides", ["slide_id", "patient", "dataset"]))
    return hits.join(slides, on="slide_id", how="left", maintain_order="left")


def _with_genes(store: Store, hits: pl.DataFrame, genes: list[str]) -> pl.DataFrame:
    """Measured log1p(CP10k) of ``genes`` at each hit (null for a slide without counts)."""
    from heads import log1p_normalise

    have = set(pl.from_arrow(store.read("genes", ["gene"]))["gene"].to_list()) if store.has_table("genes") else set()
    unknown = sorted(set(genes) - have)
    if unknown:
        raise InputError(None, "--genes", f"not measured in any slide of the store: {unknown}")
    slides = [s for s in hits["slide_id"].unique(maintain_order=True).to_list()]
    with_counts = set(pl.from_arrow(store.read("genes", ["slide_id"]))["slide_id"].to_list()) & set(slides)
    if not with_counts:
        return hits.with_columns(pl.lit(None, pl.Float64).alias(g) for g in genes)
    keys, _, counts, lib = store.expression_matrix(sorted(with_counts), genes)
    vals = log1p_normalise(counts.toarray(), lib)
    table = keys.with_columns(pl.Series(g, vals[:, j]) for j, g in enumerate(genes))
    return hits.join(table, on=["slide_id", "spot_id"], how="left", maintain_order="left")


def _with_predictions(store: Store, hits: pl.DataFrame, genes: list[str], run_id: str) -> pl.DataFrame:
    """Predicted log1p(CP10k) (``predictions.mean_log1p``) of ``genes`` by run ``run_id`` at
    each hit (null where that run predicted no such spot)."""
    run = store.read("runs", ["genes"], where=f"run_id = {sql_list([run_id])}") if store.has_table("runs") else None
    if run is None or run.num_rows == 0:
        hint = 'list them: `stimage-embed query "SELECT run_id, head FROM runs"`'
        raise InputError(None, "--predicted", f"no run {run_id!r} in {store.path} ({hint})")
    unknown = sorted(set(genes) - set(run["genes"][0].as_py() or []))
    if unknown:
        raise InputError(None, "--genes", f"not predicted by run {run_id}: {unknown}")
    slides = hits["slide_id"].unique().to_list()
    where = f"run_id = {sql_list([run_id])} AND slide_id IN ({sql_list(slides)}) AND gene IN ({sql_list(genes)})"
    rows = pl.from_arrow(store.read("predictions", ["slide_id", "spot_id", "gene", "mean_log1p"], where=where))
    values = {
        g: rows.filter(pl.col("gene") == g).select("slide_id", "spot_id", pl.col("mean_log1p").alias(g)) for g in genes
    }
    out = hits
    for g in genes:
        out = out.join(values[g], on=["slide_id", "spot_id"], how="left", maintain_order="left")
    return out


def search(
    store: Store,
    backbone: str = DEFAULT_BACKBONE,
    *,
    like: str | None = None,
    vector: np.ndarray | None = None,
    k: int = 10,
    where: str | None = None,
    exclude_slide: str | bool = False,
    genes: list[str] | None = None,
    options: SearchOptions | None = None,
    predicted: str | None = None,
) -> pl.DataFrame:
    """The k nearest spots to a query: a polars table ``rank, slide_id, spot_id, distance
    (1 - cosine), patient, dataset`` and one column per gene in ``genes``: measured
    log1p(CP10k), or with ``predicted`` (a run id) that run's predicted log1p(CP10k).

    Exactly one of ``like`` (``"SLIDE:SPOT"``) and ``vector`` (float, the table's dim; e.g.
    :func:`~stimage_embed.search.image_query.embed_region`). ``where``: SQL predicate on
    slides/spots columns (prefilter). ``exclude_slide``: True drops the ``like`` spot's slide,
    a string drops that slide.
    """
    opts = options or SearchOptions()
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InputError(None, "--k", f"must be a positive integer, got {k!r}")
    if (like is None) == (vector is None):
        raise InputError(None, "--like/--image", "give exactly one query: a stored spot or an image region")
    tbl = vector_table(store, backbone)
    if like is not None:
        query_slide, _, q = spot_vector(store, backbone, like)
    else:
        q, query_slide = np.asarray(vector, np.float32).reshape(-1), None
        dim = tbl.schema.field(VECTOR_COLUMN).type.list_size
        if q.shape[0] != dim or not np.isfinite(q).all():
            raise InputError(None, "vector", f"expected {dim} finite values, got shape {q.shape}")
    pre = resolve_where(store, where)
    filters = [f"({pre.lance})"] if pre.lance else []
    drop = query_slide if exclude_slide is True else (exclude_slide or None)
    if drop:
        filters.append(f"slide_id <> {sql_list([drop])}")
    hits = nearest(tbl, q, int(k), " AND ".join(filters) or None, opts)
    hits = _with_metadata(store, hits).with_row_index("rank", offset=1)
    if predicted is not None and not genes:
        raise InputError(None, "--predicted", "name the genes to show with --genes")
    if not genes:
        return hits
    if predicted is not None:
        return _with_predictions(store, hits, list(genes), predicted)
    return _with_genes(store, hits, list(genes))
