"""Every bad input of the command line, in one table (issues 9, 18 and 25): each gets ONE
line on stderr starting ``error:`` (no traceback, no usage box), exit code 2, and the store
is byte-identical afterwards (every file of it: each table's versions and rows, and the lock).

The store is a small real one: two slides cut from HER2ST C5 and C4 (12 spots each, real
counts and image crops, tests/store_cases.py), ingested, embedded with EfficientNet-Lite0
and a ridge model trained on S1. Each case runs on a fresh copy.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from stimage_embed.cli import app
from stimage_embed.store import Store


# --- the base store and its snapshot ------------------------------------------------------
def snapshot(path: Path) -> dict | None:
    """Every file of the store (path -> sha1) plus each table's version and row count."""
    if not path.exists():
        return None
    files = {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
    st = Store(path)
    tables = {n: (st.table(n).version, st.table(n).count_rows()) for n in st.table_names()} if path.is_dir() else {}
    return {"files": files, "tables": tables}


@dataclass
class Env:
    """One case's world: a fresh copy of the store, the data, a scratch folder."""

    store: Path
    model: str
    data: Path
    tmp: Path
    real: Path
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture()
def world(mini_cli_store, tmp_path, real_data_root, monkeypatch):
    store, run_id, data = mini_cli_store
    shutil.copytree(store, tmp_path / "store")
    shutil.copytree(data, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path / "store", run_id, tmp_path / "data", tmp_path, real_data_root)


def one_line(output: str, code: int, needles: tuple[str, ...]) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip() and "%|" not in ln]
    assert code == 2, (code, output[-2000:])
    assert "Traceback" not in output and "Usage:" not in output, output[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# --- set-ups that damage a file before the command -------------------------------------------
def new_slide(w: Env, sids: tuple[str, ...] = ("S3",), **entry) -> Path:
    """A catalog of new real slides (S3: cut from C3, S4: from B4) in ``<tmp>/new``."""
    root = w.tmp / "new"
    shutil.move(w.data / "new", root)
    raw = yaml.safe_load((root / "new.yaml").read_text())
    raw["root"] = str(root)
    raw["slides"] = [s for s in raw["slides"] if s["id"] in sids]
    raw.update(entry)
    cat = root / "new.yaml"
    cat.write_text(yaml.safe_dump(raw))
    return cat


def catalog_with_id(bad_id: str) -> Callable[[Env], Path]:
    def make(w: Env) -> Path:
        cat = new_slide(w)
        raw = yaml.safe_load(cat.read_text())
        raw["slides"][0]["id"] = bad_id
        cat.write_text(yaml.safe_dump(raw))
        return cat

    return make


def damaged(kind: str) -> Callable[[Env], Path]:
    """A one-slide catalog whose ``kind`` file is broken in a way a user meets."""

    def make(w: Env) -> Path:
        cat = new_slide(w)
        root = w.tmp / "new"
        counts, spots, image = root / "S3.tsv.gz", root / "S3_selection.tsv", root / "S3.jpg"
        if kind == "bomb":
            buf = io.BytesIO()
            Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buf, "JPEG")
            data = bytearray(buf.getvalue())
            sof = data.index(b"\xff\xc0")
            data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2  # header claims 20000 x 20000 px
            image.write_bytes(bytes(data))
        elif kind == "truncated_jpeg":
            image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
        elif kind == "missing_image":
            image.unlink()
        elif kind == "corrupt_image":
            image.write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 100)
        elif kind == "truncated_gz":
            counts.write_bytes(counts.read_bytes()[: counts.stat().st_size // 2])
        else:
            df = pl.read_csv(gzip.open(counts), separator="\t")
            sp = pl.read_csv(spots, separator="\t")
            if kind == "nan_counts":
                g = df.columns[5]
                nan = pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("NaN"))
                df = df.with_columns(nan.otherwise(pl.col(g).cast(pl.Utf8)).alias(g))
            elif kind == "negative_counts":
                g = df.columns[7]
                df = df.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(-2).otherwise(pl.col(g)).alias(g))
            elif kind == "duplicate_spots":
                df = pl.concat([df, df.head(1)])
            elif kind == "pixel_x_text":
                abc = pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("abc"))
                sp = sp.with_columns(abc.otherwise(pl.col("pixel_x").cast(pl.Utf8)).alias("pixel_x"))
            elif kind == "coords_outside":
                sp = sp.with_columns(pl.col("pixel_x") + 50000, pl.col("pixel_y") + 50000)
            elif kind == "empty_slide":
                sp = sp.with_columns(pl.lit(0).alias("selected"))
            elif kind == "one_row":
                sp = sp.filter(pl.col("y") == sp["y"][0])
            text = df.write_csv(separator="\t")
            if kind == "duplicate_genes":
                header, rest = text.split("\n", 1)
                cols = header.split("\t")
                cols[3] = cols[2]
                text = "\t".join(cols) + "\n" + rest
            with gzip.open(counts, "wt") as fh:
                fh.write(text)
            sp.write_csv(spots, separator="\t")
        return cat

    return make


