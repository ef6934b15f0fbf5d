"""Issue 3 benchmark: end-to-end tiles/s of the embedding pass against the bare model and
against a naive STimage-style path, measured side by side in one run on the real sections.

* A: ``embed()`` on a fresh store (ingest into a temp dir first, not timed), wall time of
  the whole call: model build, DataLoader worker start-up, slide decode, stain
  normalisation (macenko; second row ``stain="none"``), model forward, Lance writes.
* B: the bare model, ``bb(bb.preprocess(x))`` under ``torch.inference_mode`` on uint8 tiles
  (N, 224, 224, 3) already in memory, same batch size and number of tiles as A, after one
  warm-up batch: the compute limit.
* C: STimage-style: PIL opens each full slide (``Image.MAX_IMAGE_PIXELS = None``), crops each
  spot window (spot diameter in µm / store's µm per px), resizes to 224 px, saves one JPEG per
  tile, reads them back one by one and embeds them one by one (batch of 1), same model and
  preprocessing.

Also: bytes on disk per stored vector (embeddings table directory / rows) against 2 x dim
(float16), and the load average at start and end (the machine is shared: judge noise).

    python benchmarks/bench_embed.py [--slides C5,MOB1 | --slides all] [--batch-size 32]
        [--precision float32] [--backbone efficientnet_lite0] [--num-workers 2]
        [--naive-max-tiles N]   # C embeds only the first N tiles per slide (slow at batch 1)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from _common import table, timer

if TYPE_CHECKING:
    from stimage_embed.backbones.backbone import Backbone
    from stimage_embed.store import Store

# The package is imported inside the functions, not here: the pass's DataLoader workers are
# spawned, and a spawned worker re-imports this script as ``__mp_main__``. Top-level imports of
# the model stack (timm, torchvision, lancedb) would be paid again in every worker and charge A
# with start-up cost that the CLI (whose entry module imports only typer/polars) does not pay.

CATALOGS = ("her2st", "stutility_mob")


def _autocast(precision: str):
    """The same autocast the embedding pass uses for a resolved precision name."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=getattr(torch, precision))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def ingest_subset(store: Store, slides: list[str] | None) -> list[str]:
    """Ingest the requested slides (None = all nine) into ``store``; returns their ids."""
    from stimage_embed.ingest.catalog import load_catalog
    from stimage_embed.ingest.pipeline import ingest

    done: list[str] = []
    for name in CATALOGS:
        ids = [s.id for s in load_catalog(name).slides]
        want = ids if slides is None else [s for s in ids if s in slides]
        if want:
            ingest(name, store, slides=want, progress=False)
            done += want
    missing = sorted(set(slides or []) - set(done))
    if missing:
        raise SystemExit(f"unknown slides {missing}; known: {CATALOGS}")
    return sorted(done)


def run_a(store_dir: Path, backbone: str, slides: list[str], stain: str, args: argparse.Namespace) -> dict:
    """Time ``embed()`` as a whole on a fresh copy of the ingested store."""
    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S

    store = Store(store_dir)
    t0 = time.perf_counter()
    rep = embed(store, [backbone], slides=slides, stain=stain, batch_size=args.batch_size, num_workers=args.num_workers,
                device="cpu", precision=args.precision, progress=False)
    wall = time.perf_counter() - t0
    tdir = store.path / f"{S.embedding_table_name(backbone)}.lance"
    rows = store.table(S.embedding_table_name(backbone)).count_rows()
    data_bytes = sum(f.stat().st_size for f in (tdir / "data").rglob("*") if f.is_file())
    return {"tiles": rep.tiles, "wall": wall, "loop": rep.seconds, "rows": rows, "dir_bytes": _dir_bytes(tdir),
            "data_bytes": data_bytes, "precision": rep.precision[backbone]}


def run_c(bb: Backbone, store: Store, slides: list[str], precision: str, tmp: Path, max_tiles: int) -> dict:
    """STimage-style path.

    Every spot's tile is cropped and saved; the one-by-one read-back + embedding runs on all of
    them, or on the first ``max_tiles`` per slide (``max_tiles > 0``) when time is short. Returns
    seconds and tile counts of both phases and the tiles read back (uint8 (N, 224, 224, 3)).
    """
    Image.MAX_IMAGE_PIXELS = None  # STimage's scripts do exactly this
    size = bb.input_size
    t_tiles = t_embed = 0.0
    n_cut = 0
    kept: list[np.ndarray] = []
    for sid in slides:
        sl = store.sql(f"SELECT image_path, um_per_px, spot_diameter_um FROM slides WHERE slide_id = '{sid}'").row(0, named=True)
        sp = store.sql(f"SELECT spot_id, pixel_x, pixel_y FROM spots WHERE slide_id = '{sid}' ORDER BY spot_id")
        win = sl["spot_diameter_um"] / sl["um_per_px"]
        out = tmp / f"naive_{sid}"
        out.mkdir()
        t0 = time.perf_counter()
        img = Image.open(sl["image_path"]).convert("RGB")
        paths = []
        for i, (x, y) in enumerate(zip(sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy())):
            crop = img.crop((int(x - win / 2), int(y - win / 2), int(x + win / 2), int(y + win / 2))).resize((size, size))
            p = out / f"tile_{i}.jpeg"
            crop.save(p, "JPEG")
            paths.append(p)
        del img
        t1 = time.perf_counter()
        with torch.inference_mode():
            for p in paths[: max_tiles or None]:
                tile = np.array(Image.open(p).convert("RGB"))
                with _autocast(precision):
                    vec = bb(bb.preprocess(torch.from_numpy(tile)[None]))
                vec.float().numpy()
                kept.append(tile)
        t2 = time.perf_counter()
        t_tiles += t1 - t0
        t_embed += t2 - t1
        n_cut += len(paths)
    return {"t_tiles": t_tiles, "n_cut": n_cut, "t_embed": t_embed, "n_embed": len(kept), "tiles": np.stack(kept)}


