"""Issue 3/14 benchmark: end-to-end tiles/s of the embedding pass against the bare forward of
the same model, measured side by side in one run on the real sections (default: all nine).

* A: ``embed()`` (default Macenko stain), the whole call, in a fresh spawned process on a copy
  of a store ingested beforehand (not timed): model build, stain template, slide decode, tile
  cutting and resizing, stain normalisation, model forward, Lance writes and the store upkeep
  after them (index, compaction). The process's peak RSS is the pass's peak memory.
  Repeat 1 writes a fresh table; later repeats re-run on the same store with ``overwrite=True``
  (the byte count after ``--overwrite`` is printed next to the table's size on disk).
* B: the bare model, ``bb(bb.preprocess(x))`` under ``torch.inference_mode`` on uint8 tiles
  (N, 224, 224, 3) already in memory (real, stain-normalised tiles of these slides), same batch
  size, precision and number of tiles as A, after one warm-up batch: the compute limit. Two
  layouts, each timed: one loop with torch's threads on every core, and the pass's own layout
  (one Python thread per core, each with single-threaded torch ops); the faster of the two is
  the B of the ratio (on a loaded machine, torch's spinning thread pool loses a lot in the first).
  Timed in two halves, one right before and one right after A, so a change of machine load
  during the run weighs on both sides.
* Optional variants (``--variants``): ``none`` = A without stain normalisation; ``refit`` = A on
  a store without ``slides.stain_estimate`` (older stores: every slide's thumbnail, tissue mask
  and Macenko fit computed in the pass); ``workers`` = A with one DataLoader worker process
  instead of the background thread; ``naive`` = STimage-style path (PIL crop -> JPEG file ->
  read back -> batch of 1), with ``--naive-max-tiles`` tiles per slide.

The ratio A/B is printed per repeat, with its range over repeats (the machine is shared: the
load average is printed too), and next to it the same ratio by CPU seconds per tile (all
threads of each process): other users' load barely moves it, but it does not see the model
waiting idle (start-up before the first batch), which the wall-time ratio does.

    python benchmarks/bench_embed.py [--slides all | --slides C5,MOB1] [--repeats 3]
        [--batch-size 32] [--precision float32] [--backbone efficientnet_lite0]
        [--variants none,refit,workers,naive] [--naive-max-tiles N]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from _common import table, timer
from PIL import Image

if TYPE_CHECKING:
    from stimage_embed.backbones.backbone import Backbone
    from stimage_embed.store import Store

# The package is imported inside the functions, not here: A runs in a spawned process, which
# re-imports this script as ``__mp_main__``; top-level imports of the model stack would be paid
# there before the timing starts anyway, but keep the parent light too.

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


def _cpu_seconds() -> float:
    """CPU seconds of this process (all threads) and of its finished children (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _pass_in_child(
    store_dir: str,
    backbone: str,
    slides: list[str] | None,
    stain: str,
    batch_size: int,
    num_workers: int | None,
    precision: str,
    overwrite: bool,
) -> dict:
    """Run in a spawned process: time ``embed()`` as a whole; report its peak RSS."""
    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S
    from stimage_embed.store.maintenance import live_bytes

    logging.basicConfig(level=logging.WARNING)
    store = Store(store_dir)
    c0 = _cpu_seconds()
    t0 = time.perf_counter()
    rep = embed(
        store,
        [backbone],
        slides=slides,
        stain=stain,
        batch_size=batch_size,
        num_workers=num_workers,
        device="cpu",
        precision=precision,
        overwrite=overwrite,
        progress=False,
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - c0
    name = S.embedding_table_name(backbone)
    tdir = store.path / f"{name}.lance"
    ds = store.dataset(name)
    return {
        "tiles": rep.tiles,
        "wall": wall,
        "cpu": cpu,
        "loop": rep.seconds,
        "rows": ds.count_rows(),
        "dir_bytes": _dir_bytes(tdir),
        "live_bytes": live_bytes(store, name),
        "bytes_written": rep.bytes_written,
        "line": rep.line(),
        "fragments": len(ds.get_fragments()),
        "precision": rep.precision[backbone],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def run_a(
    store_dir: Path,
    backbone: str,
    slides: list[str] | None,
    stain: str,
    args: argparse.Namespace,
    num_workers: int | None = None,
    overwrite: bool = False,
) -> dict:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(
            _pass_in_child,
            str(store_dir),
            backbone,
            slides,
            stain,
            args.batch_size,
            num_workers if num_workers is not None else args.num_workers,
            args.precision,
            overwrite,
        ).result()


def drop_stain_estimates(store_dir: Path) -> None:
    """An older store: ``slides.stain_estimate`` all NULL (the pass fits every slide itself)."""
    from stimage_embed.store import Store

    Store(store_dir).db.open_table("slides").update(values_sql={"stain_estimate": "NULL"})


def sample_tiles(store: Store, slides: list[str], size: int, n: int) -> np.ndarray:
    """``n`` real stain-normalised tiles of these slides, cut by the pass's own stream."""
    import polars as pl

    from stimage_embed.embeddings.tile_stream import (
        SlideJob,
        SlideStainFit,
        TileStream,
        make_chunks,
        stored_stain_estimates,
        template_normalizer,
    )

    tab = pl.from_arrow(store.read("slides")).sort("slide_id")
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y"]))
    est = stored_stain_estimates(tab)
    tmpl = tab.row(0, named=True)
    fit = SlideStainFit(
        template_normalizer("macenko", tmpl["image_path"], est.get(tmpl["slide_id"])), tmpl["slide_id"], est
    )
    per = -(-n // len(slides))
    jobs, chunks = {}, []
    for r in tab.filter(pl.col("slide_id").is_in(slides)).iter_rows(named=True):
        sp = spots.filter(pl.col("slide_id") == r["slide_id"]).head(per)
        jobs[r["slide_id"]] = SlideJob(r["slide_id"], r["image_path"], r["um_per_px"], r["spot_diameter_um"])
        chunks += make_chunks(
            r["slide_id"], sp["spot_id"].to_numpy(), sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy(), per
        )
    out = [b["tiles"][size].numpy() for b in TileStream(chunks, jobs, (size,), stain_factory=fit).batches(chunks)]
    return np.concatenate(out)[:n]


def pass_threads() -> tuple[int, int]:
    """(compute threads, torch threads each) the pass uses on this CPU (``embed_pass``)."""
    threads = max(1, min(4, torch.get_num_threads()))
    return threads, max(1, torch.get_num_threads() // threads)


def run_b(
    bb: Backbone, tiles: np.ndarray, n: int, batch_size: int, precision: str, threads: int = 1
) -> tuple[float, float]:
    """Bare forward on ``n`` in-memory uint8 tiles in batches; one untimed warm-up batch first.

    ``threads`` = 1: one loop, torch's intra-op threads on every core. ``threads`` > 1: that
    many Python threads take batches in turn, each with ``cores // threads`` torch threads
    (the pass's layout on few cores, here without tiles to cut). Returns (wall seconds, CPU
    seconds of this process, all threads)."""
    reps = -(-n // len(tiles))
    x = torch.from_numpy(np.concatenate([tiles] * reps)[:n])
    starts = list(range(0, n, batch_size))

    def work(it) -> None:
        with torch.inference_mode():
            for i in it:
                with _autocast(precision):
                    vec = bb(bb.preprocess(x[i : i + batch_size]))
                vec.float().numpy()

    before = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(max(1, before // threads))
    try:
        work([0])  # warm-up, not timed
        c0, t0 = time.process_time(), time.perf_counter()
        if threads == 1:
            work(starts)
        else:
            shared = iter(starts)  # next() on a list iterator is atomic under the GIL
            pool = [threading.Thread(target=work, args=(shared,)) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(before)


def run_c(bb: Backbone, store: Store, slides: list[str], precision: str, tmp: Path, max_tiles: int) -> dict:
    """STimage-style path: crop + resize + save every spot's tile as JPEG, read back one by one
    and embed at batch 1 (all tiles, or the first ``max_tiles`` per slide)."""
    Image.MAX_IMAGE_PIXELS = None  # STimage's scripts do exactly this
    size = bb.input_size
    t_tiles = t_embed = 0.0
    n_cut = n_embed = 0
    for sid in slides:
        sl = store.sql(f"SELECT image_path, um_per_px, spot_diameter_um FROM slides WHERE slide_id = '{sid}'").row(
            0, named=True
        )
        sp = store.sql(f"SELECT spot_id, pixel_x, pixel_y FROM spots WHERE slide_id = '{sid}' ORDER BY spot_id")
        win = sl["spot_diameter_um"] / sl["um_per_px"]
        out = tmp / f"naive_{sid}"
        out.mkdir()
        t0 = time.perf_counter()
        img = Image.open(sl["image_path"]).convert("RGB")
        paths = []
        for i, (x, y) in enumerate(zip(sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy())):
            crop = img.crop((int(x - win / 2), int(y - win / 2), int(x + win / 2), int(y + win / 2))).resize(
                (size, size)
            )
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
                n_embed += 1
        t2 = time.perf_counter()
        t_tiles += t1 - t0
        t_embed += t2 - t1
        n_cut += len(paths)
    return {"t_tiles": t_tiles, "n_cut": n_cut, "t_embed": t_embed, "n_embed": n_embed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", default="all", help="comma-separated slide ids, or 'all' for the nine sections")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=None, help="the pass's num_workers (default: its own choice)")
    ap.add_argument(
        "--precision", default="float32", help="float32 | bfloat16 | auto (auto: the pass's measured choice)"
    )
    ap.add_argument("--repeats", type=int, default=1, help="A/B pairs; the ratio's range over them is printed")
    ap.add_argument("--variants", default="", help="comma-separated extra rows: none, refit, workers, naive")
    ap.add_argument(
        "--naive-max-tiles", type=int, default=20, help="naive: embed one by one only the first N tiles per slide"
    )
    args = ap.parse_args()
    variants = {v.strip() for v in args.variants.split(",") if v.strip()}
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
        ingested = Store(tmp / "ingested")
        n_total = ingested.sql(
            f"SELECT COUNT(*) AS n FROM spots WHERE slide_id IN ({', '.join(repr(s) for s in slides)})"
        )["n"][0]
        bb = create_model(args.backbone, device="cpu")
        tiles = sample_tiles(ingested, slides, bb.input_size, 256)
        shutil.copytree(tmp / "ingested", tmp / "store_A")

        rows, ratios, cpu_ratios, pairs = [], [], [], []
        precision = args.precision
        layouts = sorted({1, pass_threads()[0]})  # B: one loop on every core, and the pass's threads
        for rep in range(args.repeats):
            l0 = os.getloadavg()[0]
            half = n_total // 2
            b1 = (
                {k: run_b(bb, tiles, half, args.batch_size, precision, k) for k in layouts}
                if precision != "auto"
                else None
            )
            a = run_a(tmp / "store_A", args.backbone, slides if wanted else None, "macenko", args, overwrite=rep > 0)
            precision, _ = choose_precision(bb, "cpu", a["precision"])
            if b1 is None:
                b1 = {k: run_b(bb, tiles, half, args.batch_size, precision, k) for k in layouts}
            b2 = {k: run_b(bb, tiles, n_total - half, args.batch_size, precision, k) for k in reversed(layouts)}
            n = a["tiles"]
            b_wall = {k: b1[k][0] + b2[k][0] for k in layouts}
            b_cpu = {k: b1[k][1] + b2[k][1] for k in layouts}
            rate_a = n / a["wall"]
            rate_b = {k: n_total / b_wall[k] for k in layouts}
            best = max(layouts, key=lambda k: rate_b[k])  # the faster bare forward is the compute limit
            lean = min(layouts, key=lambda k: b_cpu[k])  # the least CPU per tile (no spin-waits)
            ratios.append(rate_a / rate_b[best])
            cpu_ratios.append((b_cpu[lean] / n_total) / (a["cpu"] / n))
            pairs.append(
                (
                    rep + 1,
                    n,
                    f"{a['wall']:.1f}",
                    f"{rate_a:.1f}",
                    " / ".join(f"{rate_b[k]:.1f}" for k in layouts),
                    f"{rate_a / rate_b[best]:.3f}",
                    f"{a['cpu']:.0f} / {b_cpu[lean]:.0f}",
                    f"{cpu_ratios[-1]:.3f}",
                    f"{a['peak_rss_mb']:.0f}",
                    f"{l0:.2f} -> {os.getloadavg()[0]:.2f}",
                )
            )
            rows.append((f"A  embed(), macenko (repeat {rep + 1}{', overwrite' if rep else ''})", a))

        extra = {}
        for v in ("none", "refit", "workers"):
            if v not in variants:
                continue
            d = tmp / f"store_{v}"
            shutil.copytree(tmp / "ingested", d)
            if v == "refit":
                drop_stain_estimates(d)
            extra[v] = run_a(
                d,
                args.backbone,
                slides if wanted else None,
                "none" if v == "none" else "macenko",
                args,
                num_workers=1 if v == "workers" else None,
            )
        c = run_c(bb, ingested, slides, precision, tmp, args.naive_max_tiles) if "naive" in variants else None
    load1 = os.getloadavg()

    print(
        f"Embedding pass, {args.backbone}, slides {','.join(slides)} ({n_total} tiles), batch {args.batch_size}, "
        f"precision {precision}, pass num_workers {args.num_workers if args.num_workers is not None else 'default'} "
        f"(torch threads {rows[0][1]['threads']} in the pass, {torch.get_num_threads()} for B), {os.cpu_count()} CPUs; "
        f"ingest (untimed) {t['ingest']:.1f} s"
    )
    print(
        f"load average at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; at end {load1[0]:.2f} "
        f"{load1[1]:.2f} {load1[2]:.2f}"
    )
    print()
    b_names = " / ".join(
        "1 loop" if k == 1 else f"{k} threads x {max(1, torch.get_num_threads() // k)}" for k in layouts
    )
    print(
        table(
            pairs,
            (
                "repeat",
                "tiles",
                "A s",
                "A tiles/s",
                f"B tiles/s ({b_names})",
                "A/B (faster B)",
                "CPU s A / B",
                "A/B by CPU s per tile",
                "A peak RSS MB",
                "load 1-min",
            ),
        )
    )
    print(
        "\nA/B (target >= 0.9; B = the faster bare-forward layout of the same run): median "
        f"{np.median(ratios):.3f}, range {min(ratios):.3f} - {max(ratios):.3f} over {len(ratios)} repeat(s)"
    )
    print(
        f"A/B by CPU seconds per tile (B's per tile / A's per tile; insensitive to other load, blind to idle waits): "
        f"median {np.median(cpu_ratios):.3f}, range {min(cpu_ratios):.3f} - {max(cpu_ratios):.3f}"
    )
    if extra or c:
        print()
        vrows = []
        names = {
            "none": "A0  stain none",
            "refit": "A*  macenko, store without stain estimates (fit in the pass)",
            "workers": "Aw  macenko, 1 DataLoader worker process",
        }
        for v, r in extra.items():
            vrows.append(
                (names[v], r["tiles"], f"{r['wall']:.1f}", f"{r['tiles'] / r['wall']:.1f}", f"{r['peak_rss_mb']:.0f}")
            )
        if c:
            per_tile = c["t_tiles"] / c["n_cut"] + c["t_embed"] / max(1, c["n_embed"])
            vrows.append(
                (
                    "C   naive: PIL crop -> JPEG -> read -> batch 1",
                    c["n_embed"],
                    f"{c['t_tiles'] + c['t_embed']:.1f}",
                    f"{1 / per_tile:.1f}",
                    "",
                )
            )
        print(table(vrows, ("variant (after the A/B pairs)", "tiles", "seconds", "tiles/s", "peak RSS MB")))
    print()
    dim = bb.embed_dim
    brows = []
    for label, a in rows:
        brows.append(
            (
                label,
                a["rows"],
                a["fragments"],
                f"{a['bytes_written'] / 1e6:.2f}",
                f"{a['live_bytes'] / 1e6:.2f}",
                f"{a['dir_bytes'] / 1e6:.2f}",
                f"{a['live_bytes'] / a['rows'] / (2 * dim):.2f}",
            )
        )
    print(
        table(
            brows,
            (
                f"{S.embedding_table_name(args.backbone)}",
                "rows",
                "fragments",
                "EmbedReport MB written",
                "table data MB (latest version)",
                "table dir MB",
                f"data bytes/vector / (2 x {dim})",
            ),
        )
    )
    print()
    print("EmbedReport of the last A:", rows[-1][1]["line"])


if __name__ == "__main__":
    main()
