"""Streaming tiles for the embedding pass: no tile files on disk.

Work is cut into fixed *chunks*: the spots of one slide, sorted by spot id, in runs of
``chunk_size``. Chunk composition depends only on the slide's spot list, so a resumed
run recomputes exactly the batches an uninterrupted run would have computed (bitwise
identical vectors on deterministic kernels). DataLoader workers take chunks round-robin,
open each slide once (caching the decoded image and the per-slide stain fit; with enough
slides, each slide goes to one worker only), and cut
every tile at each input size the backbones need from the same slide image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.tissue import tissue_mask
from stimage_embed.tiles.window import TileGeometry, TileReader

log = logging.getLogger(__name__)


class SlideStainFit:
    """Picklable per-slide stain fit for DataLoader workers: thumbnail -> tile normaliser.

    Lives in this light module so spawned workers don't import the model stack to unpickle it.
    """

    def __init__(self, target):
        self.target = target

    def __call__(self, thumbnail: np.ndarray):
        # fit on tissue pixels only: grey scanner blocks and background would bias the stains
        return self.target.fit_source(thumbnail, mask=tissue_mask(thumbnail)).transform


def assign_chunks(chunks: list["Chunk"], worker: int, n_workers: int) -> list["Chunk"]:
    """The chunks one worker handles. With at least two slides per worker, whole slides are
    dealt out (each slide decoded and stain-fitted by one worker only); otherwise chunks
    are dealt round-robin so a single large slide still uses every worker."""
    slides = list(dict.fromkeys(c.slide_id for c in chunks))
    if len(slides) >= 2 * n_workers:
        # balance by tile count: greedy, largest slides first
        sizes = {s: sum(len(c.spot_ids) for c in chunks if c.slide_id == s) for s in slides}
        load, owner = [0] * n_workers, {}
        for s in sorted(slides, key=lambda s: -sizes[s]):
            w = load.index(min(load))
            owner[s] = w
            load[w] += sizes[s]
        return [c for c in chunks if owner[c.slide_id] == worker]
    return [c for i, c in enumerate(chunks) if i % n_workers == worker]


@dataclass(frozen=True)
class SlideJob:
    """What a worker needs to cut a slide's tiles."""

    slide_id: str
    image_path: str
    um_per_px: float  # µm per level-0 pixel
    tile_um: float  # physical tile width, µm


@dataclass(frozen=True)
class Chunk:
    slide_id: str
    index: int  # chunk number within the slide
    spot_ids: tuple[str, ...]
    pixel_x: tuple[float, ...]  # level-0 px
    pixel_y: tuple[float, ...]


def make_chunks(slide_id: str, spot_ids: np.ndarray, px: np.ndarray, py: np.ndarray, chunk_size: int) -> list[Chunk]:
    order = np.argsort(spot_ids.astype(str), kind="stable")
    out = []
    for k, start in enumerate(range(0, len(order), chunk_size)):
        sel = order[start : start + chunk_size]
        out.append(Chunk(slide_id, k, tuple(spot_ids[sel].astype(str)), tuple(px[sel].tolist()), tuple(py[sel].tolist())))
    return out


class TileStream(IterableDataset):
    """Yields one batch per chunk: ``{"slide_id", "spot_ids", "tiles": {px: uint8 (B,px,px,3)}, "padded": (B,)}``.

    ``stain_factory(thumbnail_rgb) -> callable(tile) -> tile`` fits the per-slide stain
    normaliser (once per slide per worker) against a template fitted in the parent.
    """

    def __init__(
        self,
        chunks: list[Chunk],
        slides: dict[str, SlideJob],
        sizes: tuple[int, ...],
        interpolation: str = "bicubic",
        stain_factory: Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]] | None = None,
    ):
        super().__init__()
        self.chunks = chunks
        self.slides = slides
        self.sizes = tuple(sorted(set(sizes)))
        self.interpolation = interpolation
        self.stain_factory = stain_factory

    def _open(self, slide_id: str, cache: dict[str, Any]) -> dict[int, TileReader]:
        if cache.get("slide_id") != slide_id:
            if cache.get("image") is not None:
                cache["image"].close()
            job = self.slides[slide_id]
            image = SlideImage.open(job.image_path)
            normalize = None
            if self.stain_factory is not None:
                thumb, _ = image.thumbnail(2048)
                normalize = self.stain_factory(thumb)
            cache.update(
                slide_id=slide_id,
                image=image,
                readers={s: TileReader(image, job.um_per_px, TileGeometry(job.tile_um, s, self.interpolation), normalize) for s in self.sizes},
            )
        return cache["readers"]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        cache: dict[str, Any] = {}
        try:
            for chunk in assign_chunks(self.chunks, wid, n):
                readers = self._open(chunk.slide_id, cache)
                tiles: dict[int, torch.Tensor] = {}
                padded = np.zeros(len(chunk.spot_ids), np.float32)
                for size, reader in readers.items():
                    arr = np.empty((len(chunk.spot_ids), size, size, 3), np.uint8)
                    for j, (x, y) in enumerate(zip(chunk.pixel_x, chunk.pixel_y)):
                        arr[j], padded[j] = reader.read(x, y)
                    tiles[size] = torch.from_numpy(arr)
                yield {
                    "slide_id": chunk.slide_id,
                    "chunk": chunk.index,
                    "spot_ids": list(chunk.spot_ids),
                    "tiles": tiles,
                    "padded": torch.from_numpy(padded),
                }
        finally:
            if cache.get("image") is not None:
                cache["image"].close()
