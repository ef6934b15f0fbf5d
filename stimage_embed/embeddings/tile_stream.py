"""Streaming tiles for the embedding pass: no tile files on disk.

Work is cut into fixed *chunks*: the spots of one slide, sorted by spot id, in runs of
``chunk_size``. Chunk composition depends only on the slide's spot list, so a resumed
run recomputes exactly the batches an uninterrupted run would have computed (bitwise
identical vectors on deterministic kernels).

Two ways to run the stream, with identical batches:

* :func:`prefetch` (the default on few cores): one background thread of the embedding
  process cuts and normalises the tiles, slide after slide, a few batches ahead of the
  model. No process start-up, no tile copies between processes, and the thread's
  NumPy / PIL / imagecodecs work releases the GIL while the model computes.
* DataLoader workers (many cores): workers take chunks round-robin, open each slide once
  (caching the decoded image and the per-slide stain fit; with enough slides, each slide
  goes to one worker only).

Either way every tile is cut at each input size the backbones need from the same slide image.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

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
        readers = {s: TileReader(image, job.um_per_px, TileGeometry(job.tile_um, s, self.interpolation), normalize) for s in self.sizes}
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


class _Failed:
    """A producer's exception, carried through the queue to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


def prefetch(batches: Iterable[dict[str, Any]], depth: int = 8, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Iterate ``batches`` in a background thread, up to ``depth`` batches ahead.

    The producer's exceptions are re-raised in the consumer; when the consumer stops early
    (an exception, ``close()``), the producer is told to stop and joined. ``pin_memory``:
    page-lock the tile tensors in the producer (for non-blocking copies to a GPU).
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        it = iter(batches)
        try:
            for batch in it:
                if pin_memory:
                    batch["tiles"] = {k: v.pin_memory() for k, v in batch["tiles"].items()}
                    batch["padded"] = batch["padded"].pin_memory()
                if not put(batch):
                    return
            put(_DONE)
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put(_Failed(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # a generator's finally (closing the slide image) runs in this thread

    thread = threading.Thread(target=produce, name="tile-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=1.0)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError("the tile prefetch thread ended without finishing the stream") from None
                continue
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item
    finally:
        stop.set()
        thread.join()


def lead_slide_openings(chunks: list[Chunk], lead: int) -> list[Chunk]:
    """``chunks`` (slide by slide) with the first chunk of every slide after the first moved
    ``lead`` places earlier: with ``lead`` threads taking chunks in this order, the thread that
    decodes the next slide does so while the others finish the current one. Only the order
    in which chunks are taken changes, not what a chunk holds."""
    keys, prev = [], None
    for pos, c in enumerate(chunks):
        first = c.slide_id != prev and pos > 0
        keys.append(pos - lead - 0.5 if first else float(pos))
        prev = c.slide_id
    return [c for _, c in sorted(zip(keys, chunks), key=lambda kc: kc[0])]


class _OpenSlide:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.image: SlideImage | None = None
        self.readers: dict[int, TileReader] | None = None


class _SharedSlides:
    """Slides open for several threads: decoded (and stain-fitted) by the first thread that
    needs one, closed after its last chunk has been cut."""

    def __init__(self, stream: TileStream, chunks: list[Chunk]):
        self.stream = stream
        self.lock = threading.Lock()
        self.left: dict[str, int] = {}
        for c in chunks:
            self.left[c.slide_id] = self.left.get(c.slide_id, 0) + 1
        self.open: dict[str, _OpenSlide] = {}

    def readers(self, slide_id: str) -> dict[int, TileReader]:
        with self.lock:
            entry = self.open.setdefault(slide_id, _OpenSlide())
        with entry.lock:  # other threads wanting this slide wait for its one decode
            if entry.readers is None:
                entry.image, entry.readers = self.stream.open_slide(slide_id)
            return entry.readers

    def done(self, slide_id: str) -> None:
        with self.lock:
            self.left[slide_id] -= 1
            entry = self.open.pop(slide_id, None) if self.left[slide_id] == 0 else None
        if entry is not None and entry.image is not None:
            entry.image.close()

    def close(self) -> None:
        with self.lock:
            entries, self.open = list(self.open.values()), {}
        for entry in entries:
            if entry.image is not None:
                entry.image.close()


def compute_stream(
    stream: TileStream,
    chunks: list[Chunk],
    compute: Callable[[dict[str, Any]], dict[str, Any]],
    threads: int,
    intra_op_threads: int = 1,
    depth: int = 4,
) -> Iterator[dict[str, Any]]:
    """Cut, normalise and ``compute`` (the model forward) every chunk in ``threads`` threads,
    each running the model with ``intra_op_threads`` torch threads; yields the computed
    batches as they finish (not in chunk order).

    On a few CPU cores this beats one model using every core with the tiles cut in another
    thread: that thread preempts one of the model's threads, and every parallel op then
    waits for it at its barrier. Here each thread does its tiles and its forward in turn,
    independently, so the cores stay busy with no oversubscription. ``torch``'s intra-op
    thread count (process-wide) is set for the duration and restored after.
    """
    order = lead_slide_openings(chunks, threads)
    slides = _SharedSlides(stream, order)
    work: queue.SimpleQueue = queue.SimpleQueue()
    for c in order:
        work.put(c)
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> None:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def run() -> None:
        try:
            while not stop.is_set():
                try:
                    chunk = work.get_nowait()
                except queue.Empty:
                    break
                readers = slides.readers(chunk.slide_id)
                batch = stream.cut(chunk, readers)
                slides.done(chunk.slide_id)
                put(compute(batch))
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            put(_Failed(exc))
        finally:
            put(_DONE)

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, intra_op_threads))
    pool = [threading.Thread(target=run, name=f"embed-{i}", daemon=True) for i in range(max(1, threads))]
    for t in pool:
        t.start()
    try:
        running = len(pool)
        while running:
            try:
                item = out.get(timeout=1.0)
            except queue.Empty:
                if not any(t.is_alive() for t in pool) and out.empty():
                    raise RuntimeError("the embedding threads ended without finishing the stream") from None
                continue
            if item is _DONE:
                running -= 1
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                yield item
    finally:
        stop.set()
        for t in pool:
            t.join()
        slides.close()
        torch.set_num_threads(before)
