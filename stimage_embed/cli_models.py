"""Verbs that fit and use models: ``train``, ``predict``, ``infer``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stimage_embed.cli_checks import check_device, check_min, check_output_dir, check_store_path
from stimage_embed.cli_helpers import (
    ModelsDirOpt,
    StoreOpt,
    WaitOpt,
    backbone_names,
    cli_errors,
    listed,
    region_box,
    slides_from,
)
from stimage_embed.errors import InputError
from stimage_embed.paths import DEFAULT_BACKBONE
from stimage_embed.predictions.registry import head_help, head_names

GENES_HELP = (
    "var:K (top K by variance of log1p CP10k) | mean:K | seurat:K (alias hvg:K) | panel:NAME | file:PATH, "
    "selected on the training slides only. Genes detected in too few training spots are dropped first, "
    "so var:50 may keep fewer than 50."
)
_BackboneOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backbone",
        "--backbones",
        "-b",
        metavar="NAME[,NAME]",
        help="Backbone whose cached vectors to train on.",
        show_default=DEFAULT_BACKBONE,
    ),
]
_TrainOpt = Annotated[
    list[str] | None,
    typer.Option("--train", metavar="ID[,ID]", help="Training slide ids (repeatable; comma lists too)."),
]
_SlideOpt = Annotated[
    list[str] | None,
    typer.Option("--slide", "--slides", metavar="ID[,ID]", help="Slide ids (repeatable; comma lists too)."),
]
_ModelOpt = Annotated[str, typer.Option(help="Model run id (under <store>/models) or a model folder, from `train`.")]
_OutOpt = Annotated[Path, typer.Option(help="Output folder: <ID>.h5ad, <ID>/<gene>.png heatmaps, <ID>_pseudobulk.csv.")]
_UmPerPxOpt = Annotated[
    float | None,
    typer.Option(
        help="µm per full-resolution pixel (required for JPEG/PNG: from the scanner's or microscope's metadata, "
        "or a scale bar: bar length in µm / its length in pixels; overrides WSI metadata)."
    ),
]
_GenesDrawOpt = Annotated[
    list[str] | None,
    typer.Option(
        metavar="GENE[,GENE]",
        help="Genes to draw besides the top ones (repeatable; comma lists too; all model genes are predicted).",
    ),
]
_RegionOpt = Annotated[
    str | None,
    typer.Option(help="Only tiles centred in X0,Y0,X1,Y1 (full-resolution px): a region of interest."),
]


@cli_errors
def train(
    backbone: _BackboneOpt = None,
    head: Annotated[str, typer.Option(help="a head fitted on one backbone's vectors: " + head_help())] = "nb",
    genes: Annotated[str, typer.Option(help=GENES_HELP)] = "var:50",
    train_slides: _TrainOpt = None,
    train_sql: Annotated[str | None, typer.Option(help="SQL returning the training slide_ids.")] = None,
    all_spots: Annotated[bool, typer.Option(help="Train on spots failing tissue QC too.")] = False,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Label set the label head learns (see `labels add`).")
    ] = None,
    knn_copy_vectors: Annotated[
        bool,
        typer.Option(
            "--knn-copy-vectors",
            help="knn: copy the training vectors and profiles into the model folder (self-contained, for sharing) "
            "instead of referencing them in this store.",
        ),
    ] = False,
    store: StoreOpt = "store",
    wait: WaitOpt = 0.0,
    models_dir: ModelsDirOpt = None,
) -> None:
    """Fit one head on cached vectors and save it under <store>/models/<run_id>."""
    from stimage_embed.predictions.train_predict import train as run_train
    from stimage_embed.store import Store

    names = backbone_names(backbone or [DEFAULT_BACKBONE], "--backbone")
    if len(names) != 1:
        raise InputError(None, "--backbone", f"train fits one backbone's vectors; got {names}")
    if not train_slides and not train_sql:
        raise InputError(None, "--train", "no training slides given: name them with --train (or --train-sql)")
    if labels and head not in head_names(output="label"):
        raise InputError(None, "--labels", f"a label set is learned by the label head, not {head!r}: use --head label")
    check_store_path(store, write=True)
    st = Store(store, lock_wait=wait, models_dir=models_dir)
    slides = slides_from(st, train_sql, train_slides, "--train") or []
    with st.writer("train"):
        rid, path = run_train(
            st, names[0], head, genes, slides, only_qc=not all_spots, labels=labels, copy_vectors=knn_copy_vectors
        )
    typer.echo(f"model {rid} saved to {path}")


@cli_errors
def predict(
    model: _ModelOpt,
    slides: _SlideOpt = None,
    slides_sql: Annotated[str | None, typer.Option(help="SQL returning the slide_ids to predict.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Also write, per slide, <ID>.h5ad, <ID>/<gene>.png heatmaps and <ID>_pseudobulk.csv here."),
    ] = None,
    store: StoreOpt = "store",
    wait: WaitOpt = 0.0,
    models_dir: ModelsDirOpt = None,
) -> None:
    """Predict expression for slides with a saved model; writes the predictions table and
    prints each slide's PCC against its measured counts (slides with counts)."""
    from stimage_embed.inference.predict_outputs import predict_and_report

    if not slides and not slides_sql:
        raise InputError(None, "--slide", "no slides given: name them with --slide (or --slides-sql)")
    check_output_dir(out, "--out")
    check_store_path(store, write=True)
    from stimage_embed.store import Store

    st = Store(store, lock_wait=wait, models_dir=models_dir)
    ids = slides_from(st, slides_sql, slides, "--slide", "--slides-sql") or []
    for line in predict_and_report(st, model, ids, out):
        typer.echo(line)


