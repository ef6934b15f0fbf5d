"""The viewer's per-app caches (no module-level state): open slide images and drawn spot
layers, each a small LRU guarded by a lock, so concurrent requests share one decode."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``size`` values, each built once per key by ``make`` (under a per-key lock, so
    two threads asking for the same key wait for one build); ``ttl`` seconds after a build the
    value is rebuilt on next use (None: never). ``on_evict`` is called on values dropped."""

    def __init__(self, size: int, ttl: float | None = None, on_evict: Callable[[V], None] | None = None):
        self.size = size
        self.ttl = ttl
        self.on_evict = on_evict
        self._items: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def __len__(self) -> int:
        """Number of values held."""
        with self._lock:
            return len(self._items)

    def _fresh(self, key: Hashable) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None or (self.ttl is not None and time.monotonic() - hit[0] > self.ttl):
                return None
            self._items.move_to_end(key)
            return hit[1]

    def get(self, key: Hashable, make: Callable[[], V]) -> V:
        """The value of ``key``, built with ``make()`` if missing or stale."""
        value = self._fresh(key)
        if value is not None:
            return value
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            value = self._fresh(key)
            if value is not None:
                return value
            try:
                value = make()
            except BaseException:
                with self._lock:
                    if key not in self._items:
                        self._key_locks.pop(key, None)
                raise
            self.put(key, value)
            return value

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value`` under ``key`` (fresh from now), evicting the least recently used."""
        evicted = []
        with self._lock:
            self._items[key] = (time.monotonic(), value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                old_key, (_, old) = self._items.popitem(last=False)
                self._key_locks.pop(old_key, None)
                evicted.append(old)
        for old in evicted:
            if self.on_evict is not None and old is not value:
                self.on_evict(old)

    def clear(self) -> None:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for _, value in items:
            if self.on_evict is not None:
                self.on_evict(value)
