"""Visium HD at scale: a SYNTHETIC Visium HD slide of ~100,000 16-µm bins laid over a real
HER2ST H&E (C5.jpg), through ingest -> embed -> compare.

What is real: the H&E images (HER2ST C5, C4) and their µm/px (lattice fit of the real
HER2ST spots, 200 µm pitch). What is synthetic: the bins (a square_008um folder in Space
Ranger's layout, summed 2x2 into 16 µm bins by the ``visium_hd`` reader) and their counts
(Poisson, rate log-linear in the H&E darkness at the bin, so a head has something to learn).

Measured, in subprocesses of the CLI (peak RSS of the process tree, polled every 0.2 s):
1. ``ingest`` of the 100k-bin slide: wall time, peak memory.
2. ``embed`` (Lite0, Macenko, 112 µm tiles centred on each 16 µm bin) of the same slide for
   ``--embed-seconds``: tiles/s and peak memory with all 100k bins planned. The pass is
   resumable; it is stopped (SIGTERM to the process group started here) after the budget.
3. two small slides (C4, C5 images; ``--small-side`` bins a side) ingested, fully embedded
   and run through ``compare --heads mean,ridge --genes var:4``.

Usage: ``python benchmarks/bench_visium_hd.py --out /tmp/hd_bench [--embed-seconds 240]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import scipy.sparse as sp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import table  # noqa: E402
from fixtures_hd import bin_pixels, write_square_folder  # noqa: E402

from stimage_embed.ingest.geometry import fit_lattice  # noqa: E402
from stimage_embed.paths import data_root  # noqa: E402
from stimage_embed.tiles.image import SlideImage  # noqa: E402
from stimage_embed.tiles.tissue import tissue_mask  # noqa: E402

SRC_UM, BIN_UM, TILE_UM = 8, 16, 112
N_GENES = 8


def her2st_um_per_px(slide: str) -> float:
    s = pd.read_csv(data_root() / "her2st/spots" / f"{slide}_selection.tsv", sep="\t")
    return fit_lattice(s.x.to_numpy(), s.y.to_numpy(), s.pixel_x.to_numpy(), s.pixel_y.to_numpy()).um_per_px(200.0)


def build_slide(out: Path, slide: str, side16: tuple[int, int], seed: int) -> tuple[Path, float, int]:
    """square_008um folder of ``side16`` x2 bins centred on the tissue of HER2ST ``slide``;
    returns (binned_outputs folder, µm/px, number of 16 µm bins)."""
    image = data_root() / "her2st/images" / f"{slide}.jpg"
    um = her2st_um_per_px(slide)
    with SlideImage.open(image) as img:
        thumb, down = img.thumbnail(2048)
    mask = tissue_mask(thumb)
    cy, cx = np.argwhere(mask).mean(0) * down
    rows, cols = 2 * side16[0], 2 * side16[1]
    origin = (cx - cols * SRC_UM / 2 / um, cy - rows * SRC_UM / 2 / um)
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    px, py = bin_pixels(rr.ravel(), cc.ravel(), SRC_UM, um, origin, 0.0)
    ty = np.clip((py / down).astype(int), 0, thumb.shape[0] - 1)
    tx = np.clip((px / down).astype(int), 0, thumb.shape[1] - 1)
    dark = 1.0 - thumb[ty, tx].mean(1) / 255.0
    z = (dark - dark.mean()) / (dark.std() + 1e-9)
    rng = np.random.default_rng(seed)
    b = np.log(rng.uniform(0.05, 0.6, N_GENES))
    w = rng.uniform(-0.8, 0.8, N_GENES)
    counts = rng.poisson(np.exp(b[None] + np.outer(z, w))).astype(np.int64)  # synthetic counts
    binned = out / f"{slide}_hd" / "binned_outputs"
    genes = [f"SYN{i}" for i in range(N_GENES)]
    write_square_folder(
        binned, SRC_UM, (rows, cols), sp.csr_matrix(counts), np.arange(rows * cols), genes, um, "h5", origin, 0.0
    )
    return binned, um, side16[0] * side16[1]


def write_catalog(path: Path, name: str, slides: list[tuple[str, Path]]) -> Path:
    cat = {
        "name": name,
        "reader": "visium_hd",
        "root": ".",
        "platform": "visium_hd",
        "spot_diameter_um": BIN_UM,
        "spot_pitch_um": BIN_UM,
        "bin_um": BIN_UM,
        "tile_um": TILE_UM,
        "species": "human",
        "tissue": "breast (synthetic Visium HD bins)",
        "slides": [
            {"id": sid, "patient": sid, "image": str(data_root() / "her2st/images" / f"{src}.jpg"), "counts": str(b)}
            for sid, (src, b) in slides
        ],
    }
    path.write_text(yaml.safe_dump(cat))
    return path


class PeakRSS:
    """Peak RSS (bytes) of a process and its children, polled on a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak, self._stop = pid, every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                p = psutil.Process(self.pid)
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                self.peak = max(self.peak, rss)
            except psutil.Error:
                pass
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


