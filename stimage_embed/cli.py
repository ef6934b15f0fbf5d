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
                          COUNT(DISTINCT patient) AS patients, SUM(n_spots)::BIGINT AS spots,
                          SUM(n_spots_pass_qc)::BIGINT AS spots_pass_qc, ROUND(AVG(um_per_px), 4) AS um_per_px
                   FROM slides GROUP BY ALL ORDER BY dataset"""
            )
        )


@app.command()
@cli_errors
def backbones(
    check_hub: Annotated[bool, typer.Option(help="Also ask the Hugging Face hub (network) for weights not cached locally.")] = False,
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
    _print_frame(pl.DataFrame(rows))


@app.command()
@cli_errors
def embed(
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Comma-separated backbone names (see `stimage-embed backbones`).")] = "efficientnet_lite0",
    store: StoreOpt = Path("store"),
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Only these slides (repeatable).")] = None,
    tile_um: Annotated[Optional[float], typer.Option(help="Tile width in µm [default: each slide's spot diameter].")] = None,
    stain: Annotated[str, typer.Option(help="macenko | reinhard | none")] = "macenko",
    stain_template: Annotated[Optional[str], typer.Option(help="Slide id whose stain is the target [default: first slide id].")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch (= resume chunk).")] = 32,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes reading tiles.")] = 2,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: measured on CPU, spec dtype on GPU).")] = "auto",
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="NAME=PATH local weights file (repeatable).")] = None,
    only_qc: Annotated[bool, typer.Option(help="Embed only spots passing tissue QC.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Drop the backbone's existing vectors first.")] = False,
    flush_rows: Annotated[int, typer.Option(help="Rows buffered per backbone before an atomic append.")] = 512,
) -> None:
    """Embed every spot tile once per backbone into embeddings_<backbone> (resumable)."""
    from stimage_embed.embeddings.embed_pass import embed as run_embed
    from stimage_embed.errors import InputError
    from stimage_embed.store import Store

    wmap = {}
    for item in weights or []:
        if "=" not in item:
            raise InputError(None, "--weights", f"expected NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        wmap[k] = v
    report = run_embed(
        Store(store), [b.strip() for b in backbone.split(",") if b.strip()], slides=slide, tile_um=tile_um, stain=stain,
        stain_template=stain_template, batch_size=batch_size, num_workers=workers, device=device, precision=precision,
        weights=wmap, only_qc=only_qc, overwrite=overwrite, flush_rows=flush_rows,
    )
    typer.echo(report.line())


if __name__ == "__main__":
    app()
