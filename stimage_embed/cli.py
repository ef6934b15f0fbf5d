"""The ``stimage-embed`` command line: ingest -> embed -> train/predict -> compare.

Every verb has ``--help``. Errors from bad input are printed as one clear line naming
the file and field, with exit code 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import polars as pl
import typer

from stimage_embed import __version__
from stimage_embed.errors import StimageError

app = typer.Typer(
    name="stimage-embed",
    help="Embed H&E spot tiles once, cache them in LanceDB, train expression heads, compare backbones with SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("stimage_embed")

StoreOpt = Annotated[Path, typer.Option("--store", envvar="STIMAGE_STORE", help="Store directory (LanceDB database).")]
DataRootOpt = Annotated[
    Optional[Path],
    typer.Option("--data-root", envvar="STIMAGE_DATA_ROOT", help="Folder that relative catalog roots resolve against [default: ../shared/data]."),
]


def cli_errors(func: Callable) -> Callable:
    """Turn library errors into one clear line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except StimageError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc

    return wrapper


def _print_frame(df: pl.DataFrame, fmt: str = "table") -> None:
    if fmt == "csv":
        sys.stdout.write(df.write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=max(df.height, 1), tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            typer.echo(str(df))


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    """stimage-embed: predict spatial gene expression from H&E via cached foundation-model embeddings."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@app.command()
@cli_errors
def ingest(
    catalog: Annotated[str, typer.Argument(help="Catalog name (catalogs/datasets/<name>.yaml) or path to a catalog YAML.")],
    store: StoreOpt = Path("store"),
    data_root: DataRootOpt = None,
    tissue_threshold: Annotated[float, typer.Option(help="Spots whose disk is covered by less tissue than this fail QC (flagged, not deleted).")] = 0.7,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Ingest only these slide ids (repeatable).")] = None,
) -> None:
    """Read a dataset, QC its spots and write slides/spots/genes/expression to the store."""
    from stimage_embed.ingest.pipeline import ingest as run_ingest
    from stimage_embed.store import Store

    summary = run_ingest(catalog, Store(store), tissue_threshold=tissue_threshold, slides=slide, data_root=data_root)
    _print_frame(
        summary.select(
            "dataset", "slide_id", "patient", "n_spots", "n_spots_skipped", "n_spots_pass_qc", "n_genes",
            pl.col("um_per_px").round(4), "um_per_px_source",
        )
    )


@app.command()
@cli_errors
def query(
    sql: Annotated[str, typer.Argument(help="DuckDB SQL over the store's tables (slides, spots, genes, expression, expression_long, embeddings_*, ...).")],
    store: StoreOpt = Path("store"),
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
) -> None:
    """Run SQL over every table of the store and print the result."""
    import duckdb

    from stimage_embed.store import Store

    try:
        df = Store(store).sql(sql)
    except duckdb.Error as exc:
        typer.echo(f"error: SQL: {exc}", err=True)
        raise typer.Exit(2) from exc
    _print_frame(df, fmt)


@app.command()
@cli_errors
def info(store: StoreOpt = Path("store")) -> None:
    """Summarise the store: tables with row counts, and the cohort per dataset."""
    from stimage_embed.store import Store

    st = Store(store)
    names = st.table_names()
    if not names:
        typer.echo(f"{st.path}: empty store (run `stimage-embed ingest <catalog>`)")
        return
    rows = [{"table": n, "rows": st.table(n).count_rows(), "version": st.table(n).version} for n in names]
    _print_frame(pl.DataFrame(rows))
    if "slides" in names:
        _print_frame(
            st.sql(
                """SELECT dataset, species, tissue, preservation, COUNT(*) AS slides,
                          COUNT(DISTINCT patient) AS patients, SUM(n_spots) AS spots,
                          SUM(n_spots_pass_qc) AS spots_pass_qc, ROUND(AVG(um_per_px), 4) AS um_per_px
                   FROM slides GROUP BY ALL ORDER BY dataset"""
            )
        )


if __name__ == "__main__":
    app()
