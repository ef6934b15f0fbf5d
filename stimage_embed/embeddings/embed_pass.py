"""The embedding pass: every QC'd spot tile embedded once per backbone, cached in LanceDB.

* Streams tiles from the slides; several backbones share each decoded slide and each chunk.
  On few CPU cores, one thread per core cuts, stain-normalises and embeds its own chunks
  (single-threaded torch ops, no oversubscription; ``tile_stream.compute_stream``); on a GPU
  a thread cuts tiles ahead of the model; on many cores DataLoader worker processes do.
  Per-slide stain estimates come from ingest (``slides.stain_estimate``), not refitted.
* Upkeep after the writes (``store.maintenance``): slide_id index, compaction, old versions.
* Batches, channels_last, autocast (bf16 on CPU only when measured faster with cosine
  >= 0.999 to fp32; fp16/bf16 on GPU per the spec), pinned memory on GPU.
* Writes one Lance table per backbone (``embeddings_<name>``) of float16 vectors keyed
  by (slide_id, spot_id), with a provenance id per row.
* Resume: keys already present are skipped. Each append is one atomic Lance commit of
  whole chunks, so a run killed at any point (even SIGKILL) leaves only complete
  commits, and a re-run completes the table to exactly one row per key.
* Concurrency: the pass holds the store's writer lock, and each append is a keyed insert
  (``merge_insert`` on slide_id, spot_id), so a key is never stored twice. Vectors cut
  under another slide geometry (``slides.geometry_hash``: re-ingested with moved spots)
  are deleted and embedded again; ``--overwrite --slide S`` replaces only S's vectors.
"""

from __future__ import annotations

import contextlib
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