def run_cli(args: list[str], budget: float | None = None, poll=None) -> tuple[float, int, int]:
    """(wall s, peak RSS bytes, return code) of ``stimage_embed.cli args``; stopped after ``budget`` s.
    ``poll``: called every 20 s with the elapsed seconds while the command runs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stimage_embed.cli", *args], env=env, start_new_session=True, stdout=subprocess.PIPE
    )
    mon = PeakRSS(proc.pid)
    try:
        while poll is not None and proc.poll() is None and (budget is None or time.perf_counter() - t0 < budget):
            time.sleep(20.0)
            poll(time.perf_counter() - t0)
        proc.wait(timeout=None if budget is None else max(0.0, budget - (time.perf_counter() - t0)))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
    wall = time.perf_counter() - t0
    out = proc.stdout.read().decode() if proc.stdout else ""
    if out.strip():
        print(out.strip()[-2000:])
    return wall, mon.stop(), proc.returncode


def n_vectors(store: Path, slide: str | None = None) -> int:
    from stimage_embed.store import Store

    st = Store(store)
    t = "embeddings_efficientnet_lite0"
    if not st.has_table(t):
        return 0
    return st.dataset(t).count_rows(None if slide is None else f"slide_id = '{slide}'")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--side", type=int, nargs=2, default=(316, 317), help="16 µm bins per side of the big slide")
    ap.add_argument("--small-side", type=int, default=24)
    ap.add_argument("--embed-seconds", type=float, default=240.0)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    big, um, n_big = build_slide(a.out, "C5", tuple(a.side), 0)
    rows.append(
        (
            "build synthetic square_008um (C5 image)",
            f"{n_big * 4:,} 8-µm bins",
            f"{time.perf_counter() - t0:.0f} s",
            "-",
        )
    )
    store = a.out / "store"
    cat = write_catalog(a.out / "hd_big.yaml", "hd_big", [("HD_C5", ("C5", big))])
    wall, peak, rc = run_cli(["ingest", str(cat), "--store", str(store)])
    rows.append(("ingest (sum 2x2 -> 16 µm, QC, write)", f"{n_big:,} bins", f"{wall:.0f} s", f"{peak / 2**30:.2f} GiB"))
    seen: list[tuple[float, int]] = []
    wall, peak, rc = run_cli(
        ["embed", "--store", str(store), "--slide", "HD_C5", "--flush-rows", "128"],
        budget=a.embed_seconds,
        poll=lambda t: seen.append((t, n_vectors(store, "HD_C5"))),
    )
    done = n_vectors(store, "HD_C5")
    rows.append(
        (
            f"embed {TILE_UM} µm tiles, Lite0 (stopped at {a.embed_seconds:.0f} s)",
            f"{done:,} of {n_big:,} tiles",
            f"{done / wall:.1f} tiles/s",
            f"{peak / 2**30:.2f} GiB",
        )
    )
    started = [(t, n) for t, n in seen if n > 0]
    if len(started) >= 2:
        (t1, n1), (t2, n2) = started[0], started[-1]
        rows.append(
            ("embed, after the first commit", f"{n2 - n1:,} tiles", f"{(n2 - n1) / (t2 - t1):.1f} tiles/s", "-")
        )
    small = [
        (f"HDS_{s}", (s, build_slide(a.out / "small", s, (a.small_side, a.small_side), i)[0]))
        for i, s in enumerate(("C4", "C5"))
    ]
    store2 = a.out / "store_small"
    cat2 = write_catalog(a.out / "hd_small.yaml", "hd_small", small)
    for args in (
        ["ingest", str(cat2), "--store", str(store2)],
        ["embed", "--store", str(store2)],
        ["compare", "--store", str(store2), "--heads", "mean,ridge", "--genes", "var:4"],
    ):
        wall, peak, rc = run_cli(args)
        rows.append(
            (
                " ".join(args[:1]) + " (2 small slides)",
                f"{2 * a.small_side**2:,} bins",
                f"{wall:.0f} s, rc={rc}",
                f"{peak / 2**30:.2f} GiB",
            )
        )
    print(f"synthetic Visium HD (counts simulated) on real HER2ST H&E, {um:.3f} µm/px")
    print(table(rows, ("step", "size", "time / rate", "peak RSS")))


if __name__ == "__main__":
    main()
