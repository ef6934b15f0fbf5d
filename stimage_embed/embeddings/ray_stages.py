"""The three stages of the Ray embedding pass (``embed --engine ray``), run in Ray workers.

1. :func:`cut_tiles` (CPU tasks): a batch of *chunk rows* (one per resume chunk of
   :mod:`~stimage_embed.embeddings.tile_stream`, as the local pass cuts them) -> one row per
   tile: decode the slide, window each spot (level-0 px -> the backbone's input px) and
   stain-normalise it, with the local pass's own :class:`TileStream` and stain fit.
2. :class:`ModelWorker` (an actor pool, one model per backbone per actor): tiles -> vectors.
3. :func:`write_fragments` (tasks): vectors -> Lance data files (fragments) of each
   backbone's table, written by ``lance-ray``'s ``LanceFragmentWriter`` straight from the
   worker to the store; only the fragment metadata goes back to the driver, which commits.

Ray hands tensor columns as its own tensor type; :func:`vector_table` casts the vectors to
the store's ``FixedSizeList<float16>`` schema (``store.schema.embedding_schema``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from stimage_embed.embeddings.tile_stream import Chunk, SlideJob, TileStream
from stimage_embed.store import schema as S

log = logging.getLogger(__name__)

#: ``<marker file>@N``: the first model worker to reach its N-th batch while the marker file
#: does not exist creates it and SIGKILLs itself (a killed worker, for tests; once per marker)
KILL_ONCE_ENV = "STIMAGE_RAY_KILL_ONCE"


def tile_column(px: int) -> str:
    return f"tile_{px}"


def need_column(backbone: str) -> str:
    return f"need_{backbone}"


def vector_column(backbone: str) -> str:
    return f"vec_{backbone}"


def chunk_rows(plan) -> list[dict[str, Any]]:
    """One row per chunk of ``plan`` (``pass_plan.Plan``), in order: what a cutting task needs
    (:func:`cut_tiles`): spot ids, level-0 pixel centres, tissue fractions, the slide's image,
    µm/px and tile width (µm), and per backbone which spots it lacks."""
    rows = []
    for c in plan.chunks:
        job = plan.jobs[c.slide_id]
        row = {
            "slide_id": c.slide_id,
            "chunk": c.index,
            "spot_ids": list(c.spot_ids),
            "pixel_x": list(c.pixel_x),
            "pixel_y": list(c.pixel_y),
            "tissue_fraction": [float(plan.tissue[(c.slide_id, s)]) for s in c.spot_ids],
            "image_path": job.image_path,
            "um_per_px": job.um_per_px,
            "tile_um": job.tile_um,
        }
        for name in plan.models:
            row[need_column(name)] = [(c.slide_id, s) not in plan.done[name] for s in c.spot_ids]
        rows.append(row)
    return rows


def cut_tiles(
    batch: dict[str, np.ndarray], sizes: tuple[int, ...], backbones: tuple[str, ...], stain_factory=None
) -> Iterator[dict[str, np.ndarray]]:
    """Chunk rows -> tile rows (see the module doc), yielded chunk by chunk so the model
    workers start on the first chunk while the task cuts the next. Consecutive chunks of one
    slide share one decoded image and stain fit. Tiles: uint8 (N, px, px, 3) per input size."""
    open_id, image, readers = None, None, {}
    try:
        for i, sid in enumerate(batch["slide_id"]):
            sid = str(sid)
            if sid != open_id:
                if image is not None:
                    image.close()
                    image = None
                job = SlideJob(
                    sid, str(batch["image_path"][i]), float(batch["um_per_px"][i]), float(batch["tile_um"][i])
                )
                image, readers = TileStream([], {sid: job}, sizes, stain_factory=stain_factory).open_slide(sid)
                open_id = sid
            spots = [str(s) for s in batch["spot_ids"][i]]
            chunk = Chunk(
                sid,
                int(batch["chunk"][i]),
                tuple(spots),
                tuple(map(float, batch["pixel_x"][i])),
                tuple(map(float, batch["pixel_y"][i])),
            )
            cut = TileStream.cut(chunk, readers)
            out = {
                "slide_id": np.array([sid] * len(spots), object),
                "spot_id": np.array(spots, object),
                "padded": cut["padded"].numpy(),
                "tissue_fraction": np.asarray(batch["tissue_fraction"][i], np.float32),
            }
            out.update({need_column(b): np.asarray(batch[need_column(b)][i], bool) for b in backbones})
            out.update({tile_column(s): cut["tiles"][s].numpy() for s in sizes})
            yield out
    finally:
        if image is not None:
            image.close()


class ModelWorker:
    """One actor of the pool: holds one model per backbone, turns tile rows into vectors.

    ``specs``: ``[{"name", "weights", "overrides", "precision"}]``; ``device``: ``cpu`` or
    ``cuda`` (the GPU Ray gave the actor); ``threads``: torch intra-op threads."""

    def __init__(self, specs: list[dict[str, Any]], device: str, threads: int = 1):
        import torch

        from stimage_embed.backbones import create_model

        torch.set_num_threads(max(1, threads))
        self.device = torch.device(device)
        self.models = {
            s["name"]: create_model(
                s["name"], weights=s.get("weights"), device=str(self.device), overrides=s.get("overrides")
            )
            for s in specs
        }
        self.precision = {s["name"]: s["precision"] for s in specs}
        self.calls = 0

    def _forward(self, name: str, tiles: np.ndarray) -> np.ndarray:
        """One backbone's vectors of uint8 tiles (N, px, px, 3): float32 (N, D), as the local pass."""
        import torch

        bb = self.models[name]
        x = bb.preprocess(torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device))
        x = x.contiguous(memory_format=torch.channels_last)
        prec = self.precision[name]
        ctx = (
            torch.autocast(self.device.type, dtype=getattr(torch, prec))
            if prec != "float32"
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            return bb(x).float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        _maybe_kill_once(self.calls)
        out = {k: v for k, v in batch.items() if not k.startswith("tile_")}
        for name, bb in self.models.items():
            need = batch[need_column(name)]
            vec = np.zeros((len(need), bb.embed_dim), np.float16)
            if need.any():
                feats = self._forward(name, batch[tile_column(bb.input_size)][need])
                if not np.isfinite(feats).all():
                    raise ValueError(f"{name}: non-finite embedding for slide {batch['slide_id'][need][0]}")
                vec[need] = feats.astype(np.float16)
            out[vector_column(name)] = vec
        return out


def _maybe_kill_once(call: int) -> None:
    spec = os.environ.get(KILL_ONCE_ENV)
    if not spec:
        return
    marker, _, nth = spec.rpartition("@")
    if call != int(nth or 1):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first worker to get here
    except FileExistsError:
        return
    os.close(fd)
    log.warning("%s: killing this Ray worker (pid %d) at its batch %d", KILL_ONCE_ENV, os.getpid(), call)
    os.kill(os.getpid(), signal.SIGKILL)


def vector_table(batch: dict[str, np.ndarray], name: str, dim: int, meta: dict[str, Any]) -> pa.Table:
    """The rows of ``batch`` that ``name`` needs, in the store's schema: the vectors (Ray's
    tensor column, here an ndarray (N, dim) float16) cast to ``FixedSizeList<float16, dim>``.
    ``meta``: ``provenance_id``, and per slide ``tile_um``, ``um_per_px``, ``geometry_hash``."""
    need = np.asarray(batch[need_column(name)], bool)
    vec = np.ascontiguousarray(np.asarray(batch[vector_column(name)])[need], np.float16)
    sids = [str(s) for s in np.asarray(batch["slide_id"])[need]]
    slide = meta["slides"]
    flat = pa.array(vec.reshape(-1), type=pa.float16())
    return pa.table(
        {
            "slide_id": sids,
            "spot_id": [str(s) for s in np.asarray(batch["spot_id"])[need]],
            "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "tissue_fraction": pa.array(np.asarray(batch["tissue_fraction"])[need], pa.float32()),
            "padded_fraction": pa.array(np.asarray(batch["padded"])[need], pa.float32()),
            "tile_um": pa.array([slide[s]["tile_um"] for s in sids], pa.float32()),
            "um_per_px": pa.array([slide[s]["um_per_px"] for s in sids], pa.float32()),
            "provenance_id": [meta["provenance_id"]] * len(sids),
            "geometry_hash": pa.array([slide[s]["geometry_hash"] for s in sids], pa.string()),
        },
        schema=S.embedding_schema(dim, optional=True),
    )


def write_fragments(
    batch: dict[str, np.ndarray], tables: dict[str, dict[str, Any]], storage_options: dict[str, str] | None
) -> dict[str, np.ndarray]:
    """Write each backbone's needed rows of ``batch`` as Lance fragments of its table, with
    ``lance_ray.LanceFragmentWriter``; returns one row per fragment: ``table``, ``fragment``
    (pickled ``FragmentMetadata``), ``rows``. Nothing is committed here (the driver does)."""
    from lance_ray import LanceFragmentWriter

    out: dict[str, list] = {"table": [], "fragment": [], "rows": []}
    for name, info in tables.items():
        data = vector_table(batch, name, info["dim"], info)
        if not data.num_rows:
            continue
        writer = LanceFragmentWriter(info["uri"], schema=data.schema, storage_options=storage_options)
        written = writer(data)
        for frag in written["fragment"].to_pylist():
            out["table"].append(info["table"])
            out["fragment"].append(frag)
            out["rows"].append(pickle.loads(frag).physical_rows)
    return {
        "table": np.array(out["table"], object),
        "fragment": np.array(out["fragment"], object),
        "rows": np.array(out["rows"], np.int64),
    }
