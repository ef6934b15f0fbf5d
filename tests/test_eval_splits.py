"""Folds over slides: loso / lopo / grouped kfold / explicit; leakage and impossible splits."""

from __future__ import annotations

import polars as pl
import pytest
import yaml

from stimage_embed.errors import InputError
from stimage_embed.evaluation import Fold, explicit_split, make_folds, parse_split
from stimage_embed.paths import catalogs_dir


def _catalog_table(name: str) -> pl.DataFrame:
    cat = yaml.safe_load((catalogs_dir() / "datasets" / f"{name}.yaml").read_text())
    return pl.DataFrame(
        {
            "dataset": [cat["name"]] * len(cat["slides"]),
            "slide_id": [s["id"] for s in cat["slides"]],
            "patient": [str(s["patient"]) for s in cat["slides"]],
        }
    )


@pytest.fixture(scope="module")
def her2st() -> pl.DataFrame:
    return _catalog_table("her2st")


@pytest.fixture(scope="module")
def both(her2st) -> pl.DataFrame:
    return pl.concat([her2st, _catalog_table("stutility_mob")])


def _check_partition(folds: list[Fold], all_slides: set[str]) -> None:
    for f in folds:
        assert not set(f.train_slides) & set(f.test_slides), f.name
        assert set(f.train_slides) | set(f.test_slides) == all_slides, f.name


def test_parse_split():
    assert parse_split("loso").kind == "loso"
    assert parse_split(" LOPO ").kind == "lopo"
    s = parse_split("kfold:5")
    assert (s.kind, s.k, s.seed) == ("kfold", 5, 0)
    s = parse_split("kfold:3:7")
    assert (s.k, s.seed) == (3, 7)
    for bad in ("kfold", "kfold:1", "kfold:x", "lopso", ""):
        with pytest.raises(InputError, match="split"):
            parse_split(bad)


def test_loso_on_her2st(her2st):
    folds = make_folds(her2st, "loso")
    assert [f.name for f in folds] == ["loso:B4", "loso:C2", "loso:C3", "loso:C4", "loso:C5"]
    assert all(len(f.test_slides) == 1 for f in folds)
    _check_partition(folds, {"B4", "C2", "C3", "C4", "C5"})


def test_lopo_on_her2st_yields_patients_b_and_c(her2st):
    # spot-level table (duplicated slide rows) collapses to slides
    spots = pl.concat([her2st] * 3)
    folds = make_folds(spots, "lopo")
    assert [f.name for f in folds] == ["lopo:her2st/B", "lopo:her2st/C"]
    assert folds[0].test_slides == ["B4"] and folds[0].train_slides == ["C2", "C3", "C4", "C5"]
    assert folds[1].test_slides == ["C2", "C3", "C4", "C5"] and folds[1].train_slides == ["B4"]
    _check_partition(folds, {"B4", "C2", "C3", "C4", "C5"})


def test_dataset_subset_and_patient_keys_per_dataset(both):
    folds = make_folds(both, "lopo", datasets=["stutility_mob"])
    assert [f.name for f in folds] == ["lopo:stutility_mob/mouse1", "lopo:stutility_mob/mouse2"]
    assert {s for f in folds for s in f.test_slides} == {"MOB1", "MOB2", "MOB3", "MOB4"}
    # same patient label in two datasets stays two groups
    clash = both.with_columns(pl.lit("P1").alias("patient"))
    assert len(make_folds(clash, "lopo")) == 2
    with pytest.raises(InputError, match="unknown dataset"):
        make_folds(both, "loso", datasets=["nope"])


def test_kfold_grouped_by_patient_is_deterministic():
    rows = [(f"P{p}", f"S{p}_{i}") for p in range(10) for i in range(2)]
    table = pl.DataFrame({"patient": [r[0] for r in rows], "slide_id": [r[1] for r in rows]})
    folds = make_folds(table, "kfold:3")
    assert folds == make_folds(table, "kfold:3:0")
    assert len(folds) == 3
    tested = [s for f in folds for s in f.test_slides]
    assert sorted(tested) == sorted(table["slide_id"].to_list())  # every slide tested exactly once
    patient = dict(zip(table["slide_id"], table["patient"]))
    for f in folds:
        assert not {patient[s] for s in f.train_slides} & {patient[s] for s in f.test_slides}
    _check_partition(folds, set(table["slide_id"]))
    other = [make_folds(table, f"kfold:3:{seed}") for seed in range(1, 6)]
    assert any(o != folds for o in other)  # the seed matters


def test_impossible_splits_raise(her2st):
    with pytest.raises(InputError, match="lopo needs at least 2 patients"):
        make_folds(her2st.filter(pl.col("patient") == "C"), "lopo")
    with pytest.raises(InputError, match="kfold:3 needs"):
        make_folds(her2st, "kfold:3")  # only 2 patients
    with pytest.raises(InputError, match="loso needs at least 2 slides"):
        make_folds(her2st.filter(pl.col("slide_id") == "B4"), "loso")
    with pytest.raises(InputError, match="patient"):
        make_folds(her2st.drop("patient"), "loso")


def test_explicit_split(her2st):
    folds = make_folds(her2st, explicit_split(["C2", "C3", "C4"], ["B4"]))
    assert folds == [Fold("explicit", ["C2", "C3", "C4"], ["B4"])]
    with pytest.raises(InputError, match="both train and test"):
        explicit_split(["B4", "C2"], ["C2"])
    with pytest.raises(InputError, match="no test slides"):
        explicit_split(["B4"], [])
    with pytest.raises(InputError, match="not in the slide table"):
        make_folds(her2st, explicit_split(["B4"], ["X9"]))
