"""``stimage-embed labels``: categorical labels per spot and the ``label`` head.

* ``labels add FILE --key slide_id,spot_id --column cell_type``: store a label table.
* ``labels compare --labels cell_type``: an alias of ``compare --heads label --labels cell_type``
  (one backbone, with the shuffled-labels control): macro-F1, balanced accuracy, per-class F1
  and a confusion-matrix plot, all kept in the store (``label_metrics``, ``label_predictions``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from stimage_embed.cli_helpers import StoreOpt, WaitOpt, cli_errors, print_frame, split_csv
from stimage_embed.paths import DEFAULT_BACKBONE

labels_app = typer.Typer(
    help="Categorical labels per spot (cell type, region ...) and the label head.", no_args_is_help=True
)


@labels_app.command("add")
@cli_errors
def add(
    file: Annotated[Path, typer.Argument(help="CSV / TSV / parquet with one row per spot.")],
    column: Annotated[str, typer.Option(help="The label column, e.g. cell_type.")],
    key: Annotated[
        str, typer.Option(help="The file's slide and spot id columns, comma-separated.")
    ] = "slide_id,spot_id",
    name: Annotated[str | None, typer.Option(help="Label set name [default: the column name].")] = None,
    store: StoreOpt = "store",
    wait: WaitOpt = 0.0,
) -> None:
    """Store a label table as one label set (replaces that set's labels of the same slides)."""
    from stimage_embed.cli_checks import check_store_path
    from stimage_embed.errors import InputError
    from stimage_embed.store import Store
    from stimage_embed.store.labels import add_labels

    keys = split_csv(key)
    if len(keys) != 2:
        raise InputError(file, "--key", f"expected two columns (slide, spot), got {keys}")
    check_store_path(store, write=True)  # a missing store is not created
    n = add_labels(Store(store, lock_wait=wait), file, (keys[0], keys[1]), column, name)
    typer.echo(f"{n} label(s) stored as label set {name or column!r}")


@labels_app.command("compare")
@cli_errors
def compare(
    labels: Annotated[str, typer.Option("--labels", help="Label set to learn (see `labels add`).")],
    backbone: Annotated[str, typer.Option("--backbone", "-b")] = DEFAULT_BACKBONE,
    train: Annotated[str | None, typer.Option("--train", help="Training slides (with --test).")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Test slides (with --train).")] = None,
    control: Annotated[bool, typer.Option(help="Also run the shuffled-labels control.")] = True,
    c: Annotated[float, typer.Option("--C", help="Inverse elastic-net strength.")] = 0.1,
    l1_ratio: Annotated[float, typer.Option(help="Elastic-net mixing (0 ridge, 1 lasso).")] = 0.5,
    plots: Annotated[Path | None, typer.Option(help="Folder for confusion-matrix PNGs.")] = None,
    store: StoreOpt = "store",
) -> None:
    """Alias of `compare --heads label --labels NAME`: leave-one-slide-out label head with
    macro-F1, balanced accuracy, per-class F1 (+ the shuffled-labels control)."""
    from stimage_embed.errors import InputError
    from stimage_embed.evaluation.compare import CompareConfig
    from stimage_embed.evaluation.compare import compare as run_compare
    from stimage_embed.predictions.registry import head_spec
    from stimage_embed.store import Store
    from stimage_embed.store.labels import read_labels
    from stimage_embed.store.store import sql_list

    if (train is None) != (test is None):
        raise InputError(None, "--train/--test", "give both the training and the test slides for an explicit split")
    defaults = head_spec("label").make().get_params()
    params = {k: v for k, v in {"C": c, "l1_ratio": l1_ratio}.items() if v != defaults[k]}
    cfg = CompareConfig(
        backbones=[backbone],
        heads=["label"],
        labels=labels,
        controls=["shuffled"] if control else [],
        head_params={"label": params} if params else {},
        train_slides=split_csv(train) if train else None,
        test_slides=split_csv(test) if test else None,
    )
    st = Store(store)
    labelled = sorted(set(read_labels(st, labels)["slide_id"]))
    cfg.datasets = sorted(
        set(st.sql(f"SELECT dataset FROM slides WHERE slide_id IN ({sql_list(labelled)})")["dataset"])
    )
    with st.writer("compare"):
        result = run_compare(st, cfg, progress=False)
    typer.echo(f"{result.computed} run(s) computed, {result.reused} reused from the store, {result.seconds:.1f} s")
    print_label_result(st, result.label_run_ids, plots)


def print_label_result(store, run_ids: list[str], plots: Path | None = None) -> None:
    """Print the label head's scores of ``run_ids`` (per backbone x head x control, then F1
    per class); write confusion PNGs to ``plots`` (the report's label section: ``compare --report``)."""
    from stimage_embed.evaluation.label_report import (
        label_per_class,
        label_summary,
        write_confusions,
    )

    summary = label_summary(store, run_ids)
    typer.echo("label head (held-out slides; chance = 1 / classes):")
    print_frame(summary.with_columns(pl.col(pl.Float64).round(3)))
    print_frame(label_per_class(store, run_ids).with_columns(pl.col(pl.Float64).round(3)))
    means = summary.group_by("control").agg(pl.col("macro_f1").mean()).sort("control")
    typer.echo("mean macro-F1: " + ", ".join(f"{k} {v:.3f}" for k, v in means.iter_rows()))
    if plots is not None:
        for png in write_confusions(store, run_ids, plots):
            typer.echo(f"confusion matrix: {png}")


def register(app: typer.Typer) -> None:
    """Add the ``labels`` command group to the main CLI."""
    app.add_typer(labels_app, name="labels")
