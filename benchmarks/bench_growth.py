"""Issue 14 benchmark: growth with the number of spots, from 1x to 16x, side by side in one run.

Two costs, each timed at every size in a fresh spawned process (so each size's peak RSS is
its own), and fitted as ``time ~ size ** k`` (least squares on log-log; target k <= 1.1):

* **Embed-pass writes**: the pass's own writer (``embed_pass._Writer``: float16 vectors,
  keyed inserts of ``--flush-rows`` rows, one Lance commit each) fed batches of 32 vectors,
  then the store upkeep the pass runs after its writes (``maintain``: slide_id index,
  compaction, old versions). Vectors: the real ``embeddings_<backbone>`` rows of ``--store``
  (the nine sections), tiled under new slide ids (``C5~1``, ...) to reach k x the spots;
  without ``--store``, random vectors of the same shape. Cutting tiles and the model
  forward are per chunk of 32 spots (linear by construction) and are not re-timed here.
* **Head fit**: ``heads.NBRegressor(alpha=1.0)`` (fixed L2, no CV) and
  ``heads.RidgeBaseline()`` (its grouped CV over alphas) on synthetic data of realistic
  size: 1280-d float32 vectors (low-rank signal plus noise), 50 genes of negative-binomial
  counts driven by the vectors, 9 slides as groups; ``--base-spots`` spots at 1x.

Head fits run with ``--threads`` torch/BLAS threads (default 1: on a shared 2-core machine a
spinning 2-thread pool is many times slower and its times mostly measure the other load).
Wall and CPU seconds are both fitted. Peak memory: ``ru_maxrss`` of each process, and its growth over
the process's RSS right before the timed work (imports and the source data excluded).

    python benchmarks/bench_growth.py [--store STORE] [--sizes 1,2,4,8,16] [--base-spots 2400]
        [--heads nb,ridge] [--skip-writes]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _common import table

DIM, GENES, SLIDES, BATCH = 1280, 50, 9, 32


def _rss_mb() -> float:
    """Current resident set size of this process, MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _source_vectors(store_dir: str | None, backbone: str, base: int, seed: int = 0):
    """(slide ids, spot ids, float32 vectors (n, dim), um_per_px per slide) of the source."""
    if store_dir is None:
        rng = np.random.default_rng(seed)
        sid = np.array([f"S{i % SLIDES}" for i in range(base)])
        return (
            sid,
            np.array([f"spot{i:06d}" for i in range(base)]),
            rng.standard_normal((base, DIM)).astype(np.float32),
            {},
        )
    from stimage_embed.store import Store
    from stimage_embed.store import schema as S

    store = Store(store_dir)
    t = store.read(S.embedding_table_name(backbone), ["slide_id", "spot_id", "vector"]).sort_by(
        [("slide_id", "ascending"), ("spot_id", "ascending")]
    )
    vec = t["vector"].combine_chunks()
    X = vec.flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, -1).astype(np.float32)
    umpp = dict(zip(*store.sql("SELECT slide_id, um_per_px FROM slides").get_columns()))
    return np.array(t["slide_id"].to_pylist()), np.array(t["spot_id"].to_pylist()), X, umpp


def _writes_in_child(store_src: str | None, backbone: str, copies: int, out_dir: str, flush_rows: int) -> dict:
    """In a spawned process: write ``copies`` x the source vectors as the pass does, then upkeep."""
    import torch

    from stimage_embed.embeddings.embed_pass import EmbedReport, _Writer
    from stimage_embed.embeddings.pass_plan import EmbedRequest, Plan
    from stimage_embed.store import Store
    from stimage_embed.store.maintenance import maintain

    logging.basicConfig(level=logging.WARNING)
    sid0, spot0, X, umpp = _source_vectors(store_src, backbone, 2642)
    sids = np.concatenate([sid0 if c == 0 else np.char.add(sid0, f"~{c}") for c in range(copies)])
    slide_ids = list(dict.fromkeys(sids.tolist()))
    name = "bench"
    store = Store(Path(out_dir) / f"writes_{copies}")
    report = EmbedReport()

    class _Dim:
        embed_dim = X.shape[1]

    plan = Plan(
        EmbedRequest((name,)),
        torch.device("cpu"),
        models={name: _Dim()},
        tables={name: f"embeddings_{name}"},
        pids={name: "p"},
        tissue={(s, k): 1.0 for s, k in zip(sids.tolist(), np.tile(spot0, copies).tolist())},
        slide_meta={
            s: {"tile_um": 100.0, "um_per_px": float(umpp.get(s.split("~")[0], 0.5)), "geometry_hash": "g"}
            for s in slide_ids
        },
    )
    writer = _Writer(store, plan, report, flush_rows)
    # batches of 32 spots of one slide, as the stream hands them over (source vectors reused per copy)
    starts = np.flatnonzero(np.r_[True, sid0[1:] != sid0[:-1]])
    bounds = list(zip(starts, np.r_[starts[1:], len(sid0)]))
    rss0 = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    with store.writer("bench"):
        for c in range(copies):
            for a, b in bounds:
                sid = sid0[a] if c == 0 else f"{sid0[a]}~{c}"
                for i in range(a, b, BATCH):
                    j = min(b, i + BATCH)
                    writer.add(name, sid, spot0[i:j].tolist(), X[i:j], np.zeros(j - i, np.float32))
        writer.flush(name)
        t_write = time.perf_counter() - t0
        t1 = time.perf_counter()
        up = maintain(store, [f"embeddings_{name}"])
        t_up = time.perf_counter() - t1
    rows = store.dataset(f"embeddings_{name}").count_rows()
    return {
        "spots": len(sids),
        "rows": rows,
        "write": t_write,
        "upkeep": t_up,
        "cpu": time.process_time() - c0,
        "peak": _peak_mb(),
        "rss0": rss0,
        "upkeep_line": up.tables[0].line(),
    }


def synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X float32 (n, 1280), raw counts (n, 50), groups (n,), library sizes (n,)): vectors with
    a 16-d signal plus noise; NB counts (dispersion 5) whose log-mean is linear in the signal."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 16)).astype(np.float32)
    X = z @ rng.standard_normal((16, DIM)).astype(np.float32) * 0.3 + rng.standard_normal((n, DIM)).astype(np.float32)
    lib = rng.lognormal(np.log(3000.0), 0.5, n)
    eta = z @ rng.normal(0, 0.3, (16, GENES)) + rng.normal(np.log(1e-3), 1.0, GENES)
    mu = lib[:, None] * np.exp(eta)
    r = 5.0
    y = rng.poisson(rng.gamma(r, mu / r)).astype(np.float32)
    groups = np.array([f"S{i % SLIDES}" for i in range(n)])
    return X, y, groups, y.sum(1) + rng.poisson(20000, n)


def _fit_in_child(head: str, n: int, threads: int) -> dict:
    """In a spawned process: fit one head on ``n`` synthetic spots with ``threads`` torch and
    BLAS threads (0 = their defaults)."""
    import torch
    from threadpoolctl import threadpool_limits

    import heads

    X, y, groups, lib = synthetic(n)
    est = heads.NBRegressor(alpha=1.0, device="cpu") if head == "nb" else heads.RidgeBaseline()
    if threads:
        torch.set_num_threads(threads)
    rss0 = _rss_mb()
    with threadpool_limits(threads or None):
        t0, c0 = time.perf_counter(), time.process_time()
        est.fit(X, y, groups=groups, library_size=lib)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "spots": n,
        "fit": wall,
        "cpu": cpu,
        "peak": _peak_mb(),
        "rss0": rss0,
        "n_iter": getattr(est, "n_iter_", ""),
    }


def _in_child(fn, *args) -> dict:
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def exponent(sizes: list[float], times: list[float]) -> float:
    """Least-squares slope of log(time) on log(size)."""
    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default=None, help="store with the nine sections' vectors (default: random vectors)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="multiples of the base spot count")
    ap.add_argument("--base-spots", type=int, default=2400, help="spots at 1x for the head fits")
    ap.add_argument("--heads", default="nb,ridge")
    ap.add_argument("--flush-rows", type=int, default=512)
    ap.add_argument("--skip-writes", action="store_true")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/BLAS threads of the head fits (1: robust to other load, which makes spinning thread pools "
        "many times slower on a shared 2-core machine; 0: library defaults)",
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    heads_ = [h.strip() for h in args.heads.split(",") if h.strip()]
    load0 = os.getloadavg()
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmpd:
        for k in sizes:  # interleaved: each size of every cost, then the next size
            if not args.skip_writes:
                results.setdefault("writes", []).append(
                    _in_child(_writes_in_child, args.store, args.backbone, k, tmpd, args.flush_rows)
                )
            for h in heads_:
                results.setdefault(h, []).append(_in_child(_fit_in_child, h, args.base_spots * k, args.threads))
    load1 = os.getloadavg()

    print(
        f"Growth with spots, sizes {sizes} x; vectors {'of ' + args.store if args.store else 'random'} for the writes; "
        f"heads on synthetic {DIM}-d vectors, {GENES} genes, {args.base_spots} spots at 1x; {os.cpu_count()} CPUs"
    )
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    print()
    rows, fits = [], []
    for key, res in results.items():
        label = {
            "writes": "embed-pass writes + upkeep",
            "nb": "NBRegressor(alpha=1.0) fit",
            "ridge": "RidgeBaseline fit",
        }[key]
        t = [r["write"] + r["upkeep"] if key == "writes" else r["fit"] for r in res]
        c = [r["cpu"] for r in res]
        for k, r, tt in zip(sizes, res, t):
            extra = (
                f"write {r['write']:.2f} + upkeep {r['upkeep']:.2f}"
                if key == "writes"
                else f"L-BFGS iterations {r['n_iter']}"
                if r["n_iter"] != ""
                else ""
            )
            rows.append(
                (
                    label,
                    f"{k}x",
                    r["spots"],
                    f"{tt:.2f}",
                    f"{r['cpu']:.2f}",
                    f"{tt / r['spots'] * 1e3:.3f}",
                    f"{r['peak']:.0f}",
                    f"{r['peak'] - r['rss0']:.0f}",
                    extra,
                )
            )
        if len(sizes) > 1:
            fits.append(
                (
                    label,
                    f"{exponent(sizes, t):.3f}",
                    f"{exponent(sizes, c):.3f}",
                    f"{np.log(t[-1] / t[0]) / np.log(sizes[-1] / sizes[0]):.3f}",
                    f"{max(r['peak'] for r in res):.0f}",
                    f"{max(r['peak'] - r['rss0'] for r in res):.0f}",
                )
            )
    print(
        table(
            rows,
            ("cost", "size", "spots", "wall s", "CPU s", "wall ms per spot", "peak RSS MB", "peak - RSS before MB", ""),
        )
    )
    print()
    print(
        table(
            fits,
            (
                "cost",
                "exponent k, wall (log-log fit)",
                "k, CPU s",
                f"k wall from {sizes[0]}x to {sizes[-1]}x",
                "max peak RSS MB",
                "max growth MB",
            ),
        )
    )
    print("target: k <= 1.1")
    if "writes" in results:
        print()
        print("upkeep at the largest size:", results["writes"][-1]["upkeep_line"])


if __name__ == "__main__":
    main()
