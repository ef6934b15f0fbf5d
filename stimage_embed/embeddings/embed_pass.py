"""The embedding pass: every QC'd spot tile embedded once per backbone, cached in LanceDB.

* Streams tiles from the slides; several backbones share each decoded slide and each chunk.
  On few CPU cores, one thread per core cuts, stain-normalises and embeds its own chunks
  (single-threaded torch ops, no oversubscription; ``stream_threads.compute_stream``); on a GPU
  a thread cuts tiles ahead of the model; on many cores DataLoader worker processes do.
  Per-slide stain estimates come from ingest (``slides.stain_estimate``), not refitted.
* What to embed (slides, stain target, each table made ready, chunks still missing): the
  one plan both engines execute (``pass_plan.plan_pass``, steps in ``embed_plan``); this
  module executes it in this process. Upkeep after the writes (``store.maintenance``):
  slide_id index, compaction, old versions.
* Batches, channels_last, autocast (bf16 on CPU only when measured faster with cosine
  >= 0.999 to fp32; fp16/bf16 on GPU per the spec), pinned memory on GPU.
* Writes one Lance table per backbone (``embeddings_<name>``) of float16 vectors keyed
  by (slide_id, spot_id), with a provenance id per row.
* Resume: keys already present are skipped. Each append is one atomic Lance commit of
  whole chunks, so a run killed at any point (even SIGKILL) leaves only complete
  commits, and a re-run completes the table to exactly one row per key.
* Concurrency: a key is never stored twice. The pass holds the store's writer lock from
  the read of the stored keys to its last commit, and each commit is the store's keyed
  write (``Store.write_keyed`` on slide_id, spot_id: under the lock on a local store, a
  keyed insert on object storage, which has no cross-process lock). Vectors cut under
  another slide geometry (``slides.geometry_hash``: re-ingested with moved spots) are
  deleted and embedded again; ``--overwrite --slide S`` replaces only S's vectors, in the
  commit of the first new ones.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stimage_embed.embeddings.embed_plan import check_options
from stimage_embed.embeddings.pass_plan import (
    EmbedRequest,
    Plan,
    RunOptions,
    finish_pass,
    nothing_to_do,
    plan_pass,
    snapshot,
)
from stimage_embed.embeddings.stream_threads import compute_stream, prefetch
from stimage_embed.embeddings.tile_stream import TileStream
from stimage_embed.errors import StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.lock import writes
from stimage_embed.store.store import Store

log = logging.getLogger(__name__)

#: the key of every vector table
KEY = ("slide_id", "spot_id")


@dataclass
class EmbedReport:
    tiles: int = 0  # tiles cut (per chunk, shared by all backbones)
    vectors: dict[str, int] = field(default_factory=dict)  # rows written per backbone
    seconds: float = 0.0
    bytes_written: int = 0  # data files added by this run's commits (vectors, all backbones)
    precision: dict[str, str] = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        return self.tiles / self.seconds if self.seconds else 0.0

    def line(self) -> str:
        return (
            f"embedded {self.tiles} tiles in {self.seconds:.1f} s ({self.tiles_per_s:.1f} tiles/s); "
            f"vectors written {self.vectors}; {self.bytes_written / 1e6:.2f} MB written; precision {self.precision}"
        )


class _Model:
    """One backbone's forward on batches of uint8 tiles, at the pass's precision."""

    def __init__(self, bb, dev: torch.device, precision: str):
        self.bb, self.dev, self.precision = bb, dev, precision

    def __call__(self, tiles: torch.Tensor) -> np.ndarray:
        """Vectors of a batch of uint8 tiles (N, px, px, 3): float32 (N, dim), on the CPU."""
        x = self.bb.preprocess(tiles.to(self.dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        ctx = (
            torch.autocast(self.dev.type, dtype=getattr(torch, self.precision))
            if self.precision != "float32"
            else contextlib.nullcontext()
        )
        with ctx:
            return self.bb(x).float().cpu().numpy()


class _Writer:
    """Buffers each backbone's new vectors and commits them every ``flush_rows`` rows, one
    keyed write each (``Store.write_keyed``: a key already stored is skipped); the first
    write to a table replaces the old vectors an ``--overwrite`` replaces."""

    def __init__(self, store: Store, plan: Plan, report: EmbedReport, flush_rows: int):
        self.store, self.plan, self.report, self.flush_rows = store, plan, report, flush_rows
        self.buffers: dict[str, list[pa.Table]] = {n: [] for n in plan.models}
        self.buffered = {n: 0 for n in plan.models}

    def add(self, name: str, sid: str, keys: list[str], vec: np.ndarray, padded: np.ndarray) -> None:
        """Rows of one backbone for ``keys`` of slide ``sid``: float32 vectors (n, dim), padded fractions (n,)."""
        if not np.isfinite(vec).all():
            raise StoreError(f"{name}: non-finite embedding for slide {sid}; refusing to store it")
        dim, n, meta = vec.shape[1], len(keys), self.plan.slide_meta[sid]
        flat = pa.array(vec.astype(np.float16).ravel(), type=pa.float16())
        self.buffers[name].append(
            pa.table(
                {
                    "slide_id": [sid] * n,
                    "spot_id": keys,
                    "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
                    "tissue_fraction": pa.array([self.plan.tissue[(sid, k)] for k in keys], pa.float32()),
                    "padded_fraction": pa.array(padded, pa.float32()),
                    "tile_um": pa.array([meta["tile_um"]] * n, pa.float32()),
                    "um_per_px": pa.array([meta["um_per_px"]] * n, pa.float32()),
                    "provenance_id": [self.plan.pids[name]] * n,
                    "geometry_hash": [meta["geometry_hash"]] * n,
                },
                schema=S.embedding_schema(dim, optional=True),
            )
        )
        self.buffered[name] += n
        if self.buffered[name] >= self.flush_rows:
            self.flush(name)

    def flush(self, name: str) -> None:
        if not self.buffers[name]:
            return
        data = pa.concat_tables(self.buffers[name])
        table = self.plan.tables[name]
        schema = S.embedding_schema(self.plan.models[name].embed_dim, optional=True)
        self.store.write_keyed(table, data, KEY, schema=schema, replacing=self.plan.take_replaced(table))
        self.report.vectors[name] = self.report.vectors.get(name, 0) + data.num_rows
        self.buffers[name], self.buffered[name] = [], 0


def _default_workers(n_tiles: int) -> int:
    """DataLoader worker processes by default: spawned workers cost seconds to start, not
    worth it for small jobs or few cores (0 = threads of this process)."""
    cores = os.cpu_count() or 2
    return 0 if n_tiles < 256 or cores <= 4 else min(4, cores - 1)


def _loader(stream: TileStream, chunks: list, compute, num_workers: int, dev: torch.device):
    """The computed or cut batches of ``chunks`` (see the module doc for the three layouts)."""
    if num_workers:
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=dev.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4,
            # spawn, not fork: forking after LanceDB started its async runtime can deadlock
            multiprocessing_context="spawn",
        )
    if dev.type == "cpu":  # one thread per core cuts its tiles and runs the model on them (see stream_threads)
        threads = max(1, min(4, torch.get_num_threads()))
        return compute_stream(stream, chunks, compute, threads, intra_op_threads=torch.get_num_threads() // threads)
    # one background thread cuts tiles a few batches ahead of the model on the GPU
    return prefetch(stream.batches(chunks), depth=8, pin_memory=True)


def _consume(loader, forward: dict, writer: _Writer, progress: bool, closing: bool) -> None:
    """Store the vectors of every batch of ``loader`` for each backbone still lacking them
    (computed in the batch's ``features`` by a compute thread, else here), then flush."""
    plan, report = writer.plan, writer.report
    bar = tqdm(
        total=plan.n_tiles, unit="tile", desc="embed " + ",".join(plan.models), disable=not progress, smoothing=0.1
    )
    with torch.inference_mode(), contextlib.closing(loader) if closing else contextlib.nullcontext():
        for batch in loader:
            sid, ids = batch["slide_id"], batch["spot_ids"]
            for name, bb in plan.models.items():
                missing = plan.missing(name, sid, ids)
                if missing:
                    feats = (
                        batch["features"][name] if "features" in batch else forward[name](batch["tiles"][bb.input_size])
                    )
                    writer.add(name, sid, [ids[j] for j in missing], feats[missing], batch["padded"].numpy()[missing])
            report.tiles += len(ids)
            bar.update(len(ids))
            bar.set_postfix(slide=sid)
    for name in plan.models:
        writer.flush(name)
    bar.close()


def _compute_fn(plan: Plan, forward: dict):
    """The work of a compute thread on one batch: the vectors of every backbone that still
    needs its chunk (``batch["features"]``), the tiles then dropped."""

    def compute(batch: dict) -> dict:
        with torch.inference_mode():
            batch["features"] = {
                name: forward[name](batch["tiles"][bb.input_size])
                for name, bb in plan.models.items()
                if plan.missing(name, batch["slide_id"], batch["spot_ids"])
            }
        del batch["tiles"]
        return batch

    return compute


@writes("embed")
def execute(store: Store, request: EmbedRequest, run: RunOptions | None = None) -> EmbedReport:
    """The local engine: plan the pass (``pass_plan.plan_pass``) and run it in this process
    (see the module doc); ``run``: DataLoader workers, rows per commit, progress bar."""
    run = run or RunOptions()
    check_options(request.batch_size, run.num_workers, run.flush_rows)  # before any write
    plan = plan_pass(store, request)
    report = EmbedReport(precision=dict(plan.precision))
    if nothing_to_do(store, plan):  # e.g. after a killed run: its commits still need upkeep
        return report
    num_workers = _default_workers(plan.n_tiles) if run.num_workers is None else run.num_workers
    models = {name: bb.to(plan.device) for name, bb in plan.models.items()}
    forward = {name: _Model(bb, plan.device, plan.precision[name]) for name, bb in models.items()}
    sizes = tuple(bb.input_size for bb in models.values())
    stream = TileStream(plan.chunks, plan.jobs, sizes, stain_factory=plan.stain_factory)
    loader = _loader(stream, plan.chunks, _compute_fn(plan, forward), num_workers, plan.device)
    writer = _Writer(store, plan, report, run.flush_rows)
    before = snapshot(store, plan)  # after any dropped table
    t0 = time.perf_counter()
    _consume(loader, forward, writer, run.progress, closing=not num_workers)
    report.seconds = time.perf_counter() - t0
    report.bytes_written = finish_pass(store, plan, before)
    return report


def embed(
    store: Store,
    backbones: list[str],
    slides: list[str] | None = None,
    tile_um: float | None = None,
    stain: str = "macenko",
    stain_template: str | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    weights: dict[str, str] | None = None,
    only_qc: bool = False,
    overwrite: bool = False,
    flush_rows: int = 512,
    progress: bool = True,
    backbone_overrides: dict[str, dict] | None = None,
    context_um: float | None = None,
) -> EmbedReport:
    """Embed the store's spots with each backbone (see module docstring): :func:`execute` of
    the :class:`~stimage_embed.embeddings.pass_plan.EmbedRequest` these arguments make.

    tile_um: physical tile width in µm; default = each slide's spot diameter.
    context_um: embed instead a wider window of this width (µm) centred on each spot, into
        its own table ``embeddings_<backbone>__ctx<W>um`` (:func:`provenance.vector_table_name`)
        with its own provenance (``tile_um = context_um``, ``context_um``).
    only_qc: embed only spots passing tissue QC (default: all spots; QC is a query-time filter).
    num_workers: DataLoader worker processes; 0 = threads of this process (on CPU one per core,
        max 4; on a GPU one thread cuts tiles ahead of the model). Default 0 for < 256 tiles or
        <= 4 cores, else cores - 1 (max 4). Every option is checked before anything is written.
    """
    request = EmbedRequest.of(
        backbones,
        slides,
        weights,
        backbone_overrides,
        tile_um=tile_um,
        context_um=context_um,
        stain=stain,
        stain_template=stain_template,
        precision=precision,
        batch_size=batch_size,
        device=device,
        only_qc=only_qc,
        overwrite=overwrite,
    )
    return execute(store, request, RunOptions(num_workers, flush_rows, progress))
