"""``stimage-embed labels``: categorical labels per spot and the ``label`` head.

* ``labels add FILE --key slide_id,spot_id --column cell_type``: store a label table.
* ``labels compare --labels cell_type``: leave-one-slide-out (or ``--train/--test``) fits of
  the ``label`` head on cached vectors, with the shuffled-labels control: macro-F1, balanced
  accuracy, per-class F1 and a confusion-matrix plot per run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import polars as pl
import typer

from stimage_embed.cli_helpers import StoreOpt, WaitOpt, cli_errors, print_frame, split_csv

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
    from stimage_embed.errors import InputError
    from stimage_embed.store import Store
    from stimage_embed.store.labels import add_labels

    keys = split_csv(key)
    if len(keys) != 2:
        raise InputError(file, "--key", f"expected two columns (slide, spot), got {keys}")
    n = add_labels(Store(store, lock_wait=wait), file, (keys[0], keys[1]), column, name)
    typer.echo(f"{n} label(s) stored as label set {name or column!r}")


@labels_app.command("compare")
@cli_errors
def compare(
    labels: Annotated[str, typer.Option("--labels", help="Label set to learn (see `labels add`).")],
    backbone: Annotated[str, typer.Option("--backbone", "-b")] = "efficientnet_lite0",
    train: Annotated[str | None, typer.Option("--train", help="Training slides (with --test).")] = None,
    test: Annotated[str | None, typer.Option("--test", help="Test slides (with --train).")] = None,
    control: Annotated[bool, typer.Option(help="Also run the shuffled-labels control.")] = True,
    c: Annotated[float, typer.Option("--C", help="Inverse elastic-net strength.")] = 0.1,
    l1_ratio: Annotated[float, typer.Option(help="Elastic-net mixing (0 ridge, 1 lasso).")] = 0.5,
    plots: Annotated[Path | None, typer.Option(help="Folder for confusion-matrix PNGs.")] = None,
    store: StoreOpt = "store",
) -> None:
    """Leave-one-slide-out label head: macro-F1, balanced accuracy, per-class F1 (+ control)."""
    from stimage_embed.errors import InputError
    from stimage_embed.evaluation.label_metrics import label_scores, plot_confusion
    from stimage_embed.predictions.label_runs import run_labels
    from stimage_embed.store import Store

    if (train is None) != (test is None):
        raise InputError(None, "--train/--test", "give both the training and the test slides for an explicit split")
    st = Store(store)
    rows, per_class = [], []
    for ctl in ("none", "shuffled_labels") if control else ("none",):
        runs = run_labels(
            st,
            backbone,
            labels,
            split_csv(train) if train else None,
            split_csv(test) if test else None,
            control=ctl,
            params={"C": c, "l1_ratio": l1_ratio},
        )
        for run in runs:
            s = label_scores(run.y_true, run.y_pred)
            rows.append(
                {
                    "test": run.fold,
                    "control": ctl,
                    "n": s.n,
                    "macro_f1": round(s.macro_f1, 3),
                    "balanced_accuracy": round(s.balanced_accuracy, 3),
                    "chance": round(s.chance_balanced_accuracy, 3),
                }
            )
            per_class += [
                {"test": run.fold, "control": ctl, "class": k, "f1": round(float(f), 3)}
                for k, f in zip(s.classes, s.per_class_f1)
            ]
            if plots is not None:
                plot_confusion(s, plots / f"confusion_{labels}_{backbone}_{run.fold}_{ctl}.png")
    print_frame(pl.DataFrame(rows))
    print_frame(pl.DataFrame(per_class).pivot("class", index=["test", "control"], values="f1"))
    mean = {
        ctl: float(np.mean([r["macro_f1"] for r in rows if r["control"] == ctl]))
        for ctl in {r["control"] for r in rows}
    }
    typer.echo("mean macro-F1: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(mean.items())))


def register(app: typer.Typer) -> None:
    """Add the ``labels`` command group to the main CLI."""
    app.add_typer(labels_app, name="labels")
