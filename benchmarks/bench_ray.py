"""Issue 13 benchmark: the Ray embedding pass (``embed --engine ray``) with 1 vs 2 model
workers on this machine, side by side in one run, and the object-store write rate.

* One local Ray instance (all cores) is started first and shared by every pass (its start-up
  is not timed). Each pass is ``embed_ray(..., overwrite=True)`` on the same store of real
  HER2ST sections ingested beforehand (not timed): plan, actor start-up (model load),
  cutting tasks, model actors, fragment writes and commits, and the upkeep after them.
* Configurations: ``1x1`` (one worker, one torch thread), ``2x1`` (two workers, one thread
  each: the scale-out), and ``1x2`` (one worker with two threads: what one process gets from
  the second core without Ray). Run in the order 1x1, 2x1, 1x2, then reversed, so a change of
  machine load weighs on both sides. Per pass: wall time and tiles/s, the time to the first
  commit (plan, actor start-up: fixed costs), and the steady rate (vectors committed after the
  first commit / time from the first to the last commit; one commit per two batches). The
  ratios ``2x1 / 1x1`` (means of the two passes of each) are printed per round, with the load
  average (the machine is shared).
* The bare forward of the same model (uint8 tiles in memory, one torch thread, same batch
  size): the compute limit of one worker; and the cutting stage alone (decode, window,
  Macenko) in one process: what one CPU task feeds the workers.
* ``--s3``: also time writing vectors to a moto S3 server on 127.0.0.1 (Lance fragments of
  float16 vectors, MB/s). moto is a Python server: the number is a floor, not S3's rate.

    python benchmarks/bench_ray.py [--slides C3,C4,C5] [--rounds 1] [--batch-size 32] [--s3]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import table

BACKBONE = "efficientnet_lite0"


def ingest_store(path: Path, slides: list[str]):
    from stimage_embed.ingest.pipeline import ingest
    from stimage_embed.store import Store

    store = Store(path)
    ingest("her2st", store, slides=slides, progress=False)
    return store


def run_pass(store, slides: list[str], workers: int, threads: int, batch_size: int) -> dict[str, float]:
    """One pass; returns wall seconds, tiles, and the time to the first commit (plan and
    actor start-up, measured by instrumenting the store's commits)."""
    from stimage_embed.embeddings.ray_engine import RayConfig, embed_ray

    commits: list[tuple[float, int]] = []
    original = store.append_fragments

    def timed(name, fragments):
        original(name, fragments)
        commits.append((time.perf_counter(), sum(f.physical_rows for f in fragments)))

    store.append_fragments = timed
    cfg = RayConfig(workers=workers, threads_per_worker=threads)
    t0 = time.perf_counter()
    try:
        rep = embed_ray(
            store,
            [BACKBONE],
            slides=slides,
            overwrite=True,
            stain_template=slides[0],
            precision="float32",
            batch_size=batch_size,
            flush_rows=2 * batch_size,
            progress=False,
            config=cfg,
        )
    finally:
        del store.append_fragments
    span = commits[-1][0] - commits[0][0] if len(commits) > 1 else float("nan")
    steady = sum(n for _, n in commits[1:]) / span if span > 0 else float("nan")
    return {"wall": time.perf_counter() - t0, "tiles": rep.tiles, "first": commits[0][0] - t0, "steady": steady}


def cut_rate(store, slides: list[str], batch_size: int) -> float:
    """Tiles/s of the cutting stage alone (decode, window, Macenko) in this process: what one
    CPU task delivers to the model workers."""
    from stimage_embed.embeddings import ray_stages as RS
    from stimage_embed.embeddings.pass_plan import EmbedRequest, plan_pass

    request = EmbedRequest.of([BACKBONE], slides, stain_template=slides[0], precision="float32", batch_size=batch_size)
    plan = plan_pass(store, request)
    rows = RS.chunk_rows(plan)
    batch = {
        k: np.array(
            [r[k] for r in rows] if not isinstance(rows[0][k], list) else [np.asarray(r[k]) for r in rows], dtype=object
        )
        for k in rows[0]
    }
    sizes = tuple(sorted({bb.input_size for bb in plan.models.values()}))
    t0 = time.perf_counter()
    n = sum(len(out["spot_id"]) for out in RS.cut_tiles(batch, sizes, tuple(plan.models), plan.stain_factory))
    return n / (time.perf_counter() - t0)


def bare_forward(batch_size: int, n_batches: int = 6) -> float:
    """Tiles/s of the model alone on one torch thread (uint8 tiles in memory)."""
    import torch

    from stimage_embed.backbones import create_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bb = create_model(BACKBONE, device="cpu")
        tiles = torch.randint(0, 255, (batch_size, bb.input_size, bb.input_size, 3), dtype=torch.uint8)
        with torch.inference_mode():
            bb(bb.preprocess(tiles).contiguous(memory_format=torch.channels_last))  # warm-up
            t0 = time.perf_counter()
            for _ in range(n_batches):
                bb(bb.preprocess(tiles).contiguous(memory_format=torch.channels_last))
            return n_batches * batch_size / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)


