"""Issue 19 benchmark: the store's keyed write on a local store vs the plain append it replaced.

The embedding pass used to append vectors itself on a local store (keys found missing under
the writer lock) and insert them by key on object storage; it now calls
``Store.write_keyed`` for both, which on a local store subtracts the stored keys (kept per
table version, read once) and appends the rest. Both are timed side by side in one run, on
the same batches, into fresh stores: ``--commits`` commits of ``--rows`` SYNTHETIC vectors
(random float16, ``--dim`` wide), printed as seconds and the ratio keyed / append.

    python benchmarks/bench_keyed_write.py --commits 20,80,320 --dim 64
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from stimage_embed.store import Store
from stimage_embed.store import schema as S

KEY = ("slide_id", "spot_id")


def _batch(i: int, n: int, dim: int) -> pa.Table:
    vec = np.random.default_rng(i).standard_normal((n, dim)).astype(np.float16)
    return pa.table(
        {
            "slide_id": [f"S{i // 20}"] * n,
            "spot_id": [f"{i}_{k}" for k in range(n)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float16()), dim),
            "tissue_fraction": pa.array(np.ones(n), pa.float32()),
            "padded_fraction": pa.array(np.zeros(n), pa.float32()),
            "tile_um": pa.array(np.full(n, 100.0), pa.float32()),
            "um_per_px": pa.array(np.full(n, 0.5), pa.float32()),
            "provenance_id": ["p"] * n,
        }
    )


def _timed(store: Store, batches: list[pa.Table], keyed: bool, schema: pa.Schema) -> float:
    with store.writer("bench"):
        t0 = time.perf_counter()
        for b in batches:
            if keyed:
                store.write_keyed("e", b, KEY, schema=schema)
            else:
                store.append("e", b, schema=schema)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", default="20,80,320", help="commit counts to time")
    ap.add_argument("--rows", type=int, default=512, help="vectors per commit (the pass's --flush-rows)")
    ap.add_argument("--dim", type=int, default=64, help="vector width")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    schema = S.embedding_schema(args.dim, optional=True)
    print(f"local store, {args.rows} SYNTHETIC {args.dim}-d float16 vectors per commit; keyed vs plain append")
    for commits in (int(c) for c in args.commits.split(",")):
        batches = [_batch(i, args.rows, args.dim) for i in range(commits)]
        with tempfile.TemporaryDirectory() as tmp:
            append = _timed(Store(Path(tmp) / "append"), batches, False, schema)
            keyed = _timed(Store(Path(tmp) / "keyed"), batches, True, schema)
            rows = Store(Path(tmp) / "keyed").dataset("e").count_rows()
        print(
            f"{commits:4d} commits ({rows} vectors): append {append:.2f} s, write_keyed {keyed:.2f} s, "
            f"ratio {keyed / append:.2f}"
        )


if __name__ == "__main__":
    main()
