"""Pending marks of multi-commit writes, with an owner and a lease, and table versions to
restore when such a write fails.

A writer that needs several commits (``compare``: predictions, metrics, then the ``runs``
rows; ``ingest``: genes, expression, spots, then slides) first writes a mark
``<store>/.pending/<kind>/<key>``: JSON with its ``owner`` (host and pid), a ``lease_until``
time (Unix seconds) and what a cleaner needs (``ingest``: each table's Lance version
before the write). It clears the mark after its last commit.

Who may clean up a mark left behind:

* local store: the next writer, under the store's ``flock`` (a writer holds it for its whole
  command and clears its marks before releasing it, so a mark found under the lock belongs
  to a dead process);
* object store (no cross-process lock): only once the lease has expired, or when the owner
  is a process of this host that no longer exists. A live writer's marks are never removed.
  The lease (default :data:`DEFAULT_LEASE_S`, ``$STIMAGE_PENDING_LEASE_S``) must exceed the
  time between a writer's mark and its last commit (seconds for a fold's runs).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping

import pyarrow.compute as pc

from stimage_embed.store.store import PENDING_DIR, SLIDE_CHILD_TABLES, Store, sql_list

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 3600.0
LEASE_ENV = "STIMAGE_PENDING_LEASE_S"


def lease_seconds() -> float:
    """The lease of a new mark, in seconds (``$STIMAGE_PENDING_LEASE_S`` or 1 hour)."""
    try:
        return float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S))
    except ValueError:
        return DEFAULT_LEASE_S


def owner() -> str:
    """This process as a mark's owner: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def mark(store: Store, kind: str, key: str, payload: Mapping | None = None) -> None:
    """Write (or renew) the mark of ``key``: this process owns it for :func:`lease_seconds`."""
    body = {"owner": owner(), "lease_until": time.time() + lease_seconds(), **(payload or {})}
    store.location.write_bytes(f"{PENDING_DIR}/{kind}/{key}", json.dumps(body, sort_keys=True).encode())


def read(store: Store, kind: str, key: str) -> dict | None:
    """A mark's JSON (``{}`` for a mark of an older version: an empty file); None if absent."""
    raw = store.location.read_bytes(f"{PENDING_DIR}/{kind}/{key}")
    if raw is None:
        return None
    try:
        return json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, ValueError):
        return {}


def clear(store: Store, kind: str, key: str) -> None:
    store.location.remove(f"{PENDING_DIR}/{kind}/{key}")


def _process_gone(who: str) -> bool:
    host, _, pid = who.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def abandoned(store: Store, body: dict | None, now: float | None = None) -> bool:
    """Whether a mark's writer is gone, so its partial writes may be undone (see module doc).
    Call under the store's writer lock."""
    if body is None:
        return False
    if not store.remote:
        return True  # marks are made and cleared under the flock we hold: the writer is dead
    if "lease_until" not in body:  # an older version's empty mark: no owner to ask
        return True
    if body.get("owner") == owner():
        return False
    now = time.time() if now is None else now
    return float(body["lease_until"]) < now or _process_gone(str(body.get("owner", "")))


def stale_marks(store: Store, kind: str) -> list[str]:
    """Keys of ``kind`` whose mark was abandoned (see :func:`abandoned`)."""
    return [k for k in store.pending(kind) if not k.endswith(".tmp") and abandoned(store, read(store, kind, k))]


# -- table versions ---------------------------------------------------------------------------
def table_versions(store: Store, names) -> dict[str, int | None]:
    """Each table's current Lance version (None: no committed table)."""
    return {n: (store.db.open_table(n).version if store.has_table(n) else None) for n in names}


def restore_versions(store: Store, versions: Mapping[str, int | None]) -> None:
    """Put each table back to its version in ``versions`` (a new commit equal to it; a table
    that did not exist is dropped). Under the writer lock."""
    for name, version in versions.items():
        if not store.has_table(name):
            continue
        if version is None:
            store.drop_table(name)
            log.warning("%s: removed table %s, created by an interrupted write", store.path, name)
            continue
        tbl = store.db.open_table(name)
        if tbl.version != version:
            with store._commit(name):
                tbl.restore(version)
            log.warning("%s: %s restored to version %d (an interrupted write)", store.path, name, version)


def undo_abandoned(store: Store, kind: str) -> None:
    """Put back the tables of every abandoned write of ``kind`` whose mark records
    ``versions`` (an interrupted ingest), then clear its mark. Under the writer lock."""
    for key in stale_marks(store, kind):
        body = read(store, kind, key) or {}
        versions = body.get("versions")
        if versions:
            log.warning("%s: undoing an interrupted %s of slide(s) %s", store.path, kind, body.get("slides"))
            restore_versions(store, versions)
        clear(store, kind, key)


def recover(store: Store) -> None:
    """Repair what a killed writer may have left (under the store's writer lock):

    * a table directory whose first commit never happened (unreadable) is removed;
    * tables an interrupted ingest changed are put back to their versions before it;
    * ``genes``/``expression``/``spots`` rows of a slide without a ``slides`` row (left by
      older versions, whose ingest removed the ``slides`` row first) are deleted.
    """
    if not store.location.is_dir():
        return
    for name in store.db.list_tables().tables:
        if not store.committed(name):
            log.warning("%s: removing table %r, whose creation was interrupted (no commit)", store.path, name)
            store.location.remove_tree(f"{name}.lance")
    undo_abandoned(store, "ingest")
    known = set(store.read("slides", ["slide_id"])["slide_id"].to_pylist()) if store.has_table("slides") else set()
    for name in SLIDE_CHILD_TABLES:
        if not store.has_table(name):
            continue
        ids = set(pc.unique(store.read(name, ["slide_id"])["slide_id"]).to_pylist())
        orphans = sorted(ids - known)
        if orphans:
            log.warning("%s: %s: removing rows of slide(s) %s without a slides row", store.path, name, orphans)
            store.delete(name, f"slide_id IN ({sql_list(orphans)})")
