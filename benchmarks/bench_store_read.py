"""Issue 14 benchmark: one slide's vectors from the store against one h5 file per slide
(TRIDENT's layout), side by side, at two store sizes (default 9 and 90 slides).

Vectors: the real ``embeddings_<backbone>`` rows of the nine sections in ``--store`` (embed
them first); the larger store copies them under new slide ids (``C5~1``, ...), which is what
the size test needs. Each store is written the way the embedding pass writes it: keyed
inserts (``Store.insert_new``) of ``--flush-rows`` vectors, one Lance commit each.

Readers, each returning the same (spot ids, vectors) of one slide:

* h5: one file per slide, datasets ``features`` (n, dim) float16 and ``barcodes`` (spot ids);
  every read opens the file.
* store as written ("before"): the former read path, ``Store.read`` with a
  ``slide_id IN (...)`` filter (LanceDB table listing and open, scan of every fragment).
* store after upkeep, cold: the same table after :func:`stimage_embed.store.maintenance.maintain`
  (slide_id scalar index, compaction, old versions pruned), read through the index; every
  read opens the dataset anew and nothing parsed is shared between reads.
* store after upkeep, ``SlideReader``: every read still opens the latest version, but Lance's
  parsed metadata and the slide's row positions in that version are kept between reads (as
  an open h5 file keeps its metadata): one ``take`` of the slide's rows.

Two levels: "raw" returns what is stored (float16 vectors, spot ids as stored); "arrays" is
what heads get, ``load_embeddings`` (keys sorted, float32) against h5 -> (ids, float32), both
converting float16 the same way. Reads are interleaved (every reader, a random slide per
round) so machine load weighs on each alike; medians and ratios to h5 are printed, after a
cProfile of the former read path.

    python benchmarks/bench_store_read.py --store /tmp/bench_store [--sizes 9,90] [--rounds 300]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import logging
import os
import pstats
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
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
                store.insert_new(
                    name, part.slice(i, flush_rows), ("slide_id", "spot_id"), schema=S.embedding_schema(dim)
                )
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


def read_h5_raw(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["barcodes"][:], f["features"][:]


def read_h5(path: Path):
    """What ``load_embeddings`` returns, from the h5 file: keys (slide_id, spot_id) as a polars
    DataFrame and float32 vectors (float16 converted the same way)."""
    import polars as pl

    ids, X = read_h5_raw(path)
    spot = [b.decode() for b in ids]
    return pl.DataFrame({"slide_id": [path.stem] * len(spot), "spot_id": spot}), torch.tensor(
        X, dtype=torch.float32
    ).numpy()


def read_before(store, name: str, sid: str) -> pa.Table:
    """The former read path: ``Store.read`` with a filter (LanceDB listing + open, every fragment)."""
    return store.read(name, ["spot_id", "vector"], where=f"slide_id IN ('{sid}')")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--store", default=os.environ.get("STIMAGE_STORE", "store"), help="store with the nine sections' vectors"
    )
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="9,90", help="slides per store (multiples of the source's slide count)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--flush-rows", type=int, default=512, help="vectors per commit when building (the pass's default)")
    ap.add_argument("--index-type", default="BTREE", help="slide_id index type for the upkeep (BTREE, BITMAP)")
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads for the float16 -> float32 conversion of the arrays level (0: torch's default). On a "
        "loaded 2-core machine a 2-thread pool turns a 0.1 ms conversion into ~8 ms, on both sides alike",
    )
    args = ap.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.WARNING)
    from stimage_embed.predictions.arrays import load_embeddings
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S
    from stimage_embed.store.maintenance import SlideReader, maintain, read_slides

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
            store_b, _ = build_store(src, tmp / f"before_{size}", args.backbone, copies, args.flush_rows)
            store_a, _ = build_store(src, tmp / f"after_{size}", args.backbone, copies, args.flush_rows)
            t0 = time.perf_counter()
            up = maintain(store_a, [name], retain=dt.timedelta(0), index_type=args.index_type)
            t_up = time.perf_counter() - t0
            reader = SlideReader(store_a)
            slides = sorted(pc.unique(store_b.read(name, ["slide_id"])["slide_id"]).to_pylist())
            h5 = write_h5(store_b, name, slides, tmp / f"h5_{size}")
            frag_b = len(store_b.dataset(name).get_fragments())
            frag_a = len(store_a.dataset(name).get_fragments())
            # the same content on every path
            for sid in slides[:3]:
                keys, x = read_h5(h5[sid])
                ids = keys["spot_id"].to_list()
                for k, X in (
                    load_embeddings(store_a, args.backbone, [sid]),
                    load_embeddings(store_a, args.backbone, [sid], reader=reader),
                ):
                    assert k.equals(keys) and np.array_equal(X, x)
                for t in (
                    read_before(store_b, name, sid),
                    read_slides(store_a, name, [sid], ["spot_id", "vector"]),
                    reader.read(name, [sid], ["spot_id", "vector"]),
                ):
                    t = t.sort_by("spot_id")
                    v = t["vector"].combine_chunks()
                    assert t["spot_id"].to_pylist() == ids and np.array_equal(
                        v.values.to_numpy(zero_copy_only=False).reshape(len(ids), -1), x
                    )
            if not profile_text:
                pr = cProfile.Profile()
                pr.enable()
                for _ in range(3):
                    for sid in slides:
                        load_embeddings_before(store_b, name, sid)
                pr.disable()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(14)
                profile_text = buf.getvalue()
            cols = ["spot_id", "vector"]
            fns = {
                "h5 raw": lambda s: read_h5_raw(h5[s]),
                "before raw": lambda s: read_before(store_b, name, s),
                "cold raw": lambda s: read_slides(store_a, name, [s], cols),
                "reader raw": lambda s: reader.read(name, [s], cols),
                "h5 arrays": lambda s: read_h5(h5[s]),
                "before arrays": lambda s: load_embeddings_before(store_b, name, s),
                "cold arrays": lambda s: load_embeddings(store_a, args.backbone, [s]),
                "reader arrays": lambda s: load_embeddings(store_a, args.backbone, [s], reader=reader),
            }
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
            results.append((len(slides), frag_b, frag_a, med, t_up, up.tables[0]))
    load1 = os.getloadavg()

    print(
        f"One slide's {args.backbone} vectors: the vectors of {args.store} (x copies under new slide ids); "
        f"{args.rounds} interleaved rounds per size, one random slide per round; slide_id index {args.index_type}"
    )
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}; torch threads {torch.get_num_threads()}")
    print()
    rows = []
    labels = [
        ("h5", "h5 file per slide", None),
        ("before", "store as written (former path)", 1),
        ("cold", "after upkeep, cold (load_embeddings)", 2),
        ("reader", "after upkeep, SlideReader", 2),
    ]
    for n, fb, fa, med, _, _ in results:
        for key, label, frag in labels:
            r, a = med[f"{key} raw"], med[f"{key} arrays"]
            rows.append(
                (
                    n,
                    label,
                    {None: "", 1: fb, 2: fa}[frag],
                    f"{r:.3f}",
                    f"{r / med['h5 raw']:.2f}",
                    f"{a:.3f}",
                    f"{a / med['h5 arrays']:.2f}",
                )
            )
    print(table(rows, ("slides", "reader", "fragments", "raw ms", "raw x h5", "arrays ms", "arrays x h5")))
    print("target: <= 1.2 x h5, not growing with the number of slides")
    print()
    for n, _fb, _fa, _med, t_up, up in results:
        print(f"upkeep of the {n}-slide table: {t_up:.2f} s ({up.line()})")
    print()
    print(
        "cProfile of the former path (Store.read + filter, then arrays), 3 reads of every slide of the smallest store:"
    )
    print("\n".join(profile_text.splitlines()[:34]))


def load_embeddings_before(store, name: str, sid: str):
    """``load_embeddings`` as it was: ``Store.read`` + filter, lists, numpy float16 -> float32."""
    import polars as pl

    t = store.read(name, ["slide_id", "spot_id", "vector"], where=f"slide_id IN ('{sid}')")
    keys = pl.DataFrame({"slide_id": t["slide_id"].to_pylist(), "spot_id": t["spot_id"].to_pylist()})
    vec = t["vector"].combine_chunks()
    X = vec.values.to_numpy(zero_copy_only=False).reshape(-1, vec.type.list_size).astype(np.float32)
    order = np.lexsort((keys["spot_id"].to_numpy(), keys["slide_id"].to_numpy()))
    return keys[order], X[order]


if __name__ == "__main__":
    main()
