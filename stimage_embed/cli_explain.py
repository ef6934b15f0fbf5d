"""CLI verbs ``explain`` (LIME over the nuclei of spot tiles) and ``cluster`` (Leiden clusters
of a run's predicted profiles). See docs/explain.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stimage_embed.cli_helpers import ModelsDirOpt, StoreOpt, cli_errors, split_csv
from stimage_embed.explain.lime_tile import DEFAULT_SAMPLES


def explain(
    model: Annotated[str, typer.Option(help="Model run id (under <store>/models) or a model folder, from `train`.")],
    slide: Annotated[str, typer.Option(help="Slide id whose spot tiles to explain.")],
    gene: Annotated[
        str,
        typer.Option(
            help="Gene whose prediction to explain (one of the model's genes; a label model: one of its classes)."
        ),
    ],
    spots: Annotated[str | None, typer.Option(help="Spot ids, comma-separated.")] = None,
    top: Annotated[
        int | None, typer.Option(help="Explain the K tissue spots with the highest prediction of --gene.")
    ] = None,
    samples: Annotated[
        int,
        typer.Option(
            help="LIME perturbations per tile (LIME's default 1000): one backbone forward each, so a tile costs "
            "samples / forward rate, e.g. ~76 s at 1000 with EfficientNet-Lite0 at 13 tiles/s on 2 idle CPUs, ~8 min "
            "at 2.1 tiles/s on a loaded machine (see docs/explain.md)."
        ),
    ] = DEFAULT_SAMPLES,
    seed: Annotated[int, typer.Option(help="Seed of LIME's sampler (fixed seed: the same explanation).")] = 0,
    out: Annotated[Path, typer.Option(help="Folder of the overlay PNGs (<slide>_<spot>_<gene>.png).")] = Path(
        "explain"
    ),
    segmenter: Annotated[str, typer.Option(help="hed (default, offline) | cellpose | stardist.")] = "hed",
    segmenter_weights: Annotated[
        str | None, typer.Option(help="Local weights path for --segmenter cellpose/stardist.")
    ] = None,
    weights: Annotated[str | None, typer.Option(help="Local weights file of the model's backbone.")] = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    store: StoreOpt = Path("store"),
    models_dir: ModelsDirOpt = None,
) -> None:
    """Explain a gene's prediction on spot tiles with LIME over their nuclei; overlay PNGs and the nuclei table."""
    from stimage_embed.explain.run import explain as run_explain
    from stimage_embed.store import Store

    result = run_explain(
        Store(store, models_dir=models_dir),
        model,
        slide,
        gene,
        spots=split_csv(spots) if spots is not None else None,
        top=top,
        samples=samples,
        seed=seed,
        out=out,
        weights=weights,
        device=device,
        segmenter=segmenter,
        segmenter_weights=segmenter_weights,
        batch_size=batch_size,
    )
    for line in result.lines():
        typer.echo(line)


def cluster(
    run: Annotated[str, typer.Option(help="Run id of stored predictions (from `predict`, `infer` or `compare`).")],
    slide: Annotated[str | None, typer.Option(help="Slide ids, comma-separated [default: all of the run's].")] = None,
    resolution: Annotated[float, typer.Option(help="Leiden resolution (higher: more clusters).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of PCA, neighbours and Leiden.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Folder for one cluster map PNG per slide.")] = None,
    store: StoreOpt = Path("store"),
) -> None:
    """Leiden clusters of a run's predicted profiles; writes the clusters table (and maps)."""
    from stimage_embed.evaluation.clusters import cluster_run
    from stimage_embed.store import Store

    result = cluster_run(Store(store), run, split_csv(slide) or None, resolution=resolution, seed=seed, out=out)
    for line in result.lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    """Add ``explain`` and ``cluster`` to the CLI."""
    app.command()(cli_errors(explain))
    app.command()(cli_errors(cluster))
