"""Bad input: each case gets a clear error (or warning) naming the file and field, and
leaves the store unchanged."""

from __future__ import annotations

import gzip
import logging
import shutil

import polars as pl
import pytest
import yaml

from stimage_embed.errors import CatalogError, InputError
from stimage_embed.ingest.catalog import load_catalog
from stimage_embed.ingest.pipeline import ingest
from stimage_embed.store import Store


def _catalog(root, **over):
    cat = {
        "name": "bad",
        "reader": "legacy_st",
        "root": str(root),
        "platform": "legacy_st",
        "spot_diameter_um": 100,
        "spot_pitch_um": 200,
        "species": "human",
        "tissue": "breast",
        "preservation": "frozen",
        "reader_options": {"layout": "her2st"},
        "slides": [{"id": "C5", "patient": "C", "image": "C5.jpg", "counts": "C5.tsv.gz", "spots": "C5_selection.tsv"}],
    }
    cat.update(over)
    return cat


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "store"
    ingest("her2st", Store(path), slides=["C4"], progress=False)
    return path


@pytest.fixture()
def case(tmp_path, real_data_root, base_store):
    """A writable copy of HER2ST C5 plus a store that already holds C4 (to prove it is untouched)."""
    src = real_data_root / "her2st"
    root = tmp_path / "data"
    root.mkdir()
    (root / "C5.jpg").symlink_to(src / "images/C5.jpg")
    shutil.copy(src / "counts/C5.tsv.gz", root / "C5.tsv.gz")
    shutil.copy(src / "spots/C5_selection.tsv", root / "C5_selection.tsv")
    shutil.copytree(base_store, tmp_path / "store")
    store = Store(tmp_path / "store")

    class Case:
        pass

    c = Case()
    c.root, c.store, c.tmp = root, store, tmp_path
    c.versions = lambda: {n: store.table(n).version for n in store.table_names()}
    c.before = c.versions()

    def write(cat, name="cat.yaml"):
        p = tmp_path / name
        p.write_text(yaml.safe_dump(cat) if isinstance(cat, dict) else cat)
        return p

    c.write = write
    c.counts = lambda: pl.read_csv(gzip.open(root / "C5.tsv.gz"), separator="\t")

    def save_counts(df):
        with gzip.open(root / "C5.tsv.gz", "wt") as fh:
            fh.write(df.write_csv(separator="\t"))

    c.save_counts = save_counts
    c.spots = lambda: pl.read_csv(root / "C5_selection.tsv", separator="\t")
    c.save_spots = lambda df: df.write_csv(root / "C5_selection.tsv", separator="\t")
    return c


def _fails(case, exc_type, *needles, **kw):
    path = case.write(_catalog(case.root, **kw))
    with pytest.raises(exc_type) as err:
        ingest(str(path), case.store, progress=False)
    msg = str(err.value)
    for n in needles:
        assert n in msg, msg
    assert case.versions() == case.before, "store changed on bad input"
    return msg


def test_valid_copy_ingests(case):
    path = case.write(_catalog(case.root))
    ingest(str(path), case.store, progress=False)
    assert case.store.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id = 'C5'")["n"][0] == 181


def test_missing_image(case):
    (case.root / "C5.jpg").unlink()
    _fails(case, InputError, "C5.jpg", "image")


def test_corrupt_image(case):
    (case.root / "C5.jpg").unlink()
    (case.root / "C5.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 100)
    _fails(case, InputError, "C5.jpg", "image")


def test_nan_counts(case):
    df = case.counts()
    gene = df.columns[5]
    df = df.with_columns(pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col(gene)).alias(gene))
    case.save_counts(df.with_columns(pl.col(gene).cast(pl.Utf8).fill_null("NaN")))
    _fails(case, InputError, "C5.tsv.gz", "counts")


def test_negative_counts(case):
    df = case.counts()
    gene = df.columns[7]
    case.save_counts(df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(-2).otherwise(pl.col(gene)).alias(gene)))
    _fails(case, InputError, "C5.tsv.gz", "counts", "negative")


def test_duplicate_spot_ids(case):
    df = case.counts()
    case.save_counts(pl.concat([df, df.head(1)]))
    _fails(case, InputError, "C5.tsv.gz", "duplicate")


def test_duplicate_gene_names(case):
    df = case.counts()
    text = df.write_csv(separator="\t")
    header, rest = text.split("\n", 1)
    cols = header.split("\t")
    cols[3] = cols[2]
    with gzip.open(case.root / "C5.tsv.gz", "wt") as fh:
        fh.write("\t".join(cols) + "\n" + rest)
    _fails(case, InputError, "C5.tsv.gz", cols[2])


def test_spots_without_counts_are_reported_and_skipped(case, caplog):
    path = case.write(_catalog(case.root))
    with caplog.at_level(logging.WARNING):
        summary = ingest(str(path), case.store, progress=False)
    assert summary["n_spots_skipped"].to_list() == [2]
    assert any("without counts" in r.getMessage() and "C5.tsv.gz" in r.getMessage() for r in caplog.records)


def test_spots_outside_the_image_warn_and_fail_qc(case, caplog):
    sp = case.spots()
    sp = sp.with_columns(
        pl.when(pl.int_range(pl.len()) < 2).then(99999.0).otherwise(pl.col("pixel_x")).alias("pixel_x")
    )
    case.save_spots(sp)
    path = case.write(_catalog(case.root))
    with caplog.at_level(logging.WARNING):
        ingest(str(path), case.store, progress=False)
    assert any("outside" in r.getMessage() and "pixel_x" in r.getMessage() for r in caplog.records)
    bad = case.store.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id='C5' AND NOT in_image AND NOT passes_qc")
    assert bad["n"][0] >= 1


def test_coordinates_missing_the_image_entirely(case):
    sp = case.spots().with_columns(pl.col("pixel_x") + 50000, pl.col("pixel_y") + 50000)
    case.save_spots(sp)
    _fails(case, InputError, "C5_selection.tsv", "pixel_x/pixel_y", "inside")


def test_empty_slide(case):
    case.save_spots(case.spots().with_columns(pl.lit(0).alias("selected")))
    _fails(case, InputError, "C5_selection.tsv", "empty slide")


def test_um_per_px_not_estimable(case):
    sp = case.spots().filter(pl.col("selected") == 1)
    keep = sp.filter(pl.col("y") == sp["y"][0])  # one array row: the lattice is 1-D
    case.save_spots(keep)
    _fails(case, InputError, "um_per_px")


def test_unknown_catalog_name(case):
    with pytest.raises(CatalogError, match="unknown catalog 'nope'.*her2st"):
        load_catalog("nope")


def test_unknown_reader(case):
    _fails(case, CatalogError, "cat.yaml", "reader", "bogus", reader="bogus")


def test_yaml_with_a_wrong_type(case):
    msg = _fails(case, CatalogError, "cat.yaml", "spot_diameter_um", spot_diameter_um="wide")
    assert "wide" in msg
    msg = _fails(
        case, CatalogError, "cat.yaml", "slides", "image", slides=[{"id": "C5", "patient": "C", "image": ["a", "b"]}]
    )


def test_unknown_catalog_field_is_refused(case):
    _fails(case, CatalogError, "cat.yaml", "spot_diamter_um", spot_diamter_um=55)
