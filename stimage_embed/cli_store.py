"""Verbs that read datasets into the store or look at it: ``ingest``, ``query``, ``info``,
``backbones``."""

from __future__ import annotations

from typing import Annotated

import polars as pl
import typer

from stimage_embed.cli_checks import (
    QUERY_FORMATS,
    check_choice,
    check_min,
    check_store_path,
    forget_new_store,
    new_store_root,
)
from stimage_embed.cli_helpers import DataRootOpt, StoreOpt, WaitOpt, cli_errors, first_line, listed, print_frame

#: rows ``query`` prints unless ``--limit`` says otherwise
DEFAULT_QUERY_LIMIT = 10_000


@cli_errors
def ingest(
    catalog: Annotated[
        str, typer.Argument(help="Catalog name (catalogs/datasets/<name>.yaml) or path to a catalog YAML.")
    ],
    store: StoreOpt = "store",
    data_root: DataRootOpt = None,
    tissue_threshold: Annotated[
        float, typer.Option(help="Spots whose disk is covered by less tissue than this fail QC (flagged, not deleted).")
    ] = 0.7,
    slide: Annotated[
        list[str] | None,
        typer.Option(
            "--slide", "--slides", metavar="ID[,ID]", help="Ingest only these slide ids (repeatable; comma lists too)."
        ),
    ] = None,
    wait: WaitOpt = 0.0,
) -> None:
    """Read a dataset, QC its spots and write slides/spots/genes/expression to the store."""
    from stimage_embed.ingest.catalog import load_catalog
    from stimage_embed.ingest.pipeline import ingest as run_ingest
    from stimage_embed.store import Store

    check_min(tissue_threshold, 0, "--tissue-threshold")
    slides = listed(slide, "--slide") or None
    cat = load_catalog(catalog, data_root)  # a bad catalog or --slide is refused before a new store is created
    for s in slides or []:
        cat.slide(s)
    check_store_path(store, create=True, write=True)
    created, done = new_store_root(store), False
    try:
        st = Store(store, lock_wait=wait)
        with st.writer("ingest"):
            summary = run_ingest(cat, st, tissue_threshold=tissue_threshold, slides=slides)
        done = True
    finally:
        if not done:  # a failed first ingest leaves no empty store (folder, lock file) behind
            forget_new_store(created)
    print_frame(
        summary.select(
            "dataset",
            "slide_id",
            "patient",
            "n_spots",
            "n_spots_skipped",
            "n_spots_pass_qc",
            "n_genes",
            pl.col("um_per_px").round(4),
            "um_per_px_source",
        )
    )


@cli_errors
def query(
    sql: Annotated[
        str,
        typer.Argument(
            help="DuckDB SQL over the store's tables and views (`SHOW TABLES` lists them; `info` too).",
            show_default=False,
        ),
    ],
    store: StoreOpt = "store",
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
    limit: Annotated[
        int, typer.Option(help="Print at most this many rows (0: all rows; the result is then held in memory).")
    ] = DEFAULT_QUERY_LIMIT,
    allow_file_access: Annotated[
        bool,
        typer.Option(
            "--allow-file-access",
            help="Let the SQL read and write files, the network and extensions (COPY ... TO, read_csv, ATTACH). "
            "Off by default: the SQL sees only the store's tables.",
        ),
    ] = False,
) -> None:
    """Run SQL over every table of the store and print the result."""
    import duckdb

    from stimage_embed.store import Store
    from stimage_embed.store.sql import run_query

    check_choice(fmt, QUERY_FORMATS, "--format")
    check_min(limit, 0, "--limit")
    check_store_path(store, create=True)  # SQL may not need the store; a missing one is not created
    try:
        df, more = run_query(Store(store), sql, file_access=allow_file_access, limit=limit or None)
    except duckdb.Error as exc:
        typer.echo(f"error: SQL: {first_line(exc)}", err=True)
        raise typer.Exit(2) from exc
    print_frame(df, fmt)
    if more:
        typer.echo(f"(first {limit:,} rows shown; --limit N for more, --limit 0 for all)", err=True)


@cli_errors
def info(store: StoreOpt = "store") -> None:
    """Summarise the store: tables with row counts, the SQL views, and the cohort per dataset."""
    from stimage_embed.store import Store
    from stimage_embed.store.sql import available_views

    check_store_path(store)
    st = Store(store)
    names = st.table_names()
    rows = [{"table": n, "rows": st.table(n).count_rows(), "version": st.table(n).version} for n in names]
    print_frame(pl.DataFrame(rows))
    views = available_views(set(names))
    if views:
        typer.echo("views (SQL, computed on query): " + ", ".join(views))
    if "slides" in names:
        print_frame(
            st.sql(
                """SELECT dataset, species, tissue, preservation, COUNT(*) AS slides,
                          COUNT(DISTINCT patient) AS patients, SUM(n_spots)::BIGINT AS spots,
                          SUM(n_spots_pass_qc)::BIGINT AS spots_pass_qc, ROUND(AVG(um_per_px), 4) AS um_per_px
                   FROM slides GROUP BY ALL ORDER BY dataset"""
            )
        )


@cli_errors
def backbones(
    check_hub: Annotated[
        bool, typer.Option(help="Also ask the Hugging Face hub (network) for weights not cached locally.")
    ] = False,
) -> None:
    """List the registered backbones, their embedding dims and whether weights are available here."""
    from stimage_embed.backbones import get_spec, list_backbones, weights_available

    rows = []
    for name in list_backbones():
        spec = get_spec(name)
        rows.append(
            {
                "backbone": name,
                "dim": spec.embed_dim,
                "input_px": spec.input_size,
                "pooling": spec.pooling,
                "builder": spec.builder,
                "gated": spec.gated,
                "weights_here": weights_available(name, check_hub=check_hub),
                "source": spec.hub_id or spec.timm_name or "",
            }
        )
    print_frame(pl.DataFrame(rows))


def register(app: typer.Typer) -> None:
    """Add this module's verbs to ``app``."""
    app.command(short_help="Read a dataset into the store (spots, counts, QC).")(ingest)
    # the SQL may start with "--" (a comment): an unknown "option" is taken as the argument
    app.command(
        short_help="Run SQL over the store's tables and views.", context_settings={"ignore_unknown_options": True}
    )(query)
    app.command(short_help="Tables, rows, SQL views and cohort of the store.")(info)
    app.command(short_help="List the backbones and whether weights are here.")(backbones)