def run_b(bb: Backbone, tiles: np.ndarray, n: int, batch_size: int, precision: str) -> float:
    """Bare forward on ``n`` in-memory uint8 tiles in batches; one untimed warm-up batch first."""
    reps = -(-n // len(tiles))
    x = torch.from_numpy(np.concatenate([tiles] * reps)[:n])
    with torch.inference_mode():
        with _autocast(precision):
            bb(bb.preprocess(x[:batch_size]))
        t0 = time.perf_counter()
        for i in range(0, n, batch_size):
            with _autocast(precision):
                vec = bb(bb.preprocess(x[i : i + batch_size]))
            vec.float().numpy()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", default="C5,MOB1", help="comma-separated slide ids, or 'all' for the nine sections")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--precision", default="float32", help="float32 | bfloat16 | auto (auto: the pass's measured choice)")
    ap.add_argument("--naive-max-tiles", type=int, default=0,
                    help="C: embed one by one only the first N tiles per slide (0 = all); C's rate is then "
                         "1 / (seconds per tile cut+saved + seconds per tile read+embedded)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from stimage_embed.backbones import create_model
    from stimage_embed.backbones.speed import choose_precision
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S

    load0 = os.getloadavg()
    wanted = None if args.slides == "all" else [s.strip() for s in args.slides.split(",") if s.strip()]

    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        t: dict[str, float] = {}
        with timer(t, "ingest"):
            slides = ingest_subset(Store(tmp / "ingested"), wanted)
        # one fresh copy of the ingested store per A variant: no drop/overwrite inside the timing
        for stain in ("macenko", "none"):
            shutil.copytree(tmp / "ingested", tmp / f"store_{stain}")
        a = run_a(tmp / "store_macenko", args.backbone, slides, "macenko", args)
        a0 = run_a(tmp / "store_none", args.backbone, slides, "none", args)
        n = a["tiles"]

        bb = create_model(args.backbone, device="cpu")
        precision, _ = choose_precision(bb, "cpu", a["precision"])
        c = run_c(bb, Store(tmp / "ingested"), slides, precision, tmp, args.naive_max_tiles)
        b = run_b(bb, c["tiles"], n, args.batch_size, precision)
    load1 = os.getloadavg()

    c_per_tile = c["t_tiles"] / c["n_cut"] + c["t_embed"] / c["n_embed"]
    rate = {"A": n / a["wall"], "A0": n / a0["wall"], "B": n / b, "C": 1.0 / c_per_tile}
    print(f"Embedding pass, {args.backbone}, slides {','.join(slides)} ({n} tiles), batch {args.batch_size}, "
          f"precision {precision}, {args.num_workers} DataLoader workers, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs; ingest (untimed) {t['ingest']:.1f} s")
    print(f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print()
    rows = [
        ("A   embed(), macenko", n, f"{a['wall']:.1f}", f"{rate['A']:.1f}", f"{n / a['loop']:.1f}"),
        ("A0  embed(), stain none", n, f"{a0['wall']:.1f}", f"{rate['A0']:.1f}", f"{n / a0['loop']:.1f}"),
        ("B   bare model, tiles in memory", n, f"{b:.1f}", f"{rate['B']:.1f}", ""),
        ("C   naive: PIL crop -> JPEG -> read -> batch 1", c["n_embed"], f"{c['t_tiles'] + c['t_embed']:.1f}", f"{rate['C']:.1f}",
         f"(cut+save {c['n_cut']} tiles {c['t_tiles']:.1f} s; read+embed {c['n_embed']} tiles {c['t_embed']:.1f} s)"),
    ]
    print(table(rows, ("path", "tiles", "seconds", "tiles/s", "tiles/s loop only (EmbedReport)")))
    print()
    ratios = [
        ("A/B   (share of the compute limit reached end to end)", f"{rate['A'] / rate['B']:.2f}"),
        ("A0/B  (same, without stain normalisation)", f"{rate['A0'] / rate['B']:.2f}"),
        ("A/A0  (cost of macenko: 1 - this)", f"{rate['A'] / rate['A0']:.2f}"),
        ("A/C   (speed-up over the naive path)", f"{rate['A'] / rate['C']:.2f}x"),
        ("A0/C", f"{rate['A0'] / rate['C']:.2f}x"),
    ]
    print(table(ratios, ("ratio", "value")))
    print()
    dim = bb.embed_dim
    print(table([
        (f"{S.embedding_table_name(args.backbone)}.lance (whole dir)", a["rows"], a["dir_bytes"], f"{a['dir_bytes'] / a['rows']:.0f}", 2 * dim,
         f"{a['dir_bytes'] / a['rows'] / (2 * dim):.2f}"),
        ("  data/*.lance files only", a["rows"], a["data_bytes"], f"{a['data_bytes'] / a['rows']:.0f}", 2 * dim,
         f"{a['data_bytes'] / a['rows'] / (2 * dim):.2f}"),
    ], ("embeddings table", "rows", "bytes", "bytes/vector", f"2 x dim (fp16 {dim}-d)", "ratio")))


if __name__ == "__main__":
    main()
