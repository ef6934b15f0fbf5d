"""Speed of ``search`` at 100k / 1M (/ 5M) vectors of dimension 1280: index build time and
peak memory, recall@10 of the index against exact search, p50/p95 query latency with and
without a prefilter, exact-search latency (where an index starts to pay), and growth.

The vectors are the store's real Lite0 vectors replicated with small Gaussian noise
(``NOISE`` x each dimension's standard deviation) under new slide ids, ``SPOTS_PER_SLIDE``
per synthetic slide (synthetic replicates of real vectors: labelled so in the output). Queries
are real vectors with fresh noise. Searches go through :func:`stimage_embed.search.query.nearest`,
the code ``stimage-embed search`` runs; the index is built with the defaults of
``stimage-embed index``.

    python benchmarks/bench_search.py --store /tmp/search_store --workdir /tmp/bench_search --sizes 100000,1000000
"""

from __future__ import annotations

import argparse
import logging
import shutil
import threading
import time
from pathlib import Path

import lancedb
import numpy as np
import psutil
import pyarrow as pa

from stimage_embed.predictions.arrays import embedded_slides, load_embeddings
from stimage_embed.search.index import DEFAULT_INDEX_TYPE, default_partitions, index_config
from stimage_embed.search.query import SearchOptions, nearest
from stimage_embed.store import Store

log = logging.getLogger("bench_search")
NOISE = 0.3
SPOTS_PER_SLIDE = 2500
BATCH = 100_000
K = 10


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms), bytes."""

    def __enter__(self):
        self.proc, self.peak, self.base, self._stop = psutil.Process(), 0, psutil.Process().memory_info().rss, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop = True
        self.thread.join()


def make_table(db, name: str, real: np.ndarray, n: int, seed: int):
    rng = np.random.default_rng(seed)
    sd = real.std(axis=0)
    tbl = None
    for start in range(0, n, BATCH):
        m = min(BATCH, n - start)
        src = rng.integers(0, len(real), m)
        X = (real[src] + NOISE * sd * rng.standard_normal((m, real.shape[1]), dtype=np.float32)).astype(np.float16)
        rows = np.arange(start, start + m)
        batch = pa.table(
            {
                "slide_id": pa.array([f"syn{r // SPOTS_PER_SLIDE:05d}" for r in rows]),
                "spot_id": pa.array([str(r % SPOTS_PER_SLIDE) for r in rows]),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(X.ravel(), pa.float16()), X.shape[1]),
                "tissue_fraction": pa.array(rng.uniform(0, 1, m).astype(np.float32)),
            }
        )
        tbl = db.create_table(name, batch) if tbl is None else tbl
        if start:
            tbl.add(batch)
    tbl.create_scalar_index("slide_id", index_type="BTREE")  # as the store's upkeep keeps one
    return tbl


def latencies(tbl, queries: np.ndarray, where: str | None, opts: SearchOptions) -> tuple[np.ndarray, list]:
    out, hits = [], []
    for q in queries:
        t0 = time.perf_counter()
        h = nearest(tbl, q, K, where, opts)
        out.append(time.perf_counter() - t0)
        hits.append(set(zip(h["slide_id"], h["spot_id"])))
    return np.array(out) * 1e3, hits


def run_size(db, real: np.ndarray, n: int, n_queries: int, n_exact: int) -> dict:
    rng = np.random.default_rng(n)
    t0 = time.perf_counter()
    tbl = make_table(db, f"v{n}", real, n, seed=n)
    write_s = time.perf_counter() - t0
    queries = (real[rng.integers(0, len(real), n_queries)] * (1 + 0.05 * rng.standard_normal((n_queries, 1)))).astype(
        np.float32
    )
    exact_ms, exact_hits = latencies(tbl, queries[:n_exact], None, SearchOptions(use_index=False))
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        tbl.create_index("vector", config=index_config(DEFAULT_INDEX_TYPE, default_partitions(n)))
        build_s = time.perf_counter() - t0
    idx = SearchOptions(use_index=True)
    latencies(tbl, queries[:5], None, idx)  # warm the index cache
    ms, hits = latencies(tbl, queries, None, idx)
    recall = np.mean([len(a & b) / K for a, b in zip(hits[:n_exact], exact_hits)])
    slides = sorted({f"syn{i:05d}" for i in range(0, n // SPOTS_PER_SLIDE, 2)})
    slide_filter = "slide_id IN (" + ", ".join(f"'{s}'" for s in slides) + ")"
    ms_slides, _ = latencies(tbl, queries, slide_filter, idx)
    ms_tissue, _ = latencies(tbl, queries, "tissue_fraction >= 0.7", idx)
    return {
        "n": n,
        "write_s": write_s,
        "build_s": build_s,
        "build_peak_gb": (mem.peak - mem.base) / 1e9,
        "recall10": recall,
        "p50": np.percentile(ms, 50),
        "p95": np.percentile(ms, 95),
        "p50_slides": np.percentile(ms_slides, 50),
        "p95_slides": np.percentile(ms_slides, 95),
        "p50_tissue": np.percentile(ms_tissue, 50),
        "p95_tissue": np.percentile(ms_tissue, 95),
        "exact_p50": np.percentile(exact_ms, 50),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, help="store with real vectors of --backbone")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", required=True, help="scratch folder for the synthetic tables (deleted first)")
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--exact-queries", type=int, default=20)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    store = Store(args.store)
    _, real = load_embeddings(store, args.backbone, sorted(embedded_slides(store, args.backbone)))
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    db = lancedb.connect(str(work))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        r = run_size(db, real, n, args.queries, args.exact_queries)
        rows.append(r)
        log.info("%s", {k: round(float(v), 4) for k, v in r.items()})
        db.drop_table(f"v{n}")
    print(f"synthetic: {len(real)} real {args.backbone} vectors replicated with noise {NOISE} sd, dim {real.shape[1]}")
    print(
        "| vectors | build s | build peak GB | recall@10 | p50 ms | p95 ms | p50 / p95 slide prefilter ms "
        "| p50 / p95 tissue prefilter ms | exact p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']:,} | {r['build_s']:.1f} | {r['build_peak_gb']:.2f} | {r['recall10']:.3f} | {r['p50']:.1f} | "
            f"{r['p95']:.1f} | {r['p50_slides']:.1f} / {r['p95_slides']:.1f} | {r['p50_tissue']:.1f} / "
            f"{r['p95_tissue']:.1f} | {r['exact_p50']:.1f} |"
        )
    for a, b in zip(rows, rows[1:]):
        g = b["n"] / a["n"]
        print(
            f"growth {a['n']:,} -> {b['n']:,} (x{g:g}): build x{b['build_s'] / a['build_s']:.1f}, "
            f"p50 x{b['p50'] / a['p50']:.2f}, exact p50 x{b['exact_p50'] / a['exact_p50']:.1f}"
        )


if __name__ == "__main__":
    main()
