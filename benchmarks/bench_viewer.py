"""Issue 21 benchmark: deep-zoom tile latency of `stimage-embed view`, p50/p95, with and
without the spot overlay, side by side in one run, on a real HER2ST section (C5).

Two image backends over the same pixels: the JPEG section through the raster pyramid
(RasterSlide) and the same pixels saved as a tiled pyramidal TIFF read by OpenSlide. Tiles
are 256 px (254 + 1 px overlap), taken at the three most detailed levels over the tissue, in
a shuffled order, each once (no tile cache). "HTTP" rows go through the real app (uvicorn,
loopback, httpx client); "with overlay" = the image tile and the overlay tile requested at
once, as the page does, timed until both have arrived. The goal: p95 < 100 ms on 2 cores.

    python benchmarks/bench_viewer.py [--store DIR --run RUN_ID] [--tiles 240]

Without --store it builds one in a temp folder (ingest C4+C5, embed, nb var:10 on C4, predict C5).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _common import table

SLIDE = "C5"


def build_store(root: Path) -> tuple[Path, str]:
    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.ingest.pipeline import ingest
    from stimage_embed.predictions.train_predict import predict, train
    from stimage_embed.store import Store

    store = Store(root / "store")
    ingest("her2st", store, slides=["C4", SLIDE], progress=False)
    embed(store, ["efficientnet_lite0"], slides=["C4", SLIDE], precision="float32", num_workers=0, progress=False)
    run_id, _ = train(store, "efficientnet_lite0", "nb", "var:10", ["C4"])
    predict(store, run_id, [SLIDE])
    return store.path, run_id


def tissue_tiles(tiles, xs: np.ndarray, ys: np.ndarray, n: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Up to ``n`` (level, col, row) at the three top levels whose area holds spots, shuffled."""
    top = tiles.dz.level_count - 1
    out = []
    for level in (top, top - 1, top - 2):
        scale = 2 ** (top - level)
        cells = {(int(x / scale // 254), int(y / scale // 254)) for x, y in zip(xs, ys)}
        out += [(level, c, r) for c, r in sorted(cells) if tiles.valid(level, c, r)]
    random.Random(seed).shuffle(out)
    return out[:n]


def pct(ms: list[float]) -> tuple[str, str]:
    return f"{np.percentile(ms, 50):.1f}", f"{np.percentile(ms, 95):.1f}"


def in_process(tiles, layers, order) -> dict[str, list[float]]:
    """ms per tile: JPEG tile alone; JPEG tile + overlay PNG (sequential, one thread)."""
    from stimage_embed.viewer.overlay import png_bytes

    res = {"image": [], "image+overlay": []}
    for level, col, row in order:
        t0 = time.perf_counter()
        tiles.tile_jpeg(level, col, row)
        t1 = time.perf_counter()
        png_bytes(layers.render("predicted", tiles.tile_box(level, col, row)))
        t2 = time.perf_counter()
        res["image"].append((t1 - t0) * 1e3)
        res["image+overlay"].append((t2 - t0) * 1e3)
    return res


def over_http(store_path: Path, run_id: str, gene: str, order) -> dict[str, list[float]]:
    import httpx
    import uvicorn

    from stimage_embed.viewer.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(store_path), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    res = {"image": [], "overlay": [], "image+overlay": []}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http, ThreadPoolExecutor(2) as pool:
            img = lambda lv, c, r: http.get(f"/tiles/{SLIDE}_files/{lv}/{c}_{r}.jpeg")  # noqa: E731
            ovl = lambda lv, c, r: http.get(f"/overlay/{run_id}/{SLIDE}/predicted/{lv}/{c}_{r}.png?gene={gene}")  # noqa: E731
            img(*order[0]), ovl(*order[0])  # open the slide, read the values (one-off)
            half = len(order) // 2
            for i, t in enumerate(order):
                t0 = time.perf_counter()
                if i < half:  # first half: image alone, then overlay alone
                    assert img(*t).status_code == 200
                    t1 = time.perf_counter()
                    assert ovl(*t).status_code == 200
                    res["image"].append((t1 - t0) * 1e3)
                    res["overlay"].append((time.perf_counter() - t1) * 1e3)
                else:  # second half: both at once, as the page asks for them
                    a, b = pool.submit(img, *t), pool.submit(ovl, *t)
                    assert a.result().status_code == 200 and b.result().status_code == 200
                    res["image+overlay"].append((time.perf_counter() - t0) * 1e3)
    finally:
        server.should_exit = True
        thread.join(10)
    return res


def pyramidal_tiff(jpeg: Path, out: Path) -> Path:
    """The JPEG's pixels as a tiled pyramidal TIFF (256 px tiles, JPEG-compressed, 2x levels)."""
    import imagecodecs
    import tifffile
    from PIL import Image

    arr = imagecodecs.imread(str(jpeg))
    levels = [arr]
    while max(levels[-1].shape[:2]) > 1024:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(2)))
    with tifffile.TiffWriter(out) as tif:
        opts = dict(tile=(256, 256), photometric="rgb", compression="jpeg")
        tif.write(levels[0], subifds=len(levels) - 1, **opts)
        for lv in levels[1:]:
            tif.write(lv, subfiletype=1, **opts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path)
    ap.add_argument("--run")
    ap.add_argument("--tiles", type=int, default=240)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from stimage_embed.store import Store
    from stimage_embed.viewer import queries
    from stimage_embed.viewer.deepzoom import SlideTiles
    from stimage_embed.viewer.overlay import SpotLayers

    with tempfile.TemporaryDirectory() as tmp:
        store_path, run_id = (args.store, args.run) if args.store else build_store(Path(tmp))
        store = Store(store_path)
        gene = queries.run_genes(store, run_id)[0]
        row = queries.slide(store, SLIDE)
        layers = SpotLayers.build(queries.values(store, run_id, SLIDE, gene), row["um_per_px"], row["spot_diameter_um"])
        t0 = time.perf_counter()
        raster = SlideTiles(row["image_path"])
        open_raster = time.perf_counter() - t0
        tiff = SlideTiles(pyramidal_tiff(Path(row["image_path"]), Path(tmp) / f"{SLIDE}.tif"))
        order = tissue_tiles(raster, layers.x, layers.y, args.tiles)
        rows = []
        for name, src in (("raster JPEG (RasterSlide)", raster), ("pyramidal TIFF (OpenSlide)", tiff)):
            res = in_process(src, layers, order)
            base = np.percentile(res["image"], 95)
            for key, ms in res.items():
                rows.append((name, "in-process", key, *pct(ms), f"{np.percentile(ms, 95) / base:.2f}", len(ms)))
        res = over_http(Path(store_path), run_id, gene, order)
        base = np.percentile(res["image"], 95)
        for key, ms in res.items():
            rows.append(
                ("raster JPEG (RasterSlide)", "HTTP", key, *pct(ms), f"{np.percentile(ms, 95) / base:.2f}", len(ms))
            )
    print(
        f"HER2ST {SLIDE} (real), 256 px tiles at the 3 top deep-zoom levels over the tissue; run {run_id}, gene {gene}"
    )
    print(
        f"raster open (JPEG decode, once per slide): {open_raster * 1e3:.0f} ms; cores {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(table(rows, ("image source", "path", "request", "p50 ms", "p95 ms", "p95 / image p95", "tiles")))


if __name__ == "__main__":
    main()
