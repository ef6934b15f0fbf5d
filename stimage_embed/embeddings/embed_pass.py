"""The embedding pass: every QC'd spot tile embedded once per backbone, cached in LanceDB.

* Streams tiles from the slides; several backbones share each decoded slide and each chunk.
  On few CPU cores, one thread per core cuts, stain-normalises and embeds its own chunks
  (single-threaded torch ops, no oversubscription; ``stream_threads.compute_stream``); on a GPU
  a thread cuts tiles ahead of the model; on many cores DataLoader worker processes do.
  Per-slide stain estimates come from ingest (``slides.stain_estimate``), not refitted.
* What to embed (slides, stain target, each table made ready, chunks still missing):
  ``embed_plan``. Upkeep after the writes (``store.maintenance``): slide_id index,
  compaction, old versions.
* Batches, channels_last, autocast (bf16 on CPU only when measured faster with cosine
  >= 0.999 to fp32; fp16/bf16 on GPU per the spec), pinned memory on GPU.
* Writes one Lance table per backbone (``embeddings_<name>``) of float16 vectors keyed
  by (slide_id, spot_id), with a provenance id per row.
* Resume: keys already present are skipped. Each append is one atomic Lance commit of
  whole chunks, so a run killed at any point (even SIGKILL) leaves only complete
  commits, and a re-run completes the table to exactly one row per key.
* Concurrency: a key is never stored twice. On a local store the pass holds the store's
  exclusive writer lock from the read of the stored keys to its last commit, and appends
  only keys it found missing (plain appends: a keyed insert would join every stored key at
  each commit, quadratic in the table's size). On object storage, which has no
  cross-process lock, each append is a keyed insert (``merge_insert`` on slide_id,
  spot_id). Vectors cut under another slide geometry (``slides.geometry_hash``:
  re-ingested with moved spots) are deleted and embedded again; ``--overwrite --slide S``
  replaces only S's vectors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from heads.device import resolve_device
from stimage_embed.backbones import create_model
from stimage_embed.embeddings import provenance as P
from stimage_embed.embeddings.embed_plan import (
    check_images,
    check_options,
    prepare_table,
    provenance_base,
    select_spots,
    stain_target,
    work_list,
)
from stimage_embed.embeddings.stain_target import record as stain_target_record
from stimage_embed.embeddings.stream_threads import compute_stream, prefetch
from stimage_embed.embeddings.tile_stream import SlideJob, TileStream
from stimage_embed.errors import InputError, StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.lock import writes
from stimage_embed.store.maintenance import data_files, maintain
from stimage_embed.store.store import Store

log = logging.getLogger(__name__)


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
    commit each: an append under the local store's writer lock, a keyed insert (a key
    already stored is skipped) on object storage (see the module doc)."""

    def __init__(
        self,
        store: Store,
        models: dict,
        tables: dict[str, str],
        pids: dict[str, str],
        report: EmbedReport,
        jobs: dict[str, SlideJob],
        slide_tab: pl.DataFrame,
        spots: pl.DataFrame,
        flush_rows: int,
        replace: dict[str, str] | None = None,
    ):
        self.replace = dict(replace or {})  # table -> scope of old vectors the first commit replaces
        self.store, self.models, self.tables, self.pids, self.report = store, models, tables, pids, report
        self.jobs, self.flush_rows = jobs, flush_rows
        self.tissue = dict(zip(zip(spots["slide_id"], spots["spot_id"]), spots["tissue_fraction"]))
        self.umpp = dict(zip(slide_tab["slide_id"], slide_tab["um_per_px"]))
        self.ghash = (
            dict(zip(slide_tab["slide_id"], slide_tab["geometry_hash"])) if "geometry_hash" in slide_tab.columns else {}
        )
        self.buffers: dict[str, list[pa.Table]] = {n: [] for n in models}
        self.buffered = {n: 0 for n in models}

    def add(self, name: str, sid: str, keys: list[str], vec: np.ndarray, padded: np.ndarray) -> None:
        """Rows of one backbone for ``keys`` of slide ``sid``: float32 vectors (n, dim), padded fractions (n,)."""
        if not np.isfinite(vec).all():
            raise StoreError(f"{name}: non-finite embedding for slide {sid}; refusing to store it")
        dim = vec.shape[1]
        flat = pa.array(vec.astype(np.float16).ravel(), type=pa.float16())
        n = len(keys)
        self.buffers[name].append(
            pa.table(
                {
                    "slide_id": [sid] * n,
                    "spot_id": keys,
                    "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
                    "tissue_fraction": pa.array([self.tissue[(sid, k)] for k in keys], pa.float32()),
                    "padded_fraction": pa.array(padded, pa.float32()),
                    "tile_um": pa.array([self.jobs[sid].tile_um] * n, pa.float32()),
                    "um_per_px": pa.array([self.umpp[sid]] * n, pa.float32()),
                    "provenance_id": [self.pids[name]] * n,
                    "geometry_hash": [self.ghash.get(sid)] * n,
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
        schema = S.embedding_schema(self.models[name].embed_dim, optional=True)
        if self.tables[name] in self.replace:  # --overwrite: the old vectors go in the first new commit
            scope = self.replace.pop(self.tables[name])
            self.store.replace_where(self.tables[name], data, ("slide_id", "spot_id"), scope, schema=schema)
        elif self.store.remote:
            self.store.insert_new(self.tables[name], data, ("slide_id", "spot_id"), schema=schema)
        else:  # the pass holds the exclusive lock and writes only keys missing when it read them
            self.store.append(self.tables[name], data, schema=schema)
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


def _consume(
    loader, models: dict, forward: dict, needs, writer: _Writer, n_tiles: int, progress: bool, closing: bool
) -> None:
    """Store the vectors of every batch of ``loader`` for each backbone still lacking them
    (computed in the batch's ``features`` by a compute thread, else here), then flush."""
    report = writer.report
    bar = tqdm(total=n_tiles, unit="tile", desc="embed " + ",".join(models), disable=not progress, smoothing=0.1)
    with torch.inference_mode(), contextlib.closing(loader) if closing else contextlib.nullcontext():
        for batch in loader:
            sid, ids = batch["slide_id"], batch["spot_ids"]
            for name, bb in models.items():
                missing = needs(name, sid, ids)
                if missing:
                    feats = (
                        batch["features"][name] if "features" in batch else forward[name](batch["tiles"][bb.input_size])
                    )
                    writer.add(name, sid, [ids[j] for j in missing], feats[missing], batch["padded"].numpy()[missing])
            report.tiles += len(ids)
            bar.update(len(ids))
            bar.set_postfix(slide=sid)
    for name in models:
        writer.flush(name)
    bar.close()


def _context_tile_um(tile_um: float | None, context_um: float | None) -> float | None:
    """The tile width (µm) of the pass: ``context_um`` when given (it is the tile width of a
    context table; a different ``tile_um`` as well is an error), else ``tile_um``."""
    if context_um is None:
        return tile_um
    if tile_um is not None and float(tile_um) != float(context_um):
        raise InputError(None, "--context-um", f"gives the tile width itself; got --tile-um {tile_um} as well")
    P.context_width_label(context_um)  # a positive width, or a one-line error
    return float(context_um)


def _missing(done_keys: dict[str, set], name: str, sid: str, ids) -> list[int]:
    """Positions in ``ids`` (spot ids of slide ``sid``) of the keys backbone ``name`` still lacks."""
    return [j for j, s in enumerate(ids) if (sid, s) not in done_keys[name]]


def _bytes_added(store: Store, tables: dict[str, str], before: dict[str, dict[str, int]]) -> int:
    """Bytes written: the data files this run's commits added to ``tables`` since ``before``
    (``data_files`` per table; measured before the upkeep rewrites them)."""
    return sum(
        size
        for name, table in tables.items()
        for path, size in data_files(store, table).items()
        if path not in before[name]
    )


@writes("embed")
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
    """Embed the store's spots with each backbone (see module docstring).

    tile_um: physical tile width in µm; default = each slide's spot diameter.
    context_um: embed instead a wider window of this width (µm) centred on each spot, into
        its own table ``embeddings_<backbone>__ctx<W>um`` (:func:`provenance.vector_table_name`)
        with its own provenance (``tile_um = context_um``, ``context_um``).
    only_qc: embed only spots passing tissue QC (default: all spots; QC is a query-time filter).
    num_workers: DataLoader worker processes; 0 = threads of this process (on CPU one per core,
        max 4; on a GPU one thread cuts tiles ahead of the model). Default 0 for < 256 tiles or
        <= 4 cores, else cores - 1 (max 4). Every option is checked before anything is written.
    """
    check_options(batch_size, num_workers, flush_rows, precision, device, backbones)  # before any write
    if not store.has_table("spots"):
        raise StoreError(f"{store.path}: no spots; run `stimage-embed ingest` first")
    tile_um = _context_tile_um(tile_um, context_um)
    dev = resolve_device(device)
    slide_tab, spots = select_spots(store, slides, only_qc)
    models = {
        name: create_model(
            name, weights=(weights or {}).get(name), device=str(dev), overrides=(backbone_overrides or {}).get(name)
        )
        for name in backbones
    }
    names = {P.vector_table_name(b, context_um) for b in backbones}
    template_id, stain_factory, stain_desc, chosen_by = stain_target(
        store, backbones, stain, stain_template, names if overwrite and not slides else set()
    )
    report = EmbedReport()
    tables = {name: P.vector_table_name(name, context_um) for name in models}
    provs, done_keys, replace = {}, {}, {}
    for name, bb in models.items():
        prov = provenance_base(name, bb, tile_um, stain, template_id, stain_desc, context_um)
        report.precision[name], provs[name], done_keys[name] = prepare_table(
            store, name, bb, prov, precision, dev, slide_tab, overwrite, slides, table=tables[name], deferred=replace
        )

    jobs, chunks = work_list(slide_tab, spots, tile_um, batch_size, done_keys)
    if not chunks:
        log.info("all %d spots already embedded for %s", spots.height, ", ".join(models))
        maintain(store, list(tables.values()))  # e.g. after a killed run: its commits still need upkeep
        return report
    check_images(slide_tab, {c.slide_id for c in chunks})  # before the first vector is written
    n_tiles = sum(len(c.spot_ids) for c in chunks)
    num_workers = _default_workers(n_tiles) if num_workers is None else num_workers
    stain_target_record(store, template_id, chosen_by)  # the store's stain target, recorded once
    pids = {name: P.record(store, tables[name], provs[name]) for name in models}
    forward = {name: _Model(bb, dev, report.precision[name]) for name, bb in models.items()}

    needs = functools.partial(_missing, done_keys)

    def compute(batch: dict) -> dict:
        """In a compute thread: the vectors of every backbone that still needs this chunk."""
        with torch.inference_mode():
            batch["features"] = {
                name: forward[name](batch["tiles"][bb.input_size])
                for name, bb in models.items()
                if needs(name, batch["slide_id"], batch["spot_ids"])
            }
        del batch["tiles"]
        return batch

    stream = TileStream(chunks, jobs, tuple(bb.input_size for bb in models.values()), stain_factory=stain_factory)
    loader = _loader(stream, chunks, compute, num_workers, dev)
    writer = _Writer(store, models, tables, pids, report, jobs, slide_tab, spots, flush_rows, replace)
    before = {name: data_files(store, tables[name]) for name in models}  # after any --overwrite drop or delete
    t0 = time.perf_counter()
    _consume(loader, models, forward, needs, writer, n_tiles, progress, closing=not num_workers)
    report.seconds = time.perf_counter() - t0
    report.bytes_written = _bytes_added(store, tables, before)
    for table in tables.values():  # records of vectors an --overwrite replaced
        P.prune(store, table)
    # upkeep after the writes: slide_id index, compaction, old versions (store/maintenance.py)
    maintain(store, list(tables.values()) + ["provenance"])
    return report