@cli_errors
def infer(
    image: Annotated[
        Path,
        typer.Argument(help="H&E image: whole-slide file (svs, ndpi, mrxs, tiled/pyramidal TIFF ...) or JPEG/PNG."),
    ],
    model: _ModelOpt,
    out: _OutOpt,
    slide_id: Annotated[
        str | None, typer.Option(help="Id of the new slide.", show_default="the image file name without suffix")
    ] = None,
    um_per_px: _UmPerPxOpt = None,
    pitch_um: Annotated[
        float | None, typer.Option(help="Grid pitch in µm.", show_default="the model's tile width")
    ] = None,
    genes: _GenesDrawOpt = None,
    top_genes: Annotated[int, typer.Option(help="Heatmaps of the N genes whose predictions vary most.")] = 6,
    tissue_threshold: Annotated[
        float, typer.Option(help="Tiles whose disk is at least this much tissue pass QC (pseudo-bulk).")
    ] = 0.7,
    min_tissue: Annotated[float, typer.Option(help="Grid tiles with less tissue than this are skipped.")] = 0.1,
    region: _RegionOpt = None,
    weights: Annotated[
        str | None, typer.Option(help="Local weights file of the model's backbone (as `embed --weights`).")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes reading tiles.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    store: StoreOpt = "store",
    models_dir: ModelsDirOpt = None,
) -> None:
    """Predict a model's genes on a slide that has only an image: grid over tissue, embed, predict, maps."""
    from stimage_embed.inference.infer import infer as run_infer
    from stimage_embed.store import Store

    box = region_box(region)
    check_min(um_per_px, 0, "--um-per-px", strict=True)
    check_min(pitch_um, 0, "--pitch-um", strict=True)
    check_min(workers, 0, "--workers")
    check_min(top_genes, 0, "--top-genes")
    check_device(device)
    check_store_path(store, create=Path(model).is_dir(), write=True)  # a model folder may start a new store
    result = run_infer(
        Store(store, models_dir=models_dir),
        image,
        model,
        out,
        slide_id=slide_id,
        um_per_px=um_per_px,
        pitch_um=pitch_um,
        genes=listed(genes, "--genes") or None,
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


def register(app: typer.Typer) -> None:
    """Add ``train``, ``predict`` and ``infer`` to ``app``."""
    app.command(short_help="Fit one head on cached vectors; save the model.")(train)
    app.command(short_help="Predict slides with a saved model; PCC vs counts.")(predict)
    app.command(short_help="Predict a slide that has only an image.")(infer)
