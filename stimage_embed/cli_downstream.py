"""CLI verbs from predictions to patients: ``clinical add``, ``survival``, ``response``.

The logic lives in :mod:`stimage_embed.downstream`; these functions parse options, hold
the writer lock for ``clinical add`` and print. Bad input: one line, exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stimage_embed.cli_helpers import StoreOpt, WaitOpt, cli_errors, first_line, print_frame, split_csv

KeyOpt = Annotated[
    str, typer.Option("--key", help="The clinical unit: patient (slides grouped by patient) or slide_id.")
]
ExprOpt = Annotated[
    str,
    typer.Option(
        "--expr",
        help="predicted (pseudobulk + predictions tables) | measured (summed counts -> log1p CPM) | "
        "FILE: a unit x gene parquet/CSV, first column the key.",
    ),
]
GenesOpt = Annotated[str | None, typer.Option("--genes", help="Comma-separated genes (default: --top).")]
TopOpt = Annotated[int, typer.Option("--top", help="Without --genes: the N genes varying most across units.")]
RunOpt = Annotated[
    str | None, typer.Option("--run", help="--expr predicted: comma-separated run ids (default: every run).")
]
RunSqlOpt = Annotated[str | None, typer.Option("--run-sql", help="--expr predicted: SQL returning the run_ids to use.")]
OutOpt = Annotated[Path | None, typer.Option("--out", help="Write the tables (parquet), PNGs and summary.json here.")]


def _runs(store, run: str | None, run_sql: str | None) -> list[str] | None:
    import duckdb

    from stimage_embed.errors import InputError

    if run:
        return split_csv(run)
    if not run_sql:
        return None
    try:
        df = store.sql(run_sql, file_access=False)
    except duckdb.Error as exc:
        raise InputError(None, "--run-sql", f"invalid SQL: {first_line(exc)}") from exc
    if "run_id" not in df.columns:
        raise InputError(None, "--run-sql", f"the SQL must return a run_id column; got {df.columns}")
    return sorted(df["run_id"].unique().to_list())


def clinical_add(
    file: Annotated[Path, typer.Argument(help="CSV with a key column (patient or slide_id) and clinical columns.")],
    key: KeyOpt = "patient",
    time: Annotated[
        list[str] | None, typer.Option("--time", help="Extra time column(s) to check (time, *_time always are).")
    ] = None,
    event: Annotated[
        list[str] | None, typer.Option("--event", help="Extra event column(s) to check (event, *_event always are).")
    ] = None,
    store: StoreOpt = Path("store"),
    wait: WaitOpt = 0.0,
) -> None:
    """Upsert clinical rows (time, event, response, subtype, anything else) by key, in one commit."""
    from stimage_embed.cli_checks import check_store_path
    from stimage_embed.downstream.clinical_table import add_clinical, read_clinical_csv
    from stimage_embed.store import Store

    check_store_path(store, create=True, write=True)  # clinical data may start a store (survival on --expr)
    if not Path(store).exists():
        read_clinical_csv(file, key, time or (), event or ())  # a bad file is refused before the store is created
    st = Store(store, lock_wait=wait)
    with st.writer("clinical add"):
        result = add_clinical(st, file, key, time or (), event or ())
    for line in result.lines():
        typer.echo(line)


def survival(
    time: Annotated[str, typer.Option("--time", help="Clinical column of follow-up times.")],
    event: Annotated[str, typer.Option("--event", help="Clinical column of events (1 event, 0 censored).")],
    expr: ExprOpt = "predicted",
    genes: GenesOpt = None,
    top: TopOpt = 50,
    by: Annotated[str | None, typer.Option("--by", help="Also draw KM curves by this clinical column.")] = None,
    key: KeyOpt = "patient",
    out: OutOpt = None,
    run: RunOpt = None,
    run_sql: RunSqlOpt = None,
    repeats: Annotated[int, typer.Option(help="Repeats of the multivariate model's 3-fold CV.")] = 100,
    folds: Annotated[int, typer.Option(help="Folds of the multivariate model's CV.")] = 3,
    multi: Annotated[int, typer.Option(help="Genes (smallest univariate p) in the multivariate Cox model.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the first CV repeat.")] = 0,
    penalizer: Annotated[float, typer.Option(help="L2 penalty of every Cox fit (lifelines; 0: none).")] = 0.0,
    store: StoreOpt = Path("store"),
) -> None:
    """Univariate Cox per gene (c-index), top-gene multivariate Cox (repeated CV c-index), KM risk groups."""
    from stimage_embed.downstream.analysis import SYNTHETIC_NOTE, run_survival
    from stimage_embed.store import Store

    st = Store(store)
    options = {"n_repeats": repeats, "n_folds": folds, "n_multi": multi, "seed": seed, "penalizer": penalizer}
    result, summary = run_survival(
        st, expr, time, event, key, split_csv(genes) or None, top, by, out, _runs(st, run, run_sql), **options
    )
    if summary["synthetic"]:
        typer.echo(SYNTHETIC_NOTE)
    print_frame(result.univariate.head(20))
    print_frame(result.multivariate)
    lr = result.logrank
    typer.echo(f"log-rank high vs low risk: statistic {lr['statistic']:.3f}, p {lr['p']:.3g}")
    if out is not None:
        typer.echo(f"tables and figures: {out}")


def response(
    label: Annotated[str, typer.Option("--label", help="Clinical column with two classes (e.g. pCR vs RD).")],
    positive: Annotated[
        str | None, typer.Option("--positive", help="The positive class (default: 1 / true / yes / pCR).")
    ] = None,
    expr: ExprOpt = "predicted",
    genes: GenesOpt = None,
    top: TopOpt = 50,
    key: KeyOpt = "patient",
    out: OutOpt = None,
    run: RunOpt = None,
    run_sql: RunSqlOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the outer and inner stratified folds.")] = 0,
    store: StoreOpt = Path("store"),
) -> None:
    """RBF-SVM with nested stratified 5-fold CV (inner folds choose C and gamma): AUC per fold, mean, ROC."""
    from stimage_embed.downstream.analysis import run_response
    from stimage_embed.store import Store

    st = Store(store)
    result, summary = run_response(
        st, expr, label, key, split_csv(genes) or None, top, positive, out, _runs(st, run, run_sql), seed=seed
    )
    print_frame(result.folds)
    tag = " (SYNTHETIC clinical data)" if summary["synthetic"] else ""
    typer.echo(f"nested CV AUC {result.auc_mean:.3f} ± {result.auc_sd:.3f} over {result.folds.height} folds{tag}")


def register(app: typer.Typer) -> None:
    """Add ``clinical add``, ``survival`` and ``response`` to the ``stimage-embed`` app."""
    clinical = typer.Typer(help="Clinical data (outcomes, response, subtype) in the store.", no_args_is_help=True)
    clinical.command("add")(cli_errors(clinical_add))
    app.add_typer(clinical, name="clinical")
    app.command("survival")(cli_errors(survival))
    app.command("response")(cli_errors(response))
