"""The ``stimage-embed`` command line: ingest -> embed -> train/predict -> compare.

Every verb has ``--help``. Errors from bad input are printed as one clear line naming
the file and field, with exit code 2.
"""

from __future__ import annotations

import functools
import json
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


WaitOpt = Annotated[
    float,
    typer.Option("--wait", metavar="SECONDS", help="If another command is writing to the store, wait up to this long for it (0: fail at once)."),
]


def _csv_safe(df: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested values: list, array and struct columns are written as JSON text."""
    nested = [c for c, t in df.schema.items() if t.is_nested()]
    return df.with_columns(
        pl.Series(c, [None if v is None else json.dumps(v, default=str) for v in df[c].to_list()], dtype=pl.Utf8)
        for c in nested
    )


def _backbone_names(value: str, field: str) -> list[str]:
    """Comma-separated backbone names, each checked (letters, digits, '_': they name tables)."""
    from stimage_embed.errors import InputError
    from stimage_embed.store.schema import BACKBONE_NAME

    names = _split_csv(value)
    bad = [n for n in names if not BACKBONE_NAME.fullmatch(n)]
    if bad or not names:
        raise InputError(None, field, f"invalid backbone name(s) {bad or value!r}: letters, digits and '_' only "
                         "(see `stimage-embed backbones`)")
    return names


def _print_frame(df: pl.DataFrame, fmt: str = "table") -> None:
    if fmt == "csv":
        sys.stdout.write(_csv_safe(df).write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(tbl_rows=max(df.height, 1), tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            typer.echo(str(df))


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"stimage-embed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """stimage-embed: predict spatial gene expression from H&E via cached foundation-model embeddings."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


@app.command()
@cli_errors
def ingest(
    catalog: Annotated[str, typer.Argument(help="Catalog name (catalogs/datasets/<name>.yaml) or path to a catalog YAML.")],
    store: StoreOpt = Path("store"),
    data_root: DataRootOpt = None,
    tissue_threshold: Annotated[float, typer.Option(help="Spots whose disk is covered by less tissue than this fail QC (flagged, not deleted).")] = 0.7,
    slide: Annotated[Optional[list[str]], typer.Option("--slide", help="Ingest only these slide ids (repeatable).")] = None,
    wait: WaitOpt = 0.0,
) -> None:
    """Read a dataset, QC its spots and write slides/spots/genes/expression to the store."""
    from stimage_embed.ingest.pipeline import ingest as run_ingest
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait)
    with st.writer("ingest"):
        summary = run_ingest(catalog, st, tissue_threshold=tissue_threshold, slides=slide, data_root=data_root)
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
    allow_file_access: Annotated[bool, typer.Option(
        "--allow-file-access",
        help="Let the SQL read and write files, the network and extensions (COPY ... TO, read_csv, ATTACH). "
             "Off by default: the SQL sees only the store's tables.")] = False,
) -> None:
    """Run SQL over every table of the store and print the result."""
    import duckdb

    from stimage_embed.store import Store

    try:
        df = Store(store).sql(sql, file_access=allow_file_access)
    except duckdb.Error as exc:
        typer.echo(f"error: SQL: {_first_line(exc)}", err=True)
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
    stain_template: Annotated[Optional[str], typer.Option(help="Slide id whose stain is the target [default: the one the backbone's vectors used, else the first slide id].")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch (= resume chunk).")] = 32,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes reading tiles [default: 0 for small jobs, else cores - 1].")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: measured on CPU, spec dtype on GPU).")] = "auto",
    weights: Annotated[Optional[list[str]], typer.Option("--weights", help="NAME=PATH local weights file (repeatable).")] = None,
    only_qc: Annotated[bool, typer.Option(help="Embed only spots passing tissue QC.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Drop the backbone's existing vectors first (with --slide: only those slides' vectors).")] = False,
    flush_rows: Annotated[int, typer.Option(help="Rows buffered per backbone before an atomic append.")] = 512,
    wait: WaitOpt = 0.0,
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
    names = _backbone_names(backbone, "--backbone")
    st = Store(store, lock_wait=wait)
    with st.writer("embed"):
        report = run_embed(
            st, names, slides=slide, tile_um=tile_um, stain=stain,
            stain_template=stain_template, batch_size=batch_size, num_workers=workers, device=device, precision=precision,
            weights=wmap, only_qc=only_qc, overwrite=overwrite, flush_rows=flush_rows,
        )
    typer.echo(report.line())


def _split_csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split("\n\n")[0].split()) or type(exc).__name__