def catalog_field(**over) -> Callable[[Env], Path]:
    def make(w: Env) -> Path:
        return new_slide(w, **over)

    return make


def model_folder(damage: str) -> Callable[[Env], Path]:
    def make(w: Env) -> Path:
        folder = w.tmp / "model"
        shutil.copytree(w.store / "models" / w.model, folder)
        arrays = folder / "arrays.safetensors"
        if damage == "missing":
            arrays.unlink()
        else:
            arrays.write_bytes(arrays.read_bytes()[:40])
        return folder

    return make


def without_s1_vectors(w: Env) -> None:
    Store(w.store).delete("embeddings_efficientnet_lite0", "slide_id = 'S1'")


def a_file(w: Env) -> Path:
    p = w.tmp / "a_file"
    p.write_text("not a store")
    return p


def label_file(unknown_spot: bool = False) -> Callable[[Env], Path]:
    """A label CSV (slide, spot, tone) over S1's real spots; ``unknown_spot``: one spot id the store lacks."""

    def make(w: Env) -> Path:
        spots = pl.from_arrow(Store(w.store).read("spots", ["slide_id", "spot_id"], where="slide_id = 'S1'"))
        df = spots.rename({"slide_id": "slide", "spot_id": "spot"}).with_columns(
            pl.Series("tone", ["dark", "pale"] * (spots.height // 2) + ["mid"] * (spots.height % 2))
        )
        if unknown_spot:
            bad = pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("no_such_spot"))
            df = df.with_columns(bad.otherwise(pl.col("spot")).alias("spot"))
        path = w.tmp / "tone.csv"
        df.write_csv(path)
        return path

    return make


def with_labels(w: Env) -> None:
    """The label set ``tone`` stored (S1's spots), before the snapshot."""
    from stimage_embed.store.labels import add_labels

    add_labels(Store(w.store), label_file()(w), ("slide", "spot"), "tone", None)


def clinical_file(text: str) -> Callable[[Env], Path]:
    def make(w: Env) -> Path:
        path = w.tmp / "clinical.csv"
        path.write_text(text)
        return path

    return make


def _no_gpu() -> bool:
    import torch

    return not torch.cuda.is_available()


# --- the table -----------------------------------------------------------------------------
# (id, args with {store} {model} {tmp} {data} {made} placeholders, needles, set-up)
S = "--store"
CASES: list[tuple[str, list[str], tuple[str, ...], Callable | None]] = [
    # issue 18: tracebacks
    ("precision_bogus", ["embed", S, "{store}", "--precision", "bogus"], ("--precision", "bogus"), None),
    ("device_bogus", ["embed", S, "{store}", "--device", "bogus"], ("--device",), None),
    ("device_cuda_without_gpu", ["embed", S, "{store}", "--device", "cuda:7"], ("--device", "cuda:7"), None),
    *(
        [("device_cuda_no_gpu", ["embed", S, "{store}", "--device", "cuda"], ("--device", "cuda"), None)]
        if _no_gpu()
        else []
    ),
    ("batch_size_0", ["embed", S, "{store}", "--batch-size", "0"], ("--batch-size",), None),
    ("workers_negative", ["embed", S, "{store}", "--workers", "-3"], ("--workers",), None),
    ("overwrite_batch_size_0", ["embed", S, "{store}", "--overwrite", "--batch-size", "0"], ("--batch-size",), None),
    (
        "overwrite_slide_batch_negative",
        ["embed", S, "{store}", "--overwrite", "--slide", "S1", "--batch-size", "-5"],
        ("--batch-size",),
        None,
    ),
    ("overwrite_workers_negative", ["embed", S, "{store}", "--overwrite", "--workers", "-3"], ("--workers",), None),
    (
        "report_unwritable",
        ["compare", S, "{store}", "--heads", "ridge", "--genes", "var:5", "--report", "/dev/null/report"],
        ("--report", "/dev/null/report"),
        None,
    ),
    ("store_is_a_file_info", ["info", S, "{made}"], ("--store", "not a folder"), a_file),
    ("store_is_a_file_embed", ["embed", S, "{made}"], ("--store", "not a folder"), a_file),
    ("store_is_a_file_ingest", ["ingest", "{data}/mini.yaml", S, "{made}"], ("--store", "not a folder"), a_file),
    ("store_is_a_file_query", ["query", "SELECT 1", S, "{made}"], ("--store", "not a folder"), a_file),
    ("store_dev_null_info", ["info", S, "/dev/null"], ("/dev/null", "--store"), None),
    ("store_dev_null_compare", ["compare", S, "/dev/null"], ("/dev/null", "--store"), None),
    # issue 18: accepted with exit 0
    ("slide_id_quote", ["ingest", "{made}", S, "{store}"], ("slides.id", "S'3"), catalog_with_id("S'3")),
    ("slide_id_space", ["ingest", "{made}", S, "{store}"], ("slides.id",), catalog_with_id("S 3")),
    ("slide_id_dotdot", ["ingest", "{made}", S, "{store}"], ("slides.id", "../S3"), catalog_with_id("../S3")),
    ("tile_um_0", ["embed", S, "{store}", "--tile-um", "0"], ("--tile-um",), None),
    ("heads_only_a_comma", ["compare", S, "{store}", "--heads", ","], ("--head",), None),
    ("missing_bogus", ["compare", S, "{store}", "--missing", "bogus"], ("--missing", "bogus"), None),
    ("highlow_max_iter_0", ["compare", S, "{store}", "--highlow-max-iter", "0"], ("--highlow-max-iter",), None),
    ("query_format_bogus", ["query", "SELECT 1", S, "{store}", "--format", "bogus"], ("--format",), None),
    ("query_empty", ["query", "", S, "{store}"], ("SQL", "no SQL statement"), None),
    ("query_only_a_comment", ["query", "-- comment", S, "{store}"], ("SQL", "no SQL statement"), None),
    # issue 18: escapes and hangs
    (
        "infer_slide_id_dotdot",
        ["infer", "{data}/S1.jpg", "--model", "{model}", "--out", "{tmp}/out", "--slide-id", "..", "--um-per-px", "1"],
        ("--slide-id", "'..'"),
        None,
    ),
    # issue 18: SQL
    ("sql_copy_into_duckdb_tmp", ["query", "COPY (SELECT 1 AS x) TO '.tmp/x.csv'", S, "{store}"], ("SQL",), None),
    ("sql_read_duckdb_tmp", ["query", "SELECT * FROM read_csv('.tmp/seed.csv')", S, "{store}"], ("SQL",), None),
    ("sql_export_database", ["query", "EXPORT DATABASE '{tmp}/exported'", S, "{store}"], ("SQL", "EXPORT"), None),
    (
        "genes_file_not_echoed",
        ["train", S, "{store}", "--train", "S1", "--genes", "file:/etc/passwd"],
        ("/etc/passwd", "entries"),
        None,
    ),
    # issue 25: options and messages
    ("single_option_twice", ["embed", S, "{store}", "--batch-size", "3", "--batch-size", "4"], ("--batch-size",), None),
    ("unknown_option", ["embed", S, "{store}", "--bogus"], ("--bogus",), None),
    ("train_without_slides", ["train", S, "{store}"], ("--train", "no training slides"), None),
    ("predict_without_slides", ["predict", S, "{store}", "--model", "{model}"], ("--slide", "no slides"), None),
    (
        "train_on_a_slide_without_vectors",
        ["train", S, "{store}", "--train", "S1"],
        ("no spots with both efficientnet_lite0 vectors and counts", "stimage-embed embed --backbone"),
        without_s1_vectors,
    ),
    ("predict_unknown_slide", ["predict", S, "{store}", "--model", "{model}", "--slide", "S9"], ("S9",), None),
    # verbs added since issue 18 (search/index, explain, view and the clinical checks of the file are
    # in tests/test_search_bad_input.py, test_explain_her2st.py, test_viewer_api.py, test_clinical.py)
    ("compare_label_head_without_labels", ["compare", S, "{store}", "--heads", "label"], ("--labels",), None),
    (
        "compare_labels_without_any_stored",
        ["compare", S, "{store}", "--heads", "label", "--labels", "tone"],
        ("--labels", "labels add"),
        None,
    ),
    (
        "compare_unknown_label_set",
        ["compare", S, "{store}", "--heads", "label", "--labels", "nope"],
        ("--labels", "nope"),
        with_labels,
    ),
    (
        "labels_add_missing_file",
        ["labels", "add", "{tmp}/none.csv", "--key", "slide,spot", "--column", "tone", S, "{store}"],
        ("none.csv",),
        None,
    ),
    (
        "labels_add_three_keys",
        ["labels", "add", "{made}", "--key", "slide,spot,x", "--column", "tone", S, "{store}"],
        ("tone.csv", "--key"),
        label_file(),
    ),
    (
        "labels_add_unknown_column",
        ["labels", "add", "{made}", "--key", "slide,spot", "--column", "cell_type", S, "{store}"],
        ("tone.csv", "cell_type"),
        label_file(),
    ),
    (
        "labels_add_unknown_spot",
        ["labels", "add", "{made}", "--key", "slide,spot", "--column", "tone", S, "{store}"],
        ("tone.csv", "no_such_spot"),
        label_file(unknown_spot=True),
    ),
    (
        "labels_compare_train_without_test",
        ["labels", "compare", "--labels", "tone", "--train", "S1", S, "{store}"],
        ("--train/--test",),
        None,
    ),
    ("labels_compare_unknown_set", ["labels", "compare", "--labels", "nope", S, "{store}"], ("nope",), with_labels),
    ("clinical_add_missing_file", ["clinical", "add", "{tmp}/none.csv", S, "{store}"], ("none.csv",), None),
    (
        "clinical_add_first_file_bad",
        ["clinical", "add", "{made}", "--key", "patient", S, "{store}"],
        ("clinical.csv", "event '2' is not 0 or 1"),
        clinical_file("patient,time,event\nS1,1,0\nS2,2,2\n"),
    ),
    # already in the suite (tests/test_hostile_inputs.py), here through the command line
    ("jpeg_bomb", ["ingest", "{made}", S, "{store}"], ("S3.jpg", "image", "header claims"), damaged("bomb")),
    ("truncated_jpeg", ["ingest", "{made}", S, "{store}"], ("S3.jpg", "premature end"), damaged("truncated_jpeg")),
    ("truncated_counts_gz", ["ingest", "{made}", S, "{store}"], ("S3.tsv.gz", "counts"), damaged("truncated_gz")),
    ("pixel_x_not_numeric", ["ingest", "{made}", S, "{store}"], ("pixel_x", "'abc'"), damaged("pixel_x_text")),
    ("train_sql_malformed", ["train", S, "{store}", "--train-sql", "SELEC slide_id"], ("--train-sql",), None),
    (
        "slides_sql_malformed",
        ["predict", S, "{store}", "--model", "{model}", "--slides-sql", "SELECT FROM WHERE"],
        ("--slides-sql",),
        None,
    ),
    ("backbone_quote_compare", ["compare", S, "{store}", "--backbones", "lite0'x"], ("invalid backbone name",), None),
    ("backbone_quote_train", ["train", S, "{store}", "--backbone", "x'", "--train", "S1"], ("invalid backbone",), None),
    ("backbone_quote_embed", ["embed", S, "{store}", "--backbone", "x'"], ("invalid backbone name",), None),
    ("sql_read_etc_passwd", ["query", "SELECT * FROM read_csv('/etc/passwd')", S, "{store}"], ("SQL",), None),
    ("sql_copy_to", ["query", "COPY (SELECT 1 AS x) TO '{tmp}/out.csv'", S, "{store}"], ("SQL",), None),
    ("sql_attach", ["query", "ATTACH '{tmp}/x.db'", S, "{store}"], ("SQL",), None),
    ("sql_set", ["query", "SET enable_external_access = true", S, "{store}"], ("SQL",), None),
    ("sql_load", ["query", "LOAD httpfs", S, "{store}"], ("SQL",), None),
    (
        "train_sql_reads_a_file",
        ["train", S, "{store}", "--train-sql", "SELECT * FROM read_csv('/etc/passwd')"],
        ("--train-sql",),
        None,
    ),
    (
        "model_safetensors_missing",
        ["predict", S, "{store}", "--model", "{made}", "--slide", "S1"],
        ("model", "cannot load the saved head"),
        model_folder("missing"),
    ),
    (
        "model_safetensors_truncated",
        ["predict", S, "{store}", "--model", "{made}", "--slide", "S1"],
        ("model", "cannot load the saved head"),
        model_folder("truncated"),
    ),
    # already in the suite (tests/test_ingest_bad_input.py), here through the command line
    ("missing_image", ["ingest", "{made}", S, "{store}"], ("S3.jpg", "image"), damaged("missing_image")),
    ("corrupt_image", ["ingest", "{made}", S, "{store}"], ("S3.jpg", "image"), damaged("corrupt_image")),
    ("nan_counts", ["ingest", "{made}", S, "{store}"], ("S3.tsv.gz", "counts"), damaged("nan_counts")),
    ("negative_counts", ["ingest", "{made}", S, "{store}"], ("S3.tsv.gz", "negative"), damaged("negative_counts")),
    ("duplicate_spot_ids", ["ingest", "{made}", S, "{store}"], ("S3.tsv.gz", "duplicate"), damaged("duplicate_spots")),
    ("duplicate_gene_names", ["ingest", "{made}", S, "{store}"], ("S3.tsv.gz",), damaged("duplicate_genes")),
    ("coords_outside_image", ["ingest", "{made}", S, "{store}"], ("pixel_x/pixel_y",), damaged("coords_outside")),
    ("empty_slide", ["ingest", "{made}", S, "{store}"], ("empty slide",), damaged("empty_slide")),
    ("um_per_px_not_estimable", ["ingest", "{made}", S, "{store}"], ("um_per_px",), damaged("one_row")),
    ("unknown_catalog", ["ingest", "nope", S, "{store}"], ("unknown catalog 'nope'",), None),
    ("unknown_reader", ["ingest", "{made}", S, "{store}"], ("reader", "bogus"), catalog_field(reader="bogus")),
    (
        "catalog_wrong_type",
        ["ingest", "{made}", S, "{store}"],
        ("spot_diameter_um", "wide"),
        catalog_field(spot_diameter_um="wide"),
    ),
    (
        "catalog_unknown_field",
        ["ingest", "{made}", S, "{store}"],
        ("spot_diamter_um",),
        catalog_field(spot_diamter_um=55),
    ),
]


def _fill(args: list[str], w: Env, made: Path | None) -> list[str]:
    values = {"store": w.store, "model": w.model, "tmp": w.tmp, "data": w.data, "made": made}
    return [a.format(**{k: str(v) for k, v in values.items()}) for a in args]


@pytest.mark.parametrize("args,needles,setup", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_the_store_unchanged(world, args, needles, setup):
    (world.tmp / ".tmp").mkdir()  # DuckDB's default temp folder: must stay out of reach
    (world.tmp / ".tmp" / "seed.csv").write_text("x\n1\n")
    made = setup(world) if setup else None
    before = snapshot(world.store)
    res = CliRunner().invoke(app, _fill(args, world, made))
    line = one_line(res.output, res.exit_code, needles)
    assert snapshot(world.store) == before, f"store changed: {line}"
    assert not (world.tmp / ".tmp" / "x.csv").exists() and not (world.tmp / "exported").exists()
    assert not (world.tmp / "out.csv").exists() and not (world.tmp / "x.db").exists()
    assert "root:" not in line  # --genes file:/etc/passwd names the file, never echoes it


# --- cases that need their own checks ------------------------------------------------------
@pytest.mark.parametrize("verb", ["info", "embed", "train", "predict", "compare"])
def test_a_verb_on_a_missing_store_does_not_create_it(tmp_path, verb):
    missing = tmp_path / "nowhere" / "store"
    extra = {"train": ["--train", "S1"], "predict": ["--model", "x", "--slide", "S1"]}.get(verb, [])
    res = CliRunner().invoke(app, [verb, "--store", str(missing), *extra])
    one_line(res.output, res.exit_code, (str(missing), "--store", "ingest"))
    assert not missing.exists() and not (tmp_path / "nowhere").exists()


MISSING_STORE_CASES = {  # verbs that may start a store, or came after issue 18: refused before creating it
    "index": (["index"], ("--store", "ingest")),
    "labels_add": (["labels", "add", "{tmp}/tone.csv", "--key", "slide,spot", "--column", "tone"], ("--store",)),
    "clinical_add_bad_file": (["clinical", "add", "{tmp}/clinical.csv"], ("clinical.csv", "event '2'")),
    "clinical_add_no_file": (["clinical", "add", "{tmp}/none.csv"], ("none.csv",)),
    "ingest_unknown_catalog": (["ingest", "nope"], ("unknown catalog 'nope'",)),
    "ingest_unknown_slide": (["ingest", "{tmp}/new/new.yaml", "--slide", "ZZ"], ("new.yaml", "'ZZ'")),
    "ingest_missing_image": (["ingest", "{tmp}/new/new.yaml", "--slide", "S3"], ("S3.jpg", "does not exist")),
}


@pytest.mark.parametrize("case", list(MISSING_STORE_CASES))
def test_a_failing_verb_does_not_create_a_missing_store(world, case):
    """Before: `index`, `labels add`, and `ingest` or `clinical add` refused for their input
    (a catalog, a --slide, a file, a slide's image), left a new empty store (folder and lock
    file) behind."""
    args, needles = MISSING_STORE_CASES[case]
    label_file()(world)
    clinical_file("patient,time,event\nS1,1,0\nS2,2,2\n")(world)
    new_slide(world)
    (world.tmp / "new" / "S3.jpg").unlink()  # ingest_missing_image; the other cases fail before any image
    missing = world.tmp / "nowhere" / "store"
    res = CliRunner().invoke(app, [*(a.format(tmp=world.tmp) for a in args), "--store", str(missing)])
    one_line(res.output, res.exit_code, needles)
    assert not (world.tmp / "nowhere").exists()


def test_query_on_a_missing_store_runs_plain_sql_without_creating_it(tmp_path):
    missing = tmp_path / "nowhere"
    res = CliRunner().invoke(app, ["query", "SELECT 41 + 1 AS x", "--store", str(missing), "--format", "csv"])
    assert res.exit_code == 0 and res.output.split() == ["x", "42"], res.output
    assert not missing.exists()


def test_infer_slide_id_dotdot_writes_nothing_above_out(world):
    res = CliRunner().invoke(
        app,
        _fill(["infer", "{data}/S1.jpg", "--model", "{model}", "--out", "{tmp}/a/out", "--slide-id", ".."], world, None)
        + ["--um-per-px", "1", S, str(world.store)],
    )
    assert res.exit_code == 2
    assert not (world.tmp / "a").exists() or not any((world.tmp / "a").iterdir())


def test_query_caps_a_huge_result_and_says_so(world):
    """Before: ``SELECT * FROM range(10000000)`` materialised 4 GB; now the cap (10,000 rows
    unless --limit) is applied inside DuckDB and printed."""
    res = CliRunner().invoke(app, ["query", "SELECT * FROM range(100000000)", S, str(world.store), "--format", "csv"])
    assert res.exit_code == 0
    lines = res.stdout.strip().splitlines()
    assert lines == ["range", *[str(i) for i in range(10000)]]
    assert "first 10,000 rows shown" in res.stderr
    res = CliRunner().invoke(
        app, ["query", "SELECT * FROM range(7)", S, str(world.store), "--format", "csv", "--limit", "3"]
    )
    assert res.stdout.split() == ["range", "0", "1", "2"] and "first 3 rows" in res.stderr


def test_an_object_store_that_does_not_answer_is_one_line_within_the_time_out(world, monkeypatch):
    """Before: ``info --store gs://bucket/x`` waited with no output."""
    monkeypatch.setenv("STIMAGE_REMOTE_TIMEOUT", "2")
    res = CliRunner().invoke(app, ["info", S, "gs://stimage-no-such-bucket/x"])
    one_line(res.output, res.exit_code, ("gs://stimage-no-such-bucket/x",))


# --- read-only and full disks (need mount: root in a container) --------------------------------
def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture()
def mounted(tmp_path):
    points: list[Path] = []

    def mount(*args: str, at: Path) -> Path:
        at.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or not _mount(*args, str(at)):
            pytest.skip("needs mount (root with CAP_SYS_ADMIN)")
        points.append(at)
        return at

    yield mount
    for p in reversed(points):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


WRITERS = {
    "ingest": ["ingest", "{data}/mini.yaml"],
    "embed": ["embed", "--overwrite", "--precision", "float32", "--workers", "0"],
    "train": ["train", "--train", "S1", "--head", "ridge", "--genes", "var:5"],
    "predict": ["predict", "--model", "{model}", "--slide", "S2"],
    "compare": ["compare", "--heads", "ridge", "--genes", "var:5"],
    # writers added since issue 18
    "infer": ["infer", "{data}/S1.jpg", "--model", "{model}", "--out", "{tmp}/out", "--um-per-px", "1"],
    "labels_add": ["labels", "add", "{tmp}/tone.csv", "--key", "slide,spot", "--column", "tone"],
    "clinical_add": ["clinical", "add", "{tmp}/clinical.csv"],
    "index": ["index", "--force"],
    "explain": ["explain", "--model", "{model}", "--slide", "S2", "--gene", "<gene>", "--spots", "<spot>"]
    + ["--out", "{tmp}/ex", "--samples", "8", "--device", "cpu"],
}


@pytest.mark.parametrize("verb", list(WRITERS))
def test_every_writer_on_a_read_only_store_is_one_line(world, mounted, verb):
    ro = mounted("--bind", str(world.store), at=world.tmp / "ro")
    if not _mount("-o", "remount,bind,ro", str(ro)):
        pytest.skip("cannot remount read-only")
    label_file()(world)
    clinical_file("patient,time,event\nS1,1,0\n")(world)
    gene = json.loads((world.store / "models" / world.model / "run.json").read_text())["genes"][0]
    spot = Store(world.store).read("spots", ["spot_id"], where="slide_id = 'S2' AND passes_qc")["spot_id"][0].as_py()
    args = [a.replace("<gene>", gene).replace("<spot>", spot) for a in WRITERS[verb]]
    before = snapshot(ro)
    res = CliRunner().invoke(app, [*_fill(args, world, None), S, str(ro)])
    one_line(res.output, res.exit_code, (str(ro), "read-only"))
    assert snapshot(ro) == before


@pytest.mark.parametrize("free_kb", [0, 400, 800])
def test_a_full_disk_during_ingest_is_one_line(world, mounted, free_kb):
    """ENOSPC while two new slides are written (``free_kb`` left: at the first write, at a
    table's commit, in the compaction after the commits): one line saying the disk is full;
    the store as it was, or (compaction) with both new slides whole in every table."""
    disk = mounted("-t", "tmpfs", "-o", f"size={_size(world.store) + 4 * 1024 * 1024}", "tmpfs", at=world.tmp / "disk")
    shutil.copytree(world.store, disk / "store")
    (disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(disk).free - free_kb * 1024))
    cat = new_slide(world, ("S3", "S4"))  # 2 x 12 spots with ~15,000 genes each
    before = committed(disk / "store")
    res = CliRunner().invoke(app, ["ingest", str(cat), S, str(disk / "store")])
    one_line(res.output, res.exit_code, ("disk is full", "not committed"))
    after = committed(disk / "store")
    st = Store(disk / "store")
    new = {t: st.sql(f"SELECT COUNT(*) AS n FROM {t} WHERE slide_id IN ('S3', 'S4')")["n"][0] for t in CORE}
    changed = sorted(set(after["rows"].items()) ^ set(before["rows"].items()))
    if free_kb < 800:  # failed at a write or a commit: nothing of S3, S4 anywhere, the tables restored
        assert after == before and set(new.values()) == {0}, changed
    else:  # all committed, then the compaction after them found the disk full: both slides whole
        assert new["slides"] == 2 and min(new.values()) >= 2 and st.pending("ingest") == [], new


CORE = ("slides", "spots", "genes", "expression")


def _size(store: Path) -> int:
    """Bytes a copy of ``store`` takes on tmpfs (4 KiB pages)."""
    files = [p for p in store.rglob("*") if p.is_file()]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in files) + 4096 * (len(files) + 64)


