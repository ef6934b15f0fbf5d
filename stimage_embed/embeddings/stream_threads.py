"""Running the tile stream in threads of the embedding process (no worker processes).

* :func:`compute_stream` (CPU, few cores): one thread per core takes chunks in turn, cuts and
  stain-normalises its tiles and runs the model on them with single-threaded torch ops, so
  the cores stay busy without oversubscription. Slides are decoded once, by the first thread
  that needs one (:class:`_SharedSlides`), the next slide's decode overlapping the current
  slide's last chunks (:func:`lead_slide_openings`).
* :func:`prefetch` (GPU): one background thread cuts the tiles a few batches ahead of the
  model; NumPy / PIL / imagecodecs work releases the GIL while the model computes.

Both hand the producers' exceptions to the consumer, which re-raises them, and stop and join
their threads when the consumer stops early.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from stimage_embed.embeddings.tile_stream import Chunk, TileStream
    from stimage_embed.tiles.image import SlideImage
    from stimage_embed.tiles.window import TileReader


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
    decodes the next slide does so while the others finish the current one. At the start, the
    first chunks of the first ``lead`` slides come first, so each thread decodes a different
    slide instead of all waiting for the first one. Only the order in which chunks are taken
    changes, not what a chunk holds."""
    keys, prev, k = [], None, 0
    for pos, c in enumerate(chunks):
        first = c.slide_id != prev and pos > 0
        if first:
            k += 1
        # slide k < lead: right after the very first chunk (keys in (0, 1)); later slides: lead places early
        keys.append((k / lead if k < lead else pos - lead - 0.5) if first else float(pos))
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
