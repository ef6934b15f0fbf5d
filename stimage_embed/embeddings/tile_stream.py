"""Streaming tiles for the embedding pass: no tile files on disk.

Work is cut into fixed *chunks*: the spots of one slide, sorted by spot id, in runs of
``chunk_size``. Chunk composition depends only on the slide's spot list, so a resumed
run recomputes exactly the batches an uninterrupted run would have computed (bitwise
identical vectors on deterministic kernels).

Ways to run the stream, with identical batches:

* threads of the embedding process (:mod:`stimage_embed.embeddings.stream_threads`): on a
  few CPU cores one thread per core cuts, normalises and embeds its own chunks
  (``compute_stream``); on a GPU one background thread cuts tiles ahead of the model
  (``prefetch``). No process start-up, no tile copies between processes.
* DataLoader workers (many cores): workers take chunks round-robin, open each slide once
  (caching the decoded image and the per-slide stain fit; with enough slides, each slide
  goes to one worker only).

Either way every tile is cut at each input size the backbones need from the same slide image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.stain import make_normalizer, normalizer_from_estimate
from stimage_embed.tiles.tissue import tissue_mask
from stimage_embed.tiles.window import TileGeometry, TileReader

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

#: thumbnail (longer side, px) the per-slide stain fit is estimated on, as at ingest
STAIN_THUMBNAIL_PX = 2048


def stored_stain_estimates(slides: pl.DataFrame) -> dict[str, dict]:
    """``slide_id -> estimate`` from the ``slides`` table's ``stain_estimate`` JSON (made at
    ingest on the same thumbnail and tissue mask as :data:`STAIN_THUMBNAIL_PX`); slides
    without one (older stores, too little tissue) are left out."""
    if "stain_estimate" not in slides.columns:
        return {}
    out = {}
    for sid, text in zip(slides["slide_id"], slides["stain_estimate"]):
        est = json.loads(text) if text else None
        if est and est.get("thumbnail_px") == STAIN_THUMBNAIL_PX:
            out[sid] = est
    return out


def template_normalizer(method: str, image_path: str, estimate: dict | None = None):
    """The stain target fitted on the template slide: from its stored estimate when usable
    (the same numbers, without decoding the image), else on the tissue of its thumbnail."""
    norm = normalizer_from_estimate(method, estimate)
    if norm is not None:
        return norm
    with SlideImage.open(image_path) as img:
        thumb, _ = img.thumbnail(STAIN_THUMBNAIL_PX)
    return make_normalizer(method, thumb, mask=tissue_mask(thumb), source=str(image_path))


class SlideStainFit:
    """Picklable per-slide stain fit for the stream: slide -> tile normaliser.

    ``target`` is the normaliser fitted on the template. A slide's source fit is, in order:
    its stored estimate (``estimates``, made at ingest on the same thumbnail and mask); for
    the template slide (``template_slide``) the target's own fit (:meth:`own_source`, the
    same estimate on the same thumbnail); else a fit on the tissue pixels of its thumbnail.
    All three give the same numbers; the first two skip the thumbnail, tissue mask and fit.

    Lives in this light module so spawned workers don't import the model stack to unpickle it.
    """

    def __init__(self, target, template_slide: str | None = None, estimates: dict[str, dict] | None = None):
        self.target = target
        self.template_slide = template_slide
        self.estimates = estimates or {}

    def __call__(self, thumbnail: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        # fit on tissue pixels only: grey scanner blocks and background would bias the stains
        return _transformer(self.target.fit_source(thumbnail, mask=tissue_mask(thumbnail)))

    def for_slide(self, slide_id: str, image: SlideImage) -> Callable[[np.ndarray], np.ndarray]:
        """The tile normaliser of ``slide_id`` (``image``: its open image)."""
        if hasattr(self.target, "with_source_estimate"):
            fitted = self.target.with_source_estimate(self.estimates.get(slide_id))
            if fitted is not None:
                return _transformer(fitted)
        if slide_id == self.template_slide and hasattr(self.target, "own_source"):
            return _transformer(self.target.own_source())
        thumb, _ = image.thumbnail(STAIN_THUMBNAIL_PX)
        return self(thumb)


def _transformer(fitted) -> Callable[[np.ndarray], np.ndarray]:
    """The fitted normaliser's tile transform, with per-slide tables precomputed if it has them."""
    return fitted.transformer() if hasattr(fitted, "transformer") else fitted.transform


