"""Issue 14 benchmark: one slide's vectors from the store against one h5 file per slide
(TRIDENT's layout), side by side, at two store sizes (default 9 and 90 slides).

Vectors: the real ``embeddings_<backbone>`` rows of the nine sections in ``--store`` (embed
them first); the larger store copies them under new slide ids (``C5~1``, ...), which is what
the size test needs. Each store is written the way the embedding pass writes it: keyed
inserts (``Store.insert_new``) of ``--flush-rows`` vectors, one Lance commit each. Then:

* h5: one file per slide, datasets ``features`` (n, dim) float16 and ``barcodes`` (spot ids);
  a read opens the file and returns (spot ids, float32 matrix).
* store as written ("before"): ``load_embeddings``'s former path, ``Store.read`` with a
  ``slide_id IN (...)`` filter (LanceDB table listing and open, scan of every fragment).
* store after upkeep: the same table after :func:`stimage_embed.store.maintenance.maintain`
  (slide_id scalar index, compaction, old versions pruned), read by ``load_embeddings``
  (index lookup, rows of that slide only). Each read opens the dataset anew, cold in-process
  (nothing parsed is shared between reads), like the h5 read opens its file.
* the same with a ``SlideReader``: each read still opens the latest version, but Lance's
  parsed metadata and index pages are kept between reads (as an open h5 file keeps its own).

Reads are interleaved (h5, before, after, for a random slide each round) so machine load
weighs equally on each; medians in ms and the ratio to h5 are printed, with a cProfile of
the "before" read first.

    python benchmarks/bench_store_read.py --store /tmp/bench_store [--sizes 9,90] [--rounds 200]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import logging
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from _common import table


def build_store(src, dst: Path, backbone: str, copies: int, flush_rows: int):
    """A store holding ``copies`` x the source slides' vectors, written as the pass writes."""
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S

    name = S.embedding_table_name(backbone)
    base = src.read(name).sort_by([("slide_id", "ascending"), ("spot_id", "ascending")])
    dim = base.schema.field("vector").type.list_size
    store = Store(dst)
    with store.writer("bench"):
        for c in range(copies):
            part = base
            if c:
                ids = pc.binary_join_element_wise(base["slide_id"], pa.scalar(f"~{c}"), "")
                part = base.set_column(base.schema.get_field_index("slide_id"), base.schema.field("slide_id"), ids)
            for i in range(0, part.num_rows, flush_rows):
                store.insert_new(name, part.slice(i, flush_rows), ("slide_id", "spot_id"), schema=S.embedding_schema(dim))
    return store, name


def write_h5(store, name: str, slides: list[str], out: Path) -> dict[str, Path]:
    import h5py

    paths = {}
    out.mkdir(parents=True, exist_ok=True)
    for sid in slides:
        t = store.read(name, ["spot_id", "vector"], where=f"slide_id = '{sid}'").sort_by("spot_id")
        vec = t["vector"].combine_chunks()
        feats = vec.values.to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size)
        p = out / f"{sid}.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("features", data=feats)
            f.create_dataset("barcodes", data=np.array(t["spot_id"].to_pylist(), dtype="S"))
        paths[sid] = p
    return paths