def committed(path: Path) -> dict:
    """What a failed writer must leave as it was: each table's rows and version-independent
    content (row count), the lock file and the pending marks."""
    snap = snapshot(path)
    st = Store(path)
    rows = {n: st.table(n).count_rows() for n in st.table_names()}
    marks = {k: v for k, v in snap["files"].items() if k == ".stimage-embed.lock" or k.startswith(".pending")}
    return {"rows": rows, "marks": marks}


@pytest.mark.parametrize("free_kb", [0, 48, 96])
def test_a_full_disk_during_compare_is_one_line_and_never_leaves_a_wrong_result(world, mounted, free_kb):
    """ENOSPC at one of compare's commits (``free_kb`` left: at its first write, at a fold's
    predictions, at the second fold): one line saying the disk is full; the inputs untouched;
    no committed run without its rows; once there is room, the same command gives the
    leaderboard of an undisturbed store."""
    disk = mounted("-t", "tmpfs", "-o", f"size={_size(world.store) + 1024 * 1024}", "tmpfs", at=world.tmp / "disk")
    shutil.copytree(world.store, disk / "store")
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(disk).free - free_kb * 1024))
    args = ["compare", "--heads", "ridge", "--genes", "var:5", S]
    before = committed(disk / "store")
    res = CliRunner().invoke(app, [*args, str(disk / "store")])
    errors = [ln for ln in res.output.splitlines() if "error:" in ln]
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output[-2000:]
    assert len(errors) == 1 and "disk is full" in errors[0] and "not committed" in errors[0], res.output[-2000:]
    after = committed(disk / "store")
    inputs = {n: r for n, r in before["rows"].items() if n not in ("runs", "predictions", "metrics")}
    assert {n: after["rows"][n] for n in inputs} == inputs
    assert after["marks"][".stimage-embed.lock"] == before["marks"][".stimage-embed.lock"]
    st = Store(disk / "store")
    new = set(st.sql("SELECT run_id FROM runs")["run_id"]) - set(
        Store(world.store).sql("SELECT run_id FROM runs")["run_id"]
    )
    for run in new:  # a run committed before the disk filled has its rows
        assert st.sql(f"SELECT COUNT(*) AS n FROM predictions WHERE run_id = '{run}'")["n"][0] > 0, run
    filler.unlink()
    assert CliRunner().invoke(app, [*args, str(disk / "store")]).exit_code == 0
    assert CliRunner().invoke(app, [*args, str(world.store)]).exit_code == 0
    got, want = (_leaderboard(p) for p in (disk / "store", world.store))
    assert got["head"].to_list() == want["head"].to_list() == ["ridge"] and got["folds"].to_list() == [2]
    np.testing.assert_allclose(got["pcc_mean"].to_numpy(), want["pcc_mean"].to_numpy(), rtol=1e-9)


def _runs(store: Path) -> list[str]:
    return Store(store).sql("SELECT run_id FROM runs")["run_id"].to_list()


def _leaderboard(store: Path) -> pl.DataFrame:
    return Store(store).sql("SELECT * FROM leaderboard").sort("head", "backbone")