def assign_chunks(chunks: list[Chunk], worker: int, n_workers: int) -> list[Chunk]:
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
        out.append(
            Chunk(slide_id, k, tuple(spot_ids[sel].astype(str)), tuple(px[sel].tolist()), tuple(py[sel].tolist()))
        )
    return out


class TileStream(IterableDataset):
    """Yields one batch per chunk: ``{"slide_id", "spot_ids", "tiles": {px: uint8 (B,px,px,3)}, "padded": (B,)}``.

    ``stain_factory``: a :class:`SlideStainFit` (or any ``thumbnail_rgb -> (tile -> tile)``
    callable) fitting the per-slide stain normaliser once per slide per worker against a
    template fitted in the parent.
    """

    def __init__(
        self,
        chunks: list[Chunk],
        slides: dict[str, SlideJob],
        sizes: tuple[int, ...],
        interpolation: str = "bicubic",
        stain_factory: SlideStainFit | Callable[[np.ndarray], Callable[[np.ndarray], np.ndarray]] | None = None,
    ):
        super().__init__()
        self.chunks = chunks
        self.slides = slides
        self.sizes = tuple(sorted(set(sizes)))
        self.interpolation = interpolation
        self.stain_factory = stain_factory

    def _normalizer(self, slide_id: str, image: SlideImage) -> Callable[[np.ndarray], np.ndarray] | None:
        if self.stain_factory is None:
            return None
        if isinstance(self.stain_factory, SlideStainFit):
            return self.stain_factory.for_slide(slide_id, image)
        thumb, _ = image.thumbnail(STAIN_THUMBNAIL_PX)
        return self.stain_factory(thumb)

    def open_slide(self, slide_id: str) -> tuple[SlideImage, dict[int, TileReader]]:
        """Decode a slide's image and fit its stain normaliser: (image, tile reader per size)."""
        job = self.slides[slide_id]
        image = SlideImage.open(job.image_path)
        try:
            normalize = self._normalizer(slide_id, image)
        except BaseException:
            image.close()
            raise
        readers = {
            s: TileReader(image, job.um_per_px, TileGeometry(job.tile_um, s, self.interpolation), normalize)
            for s in self.sizes
        }
        return image, readers

    @staticmethod
    def cut(chunk: Chunk, readers: dict[int, TileReader]) -> dict[str, Any]:
        """The batch of one chunk (see the class doc)."""
        tiles: dict[int, torch.Tensor] = {}
        padded = np.zeros(len(chunk.spot_ids), np.float32)
        for size, reader in readers.items():
            arr, padded[:] = reader.read_many(chunk.pixel_x, chunk.pixel_y)
            tiles[size] = torch.from_numpy(arr)
        return {
            "slide_id": chunk.slide_id,
            "chunk": chunk.index,
            "spot_ids": list(chunk.spot_ids),
            "tiles": tiles,
            "padded": torch.from_numpy(padded),
        }

    def batches(self, chunks: Iterable[Chunk]) -> Iterator[dict[str, Any]]:
        """The batches of ``chunks``, in order (one slide image open at a time)."""
        slide_id, image, readers = None, None, {}
        try:
            for chunk in chunks:
                if chunk.slide_id != slide_id:
                    if image is not None:
                        image.close()  # free the previous slide before decoding the next
                        image = None
                    image, readers = self.open_slide(chunk.slide_id)
                    slide_id = chunk.slide_id
                yield self.cut(chunk, readers)
        finally:
            if image is not None:
                image.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.batches(assign_chunks(self.chunks, wid, n))
