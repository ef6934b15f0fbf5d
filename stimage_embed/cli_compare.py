"""The ``compare`` verb: every fold x backbone x head from the cache, the leaderboard and
the paired comparisons."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from stimage_embed.cli_checks import (
    CONTROLS,
    MISSING_POLICIES,
    check_choice,
    check_min,
    check_output_dir,
    check_store_path,
)
from stimage_embed.cli_helpers import (
    StoreOpt,
    WaitOpt,
    backbone_names,
    cli_errors,
    listed,
    print_frame,
    slides_from,
)
from stimage_embed.cli_models import GENES_HELP
from stimage_embed.errors import InputError
from stimage_embed.paths import DEFAULT_BACKBONE
from stimage_embed.predictions.registry import head_help, head_names

_BackbonesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--backbone",
        "--backbones",
        "-b",
        metavar="NAME[,NAME]",
        help="Backbones with vectors in the store (repeatable; comma lists too).",
        show_default=DEFAULT_BACKBONE,
    ),
]
_HeadsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--head",
        "--heads",
        metavar="NAME[,NAME]",
        show_default="every head but fstimage",
        help="Head names (repeatable; comma lists too): " + head_help(),
    ),
]
_SlidesOpt = Annotated[
    list[str] | None, typer.Option(metavar="ID[,ID]", help="Explicit split: slide ids (repeatable; comma lists).")
]
_DatasetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dataset",
        "--datasets",
        metavar="NAME[,NAME]",
        help="Datasets (repeatable; comma lists too).",
        show_default="all",
    ),
]
_MissingOpt = Annotated[
    str, typer.Option(help="FSTimage policy for spots missing in a backbone: error | drop | available.")
]
_MaxIterOpt = Annotated[
    int, typer.Option(help="iterations of the high/low classifier's solver (FISTA; saga epochs with solver saga).")
]
_ControlOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--control",
        "--controls",
        metavar="shuffled",
        help="Also run a leak control: 'shuffled' trains and scores every head on vectors permuted among "
        "each slide's spots (should score about 0).",
    ),
]


@cli_errors
def compare(
    backbones: _BackbonesOpt = None,
    heads: _HeadsOpt = None,
    split: Annotated[str, typer.Option(help="loso | lopo | kfold:K[:SEED] (folds within each dataset).")] = "loso",
    genes: Annotated[str, typer.Option(help=GENES_HELP)] = "var:50",
    dataset: _DatasetOpt = None,
    train: _SlidesOpt = None,
    test: _SlidesOpt = None,
    train_sql: Annotated[str | None, typer.Option(help="Explicit split: SQL returning the training slide_ids.")] = None,
    test_sql: Annotated[str | None, typer.Option(help="Explicit split: SQL returning the test slide_ids.")] = None,
    missing: _MissingOpt = "error",
    all_spots: Annotated[bool, typer.Option(help="Use spots failing tissue QC too.")] = False,
    report: Annotated[Path | None, typer.Option(help="Write a Markdown + PNG report folder here.")] = None,
    highlow_max_iter: _MaxIterOpt = 1000,
    control: _ControlOpt = None,
    labels: Annotated[
        str | None, typer.Option("--labels", help="Label set the label head learns (`labels add`); adds it to heads.")
    ] = None,
    store: StoreOpt = "store",
    wait: WaitOpt = 0.0,
) -> None:
    """Train and evaluate every fold x backbone x head from the cache; print the leaderboard
    and the paired comparisons (mean PCC difference with a bootstrap 95 % CI; a CI covering
    0 is a tie)."""
    from stimage_embed.evaluation.compare import CompareConfig
    from stimage_embed.evaluation.compare import compare as run_compare
    from stimage_embed.store import Store

    head_list = listed(heads, "--head") or [*head_names(spans_backbones=False), *(["label"] if labels else [])]
    controls = [check_choice(c, CONTROLS, "--control") for c in listed(control, "--control")]
    check_choice(missing, MISSING_POLICIES, "--missing")
    check_min(highlow_max_iter, 1, "--highlow-max-iter")
    names = backbone_names(backbones or [DEFAULT_BACKBONE], "--backbone")
    check_output_dir(report, "--report")  # before any run is committed
    check_store_path(store, write=True)
    st = Store(store, lock_wait=wait)
    tr = slides_from(st, train_sql, train, "--train")
    te = slides_from(st, test_sql, test, "--test")
    if (tr is None) != (te is None):
        raise InputError(None, "--train/--test", "give both the training and the test slides for an explicit split")
    cfg = CompareConfig(
        backbones=names,
        heads=head_list,
        split=split,
        genes=genes,
        datasets=listed(dataset, "--dataset") or None,
        only_qc=not all_spots,
        missing=missing,
        train_slides=tr,
        test_slides=te,
        head_params={"highlow": {"max_iter": highlow_max_iter}} if highlow_max_iter != 1000 else {},
        controls=controls,
        labels=labels,
    )
    with st.writer("compare"):
        result = run_compare(st, cfg)
    if result.run_ids or not result.label_run_ids:
        print_compare_result(result)
    if result.label_run_ids:  # the label heads' tables (evaluation.label_report)
        from stimage_embed.cli_labels import print_label_result

        if not result.run_ids:
            typer.echo(f"{result.computed} run(s) computed, {result.reused} reused from the store")
        print_label_result(st, result.label_run_ids)
    if report is not None:
        from stimage_embed.evaluation.report_driver import write_compare_report

        typer.echo(f"report: {write_compare_report(st, result, report)}")


def print_compare_result(result) -> None:
    """Print a ``compare`` result (``evaluation.compare.CompareResult``): runs, leaderboard
    and paired comparisons, all computed by ``compare``."""
    typer.echo(f"{result.computed} run(s) computed, {result.reused} reused from the store, {result.seconds:.1f} s")
    rounded = ("pcc_median", "pcc_mean", "mse_mean", "iou_mean", "auc_mean", "coverage_90")
    keys = ("dataset", "split", "gene_spec", "control", "backbone", "head", "folds")
    print_frame(
        result.leaderboard.select(
            *keys, pl.col("genes").alias("genes_all_folds"), *[pl.col(c).round(3) for c in rounded]
        )
    )
    typer.echo(
        "genes_all_folds: distinct genes over the folds (each fold selects its own K genes from its training "
        "slides, so var:50 over 5 folds can reach more than 50)"
    )
    paired = result.paired
    if paired.height:
        typer.echo("paired comparisons (per-slide PCC over common slide x gene pairs; tie = 95 % CI covers 0):")
        better = pl.concat_str(pl.col("a_backbone"), pl.lit("/"), pl.col("a_head"), pl.lit(" better"))
        worse = pl.concat_str(pl.col("b_backbone"), pl.lit("/"), pl.col("b_head"), pl.lit(" better"))
        verdict = pl.when(pl.col("verdict") == "a").then(better).when(pl.col("verdict") == "b").then(worse)
        print_frame(
            paired.select(
                "dataset",
                "a_backbone",
                "a_head",
                "b_backbone",
                "b_head",
                "n_pairs",
                *[pl.col(c).round(3) for c in ("diff", "ci_low", "ci_high")],
                verdict.otherwise(pl.lit("tie (95 % CI covers 0)")).alias("verdict"),
            )
        )


def register(app: typer.Typer) -> None:
    """Add ``compare`` to ``app``."""
    app.command(short_help="Cross-validate backbones x heads; leaderboard.")(compare)
