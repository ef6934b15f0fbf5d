"""The ``stimage-embed`` command line: ingest -> embed -> train/predict -> compare.

Every verb has ``--help``. Errors from bad input are printed as one clear line naming
the file and field, with exit code 2. Shared options, option parsing and printing are in
:mod:`stimage_embed.cli_helpers`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from stimage_embed import __version__
from stimage_embed.cli_helpers import (
    DataRootOpt,
    ModelsDirOpt,
    StoreOpt,
    WaitOpt,
    backbone_names,
    cli_errors,
    first_line,
    print_compare_result,
    print_frame,
    region_box,
    slides_from,
    split_csv,
    weights_map,
)
from stimage_embed.predictions.registry import head_help, head_names

app = typer.Typer(
    name="stimage-embed",
    help="Embed H&E spot tiles once, cache them in LanceDB, train expression heads, compare backbones with SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("stimage_embed")


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
    catalog: Annotated[
        str, typer.Argument(help="Catalog name (catalogs/datasets/<name>.yaml) or path to a catalog YAML.")
    ],
    store: StoreOpt = Path("store"),
    data_root: DataRootOpt = None,
    tissue_threshold: Annotated[
        float, typer.Option(help="Spots whose disk is covered by less tissue than this fail QC (flagged, not deleted).")
    ] = 0.7,
    slide: Annotated[
        list[str] | None, typer.Option("--slide", help="Ingest only these slide ids (repeatable).")
    ] = None,
    wait: WaitOpt = 0.0,
) -> None:
    """Read a dataset, QC its spots and write slides/spots/genes/expression to the store."""
    from stimage_embed.ingest.pipeline import ingest as run_ingest
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait)
    with st.writer("ingest"):
        summary = run_ingest(catalog, st, tissue_threshold=tissue_threshold, slides=slide, data_root=data_root)
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


@app.command()
@cli_errors
def query(
    sql: Annotated[
        str,
        typer.Argument(
            help="DuckDB SQL over the store's tables (slides, spots, genes, expression, expression_long, embeddings_*, ...)."
        ),
    ],
    store: StoreOpt = Path("store"),
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json")] = "table",
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

    try:
        df = Store(store).sql(sql, file_access=allow_file_access)
    except duckdb.Error as exc:
        typer.echo(f"error: SQL: {first_line(exc)}", err=True)
        raise typer.Exit(2) from exc
    print_frame(df, fmt)


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
    print_frame(pl.DataFrame(rows))
    if "slides" in names:
        print_frame(
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


@app.command()
@cli_errors
def embed(
    backbone: Annotated[
        str, typer.Option("--backbone", "-b", help="Comma-separated backbone names (see `stimage-embed backbones`).")
    ] = "efficientnet_lite0",
    store: StoreOpt = Path("store"),
    slide: Annotated[list[str] | None, typer.Option("--slide", help="Only these slides (repeatable).")] = None,
    tile_um: Annotated[
        float | None, typer.Option(help="Tile width in µm [default: each slide's spot diameter].")
    ] = None,
    context_um: Annotated[
        list[float] | None,
        typer.Option(
            "--context-um",
            help="Embed a wider window of this width (µm) centred on each spot into embeddings_<backbone>__ctx<W>um (repeatable: one table per width); heads load it as backbone <backbone>__ctx<W>um.",
        ),
    ] = None,
    stain: Annotated[str, typer.Option(help="macenko | reinhard | none")] = "macenko",
    stain_template: Annotated[
        str | None,
        typer.Option(
            help="Slide id whose stain is the target [default: the one the backbone's vectors used, else the first slide id]."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch (= resume chunk).")] = 32,
    workers: Annotated[
        int | None,
        typer.Option(help="DataLoader worker processes reading tiles [default: 0 for small jobs, else cores - 1]."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[
        str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: measured on CPU, spec dtype on GPU).")
    ] = "auto",
    weights: Annotated[
        list[str] | None, typer.Option("--weights", help="NAME=PATH local weights file (repeatable).")
    ] = None,
    only_qc: Annotated[bool, typer.Option(help="Embed only spots passing tissue QC.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Drop the backbone's existing vectors first (with --slide: only those slides' vectors)."),
    ] = False,
    flush_rows: Annotated[int, typer.Option(help="Rows buffered per backbone before an atomic append.")] = 512,
    wait: WaitOpt = 0.0,
    engine: Annotated[
        str,
        typer.Option(
            help="local (this process) | ray (a Ray Data pipeline; needs the distributed extra: pip install stimage-embed\\[distributed])."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="Ray engine: cluster address (auto | ray://HOST:10001); default: start a local Ray."),
    ] = None,
    gpus_per_worker: Annotated[
        float, typer.Option(help="Ray engine: GPUs per model worker (0: CPU workers of 0.5 CPU each).")
    ] = 0.0,
) -> None:
    """Embed every spot tile once per backbone into embeddings_<backbone> (resumable).
    With --engine ray, --workers is the number of model workers (Ray actors)."""
    from stimage_embed.embeddings.embed_pass import embed as run_embed
    from stimage_embed.errors import InputError
    from stimage_embed.store import Store

    wmap = weights_map(weights)
    names = backbone_names(backbone, "--backbone")
    st = Store(store, lock_wait=wait)
    if engine not in ("local", "ray"):
        raise InputError(None, "--engine", f"expected local or ray, got {engine!r}")
    if engine == "ray":
        from stimage_embed.embeddings.ray_engine import RayConfig, embed_ray

        run_embed = functools.partial(embed_ray, config=RayConfig(address=address, gpus_per_worker=gpus_per_worker))
    with st.writer("embed"):
        for width in context_um or [None]:  # one pass (and one table per backbone) per context width
            extra = {} if width is None else {"context_um": width}
            report = run_embed(
                st,
                names,
                slides=slide,
                tile_um=tile_um,
                stain=stain,
                stain_template=stain_template,
                batch_size=batch_size,
                num_workers=workers,
                device=device,
                precision=precision,
                weights=wmap,
                only_qc=only_qc,
                overwrite=overwrite,
                flush_rows=flush_rows,
                **extra,
            )
            typer.echo(report.line() if width is None else f"context {width:g} µm: {report.line()}")


@app.command()
@cli_errors
def train(
    backbone: Annotated[
        str, typer.Option("--backbone", "-b", help="Backbone whose cached vectors to train on.")
    ] = "efficientnet_lite0",
    head: Annotated[str, typer.Option(help="a head fitted on one backbone's vectors: " + head_help())] = "nb",
    genes: Annotated[
        str,
        typer.Option(
            help="var:K (default; top K by variance of log1p CP10k) | mean:K | seurat:K (alias hvg:K) | panel:NAME | file:PATH, selected on the training slides only."
        ),
    ] = "var:50",
    train_slides: Annotated[str | None, typer.Option("--train", help="Training slide ids, comma-separated.")] = None,
    train_sql: Annotated[str | None, typer.Option(help="SQL returning the training slide_ids.")] = None,
    all_spots: Annotated[bool, typer.Option(help="Train on spots failing tissue QC too.")] = False,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
    models_dir: ModelsDirOpt = None,
) -> None:
    """Fit one head on cached vectors and save it under <store>/models/<run_id>."""
    from stimage_embed.errors import InputError
    from stimage_embed.predictions.train_predict import train as run_train
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait, models_dir=models_dir)
    names = backbone_names(backbone, "--backbone")
    if len(names) != 1:
        raise InputError(None, "--backbone", f"train fits one backbone's vectors; got {names}")
    backbone = names[0]
    slides = slides_from(st, train_sql, train_slides, "--train") or []
    with st.writer("train"):
        rid, path = run_train(st, backbone, head, genes, slides, only_qc=not all_spots)
    typer.echo(f"model {rid} saved to {path}")


@app.command()
@cli_errors
def predict(
    model: Annotated[str, typer.Option(help="Model run id (under <store>/models) or a model folder.")],
    slides: Annotated[str | None, typer.Option("--slide", help="Slide ids, comma-separated.")] = None,
    slides_sql: Annotated[str | None, typer.Option(help="SQL returning the slide_ids to predict.")] = None,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
    models_dir: ModelsDirOpt = None,
) -> None:
    """Predict expression for slides with a saved model; writes the predictions table."""
    from stimage_embed.predictions.train_predict import predict as run_predict
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait, models_dir=models_dir)
    ids = slides_from(st, slides_sql, slides, "--slide", "--slides-sql") or []
    with st.writer("predict"):
        pred = run_predict(st, model, ids)
    typer.echo(
        f"{pred.height} prediction rows written for {pred['slide_id'].n_unique()} slide(s), "
        f"{pred['gene'].n_unique()} genes, run {pred['run_id'][0]}"
    )


@app.command()
@cli_errors
def infer(
    image: Annotated[
        Path,
        typer.Argument(help="H&E image: whole-slide file (svs, ndpi, mrxs, tiled/pyramidal TIFF ...) or JPEG/PNG."),
    ],
    model: Annotated[str, typer.Option(help="Model run id (under <store>/models) or a model folder, from `train`.")],
    out: Annotated[Path, typer.Option(help="Output folder: <ID>.h5ad, <ID>/<gene>.png heatmaps, <ID>_pseudobulk.csv.")],
    slide_id: Annotated[
        str | None, typer.Option(help="Id of the new slide (default: the image file name without suffix).")
    ] = None,
    um_per_px: Annotated[
        float | None,
        typer.Option(help="µm per full-resolution pixel (required for JPEG/PNG; overrides WSI metadata)."),
    ] = None,
    pitch_um: Annotated[
        float | None, typer.Option(help="Grid pitch in µm (default: the model's tile width).")
    ] = None,
    genes: Annotated[
        str | None,
        typer.Option(help="Comma-separated genes to draw besides the top ones (all model genes are predicted)."),
    ] = None,
    top_genes: Annotated[
        int, typer.Option(help="Heatmaps of the N genes whose predictions vary most across tiles.")
    ] = 6,
    tissue_threshold: Annotated[
        float, typer.Option(help="Tiles whose disk is at least this much tissue pass QC (pseudo-bulk).")
    ] = 0.7,
    min_tissue: Annotated[float, typer.Option(help="Grid tiles with less tissue than this are skipped.")] = 0.1,
    region: Annotated[
        str | None,
        typer.Option(help="Only tiles centred in X0,Y0,X1,Y1 (full-resolution px): a region of interest."),
    ] = None,
    weights: Annotated[
        str | None, typer.Option(help="Local weights file of the model's backbone (as `embed --weights`).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes reading tiles.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    store: StoreOpt = Path("store"),
    models_dir: ModelsDirOpt = None,
) -> None:
    """Predict a model's genes on a slide that has only an image: grid over tissue, embed, predict, maps."""
    from stimage_embed.inference.infer import infer as run_infer
    from stimage_embed.store import Store

    box = region_box(region)
    result = run_infer(
        Store(store, models_dir=models_dir),
        image,
        model,
        out,
        slide_id=slide_id,
        um_per_px=um_per_px,
        pitch_um=pitch_um,
        genes=split_csv(genes) or None,
        n_top_genes=top_genes,
        tissue_threshold=tissue_threshold,
        min_tissue=min_tissue,
        region=box,
        weights=weights,
        num_workers=workers,
        device=device,
        progress=True,
    )
    for line in result.lines():
        typer.echo(line)


