"""Hostile or broken files and options (issue 9): each is refused with ONE line naming the
file and the field (exit code 2; no traceback, no bare "Aborted."), before anything is
decoded or written; user SQL cannot reach the file system unless asked to.

Files are cut from the real HER2ST C5 section (tests/store_cases.py).
"""

from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from PIL import Image
from store_cases import mini_dataset
from typer.testing import CliRunner

from stimage_embed import __version__
from stimage_embed.cli import app
from stimage_embed.errors import InputError
from stimage_embed.store import Store
from stimage_embed.store import schema as S
from stimage_embed.tiles.image import SlideImage


def _one_line(res, *needles: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip() and "%|" not in ln]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and "Aborted" not in res.output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def case(tmp_path, real_data_root):
    """A one-slide catalog (S1: 12 spots of HER2ST C5 and a crop of its image) with writable files."""
    catalog = mini_dataset(tmp_path / "data", real_data_root, slides={"S1": "C5"})
    image = tmp_path / "data" / "S1.jpg"

    def ingest(*extra):
        return CliRunner().invoke(app, ["ingest", str(catalog), "--store", str(tmp_path / "store"), *extra])

    class Case:
        pass

    c = Case()
    c.root, c.image, c.catalog, c.ingest, c.store = tmp_path / "data", image, catalog, ingest, Store(tmp_path / "store")
    return c