def _slides_from(store_obj, sql: str | None, ids: str | None, field: str, sql_field: str | None = None) -> list[str] | None:
    """Slide ids from a comma list or from SQL returning a ``slide_id`` column (user SQL:
    run without file access; an error is one line naming the option)."""
    import duckdb

    from stimage_embed.errors import InputError

    if ids:
        return _split_csv(ids)
    if sql:
        sql_field = sql_field or f"{field}-sql"
        try:
            df = store_obj.sql(sql, file_access=False)
        except duckdb.Error as exc:
            raise InputError(None, sql_field, f"invalid SQL: {_first_line(exc)}") from exc
        if "slide_id" not in df.columns:
            raise InputError(None, sql_field, f"the SQL must return a slide_id column; got {df.columns}")
        return sorted(df["slide_id"].unique().to_list())
    return None


@app.command()
@cli_errors
def train(
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Backbone whose cached vectors to train on.")] = "efficientnet_lite0",
    head: Annotated[str, typer.Option(help="nb | ensemble | highlow | ridge | mean")] = "nb",
    genes: Annotated[str, typer.Option(help="var:K (default; top K by variance of log1p CP10k) | mean:K | seurat:K (alias hvg:K) | panel:NAME | file:PATH, selected on the training slides only.")] = "var:50",
    train_slides: Annotated[Optional[str], typer.Option("--train", help="Training slide ids, comma-separated.")] = None,
    train_sql: Annotated[Optional[str], typer.Option(help="SQL returning the training slide_ids.")] = None,
    all_spots: Annotated[bool, typer.Option(help="Train on spots failing tissue QC too.")] = False,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
) -> None:
    """Fit one head on cached vectors and save it under <store>/models/<run_id>."""
    from stimage_embed.errors import InputError
    from stimage_embed.predictions.train_predict import train as run_train
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait)
    names = _backbone_names(backbone, "--backbone")
    if len(names) != 1:
        raise InputError(None, "--backbone", f"train fits one backbone's vectors; got {names}")
    backbone = names[0]
    slides = _slides_from(st, train_sql, train_slides, "--train") or []
    with st.writer("train"):
        rid, path = run_train(st, backbone, head, genes, slides, only_qc=not all_spots)
    typer.echo(f"model {rid} saved to {path}")


@app.command()
@cli_errors
def predict(
    model: Annotated[str, typer.Option(help="Model run id (under <store>/models) or a model folder.")],
    slides: Annotated[Optional[str], typer.Option("--slide", help="Slide ids, comma-separated.")] = None,
    slides_sql: Annotated[Optional[str], typer.Option(help="SQL returning the slide_ids to predict.")] = None,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
) -> None:
    """Predict expression for slides with a saved model; writes the predictions table."""
    from stimage_embed.predictions.train_predict import predict as run_predict
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait)
    ids = _slides_from(st, slides_sql, slides, "--slide", "--slides-sql") or []
    with st.writer("predict"):
        pred = run_predict(st, model, ids)
    typer.echo(f"{pred.height} prediction rows written for {pred['slide_id'].n_unique()} slide(s), "
               f"{pred['gene'].n_unique()} genes, run {pred['run_id'][0]}")


