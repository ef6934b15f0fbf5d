"""Fit many small heads in parallel on few cores: threads, each with single-threaded
math libraries.

A head fit on a fold is a chain of small matrix products; with every core in one torch /
BLAS thread pool, each product waits at a barrier for all cores, and on a shared or loaded
machine a spinning pool can be many times slower than one thread. Running ``workers``
independent fits side by side (torch and NumPy release the GIL in their kernels), each with
``cores // workers`` threads, keeps the cores busy without oversubscription.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

T = TypeVar("T")
R = TypeVar("R")


def default_workers(n_tasks: int) -> int:
    """One worker per core (at most 8), never more than the tasks."""
    return max(1, min(n_tasks, os.cpu_count() or 1, 8))


@contextlib.contextmanager
def math_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads and the BLAS/OpenMP pools limited to ``n`` for the block
    (process-wide; restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        with threadpool_limits(limits=max(1, n)):
            yield
    finally:
        torch.set_num_threads(before)


def threaded_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in completion order, computed by ``workers`` threads (default
    :func:`default_workers`), each with ``cores // workers`` math threads. An exception in
    ``fn`` is raised here, after the running items finish; items not started are dropped."""
    items = list(items)
    workers = default_workers(len(items)) if workers is None else max(1, int(workers))
    per_worker = max(1, (os.cpu_count() or 1) // workers)
    with math_threads(per_worker), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fit") as pool:
        queue = iter(items)
        running = {}
        for item in queue:
            running[pool.submit(fn, item)] = item
            if len(running) >= workers:
                break
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    item = running.pop(fut)
                    result = fut.result()
                    nxt = next(queue, None)
                    if nxt is not None:
                        running[pool.submit(fn, nxt)] = nxt
                    yield item, result
        finally:
            for fut in running:
                fut.cancel()
