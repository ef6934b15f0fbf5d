"""Helpers of the ``stimage-embed`` command line (:mod:`stimage_embed.cli`): shared options,
the error wrapper, option parsing and printing of tables.

Errors from bad input are :class:`~stimage_embed.errors.InputError` naming the option;
:func:`cli_errors` prints them as one line on stderr with exit code 2.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from stimage_embed.errors import InputError, StimageError

StoreOpt = Annotated[
    str,
    typer.Option(
        "--store",
        envvar="STIMAGE_STORE",
        help="Store: a directory, or an object-store URI s3://BUCKET/PREFIX (endpoint and credentials from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...; AWS_ALLOW_HTTP=true for a local server).",
    ),
]
ModelsDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--models-dir",
        envvar="STIMAGE_MODELS_DIR",
        help="Local folder of model folders (default: <store>/models; required for an s3:// store).",
    ),
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-root",
        envvar="STIMAGE_DATA_ROOT",
        help="Folder that relative catalog roots resolve against.",
        show_default="../shared/data",
    ),
]
WaitOpt = Annotated[
    float,
    typer.Option(
        "--wait",
        metavar="SECONDS",
        help="If another command is writing to the store, wait up to this long for it (0: fail at once).",
    ),
]


#: options whose paths an error shows as the user typed them
PATH_OPTIONS = ("store", "image", "out", "report", "model", "catalog", "models_dir")


def as_typed(message: str, options: dict) -> str:
    """``message`` with each path option written as the user typed it, not resolved
    (``/data/link/store``, not the symlink's target ``/mnt/disk3/store``)."""
    for key in PATH_OPTIONS:
        typed = options.get(key)
        if typed is None or "://" in str(typed):
            continue
        try:
            resolved = str(Path(str(typed)).expanduser().resolve())
        except (OSError, RuntimeError):
            continue
        if resolved != str(typed) and resolved in message:
            message = message.replace(resolved, str(typed))
    return message


def cli_errors(func: Callable) -> Callable:
    """Turn library errors into one clear line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except StimageError as exc:
            typer.echo(f"error: {as_typed(str(exc), kwargs)}", err=True)
            raise typer.Exit(2) from exc
        except (OSError, RuntimeError, ValueError) as exc:  # disk full, read-only, permissions: one line
            from stimage_embed.cli_checks import environment_error

            line = environment_error(exc)
            if line is None:
                raise
            typer.echo(f"error: {as_typed(line, kwargs)}", err=True)
            raise typer.Exit(2) from exc

    return wrapper


class RepeatFilter(logging.Filter):
    """Let a warning through once per message template; count the repeats (printed once at
    exit by :func:`configure_logging`)."""

    def __init__(self) -> None:
        super().__init__()
        self.repeats: Counter[tuple[str, str]] = Counter()
        self.first: dict[tuple[str, str], str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, str(record.msg))
        self.repeats[key] += 1
        self.first.setdefault(key, record.getMessage())
        return self.repeats[key] == 1

    def summary(self) -> list[str]:
        """One line per warning that repeated."""
        return [
            f"WARNING {key[0]}: {n - 1} more warning(s) like {self.first[key][:60]!r}... (-v shows each)"
            for key, n in self.repeats.items()
            if n > 1
        ]

    def report(self) -> None:
        """Print :meth:`summary` on stderr (at exit)."""
        for line in self.summary():
            sys.stderr.write(line + "\n")


def configure_logging(verbose: bool) -> None:
    """Log to stderr: INFO (DEBUG with ``verbose``); a repeated warning is shown once and
    counted (every one with ``verbose``); third-party chatter at INFO is hidden."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("numexpr", "numexpr.utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose:
        return
    repeat = RepeatFilter()
    # only the console handler of basicConfig (not a test harness's capturing handlers)
    for handler in [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]:
        for old in [f for f in handler.filters if isinstance(f, RepeatFilter)]:
            handler.removeFilter(old)  # a second command in one process (tests) starts afresh
            atexit.unregister(old.report)
        handler.addFilter(repeat)
    atexit.register(repeat.report)


def csv_safe(df: pl.DataFrame) -> pl.DataFrame:
    """CSV has no nested values: list, array and struct columns are written as JSON text."""
    nested = [c for c, t in df.schema.items() if t.is_nested()]
    return df.with_columns(
        pl.Series(c, [None if v is None else json.dumps(v, default=str) for v in df[c].to_list()], dtype=pl.Utf8)
        for c in nested
    )


def print_frame(df: pl.DataFrame, fmt: str = "table") -> None:
    """Print ``df`` to stdout as ``table`` (all rows), ``csv`` or ``json``."""
    if fmt == "csv":
        sys.stdout.write(csv_safe(df).write_csv())
    elif fmt == "json":
        sys.stdout.write(df.write_json() + "\n")
    else:
        with pl.Config(
            tbl_rows=max(df.height, 1),
            tbl_cols=-1,
            fmt_str_lengths=80,
            tbl_width_chars=30_000,  # never squeeze a column to one letter
            tbl_hide_dataframe_shape=True,
        ):
            typer.echo(str(df))


def split_csv(value: str | None) -> list[str]:
    """Non-empty, stripped items of a comma-separated option (none for ``None``)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def listed(values: str | list[str] | None, field: str) -> list[str]:
    """The values of a list option, in the one convention of every verb: the option is
    repeatable and each occurrence may be a comma list (``--slide A --slide B,C`` -> A, B, C).
    Duplicates are kept once, in order. An option given only with empty items (``--heads ,``)
    is an error naming ``field``, never an empty list taken silently."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out = list(dict.fromkeys(v for item in items for v in split_csv(item)))
    if items and not out:
        raise InputError(None, field, f"no value given ({', '.join(repr(i) for i in items)})")
    return out


def first_line(exc: BaseException) -> str:
    """The first paragraph of an exception's message, on one line."""
    return " ".join(str(exc).split("\n\n")[0].split()) or type(exc).__name__


def backbone_names(value: str | list[str] | None, field: str) -> list[str]:
    """Comma-separated vector-source names, each checked by
    :meth:`~stimage_embed.embeddings.vector_source.VectorSource.parse` (letters, digits, '_':
    they name tables; ``a+b`` joins the vectors of two tables, e.g. a spot tile and its
    ``--context-um`` window)."""
    from stimage_embed.embeddings.vector_source import VectorSource

    names = listed(value, field)
    if not names:
        raise InputError(None, field, f"invalid backbone name(s) {value!r}: name at least one backbone")
    for name in names:
        VectorSource.parse(name, field)
    return names


def weights_map(items: list[str] | None) -> dict[str, str]:
    """``NAME=PATH`` options (``--weights``) as a dict."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(None, "--weights", f"expected NAME=PATH, got {item!r}")
        k, v = item.split("=", 1)
        out[k] = v
    return out


def region_box(region: str | None) -> tuple[float, float, float, float] | None:
    """``--region X0,Y0,X1,Y1`` (full-resolution px) as a tuple, ``None`` when not given."""
    if region is None:
        return None
    try:
        box = tuple(float(v) for v in region.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise InputError(None, "--region", f"expected X0,Y0,X1,Y1 (four numbers, full-resolution px), got {region!r}")
    return box


def slides_from(
    store_obj, sql: str | None, ids: str | list[str] | None, field: str, sql_field: str | None = None
) -> list[str] | None:
    """Slide ids from a comma list or from SQL returning a ``slide_id`` column (user SQL:
    run without file access; an error is one line naming the option)."""
    import duckdb

    if ids and sql:
        raise InputError(None, f"{field}/{sql_field or field + '-sql'}", "give the slide ids or the SQL, not both")
    if ids:
        return listed(ids, field)
    if sql:
        sql_field = sql_field or f"{field}-sql"
        try:
            df = store_obj.sql(sql, file_access=False)
        except duckdb.Error as exc:
            raise InputError(None, sql_field, f"invalid SQL: {first_line(exc)}") from exc
        if "slide_id" not in df.columns:
            raise InputError(None, sql_field, f"the SQL must return a slide_id column; got {df.columns}")
        return sorted(df["slide_id"].unique().to_list())
    return None
