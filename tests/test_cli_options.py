"""One option convention for every verb (issue 25, item 2): list options are repeatable and
each value may be a comma list; the plural spelling is an alias of the singular; a value is
never dropped silently (a single-valued option given twice is an error)."""

from __future__ import annotations

import shutil

import polars as pl
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.cli_helpers import listed
from stimage_embed.errors import InputError
from stimage_embed.store import Store


@pytest.fixture()
def store(mini_cli_store, tmp_path):
    path, run_id, _ = mini_cli_store
    shutil.copytree(path, tmp_path / "store")
    return tmp_path / "store", run_id


def test_listed_flattens_repeats_and_comma_lists():
    assert listed(["S1", "S2,S3", " S1 "], "--slide") == ["S1", "S2", "S3"]
    assert listed("a, b", "--head") == ["a", "b"]
    assert listed(None, "--slide") == []
    with pytest.raises(InputError, match="--head: no value given"):
        listed([","], "--head")


#: list options that must exist with both spellings, per verb
ALIASES = {
    "ingest": [("--slide", "--slides")],
    "embed": [("--backbone", "--backbones"), ("--slide", "--slides")],
    "train": [("--backbone", "--backbones")],
    "predict": [("--slide", "--slides")],
    "compare": [("--backbone", "--backbones"), ("--head", "--heads"), ("--dataset", "--datasets")],
}


@pytest.mark.parametrize("verb", list(ALIASES))
def test_list_options_take_both_spellings_and_repeat(verb):
    cmd = get_command(app).commands[verb]
    by_name = {o: p for p in cmd.params for o in getattr(p, "opts", [])}
    for singular, plural in ALIASES[verb]:
        assert singular in by_name and by_name[singular] is by_name.get(plural), (verb, singular, plural)
        assert by_name[singular].multiple, (verb, singular)


def test_predict_with_two_slide_options_predicts_both(store):
    """Before: ``predict --slide C4 --slide C5`` silently predicted only C5."""
    path, run_id = store
    res = CliRunner().invoke(
        app, ["predict", "--store", str(path), "--model", run_id, "--slide", "S1", "--slide", "S2"]
    )
    assert res.exit_code == 0, res.output
    pred = Store(path).sql(f"SELECT DISTINCT slide_id FROM predictions WHERE run_id = '{run_id}'")
    assert sorted(pred["slide_id"].to_list()) == ["S1", "S2"]


def test_embed_takes_a_comma_list_of_slides(store):
    """Before: ``embed --slide B4,C4`` failed with "slides not in the store: ['B4,C4']"."""
    path, _ = store
    res = CliRunner().invoke(
        app, ["embed", "--store", str(path), "--slides", "S1,S2", "--precision", "float32", "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    assert "embedded 0 tiles" in res.output  # both slides found, already embedded


def test_a_single_valued_option_given_twice_is_an_error(store):
    path, run_id = store
    res = CliRunner().invoke(app, ["predict", "--store", str(path), "--model", run_id, "--model", "x", "--slide", "S1"])
    assert res.exit_code == 2 and res.output.startswith("error: --model given more than once"), res.output
    assert not Store(path).has_table("predictions")


def test_compare_takes_the_singular_backbone_and_repeated_heads(store):
    """Before: ``compare`` said ``--backbones`` where ``embed``/``train`` said ``--backbone``."""
    path, _ = store
    res = CliRunner().invoke(
        app,
        ["compare", "--store", str(path), "--backbone", "efficientnet_lite0", "--head", "ridge", "--head", "mean"]
        + ["--genes", "var:5"],
    )
    assert res.exit_code == 0, res.output
    runs = pl.from_arrow(Store(path).read("runs")).filter(pl.col("split") == "loso")
    assert sorted(runs["head"].unique().to_list()) == ["mean", "ridge"]