def _bomb() -> bytes:
    """A real 16 x 16 JPEG whose frame header claims 20000 x 20000 pixels (631 bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (20000).to_bytes(2, "big") * 2
    return bytes(data)


# --- images ------------------------------------------------------------------------------
def test_a_jpeg_claiming_more_pixels_than_its_bytes_can_hold_is_refused_before_decoding(case):
    """Before: accepted, allocating 1.2 GB (in every loader worker too)."""
    case.image.write_bytes(_bomb())
    assert case.image.stat().st_size < 1000
    with pytest.raises(InputError, match="header claims 400,000,000 pixels but the file has only"):
        SlideImage.open(case.image)
    _one_line(case.ingest(), str(case.image), ": image: ")
    assert not case.store.table_names()


def test_decoding_stays_within_the_memory_budget(real_data_root):
    path = real_data_root / "her2st/images/C5.jpg"  # 9272 x 9901 RGB = 275 MB decoded
    with pytest.raises(InputError, match="decoding needs 0.28 GB, over the memory budget of 0.10 GB"):
        SlideImage.open(path, max_bytes=100_000_000)


def test_a_truncated_jpeg_is_an_error_naming_the_file(case):
    """Before: a JPEG cut to a third ingested without a warning (the decoder filled grey)."""
    raw = case.image.read_bytes()
    case.image.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(InputError, match="premature end of JPEG data"):
        SlideImage.open(case.image)
    _one_line(case.ingest(), str(case.image), ": image: premature end of JPEG data")
    assert not case.store.table_names()


def test_a_complete_jpeg_with_trailing_bytes_still_opens(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "ok.jpg"
    path.write_bytes(buf.getvalue() + b"\x00" * 100)  # padding some scanners append after the end marker
    with SlideImage.open(path) as img:
        assert (img.width, img.height) == (48, 64)


# --- tables --------------------------------------------------------------------------------
def test_a_truncated_counts_gz_names_the_file(case):
    """Before: EOFError -> a bare "Aborted." from the command line."""
    counts = case.root / "S1.tsv.gz"
    raw = counts.read_bytes()
    counts.write_bytes(raw[: len(raw) // 2])
    _one_line(case.ingest(), f"{counts}: counts: truncated or corrupt compressed file")


def test_a_non_numeric_pixel_x_names_the_file_field_and_line(case):
    """Before: a polars InvalidOperationError traceback."""
    spots = case.root / "S1_selection.tsv"
    df = pl.read_csv(spots, separator="\t", infer_schema_length=0)
    df = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(pl.lit("abc")).otherwise(pl.col("pixel_x")).alias("pixel_x")
    )
    df.write_csv(spots, separator="\t")
    _one_line(case.ingest(), f"{spots}: pixel_x: 1 non-numeric value(s) (line 5: 'abc')")


# --- options and SQL -----------------------------------------------------------------------
def test_malformed_user_sql_options_are_one_line(tmp_path):
    """Before: a DuckDB parser error traceback. (On an existing store: a missing one is its own
    error, see tests/test_bad_input_cli.py.)"""
    Store(tmp_path / "store").append(
        "genes", pa.Table.from_pylist([{"slide_id": "S", "gene_index": 0, "gene": "A"}], schema=S.GENES)
    )
    store = str(tmp_path / "store")
    _one_line(
        CliRunner().invoke(app, ["train", "--store", store, "--train-sql", "SELEC slide_id FROM slides"]),
        '--train-sql: invalid SQL: Parser Error: syntax error at or near "SELEC"',
    )
    _one_line(
        CliRunner().invoke(app, ["predict", "--store", store, "--model", "x", "--slides-sql", "SELECT FROM WHERE"]),
        "--slides-sql: invalid SQL",
    )


def test_backbone_names_with_quotes_are_refused(tmp_path):
    """Before: the quote reached a Lance filter and DuckDB SQL (a ValueError traceback)."""
    store = Store(tmp_path / "store")
    store.append(
        "provenance",
        pa.Table.from_pylist(
            [{"provenance_id": "p", "table_name": "embeddings_x", "backbone": "x", "json": "{}"}], schema=S.PROVENANCE
        ),
    )
    bad = "efficientnet_lite0'x"
    for args in (
        ["compare", "--backbones", bad],
        ["train", "--backbone", bad, "--train", "C4"],
        ["embed", "--backbone", bad],
    ):
        _one_line(CliRunner().invoke(app, [*args, "--store", str(store.path)]), "backbone", "invalid backbone name")
    with pytest.raises(InputError, match="invalid backbone name"):
        S.embedding_table_name('a"; DROP TABLE slides; --')


def test_csv_output_of_list_columns_is_json_text(tmp_path):
    """Before: polars ComputeError "CSV format does not support nested data" (a traceback)."""
    res = CliRunner().invoke(
        app,
        [
            "query",
            "SELECT 'C5' AS slide_id, [1, 2] AS gene_index, {'a': 1} AS s",
            "--store",
            str(tmp_path / "store"),
            "--format",
            "csv",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines() == ["slide_id,gene_index,s", 'C5,"[1, 2]","{""a"": 1}"']


def test_user_sql_has_no_file_access_unless_allowed(tmp_path):
    """Before: `query` could read any file (read_csv('/etc/passwd')) and write one (COPY ... TO)."""
    store = Store(tmp_path / "store")
    store.append(
        "genes",
        pa.Table.from_pylist(
            [{"slide_id": "S", "gene_index": i, "gene": g} for i, g in enumerate(["A", "B"])], schema=S.GENES
        ),
    )
    target = tmp_path / "out.csv"
    runner = CliRunner()

    def query(sql, *extra):
        return runner.invoke(app, ["query", sql, "--store", str(store.path), "--format", "csv", *extra])

    # the store's own tables are there (registered before the configuration is locked)
    res = query("SELECT gene FROM genes ORDER BY gene_index")
    assert res.exit_code == 0 and res.output.splitlines() == ["gene", "A", "B"], res.output
    for sql in (
        "SELECT * FROM read_csv('/etc/passwd')",
        f"COPY (SELECT 1 AS x) TO '{target}'",
        f"ATTACH '{tmp_path / 'x.db'}'",
        "SET enable_external_access = true",
        "LOAD httpfs",
    ):
        _one_line(query(sql), "SQL:")
    assert not target.exists() and not (tmp_path / "x.db").exists()
    # user SQL passed through other options is sandboxed too
    _one_line(
        runner.invoke(
            app, ["train", "--store", str(store.path), "--train-sql", "SELECT * FROM read_csv('/etc/passwd')"]
        ),
        "--train-sql",
        "disabled by configuration",
    )
    # an explicit flag lifts it
    res = query(f"COPY (SELECT 1 AS x) TO '{target}'", "--allow-file-access")
    assert res.exit_code == 0 and target.read_text().splitlines() == ["x", "1"]


# --- models --------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_model_folder_with_a_missing_or_truncated_safetensors_is_one_line(tmp_path, damage):
    """Before: a FileNotFoundError / SafetensorError traceback."""
    from heads import save_head
    from heads.baselines import MeanBaseline

    rng = np.random.default_rng(0)
    head = MeanBaseline().fit(
        rng.normal(size=(20, 4)).astype(np.float32), rng.poisson(3, (20, 2)), library_size=np.full(20, 100.0)
    )
    folder = save_head(head, tmp_path / "model", provenance={"backbone": "x"})
    (folder / "run.json").write_text(
        json.dumps(
            {"run_id": "0123456789abcdef0123", "backbone": "efficientnet_lite0", "head": "mean", "genes": ["A", "B"]}
        )
    )
    arrays = folder / "arrays.safetensors"
    if damage == "missing":
        arrays.unlink()
    else:
        arrays.write_bytes(arrays.read_bytes()[:40])
    Store(tmp_path / "store").append(
        "genes", pa.Table.from_pylist([{"slide_id": "C5", "gene_index": 0, "gene": "A"}], schema=S.GENES)
    )
    res = CliRunner().invoke(
        app, ["predict", "--store", str(tmp_path / "store"), "--model", str(folder), "--slide", "C5"]
    )
    _one_line(res, f"{folder}: model: cannot load the saved head")


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"stimage-embed {__version__}"


def test_decode_budget_counts_reclaimable_page_cache():
    """The full-decode memory budget is half the kernel's available memory (free plus
    reclaimable cache, as psutil reports it), not half the free pages: after a large install
    the cache holds most of the RAM and a real slide would otherwise be refused."""
    psutil = pytest.importorskip("psutil")
    from stimage_embed.tiles.image import default_max_bytes

    expected = psutil.virtual_memory().available / 2
    assert abs(default_max_bytes() - expected) < 0.1 * expected