def read_h5(path: Path) -> tuple[list[str], np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        X = f["features"][:].astype(np.float32)
        ids = [b.decode() for b in f["barcodes"][:]]
    return ids, X


def read_before(store, name: str, sid: str) -> tuple[list[str], np.ndarray]:
    """``load_embeddings``'s path before the upkeep/index work: ``Store.read`` with a filter."""
    t = store.read(name, ["slide_id", "spot_id", "vector"], where=f"slide_id IN ('{sid}')")
    vec = t["vector"].combine_chunks()
    X = vec.values.to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size).astype(np.float32)
    return t["spot_id"].to_pylist(), X


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=os.environ.get("STIMAGE_STORE", "store"), help="store with the nine sections' vectors")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="9,90", help="slides per store (multiples of the source's slide count)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--flush-rows", type=int, default=512, help="vectors per commit when building (the pass's default)")
    ap.add_argument("--index-type", default="BTREE", help="slide_id index type for the upkeep (BTREE, BITMAP)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from stimage_embed.predictions.arrays import load_embeddings
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S
    from stimage_embed.store.maintenance import SlideReader, maintain

    src = Store(args.store)
    name = S.embedding_table_name(args.backbone)
    if not src.has_table(name):
        raise SystemExit(f"{src.path}: no {name}; embed the sections first (stimage-embed embed --store {src.path})")
    n_src = len(pc.unique(src.read(name, ["slide_id"])["slide_id"]))
    rng = np.random.default_rng(0)
    results, profile_text = [], ""
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for size in [int(s) for s in args.sizes.split(",")]:
            copies = max(1, round(size / n_src))
            before_dir, after_dir, kept_dir = tmp / f"before_{size}", tmp / f"after_{size}", tmp / f"kept_{size}"
            store_b, _ = build_store(src, before_dir, args.backbone, copies, args.flush_rows)
            shutil.copytree(before_dir, after_dir)
            shutil.copytree(before_dir, kept_dir)
            store_a, store_k = Store(after_dir), Store(kept_dir)
            t0 = time.perf_counter()
            up = maintain(store_a, [name], retain=dt.timedelta(0), index_type=args.index_type)
            t_up = time.perf_counter() - t0
            maintain(store_k, [name], index_type=args.index_type)  # the default retention: this run's versions are kept
            reader = SlideReader(store_a)
            slides = sorted(pc.unique(store_b.read(name, ["slide_id"])["slide_id"]).to_pylist())
            h5 = write_h5(store_b, name, slides, tmp / f"h5_{size}")
            frag_b = len(store_b.dataset(name).get_fragments())
            frag_a = len(store_a.dataset(name).get_fragments())
            # same content on every path
            for sid in slides[:3]:
                i1, x1 = read_h5(h5[sid])
                k2, x2 = load_embeddings(store_a, args.backbone, [sid], reader=SlideReader(store_a))
                i3, x3 = read_before(store_b, name, sid)
                o3 = np.argsort(i3)
                assert i1 == k2["spot_id"].to_list() == [i3[j] for j in o3] and np.array_equal(x1, x2) and np.array_equal(x1, x3[o3])
            if not profile_text:
                pr = cProfile.Profile()
                pr.enable()
                for sid in slides[:20]:
                    read_before(store_b, name, sid)
                pr.disable()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(12)
                profile_text = buf.getvalue()
            fns = {"h5": lambda s: read_h5(h5[s]), "before": lambda s: read_before(store_b, name, s),
                   "after": lambda s: load_embeddings(store_a, args.backbone, [s]),
                   "kept": lambda s: load_embeddings(store_k, args.backbone, [s]),
                   "reader": lambda s: load_embeddings(store_a, args.backbone, [s], reader=reader)}
            times = {k: [] for k in fns}
            for f in fns.values():
                f(slides[0])
            for _ in range(args.rounds):
                sid = slides[int(rng.integers(len(slides)))]
                for k in rng.permutation(list(fns)):
                    t1 = time.perf_counter()
                    fns[k](sid)
                    times[k].append(time.perf_counter() - t1)
            med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
            results.append((size, len(slides), frag_b, frag_a, med, t_up, up.tables[0]))
    load1 = os.getloadavg()

    print(f"One slide's {args.backbone} vectors: the vectors of {args.store} (x copies under new slide ids); "
          f"{args.rounds} interleaved rounds per size, one random slide per round; slide_id index {args.index_type}")
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    print()
    rows = []
    for size, n, fb, fa, med, t_up, up in results:
        rows.append((n, "h5 file per slide", "", f"{med['h5']:.3f}", "1.00"))
        rows.append((n, "store as written (Store.read + filter)", fb, f"{med['before']:.3f}", f"{med['before'] / med['h5']:.2f}"))
        rows.append((n, "store after upkeep (load_embeddings)", fa, f"{med['after']:.3f}", f"{med['after'] / med['h5']:.2f}"))
        rows.append((n, "  same, old versions still within retention", fa, f"{med['kept']:.3f}", f"{med['kept'] / med['h5']:.2f}"))
        rows.append((n, "  same, with a SlideReader (parsed index kept)", fa, f"{med['reader']:.3f}", f"{med['reader'] / med['h5']:.2f}"))
    print(table(rows, ("slides", "layout / reader", "fragments", "median ms", "x h5 (target <= 1.2 after upkeep)")))
    print()
    for size, n, fb, fa, med, t_up, up in results:
        print(f"upkeep of the {n}-slide table: {t_up:.2f} s ({up.line()})")
    print()
    print("cProfile of 20 reads 'as written' (before), top by cumulative time:")
    print("\n".join(profile_text.splitlines()[:30]))


if __name__ == "__main__":
    main()
