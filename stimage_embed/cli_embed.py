"""The ``embed`` verb: every spot tile once per backbone into ``embeddings_<backbone>``."""

from __future__ import annotations

import functools
from typing import Annotated

import typer

from stimage_embed.cli_checks import check_embed_options, check_min, check_store_path
from stimage_embed.cli_helpers import StoreOpt, WaitOpt, backbone_names, cli_errors, listed, weights_map
from stimage_embed.errors import InputError
from stimage_embed.paths import DEFAULT_BACKBONE


def context_widths(values: list[str] | None) -> list[float | None]:
    """``--context-um`` values (repeatable, comma lists) as widths in µm; ``[None]`` (the
    spot tile only) when not given."""
    widths: list[float | None] = []
    for item in listed(values, "--context-um"):
        try:
            widths.append(float(item))
        except ValueError as exc:
            raise InputError(None, "--context-um", f"expected a width in µm, got {item!r}") from exc
        check_min(widths[-1], 0, "--context-um", strict=True)
    return widths or [None]


_BackboneOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backbone",
        "--backbones",
        "-b",
        metavar="NAME[,NAME]",
        help="Backbone names (repeatable; comma lists too; see `stimage-embed backbones`).",
        show_default=DEFAULT_BACKBONE,
    ),
]

_SlideOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--slide", "--slides", metavar="ID[,ID]", help="Only these slides (repeatable; comma lists too) [default: all]."
    ),
]

_TileUmOpt = Annotated[
    float | None,
    typer.Option(help="Tile width in µm.", show_default="each slide's spot diameter"),
]

_ContextUmOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--context-um",
        metavar="WIDTH_UM",
        help="Embed a wider window of this width (µm) centred on each spot into "
        "embeddings_<backbone>__ctx<W>um (repeatable: one table per width); heads load it as "
        "backbone <backbone>__ctx<W>um.",
    ),
]

_StainTemplateOpt = Annotated[
    str | None,
    typer.Option(
        help="Slide id whose stain is the target.",
        show_default="the one the backbone's vectors used, else the first slide id",
    ),
]

_WorkersOpt = Annotated[
    int | None,
    typer.Option(help="DataLoader worker processes reading tiles.", show_default="0 for small jobs, else cores - 1"),
]

_PrecisionOpt = Annotated[
    str, typer.Option(help="auto | float32 | bfloat16 | float16 (auto: measured on CPU, spec dtype on GPU).")
]

_WeightsOpt = Annotated[list[str] | None, typer.Option("--weights", help="NAME=PATH local weights file (repeatable).")]

_OverwriteOpt = Annotated[
    bool,
    typer.Option(help="Drop the backbone's existing vectors first (with --slide: only those slides' vectors)."),
]

_EngineOpt = Annotated[
    str,
    typer.Option(
        help="local (this process) | ray (a Ray Data pipeline; needs the distributed extra: "
        "pip install stimage-embed\\[distributed])."
    ),
]

_AddressOpt = Annotated[
    str | None,
    typer.Option(help="Ray engine: cluster address (auto | ray://HOST:10001).", show_default="start a local Ray"),
]

_GpusPerWorkerOpt = Annotated[
    float, typer.Option(help="Ray engine: GPUs per model worker (0: CPU workers of 0.5 CPU each).")
]


def _local_engine(address: str | None, gpus_per_worker: float):
    """The local engine's runner (this process; the Ray options do not apply)."""
    from stimage_embed.embeddings.embed_pass import execute

    return execute


def _ray_engine(address: str | None, gpus_per_worker: float):
    """The Ray engine's runner, on the cluster at ``address`` (None: a local Ray)."""
    from stimage_embed.embeddings.ray_engine import RayConfig, execute

    return functools.partial(execute, config=RayConfig(address=address, gpus_per_worker=gpus_per_worker))


#: ``--engine`` name -> its runner ``(store, EmbedRequest, RunOptions) -> EmbedReport``, made
#: from the Ray options (``--address``, ``--gpus-per-worker``); each executes the one plan
#: of ``pass_plan.plan_pass``
ENGINES = {"local": _local_engine, "ray": _ray_engine}


@cli_errors
def embed(
    backbone: _BackboneOpt = None,
    store: StoreOpt = "store",
    slide: _SlideOpt = None,
    tile_um: _TileUmOpt = None,
    context_um: _ContextUmOpt = None,
    stain: Annotated[str, typer.Option(help="macenko | reinhard | none")] = "macenko",
    stain_template: _StainTemplateOpt = None,
    batch_size: Annotated[int, typer.Option(help="Tiles per batch (= resume chunk).")] = 32,
    workers: _WorkersOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: _PrecisionOpt = "auto",
    weights: _WeightsOpt = None,
    only_qc: Annotated[bool, typer.Option(help="Embed only spots passing tissue QC.")] = False,
    overwrite: _OverwriteOpt = False,
    flush_rows: Annotated[int, typer.Option(help="Rows buffered per backbone before an atomic append.")] = 512,
    wait: WaitOpt = 0.0,
    engine: _EngineOpt = "local",
    address: _AddressOpt = None,
    gpus_per_worker: _GpusPerWorkerOpt = 0.0,
) -> None:
    """Embed every spot tile once per backbone into embeddings_<backbone> (resumable).
    With --engine ray, --workers is the number of model workers (Ray actors)."""
    from stimage_embed.embeddings.pass_plan import EmbedRequest, RunOptions
    from stimage_embed.store import Store

    # every option is checked before the store is opened: a bad value never deletes vectors
    wmap = weights_map(listed(weights, "--weights"))
    names = backbone_names(backbone or [DEFAULT_BACKBONE], "--backbone")
    slides = listed(slide, "--slide") or None
    widths = context_widths(context_um)
    check_embed_options(
        precision=precision,
        device=device,
        batch_size=batch_size,
        workers=workers,
        tile_um=tile_um,
        flush_rows=flush_rows,
    )
    if engine not in ENGINES:
        raise InputError(None, "--engine", f"expected {' or '.join(ENGINES)}, got {engine!r}")
    check_min(gpus_per_worker, 0, "--gpus-per-worker")
    check_store_path(store, write=True)
    st = Store(store, lock_wait=wait)
    run_pass = ENGINES[engine](address, gpus_per_worker)
    request = EmbedRequest.of(
        names,
        slides,
        wmap,
        tile_um=tile_um,
        stain=stain,
        stain_template=stain_template,
        precision=precision,
        batch_size=batch_size,
        device=device,
        only_qc=only_qc,
        overwrite=overwrite,
    )
    with st.writer("embed"):
        for width in widths:  # one pass (and one table per backbone) per context width
            report = run_pass(st, request.at_width(width), RunOptions(workers, flush_rows))
            typer.echo(report.line() if width is None else f"context {width:g} µm: {report.line()}")


def register(app: typer.Typer) -> None:
    """Add ``embed`` to ``app``."""
    app.command(short_help="Embed every spot tile once per backbone.")(embed)