from stimage_embed import __version__
from stimage_embed.backbones import create_model
from stimage_embed.backbones.speed import choose_precision
from stimage_embed.embeddings import provenance as P
from stimage_embed.embeddings.tile_stream import (
    SlideJob, SlideStainFit, TileStream, compute_stream, make_chunks, prefetch, stored_stain_estimates, template_normalizer,
)
from stimage_embed.errors import InputError, ProvenanceError, StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.lock import writes
from stimage_embed.store.maintenance import data_files, maintain
from stimage_embed.store.store import Store, sql_list

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


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _existing_keys(store: Store, table: str) -> set[tuple[str, str]]:
    if not store.has_table(table):
        return set()
    t = store.read(table, ["slide_id", "spot_id"])
    return set(zip(t["slide_id"].to_pylist(), t["spot_id"].to_pylist()))


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
) -> EmbedReport:
    """Embed the store's spots with each backbone (see module docstring).

    tile_um: physical tile width in µm; default = each slide's spot diameter.
    only_qc: embed only spots passing tissue QC (default: all spots; QC is a query-time filter).
    num_workers: DataLoader worker processes; 0 = threads of this process: on CPU one per core
        (max 4), each cutting, normalising and embedding its own chunks with single-threaded
        torch ops; on a GPU one thread cuts tiles ahead of the model. Default 0 for < 256 tiles
        or <= 4 cores (a worker process would compete with the model's threads), else cores - 1
        (max 4).
    """
    if not backbones:
        raise InputError(None, "--backbone", "name at least one backbone")
    if not store.has_table("spots"):
        raise StoreError(f"{store.path}: no spots; run `stimage-embed ingest` first")
    dev = _device(device)
    slide_tab = pl.from_arrow(store.read("slides"))
    if slides:
        unknown = sorted(set(slides) - set(slide_tab["slide_id"]))
        if unknown:
            raise InputError(None, "--slide", f"slides not in the store: {unknown}")
        slide_tab = slide_tab.filter(pl.col("slide_id").is_in(slides))
    slide_tab = slide_tab.sort("slide_id")
    where = f"slide_id IN ({sql_list(slide_tab['slide_id'])})" + (" AND passes_qc" if only_qc else "")
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y", "tissue_fraction"], where=where))

    # --- backbones, stain template, provenance -------------------------------------
    models = {name: create_model(name, weights=(weights or {}).get(name), device=str(dev), overrides=(backbone_overrides or {}).get(name)) for name in backbones}
    template_id = None
    stain_factory = None
    stain_desc: dict = {"method": stain}
    if stain != "none":
        all_slides = pl.from_arrow(store.read("slides")).sort("slide_id")
        # default: the template the tables' vectors were normalised against, else the first slide
        recorded = None if stain_template or (overwrite and not slides) else P.recorded_stain_template(
            store, [S.embedding_table_name(b) for b in backbones])
        template_id = stain_template or recorded or all_slides["slide_id"][0]
        row = all_slides.filter(pl.col("slide_id") == template_id)
        if row.height == 0:
            raise InputError(None, "--stain-template", f"template slide {template_id!r} is not in the store")
        # per-slide stain estimates made at ingest (same thumbnail and tissue mask): not recomputed
        estimates = stored_stain_estimates(all_slides)
        target = template_normalizer(stain, row["image_path"][0], estimates.get(template_id))
        stain_factory = SlideStainFit(target, template_slide=template_id, estimates=estimates)
        stain_desc = target.to_dict()

    report = EmbedReport()
    tables, provs, done_keys = {}, {}, {}
    for name, bb in models.items():
        table = S.embedding_table_name(name)
        if overwrite and not slides and store.has_table(table):
            store.drop_table(table)
            P.forget(store, table)
        old = P.existing_provenance(store, table)
        prec = precision
        if prec == "auto" and old:
            prec = old[0].get("precision", "auto")  # resume with the table's precision
        prec, probe = choose_precision(bb, dev, prec)
        report.precision[name] = prec
        prov = {
            "backbone": name,
            "spec_hash": bb.spec.spec_hash(),
            "weights_sha256": bb.weights_sha256,
            "transform": bb.transform_description(),
            "tile_um": tile_um if tile_um is not None else "spot_diameter",
            "tile_px": bb.input_size,
            "stain_method": stain,
            "stain_template": template_id,
            "stain": stain_desc,
            "precision": prec,
            "precision_probe": probe,
            "package_version": __version__,
            "embed_dim": bb.embed_dim,
        }
        try:
            P.check_compatible(store, table, prov)
        except ProvenanceError as exc:
            if overwrite and slides:
                raise ProvenanceError(f"{exc} (--overwrite with --slide replaces only these slides' vectors, which must keep "
                                      "the table's provenance; omit --slide to replace every slide's)") from exc
            raise
        if overwrite and slides:  # replace only these slides' vectors
            store.delete(table, f"slide_id IN ({sql_list(slide_tab['slide_id'])})")
        P.repair(store, table, slide_tab)
        tables[name], provs[name] = table, prov
        have = _existing_keys(store, table)
        done_keys[name] = have

    # --- work list: chunks holding any key missing for any backbone -------------------
    jobs, chunks = {}, []
    for srow in slide_tab.iter_rows(named=True):
        sid = srow["slide_id"]
        sp = spots.filter(pl.col("slide_id") == sid)
        if sp.height == 0:
            continue
        jobs[sid] = SlideJob(sid, srow["image_path"], srow["um_per_px"], float(tile_um or srow["spot_diameter_um"]))
        for ch in make_chunks(sid, sp["spot_id"].to_numpy(), sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy(), batch_size):
            if any((sid, s) not in done_keys[n] for n in models for s in ch.spot_ids):
                chunks.append(ch)
    n_tiles = sum(len(c.spot_ids) for c in chunks)
    if not chunks:
        log.info("all %d spots already embedded for %s", spots.height, ", ".join(models))
        maintain(store, list(tables.values()))  # e.g. after a killed run: its commits still need upkeep
        return report

    if num_workers is None:
        # spawned workers cost seconds to start: not worth it for small jobs or 1-2 cores
        cores = os.cpu_count() or 2
        num_workers = 0 if n_tiles < 256 or cores <= 4 else min(4, cores - 1)
    tissue = dict(zip(zip(spots["slide_id"], spots["spot_id"]), spots["tissue_fraction"]))
    umpp = dict(zip(slide_tab["slide_id"], slide_tab["um_per_px"]))
    pids = {name: P.record(store, tables[name], provs[name]) for name in models}
    ghash = dict(zip(slide_tab["slide_id"], slide_tab["geometry_hash"])) if "geometry_hash" in slide_tab.columns else {}
    stream = TileStream(chunks, jobs, tuple(bb.input_size for bb in models.values()), stain_factory=stain_factory)
    def forward(name: str, tiles: torch.Tensor) -> np.ndarray:
        """One backbone's vectors of a batch of uint8 tiles: float32, on the CPU."""
        bb = models[name]
        x = bb.preprocess(tiles.to(dev, non_blocking=True)).contiguous(memory_format=torch.channels_last)
        ctx = torch.autocast(dev.type, dtype=getattr(torch, report.precision[name])) if report.precision[name] != "float32" else contextlib.nullcontext()
        with ctx:
            return bb(x).float().cpu().numpy()

    def compute(batch: dict) -> dict:
        """In a compute thread: the vectors of every backbone that still needs this chunk."""
        sid = batch["slide_id"]
        with torch.inference_mode():
            batch["features"] = {name: forward(name, batch["tiles"][bb.input_size]) for name, bb in models.items()
                                 if any((sid, s) not in done_keys[name] for s in batch["spot_ids"])}
        del batch["tiles"]
        return batch

    if num_workers:
        loader = DataLoader(
            stream, batch_size=None, num_workers=num_workers, pin_memory=dev.type == "cuda",
            persistent_workers=False, prefetch_factor=4,
            # spawn, not fork: forking after LanceDB started its async runtime can deadlock
            multiprocessing_context="spawn",
        )
    elif dev.type == "cpu":  # one thread per core cuts its tiles and runs the model on them (see tile_stream)
        threads = max(1, min(4, torch.get_num_threads()))
        loader = compute_stream(stream, chunks, compute, threads, intra_op_threads=torch.get_num_threads() // threads)
    else:  # one background thread cuts tiles a few batches ahead of the model on the GPU
        loader = prefetch(stream.batches(chunks), depth=8, pin_memory=True)
    buffers: dict[str, list[pa.Table]] = {n: [] for n in models}
    buffered = {n: 0 for n in models}

    def flush(name: str) -> None:
        if not buffers[name]:
            return
        data = pa.concat_tables(buffers[name])
        # keyed insert: a key already stored is never written twice, whatever ran before
        store.insert_new(tables[name], data, ("slide_id", "spot_id"), schema=S.embedding_schema(models[name].embed_dim, optional=True))
        report.vectors[name] = report.vectors.get(name, 0) + data.num_rows
        buffers[name], buffered[name] = [], 0

    before = {name: data_files(store, tables[name]) for name in models}  # after any --overwrite drop or delete
    t0 = time.perf_counter()
    bar = tqdm(total=n_tiles, unit="tile", desc="embed " + ",".join(models), disable=not progress, smoothing=0.1)
    with torch.inference_mode(), contextlib.closing(loader) if not num_workers else contextlib.nullcontext():
        for batch in loader:
            sid, ids = batch["slide_id"], batch["spot_ids"]
            for name, bb in models.items():
                missing = [j for j, s in enumerate(ids) if (sid, s) not in done_keys[name]]
                if not missing:
                    continue
                feats = batch["features"][name] if "features" in batch else forward(name, batch["tiles"][bb.input_size])
                vec = feats[missing]
                if not np.isfinite(vec).all():
                    raise StoreError(f"{name}: non-finite embedding for slide {sid}; refusing to store it")
                dim = vec.shape[1]
                flat = pa.array(vec.astype(np.float16).ravel(), type=pa.float16())
                keys = [ids[j] for j in missing]
                buffers[name].append(
                    pa.table(
                        {
                            "slide_id": [sid] * len(keys),
                            "spot_id": keys,
                            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
                            "tissue_fraction": pa.array([tissue[(sid, k)] for k in keys], pa.float32()),
                            "padded_fraction": pa.array(batch["padded"].numpy()[missing], pa.float32()),
                            "tile_um": pa.array([jobs[sid].tile_um] * len(keys), pa.float32()),
                            "um_per_px": pa.array([umpp[sid]] * len(keys), pa.float32()),
                            "provenance_id": [pids[name]] * len(keys),
                            "geometry_hash": [ghash.get(sid)] * len(keys),
                        },
                        schema=S.embedding_schema(dim, optional=True),
                    )
                )
                buffered[name] += len(keys)
                if buffered[name] >= flush_rows:
                    flush(name)
            report.tiles += len(ids)
            bar.update(len(ids))
            bar.set_postfix(slide=sid)
    for name in models:
        flush(name)
    bar.close()
    report.seconds = time.perf_counter() - t0
    # bytes written: the data files this run's commits added (before the upkeep rewrites them)
    report.bytes_written = sum(size for name in models for path, size in data_files(store, tables[name]).items()
                               if path not in before[name])
    # upkeep after the writes: slide_id index, compaction, old versions (store/maintenance.py)
    maintain(store, list(tables.values()) + ["provenance"])
    return report
