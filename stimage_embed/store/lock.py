"""The store's writer lock: one writing command at a time per store directory.

Every command that writes (``ingest``, ``embed``, ``train``, ``predict``, ``compare``)
holds an exclusive ``flock`` on ``<store>/.stimage-embed.lock`` for its whole run;
each single commit also takes it (re-entrantly), so library callers are serialised too.
Readers never take it: Lance commits are atomic, a reader sees the last commit.

The kernel drops the lock when the holder exits, however it exits (even SIGKILL), so
there is no stale lock to clean. The holder writes its pid and verb into the file so a
refused writer can say who holds the store.

Crash points: ``crash_point(name)`` kills the process with SIGKILL when ``name`` is listed
in the environment variable ``STIMAGE_FAULT`` (comma-separated, ``name`` or ``name@N``
for the N-th time the caller reaches it). The store calls it around every commit
(``before:<table>``, ``after:<table>``), so tests can kill any writing command between
two of its commits, exactly where a power cut or an OOM kill could. Unset, it does nothing.

Stores on object storage (``s3://...``) have no file to ``flock``; there the lock is
:class:`ObjectStoreLock`, which serialises the commits of one process only. Writers of
several processes or machines rely on Lance instead: every commit is an optimistic,
atomic manifest swap (a conditional put), a conflicting commit is retried or refused by
Lance, and vector rows are written by key (``merge_insert`` on slide_id, spot_id), so a
key is stored once however many writers race. What the file lock adds locally (one
writing *command* at a time, the busy message naming the holder) is not there.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import functools
import json
import logging
import os
import signal
import time
from pathlib import Path

from stimage_embed.errors import StoreError

log = logging.getLogger(__name__)

LOCK_NAME = ".stimage-embed.lock"
FAULT_ENV = "STIMAGE_FAULT"
POLL_SECONDS = 0.1


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock."""


class StoreLock:
    """An exclusive, re-entrant (per object) writer lock on a store directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._depth = 0
        self.verb: str | None = None

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self, verb: str, wait: float = 0.0) -> bool:
        """Take the lock (waiting up to ``wait`` seconds); returns True on the outermost
        acquisition. Raises :class:`StoreBusyError` naming the holder when it stays busy."""
        if self._depth:
            self._depth += 1
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + max(0.0, wait)
        announced = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StoreBusyError(
                            f"store {self.directory} is busy ({_holder(fd)}); "
                            "retry when it is done, or pass --wait SECONDS to queue behind it"
                        ) from None
                    if not announced:
                        log.info("store %s is busy (%s); waiting up to %.0f s", self.directory, _holder(fd), wait)
                        announced = True
                    time.sleep(min(POLL_SECONDS, left))
            os.ftruncate(fd, 0)
            info = {
                "pid": os.getpid(),
                "verb": verb,
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            }
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._depth, self.verb = fd, 1, verb
        return True

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        fd, self._fd, self.verb = self._fd, None, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class ObjectStoreLock:
    """The writer lock of a store on object storage: re-entrant within this object, no
    cross-process exclusion (see the module doc: Lance's optimistic commits and keyed
    writes keep the tables consistent)."""

    def __init__(self, uri: str):
        self.directory = uri
        self._depth = 0
        self.verb: str | None = None

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self, verb: str, wait: float = 0.0) -> bool:
        self._depth += 1
        if self._depth == 1:
            self.verb = verb
            return True
        return False

    def release(self) -> None:
        if self._depth:
            self._depth -= 1
            if not self._depth:
                self.verb = None


def _holder(fd: int) -> str:
    """'held by pid N, <verb>' from the lock file (written by the holder after it locked)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "held by another process"
    return f"held by pid {info['pid']}, {info.get('verb', '?')}"


def crash_point(name: str, n: int = 1) -> None:
    """SIGKILL this process here if ``$STIMAGE_FAULT`` names this point (see module doc).

    ``n``: the caller's count of how often it reached the point (``name@n`` matches it)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(","):
        point, _, nth = item.strip().partition("@")
        if point == name and n == (int(nth) if nth.isdigit() else 1):
            log.warning("%s=%s: killing this process at %s", FAULT_ENV, spec, name)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)


def writes(verb: str):
    """Decorator: run a function whose first argument is a ``Store`` under its writer lock."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(store, *args, **kwargs):
            with store.writer(verb):
                return func(store, *args, **kwargs)

        return wrapper

    return decorate
