"""Issue 2 benchmark: tiles/s of the store's tile reader against STimage's naive path,
measured side by side in one run on the real HER2ST sections, plus ingest time for all
nine sections.

Naive path (STimage-style): open the full image with PIL, crop each spot, resize, save a
JPEG per tile, read it back. Ours: decode the slide once, cut physical windows in memory.

    python benchmarks/bench_tiles.py [--slides B4,C5] [--store DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from _common import table, timer
from PIL import Image

from stimage_embed.ingest.pipeline import ingest
from stimage_embed.store import Store
from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.window import TileGeometry, TileReader


def naive(image_path: str, xs, ys, win: float, out_px: int, tmp: Path) -> None:
    Image.MAX_IMAGE_PIXELS = None  # STimage's scripts do exactly this
    img = Image.open(image_path).convert("RGB")
    paths = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        crop = img.crop((int(x - win / 2), int(y - win / 2), int(x + win / 2), int(y + win / 2))).resize(
            (out_px, out_px)
        )
        p = tmp / f"tile_{i}.jpeg"
        crop.save(p, "JPEG")
        paths.append(p)
    for p in paths:
        np.asarray(Image.open(p).convert("RGB"))


def ours(image_path: str, xs, ys, umpp: float, tile_um: float, out_px: int) -> None:
    with SlideImage.open(image_path) as img:
        reader = TileReader(img, umpp, TileGeometry(tile_um, out_px))
        for x, y in zip(xs, ys):
            reader.read(x, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default=None)
    ap.add_argument("--slides", default="B4,C2,C3,C4,C5")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        store = Store(args.store or tmp / "store")
        t: dict[str, float] = {}
        with timer(t, "ingest_her2st"):
            ingest("her2st", store, progress=False)
        with timer(t, "ingest_mob"):
            ingest("stutility_mob", store, progress=False)
        rows = []
        tot = {"ours": 0.0, "naive": 0.0, "n": 0}
        for sid in args.slides.split(","):
            sp = store.sql(f"SELECT pixel_x, pixel_y FROM spots WHERE slide_id = '{sid}'")
            sl = store.sql(f"SELECT image_path, um_per_px, spot_diameter_um FROM slides WHERE slide_id = '{sid}'").row(
                0, named=True
            )
            xs, ys = sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy()
            win = sl["spot_diameter_um"] / sl["um_per_px"]
            r: dict[str, float] = {}
            with timer(r, "naive"):
                naive(sl["image_path"], xs, ys, win, 224, tmp)
            with timer(r, "ours"):
                ours(sl["image_path"], xs, ys, sl["um_per_px"], sl["spot_diameter_um"], 224)
            n = len(xs)
            tot["ours"] += r["ours"]
            tot["naive"] += r["naive"]
            tot["n"] += n
            rows.append((sid, n, f"{n / r['ours']:.1f}", f"{n / r['naive']:.1f}", f"{r['naive'] / r['ours']:.2f}x"))
        rows.append(
            (
                "all",
                tot["n"],
                f"{tot['n'] / tot['ours']:.1f}",
                f"{tot['n'] / tot['naive']:.1f}",
                f"{tot['naive'] / tot['ours']:.2f}x",
            )
        )
        print("Tile reading, 100 µm tiles -> 224 px, including image decode (tiles/s)")
        print(table(rows, ("slide", "tiles", "ours tiles/s", "naive tiles/s", "speed-up ours/naive")))
        print()
        print(
            table(
                [
                    ("her2st (5 sections)", f"{t['ingest_her2st']:.1f}"),
                    ("stutility_mob (4 sections)", f"{t['ingest_mob']:.1f}"),
                    ("all nine", f"{t['ingest_her2st'] + t['ingest_mob']:.1f}"),
                ],
                ("ingest", "seconds"),
            )
        )


if __name__ == "__main__":
    main()
