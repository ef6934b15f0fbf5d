"""Small real-data cases for the store robustness tests (concurrency, crashes, hostile files).

``mini_dataset`` writes a catalog of tiny slides cut from the real HER2ST sections: each
keeps ``n_spots`` real spots with their real counts and a real image crop around them,
so an ingest or an embedding pass takes seconds. ``cli`` runs the real command line in a
subprocess (how concurrent writers and crashes happen in practice).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import yaml

#: mini slide id -> HER2ST section it is cut from
MINI_SLIDES = {"S1": "C5", "S2": "C4"}
BACKBONE = "efficientnet_lite0"
TABLE = f"embeddings_{BACKBONE}"
#: spots per embedding chunk (= per append) in these tests
CHUNK = 4


def mini_dataset(
    root: Path,
    data_root: Path,
    n_spots: int = 12,
    slides: dict[str, str] | None = None,
    shift_px: dict[str, float] | None = None,
    name: str = "mini",
    margin_px: int = 300,
    downsample: int = 2,
) -> Path:
    """Write ``root/<slide>.*`` files and ``root/<name>.yaml``; returns the catalog path.

    Each slide is a real HER2ST section cut down to its ``n_spots`` selected spots nearest
    the middle of the tissue: the image is cropped around them (``margin_px`` on every side),
    reduced ``downsample`` times (area mean; µm/px grows alike) and re-encoded as JPEG, with
    the spot centres moved into that frame; the counts keep those spots' rows. ``shift_px``: per
    slide, pixels added to every
    spot centre (spots "moved" on re-ingest).
    """
    import imagecodecs
    import numpy as np

    slides = slides or MINI_SLIDES
    src = data_root / "her2st"
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for sid, section in slides.items():
        sel = pl.read_csv(src / f"spots/{section}_selection.tsv", separator="\t").filter(pl.col("selected") == 1)
        cx, cy = sel["pixel_x"].median(), sel["pixel_y"].median()
        sel = (
            sel.with_columns(((pl.col("pixel_x") - cx) ** 2 + (pl.col("pixel_y") - cy) ** 2).alias("_d"))
            .sort("_d")
            .head(n_spots)
        )
        sel = sel.drop("_d").sort("y", "x")
        img = root / f"{sid}.jpg"
        if not img.exists():
            full = imagecodecs.imread(str(src / f"images/{section}.jpg"))
            x0 = max(0, int(sel["pixel_x"].min()) - margin_px)
            y0 = max(0, int(sel["pixel_y"].min()) - margin_px)
            x1 = min(full.shape[1], int(sel["pixel_x"].max()) + margin_px)
            y1 = min(full.shape[0], int(sel["pixel_y"].max()) + margin_px)
            k = downsample
            crop = full[y0 : y0 + (y1 - y0) // k * k, x0 : x0 + (x1 - x0) // k * k].astype(np.float32)
            crop = crop.reshape(crop.shape[0] // k, k, crop.shape[1] // k, k, 3).mean((1, 3))
            img.write_bytes(imagecodecs.jpeg8_encode(np.ascontiguousarray(crop.round().astype(np.uint8)), level=90))
            (root / f"{sid}.origin").write_text(f"{x0} {y0} {k}")
        x0, y0, k = (float(v) for v in (root / f"{sid}.origin").read_text().split())
        dx = (shift_px or {}).get(sid, 0.0)
        sel = sel.with_columns((pl.col("pixel_x") - x0) / k + dx, (pl.col("pixel_y") - y0) / k + dx)
        sel.write_csv(root / f"{sid}_selection.tsv", separator="\t")
        keys = set(f"{x}x{y}" for x, y in zip(sel["x"], sel["y"]))
        with gzip.open(src / f"counts/{section}.tsv.gz", "rt") as fh, gzip.open(root / f"{sid}.tsv.gz", "wt") as out:
            out.write(fh.readline())
            for line in fh:
                if line.split("\t", 1)[0] in keys:
                    out.write(line)
        entries.append(
            {
                "id": sid,
                "patient": sid,
                "image": f"{sid}.jpg",
                "counts": f"{sid}.tsv.gz",
                "spots": f"{sid}_selection.tsv",
            }
        )
    cat = {
        "name": name,
        "reader": "legacy_st",
        "root": str(root),
        "platform": "legacy_st",
        "spot_diameter_um": 100,
        "spot_pitch_um": 200,
        "species": "human",
        "tissue": "breast",
        "preservation": "frozen",
        "reader_options": {"layout": "her2st"},
        "slides": entries,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cat))
    return path


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    e.pop("STIMAGE_FAULT", None)
    e.update(extra)
    return e


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "stimage_embed.cli", *args]


def cli(*args: str, check: bool = True, fault: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``stimage-embed ARGS`` to completion (``fault``: STIMAGE_FAULT crash point)."""
    extra = {"STIMAGE_FAULT": fault} if fault else {}
    proc = subprocess.run(cli_args(*args), env=env(**extra), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"stimage-embed {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def embed_args(store: Path, *extra: str) -> list[str]:
    """A deterministic small embedding pass (float32, chunks of CHUNK, one append per chunk)."""
    return [
        "embed",
        "--store",
        str(store),
        "--precision",
        "float32",
        "--batch-size",
        str(CHUNK),
        "--flush-rows",
        str(CHUNK),
        "--workers",
        "0",
        *extra,
    ]


def table_rows(store, table: str, order: tuple[str, ...]) -> list[dict]:
    """Every row of a table as dicts, sorted by ``order`` (exact-state comparisons)."""
    if not store.has_table(table):
        return []
    return pl.from_arrow(store.read(table)).sort(list(order)).to_dicts()


def copy_store(src, dst: Path):
    """A writable copy of a store (Store objects are cheap; the lock file is copied as data)."""
    import shutil

    from stimage_embed.store import Store

    shutil.copytree(src.path if hasattr(src, "path") else src, dst)
    return Store(dst)


def popen(*args: str, fault: str | None = None) -> subprocess.Popen:
    extra = {"STIMAGE_FAULT": fault} if fault else {}
    return subprocess.Popen(
        cli_args(*args), env=env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen, timeout: float = 900) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def killed(proc: subprocess.CompletedProcess) -> bool:
    """True if the run was SIGKILLed (by its STIMAGE_FAULT crash point)."""
    return proc.returncode == -9


def key_counts(store, table: str, keys: tuple[str, ...]) -> tuple[int, int]:
    """(rows, distinct keys) of a table."""
    cols = ", ".join(keys)
    df = store.sql(
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT ({cols})) AS k FROM {table}"
    )  # one scan (vector tables stream)
    return int(df["n"][0]), int(df["k"][0])


def one_error_line(output: str, exit_code: int, *needles: str) -> str:
    """The CLI's refusal: exit code 2 and one ``error: ...`` line holding every needle; returns that line."""
    assert exit_code == 2, (exit_code, output)
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
