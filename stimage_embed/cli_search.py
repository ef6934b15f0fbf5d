"""CLI verbs ``index`` and ``search`` (morphology search over the store's vectors; see
:mod:`stimage_embed.search` and docs/search.md). Registered on the main app by
:func:`register`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stimage_embed.cli_helpers import StoreOpt, WaitOpt, cli_errors, print_frame, split_csv
from stimage_embed.paths import DEFAULT_BACKBONE

BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Backbone whose vector table to use.")]


def index(
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    index_type: Annotated[str, typer.Option(help="IVF_HNSW_SQ | IVF_PQ | IVF_HNSW_PQ | IVF_SQ | IVF_FLAT")] = (
        "IVF_HNSW_SQ"
    ),
    partitions: Annotated[
        int | None, typer.Option("--partitions", help="IVF partitions [default: one per 25,000 rows].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Build even below the size where exact search is as fast.")] = False,
    rebuild: Annotated[bool, typer.Option(help="Retrain from scratch instead of folding new rows in.")] = False,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
) -> None:
    """Build (or update with new rows) the cosine vector index of embeddings_<backbone>."""
    from stimage_embed.cli_checks import check_store_path
    from stimage_embed.search.index import build_index
    from stimage_embed.store import Store

    check_store_path(store, write=True)  # a missing store is not created
    report = build_index(
        Store(store, lock_wait=wait),
        backbone,
        index_type=index_type,
        num_partitions=partitions,
        force=force,
        rebuild=rebuild,
    )
    typer.echo(report.line())


def search(
    like: Annotated[str | None, typer.Option("--like", help="Query by a stored spot: SLIDE:SPOT.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Query by a region of a new H&E image.")] = None,
    um_per_px: Annotated[float | None, typer.Option("--um-per-px", help="µm per pixel of --image.")] = None,
    x: Annotated[float | None, typer.Option("--x", help="Region centre, image px [default: image centre].")] = None,
    y: Annotated[float | None, typer.Option("--y", help="Region centre, image px [default: image centre].")] = None,
    k: Annotated[int, typer.Option("--k", help="Number of hits.")] = 10,
    where: Annotated[
        str | None,
        typer.Option(help="SQL predicate on slides/spots columns, a prefilter, e.g. \"patient <> 'C'\"."),
    ] = None,
    exclude_slide: Annotated[bool, typer.Option("--exclude-slide", help="Drop the query's own slide.")] = False,
    genes: Annotated[str | None, typer.Option(help="Comma-separated genes: add their measured log1p(CP10k).")] = None,
    predicted: Annotated[
        str | None,
        typer.Option(help="Run id: show --genes as that run's predicted log1p(CP10k) instead of measured."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write hits.parquet and montage.png here.")] = None,
    exact: Annotated[bool, typer.Option(help="Exact search even when an index exists.")] = False,
    nprobes: Annotated[int, typer.Option(help="IVF partitions probed (index search).")] = 20,
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    weights: Annotated[str | None, typer.Option(help="Local weights file of the backbone (--image).")] = None,
    store: StoreOpt = Path("store"),
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
) -> None:
    """The k spots whose vectors are nearest (cosine) to a stored spot or a new image region."""
    from stimage_embed.errors import InputError
    from stimage_embed.search.query import SearchOptions
    from stimage_embed.search.query import search as run_search
    from stimage_embed.store import Store

    st = Store(store)
    if (like is None) == (image is None):
        raise InputError(None, "--like/--image", "give exactly one query: --like SLIDE:SPOT or --image FILE")
    if out is not None and out.exists() and not out.is_dir():
        raise InputError(out, "--out", "exists and is not a folder")
    opts = SearchOptions(use_index=False if exact else None, nprobes=nprobes)
    query_tile, label, vector = None, like, None
    if image is not None:
        from stimage_embed.search.image_query import embed_region
        from stimage_embed.search.where import check_where

        if k <= 0:  # refused before the region is embedded (search() checks it again)
            raise InputError(None, "--k", f"must be a positive integer, got {k!r}")
        check_where(where)

        q = embed_region(st, backbone, image, um_per_px, x, y, weights=weights)
        vector, query_tile, label = q.vector, q.tile, f"{image.name} ({q.x:.0f}, {q.y:.0f}) px"
    hits = run_search(
        st,
        backbone,
        like=like,
        vector=vector,
        k=k,
        where=where,
        exclude_slide=exclude_slide,
        genes=split_csv(genes) or None,
        options=opts,
        predicted=predicted,
    )
    print_frame(hits, fmt)
    if out is not None:
        _write_outputs(st, backbone, hits, query_tile, label, out, q.tile_um if image is not None else None)


def _write_outputs(st, backbone, hits, query_tile, label, out: Path, tile_um: float | None) -> None:
    from stimage_embed.search.montage import montage
    from stimage_embed.store import schema as S
    from stimage_embed.store.store import sql_list

    out.mkdir(parents=True, exist_ok=True)
    hits.write_parquet(out / "hits.parquet")
    if tile_um is None:  # a stored spot: its own tile width
        slide, _, spot = label.partition(":")
        where = f"slide_id = {sql_list([slide])} AND spot_id = {sql_list([spot])}"
        tile_um = float(st.read(S.embedding_table_name(backbone), ["tile_um"], where=where)["tile_um"][0].as_py())
    m = montage(st, hits, query_tile, label, tile_um, out / "montage.png")
    typer.echo(f"wrote {out / 'hits.parquet'} and {m.path} ({len(m.tiles)} tiles)")


def register(app: typer.Typer) -> None:
    """Add ``index`` and ``search`` to the main CLI app."""
    app.command("index")(cli_errors(index))
    app.command("search")(cli_errors(search))