@app.command()
@cli_errors
def infer(
    image: Annotated[Path, typer.Argument(help="H&E image: whole-slide file (svs, ndpi, mrxs, tiled/pyramidal TIFF ...) or JPEG/PNG.")],
    model: Annotated[str, typer.Option(help="Model run id (under <store>/models) or a model folder, from `train`.")],
    out: Annotated[Path, typer.Option(help="Output folder: <ID>.h5ad, <ID>/<gene>.png heatmaps, <ID>_pseudobulk.csv.")],
    slide_id: Annotated[Optional[str], typer.Option(help="Id of the new slide (default: the image file name without suffix).")] = None,
    um_per_px: Annotated[Optional[float], typer.Option(help="µm per full-resolution pixel (required for JPEG/PNG; overrides WSI metadata).")] = None,
    pitch_um: Annotated[Optional[float], typer.Option(help="Grid pitch in µm (default: the model's tile width).")] = None,
    genes: Annotated[Optional[str], typer.Option(help="Comma-separated genes to draw besides the top ones (all model genes are predicted).")] = None,
    top_genes: Annotated[int, typer.Option(help="Heatmaps of the N genes whose predictions vary most across tiles.")] = 6,
    tissue_threshold: Annotated[float, typer.Option(help="Tiles whose disk is at least this much tissue pass QC (pseudo-bulk).")] = 0.7,
    min_tissue: Annotated[float, typer.Option(help="Grid tiles with less tissue than this are skipped.")] = 0.1,
    region: Annotated[Optional[str], typer.Option(help="Only tiles centred in X0,Y0,X1,Y1 (full-resolution px): a region of interest.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Local weights file of the model's backbone (as `embed --weights`).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes reading tiles.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    store: StoreOpt = Path("store"),
) -> None:
    """Predict a model's genes on a slide that has only an image: grid over tissue, embed, predict, maps."""
    from stimage_embed.errors import InputError
    from stimage_embed.inference.infer import infer as run_infer
    from stimage_embed.store import Store

    box = None
    if region is not None:
        try:
            box = tuple(float(v) for v in region.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            raise InputError(None, "--region", f"expected X0,Y0,X1,Y1 (four numbers, full-resolution px), got {region!r}")
    result = run_infer(
        Store(store), image, model, out, slide_id=slide_id, um_per_px=um_per_px, pitch_um=pitch_um,
        genes=_split_csv(genes) or None, n_top_genes=top_genes, tissue_threshold=tissue_threshold, min_tissue=min_tissue,
        region=box, weights=weights, num_workers=workers, device=device, progress=True,
    )
    for line in result.lines():
        typer.echo(line)


@app.command()
@cli_errors
def compare(
    backbones: Annotated[str, typer.Option("--backbones", help="Comma-separated backbones with vectors in the store.")] = "efficientnet_lite0",
    heads: Annotated[str, typer.Option("--heads", help="Comma-separated: nb, ensemble, highlow, ridge, mean, fstimage.")] = "nb,ensemble,highlow,ridge,mean",
    split: Annotated[str, typer.Option(help="loso | lopo | kfold:K[:SEED] (folds within each dataset).")] = "loso",
    genes: Annotated[str, typer.Option(help="var:K (default; top K by variance of log1p CP10k) | mean:K | seurat:K (alias hvg:K) | panel:NAME | file:PATH, selected on the training slides only.")] = "var:50",
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Comma-separated datasets [default: all].")] = None,
    train: Annotated[Optional[str], typer.Option(help="Explicit split: training slide ids, comma-separated.")] = None,
    test: Annotated[Optional[str], typer.Option(help="Explicit split: test slide ids, comma-separated.")] = None,
    train_sql: Annotated[Optional[str], typer.Option(help="Explicit split: SQL returning the training slide_ids.")] = None,
    test_sql: Annotated[Optional[str], typer.Option(help="Explicit split: SQL returning the test slide_ids.")] = None,
    missing: Annotated[str, typer.Option(help="FSTimage policy for spots missing in a backbone: error | drop | available.")] = "error",
    all_spots: Annotated[bool, typer.Option(help="Use spots failing tissue QC too.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write a Markdown + PNG report folder here.")] = None,
    highlow_max_iter: Annotated[int, typer.Option(help="saga iterations of the high/low classifier (sklearn's default is 1000).")] = 100,
    control: Annotated[Optional[str], typer.Option(help="Also run a leak control: 'shuffled' trains and scores every head on vectors permuted among each slide's spots (should score about 0).")] = None,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
) -> None:
    """Train and evaluate every fold x backbone x head from the cache; print the leaderboard
    and the paired comparisons (mean PCC difference with a bootstrap 95 % CI; a CI covering
    0 is a tie)."""
    from stimage_embed.errors import InputError
    from stimage_embed.evaluation.compare import CompareConfig, compare as run_compare
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait)
    tr = _slides_from(st, train_sql, train, "--train")
    te = _slides_from(st, test_sql, test, "--test")
    if (tr is None) != (te is None):
        raise InputError(None, "--train/--test", "give both the training and the test slides for an explicit split")
    cfg = CompareConfig(
        backbones=_backbone_names(backbones, "--backbones"), heads=_split_csv(heads), split=split, genes=genes,
        datasets=_split_csv(dataset) or None, only_qc=not all_spots, missing=missing, train_slides=tr, test_slides=te,
        head_params={"highlow": {"max_iter": highlow_max_iter, "tol": 1e-3}}, controls=_split_csv(control),
    )
    with st.writer("compare"):
        result = run_compare(st, cfg)
    typer.echo(f"{result.computed} run(s) computed, {result.reused} reused from the store, {result.seconds:.1f} s")
    _print_frame(result.leaderboard.select(
        "dataset", "split", "gene_spec", "control", "backbone", "head", "folds", "genes",
        *[pl.col(c).round(3) for c in ("pcc_median", "pcc_mean", "mse_mean", "iou_mean", "auc_mean", "coverage_90")],
    ))
    from stimage_embed.evaluation.paired import paired_comparisons

    paired = paired_comparisons(st, run_ids=result.run_ids)
    if paired.height:
        typer.echo("paired comparisons (per-slide PCC over common slide x gene pairs; tie = 95 % CI covers 0):")
        _print_frame(paired.select(
            "dataset", "a_backbone", "a_head", "b_backbone", "b_head", "n_pairs",
            *[pl.col(c).round(3) for c in ("diff", "ci_low", "ci_high")], "verdict",
        ))
    if report is not None:
        from stimage_embed.evaluation.report_driver import write_compare_report

        path = write_compare_report(st, result, report)
        typer.echo(f"report: {path}")


if __name__ == "__main__":
    app()