def s3_write_rate(n_rows: int = 20000, dim: int = 1280) -> float:
    """MB/s of Lance fragment writes + commit of float16 vectors to a moto S3 on 127.0.0.1."""
    import socket
    import subprocess
    import sys

    import boto3
    import lance
    import pyarrow as pa

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        opts = {
            "aws_endpoint": f"http://127.0.0.1:{port}",
            "allow_http": "true",
            "aws_region": "us-east-1",
            "aws_access_key_id": "bench",
            "aws_secret_access_key": "bench",
        }
        boto3.client(
            "s3",
            endpoint_url=opts["aws_endpoint"],
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        ).create_bucket(Bucket="bench")
        vec = np.random.default_rng(0).standard_normal((n_rows, dim)).astype(np.float16)
        data = pa.table(
            {
                "spot_id": [str(i) for i in range(n_rows)],
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.reshape(-1)), dim),
            }
        )
        t0 = time.perf_counter()
        lance.write_dataset(data, "s3://bench/vectors.lance", storage_options=opts)
        return vec.nbytes / 1e6 / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", default="C3,C4,C5")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--s3", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import ray

    slides = args.slides.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    try:
        store = ingest_store(tmp / "store", slides)
        cut = cut_rate(store, slides, args.batch_size)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        configs = [(1, 1), (2, 1), (1, 2)]
        rows, ratios = [], []
        for r in range(args.rounds):
            order = configs + configs[::-1]
            seen: dict[tuple[int, int], list[float]] = {}
            for workers, threads in order:
                res = run_pass(store, slides, workers, threads, args.batch_size)
                seen.setdefault((workers, threads), []).append((res["tiles"] / res["wall"], res["steady"]))
                rows.append(
                    (
                        r + 1,
                        f"{workers}x{threads}",
                        res["tiles"],
                        f"{res['wall']:.1f}",
                        f"{res['first']:.1f}",
                        f"{res['tiles'] / res['wall']:.1f}",
                        f"{res['steady']:.1f}",
                        f"{os.getloadavg()[0]:.1f}",
                    )
                )
            two, one = np.mean(seen[(2, 1)], axis=0), np.mean(seen[(1, 1)], axis=0)
            ratios.append((two[0] / one[0], two[1] / one[1]))
        ray.shutdown()
        print(
            table(
                rows,
                (
                    "round",
                    "workers x threads",
                    "tiles",
                    "wall s",
                    "first commit s",
                    "tiles/s",
                    "steady tiles/s",
                    "load",
                ),
            )
        )
        bare = bare_forward(args.batch_size)
        print(
            "\nratio 2 workers / 1 worker, 1 torch thread each (whole pass; steady, after the first commit): "
            + ", ".join(f"{a:.2f}; {b:.2f}" for a, b in ratios)
            + f"  on {os.cpu_count()} cores"
        )
        print(f"bare forward, 1 torch thread: {bare:.1f} tiles/s ({BACKBONE}, batch {args.batch_size})")
        print(f"cutting stage (decode, window, Macenko), 1 process: {cut:.1f} tiles/s")
        if args.s3:
            print(f"Lance fragment write to moto S3 on 127.0.0.1: {s3_write_rate():.1f} MB/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
