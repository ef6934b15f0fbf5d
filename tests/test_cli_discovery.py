"""Finding one's way (issue 25, items 9-11): the store's tables and views are discoverable
from SQL and from ``info``; tables print without polars' ``shape:`` line and never squeeze a
column to one letter; help is not truncated at 80 columns and shows defaults; a repeated
warning is shown once, with a count."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.cli_helpers import RepeatFilter, print_frame


@pytest.fixture()
def store(mini_cli_store, tmp_path):
    path, run_id, _ = mini_cli_store
    shutil.copytree(path, tmp_path / "store")
    return str(tmp_path / "store")


def _query(store: str, sql: str) -> list[str]:
    res = CliRunner().invoke(app, ["query", sql, "--store", store, "--format", "csv"])
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()


def test_show_tables_and_information_schema_list_the_store(store):
    """Before: both returned nothing (only the tables a query names were registered)."""
    shown = _query(store, "SHOW TABLES")
    assert shown[0] == "name"
    assert {"slides", "spots", "genes", "expression", "embeddings_efficientnet_lite0", "runs"} <= set(shown[1:])
    assert "expression_long" in shown  # a view
    listed = _query(store, "SELECT table_name FROM information_schema.tables ORDER BY 1")
    assert set(shown[1:]) <= set(listed[1:])


def test_a_misspelt_table_suggests_the_store_table(store):
    """Before: ``FROM spot`` suggested ``pg_collation``."""
    res = CliRunner().invoke(app, ["query", "FROM spot", "--store", store])
    assert res.exit_code == 2 and 'Did you mean "spots"' in res.output, res.output


def test_info_lists_views(store):
    res = CliRunner().invoke(app, ["info", "--store", store])
    assert res.exit_code == 0, res.output
    assert "views (SQL, computed on query): expression_long" in res.stdout


def test_tables_print_without_shape_and_without_squeezed_columns(capsys):
    import polars as pl

    wide = pl.DataFrame({f"column_{i}": ["a value that is long"] for i in range(12)} | {"verdict": ["a better"]})
    print_frame(wide)
    out = capsys.readouterr().out
    assert "shape:" not in out and "a better" in out and "…" not in out


def test_help_at_80_columns_is_wrapped_not_truncated_and_shows_defaults():
    res = CliRunner().invoke(app, ["embed", "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert res.exit_code == 0
    assert "…" not in res.output and max(len(ln) for ln in res.output.splitlines()) <= 100
    text = " ".join(res.output.split())
    for default in ("[default: (each slide's spot diameter)]", "[default: (0 for small jobs, else cores - 1)]"):
        assert default in text, default
    ingest = " ".join(CliRunner().invoke(app, ["ingest", "--help"], terminal_width=80).output.split())
    assert "default: (../shared/data)" in ingest


def test_a_repeated_warning_is_shown_once_with_a_count():
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, repeat = Keep(), RepeatFilter()
    handler.addFilter(repeat)
    log = logging.getLogger("test.repeat")
    log.addHandler(handler)
    log.propagate = False
    try:
        for slide in ("S1", "S2", "S3", "S4"):
            log.warning("slide %s: spots without counts skipped", slide)
        log.warning("another warning")
    finally:
        log.removeHandler(handler)
    assert records == ["slide S1: spots without counts skipped", "another warning"]
    assert repeat.summary() == [
        "WARNING test.repeat: 3 more warning(s) like 'slide S1: spots without counts skipped'... (-v shows each)"
    ]


def test_errors_show_the_store_path_as_typed_not_its_symlink_target(store, tmp_path):
    """Before: messages named the resolved target of a symlinked store."""
    link = tmp_path / "link"
    link.symlink_to(store)
    res = CliRunner().invoke(app, ["predict", "--store", str(link), "--model", "nope", "--slide", "S1"])
    assert res.exit_code == 2 and f"{link}/models/nope" in res.output, res.output
    assert str(Path(store).resolve()) not in res.output


def test_the_report_does_not_list_fstimage_as_a_backbone():
    """FSTimage runs are stored with backbone "fstimage" (they span backbones); the report's
    configuration listed it among the backbones."""
    import polars as pl

    from stimage_embed.evaluation.report import _config_rows

    runs = pl.DataFrame(
        {
            "dataset": ["her2st"] * 3,
            "split": ["loso"] * 3,
            "fold": ["loso:C5"] * 3,
            "test_slides": [["C5"]] * 3,
            "genes": [["A", "B"]] * 3,
            "backbone": ["efficientnet_lite0", "efficientnet_lite1", "fstimage"],
            "head": ["nb", "nb", "fstimage"],
        }
    )
    rows = dict(_config_rows(runs))
    assert rows["backbones"] == "`efficientnet_lite0`, `efficientnet_lite1`", rows["backbones"]
    assert "fstimage" in rows["heads"]