@app.command()
@cli_errors
def compare(
    backbones: Annotated[
        str, typer.Option("--backbones", help="Comma-separated backbones with vectors in the store.")
    ] = "efficientnet_lite0",
    heads: Annotated[str, typer.Option("--heads", help="Comma-separated head names: " + head_help())] = ",".join(
        head_names(spans_backbones=False)
    ),
    split: Annotated[str, typer.Option(help="loso | lopo | kfold:K[:SEED] (folds within each dataset).")] = "loso",
    genes: Annotated[
        str,
        typer.Option(
            help="var:K (default; top K by variance of log1p CP10k) | mean:K | seurat:K (alias hvg:K) | panel:NAME | file:PATH, selected on the training slides only."
        ),
    ] = "var:50",
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="Comma-separated datasets [default: all].")
    ] = None,
    train: Annotated[str | None, typer.Option(help="Explicit split: training slide ids, comma-separated.")] = None,
    test: Annotated[str | None, typer.Option(help="Explicit split: test slide ids, comma-separated.")] = None,
    train_sql: Annotated[
        str | None, typer.Option(help="Explicit split: SQL returning the training slide_ids.")
    ] = None,
    test_sql: Annotated[str | None, typer.Option(help="Explicit split: SQL returning the test slide_ids.")] = None,
    missing: Annotated[
        str, typer.Option(help="FSTimage policy for spots missing in a backbone: error | drop | available.")
    ] = "error",
    all_spots: Annotated[bool, typer.Option(help="Use spots failing tissue QC too.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write a Markdown + PNG report folder here.")] = None,
    highlow_max_iter: Annotated[
        int, typer.Option(help="iterations of the high/low classifier's solver (FISTA; saga epochs with solver saga).")
    ] = 1000,
    control: Annotated[
        str | None,
        typer.Option(
            help="Also run a leak control: 'shuffled' trains and scores every head on vectors permuted among each slide's spots (should score about 0)."
        ),
    ] = None,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
) -> None:
    """Train and evaluate every fold x backbone x head from the cache; print the leaderboard
    and the paired comparisons (mean PCC difference with a bootstrap 95 % CI; a CI covering
    0 is a tie)."""
    from stimage_embed.errors import InputError
    from stimage_embed.evaluation.compare import CompareConfig
    from stimage_embed.evaluation.compare import compare as run_compare
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait)
    tr = slides_from(st, train_sql, train, "--train")
    te = slides_from(st, test_sql, test, "--test")
    if (tr is None) != (te is None):
        raise InputError(None, "--train/--test", "give both the training and the test slides for an explicit split")
    cfg = CompareConfig(
        backbones=backbone_names(backbones, "--backbones"),
        heads=split_csv(heads),
        split=split,
        genes=genes,
        datasets=split_csv(dataset) or None,
        only_qc=not all_spots,
        missing=missing,
        train_slides=tr,
        test_slides=te,
        head_params={"highlow": {"max_iter": highlow_max_iter}} if highlow_max_iter != 1000 else {},
        controls=split_csv(control),
    )
    with st.writer("compare"):
        result = run_compare(st, cfg)
    print_compare_result(st, result, report)


from stimage_embed.cli_labels import register as register_labels  # noqa: E402

register_labels(app)

if __name__ == "__main__":
    app()
