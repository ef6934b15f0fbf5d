"""Checks the command line runs before it touches a store: option values, the store path
(exists, is a folder, is writable, is reachable), the report folder.

Every check raises :class:`~stimage_embed.errors.InputError` naming the option, so a bad
value is one line with exit code 2 and nothing is created or written. Paths in messages are
the ones the user typed (symlinks not resolved).
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import threading
from pathlib import Path

from stimage_embed.errors import InputError, StoreError

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
QUERY_FORMATS = ("table", "csv", "json")
MISSING_POLICIES = ("error", "drop", "available")
CONTROLS = ("shuffled",)
#: seconds a first listing of a non-S3 object store (gs://, az://) may take before it is an error
REMOTE_TIMEOUT_ENV = "STIMAGE_REMOTE_TIMEOUT"
DEFAULT_REMOTE_TIMEOUT_S = 20.0
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_choice(value: str, choices: tuple[str, ...], field: str) -> str:
    """``value`` if it is one of ``choices``; else an error naming ``field``."""
    if value not in choices:
        raise InputError(None, field, f"expected one of {' | '.join(choices)}, got {value!r}")
    return value


def check_min(value: float | None, low: float, field: str, *, strict: bool = False) -> None:
    """A number option must be >= ``low`` (> ``low`` when ``strict``); ``None`` passes."""
    if value is None:
        return
    if value < low or (strict and value == low):
        raise InputError(None, field, f"must be {'>' if strict else '>='} {low:g}, got {value:g}")


def check_device(device: str, field: str = "--device") -> str:
    """``auto | cpu | mps | cuda | cuda:N``; a CUDA device must exist here."""
    if not _DEVICE.fullmatch(device):
        raise InputError(None, field, f"expected auto | cpu | cuda | cuda:N, got {device!r}")
    if device.startswith("cuda"):
        from heads.device import device_unavailable

        why = device_unavailable(device)
        if why is not None:
            raise InputError(None, field, f"{device} asked for, but {why}; use --device auto or cpu")
    return device


def check_embed_options(
    *,
    precision: str,
    device: str,
    batch_size: int,
    workers: int | None,
    tile_um: float | None,
    flush_rows: int | None = None,
) -> None:
    """The embedding options of ``embed`` and ``infer``, all checked before any write."""
    check_choice(precision, PRECISIONS, "--precision")
    check_device(device)
    check_min(batch_size, 1, "--batch-size")
    check_min(workers, 0, "--workers")
    check_min(tile_um, 0, "--tile-um", strict=True)
    check_min(flush_rows, 1, "--flush-rows")


def _remote_reachable(where: str) -> None:
    """List an object-store prefix within ``$STIMAGE_REMOTE_TIMEOUT`` seconds, else one error
    (a gs:// URI without credentials otherwise waits for a metadata server for minutes)."""
    from stimage_embed.store.uri import StoreLocation

    loc = StoreLocation(where)
    if loc.scheme in ("s3", "s3a"):
        loc.check()  # boto3 with its own time-outs
        return
    timeout = float(os.environ.get(REMOTE_TIMEOUT_ENV) or DEFAULT_REMOTE_TIMEOUT_S)
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            loc.listdir("")
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - reported below as one line
            outcome.append(exc)

    thread = threading.Thread(target=probe, daemon=True, name="store-probe")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise StoreError(
            f"{where}: no answer from the object store within {timeout:g} s (credentials? network?); "
            f"set ${REMOTE_TIMEOUT_ENV} to wait longer"
        )
    if outcome[0] is not None:
        first = " ".join(str(outcome[0]).split())[:200] or type(outcome[0]).__name__
        raise StoreError(f"{where}: cannot list the object store: {first}")


def _has_tables(path: Path) -> bool:
    return path.is_dir() and any(p.suffix == ".lance" for p in path.iterdir())


def check_store_path(where: str | Path, *, create: bool = False, write: bool = False) -> None:
    """Check ``--store`` before anything opens it.

    ``create``: the verb may start a new store (``ingest``); otherwise the store must exist
    and hold tables, and nothing is created. ``write``: the verb writes, so the folder (or,
    for a new store, its parent) must be writable.
    """
    from stimage_embed.store.uri import is_remote

    text = str(where)
    if is_remote(text):
        _remote_reachable(text)
        return
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(text, "--store", "is not a folder (a store is a folder of tables)")
    if not create and not _has_tables(path):
        state = "holds no tables" if path.is_dir() else "does not exist"
        raise InputError(
            text,
            "--store",
            f"{state}: no store here; run `stimage-embed ingest CATALOG --store {text}` first, "
            "or point --store ($STIMAGE_STORE) at an existing store",
        )
    if write:
        target = path if path.is_dir() else _existing_parent(path)
        if not os.access(target, os.W_OK):
            raise InputError(text, "--store", f"read-only: cannot write to {target}")


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path("/")


def new_store_root(where: str | Path) -> Path | None:
    """The first folder a new local store at ``where`` will create (its highest missing
    ancestor), or None when it exists or is remote: see :func:`forget_new_store`."""
    from stimage_embed.store.uri import is_remote

    if is_remote(str(where)):
        return None
    path = Path(where).expanduser().absolute()
    if path.exists():
        return None
    return next((p for p in [*reversed(path.parents), path] if not p.exists()), path)


def forget_new_store(root: Path | None) -> None:
    """Remove the folders a failed command created for a new store (``root`` from
    :func:`new_store_root`), if they hold nothing but the lock file and empty pending-mark
    folders; anything else (a table, a user's file) keeps them all."""
    from stimage_embed.store.lock import LOCK_NAME

    if root is None or not root.is_dir():
        return
    files = [p for p in root.rglob("*") if not p.is_dir()]
    if any(p.name != LOCK_NAME for p in files):
        return
    for p in files:
        p.unlink()
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    root.rmdir()


def check_output_dir(path: Path | None, field: str) -> None:
    """An output folder (``--report``, ``--out``) must be creatable and writable; checked
    before any long run commits results."""
    if path is None:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(path, field, f"cannot write here: {exc.strerror or exc}") from exc


#: errno -> what it means for the store
_OS_ERRORS = {
    errno.ENOSPC: "the disk is full (no space left on device)",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_OS_MESSAGES = {
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
}


def environment_error(exc: BaseException) -> str | None:
    """One line for a disk-full, read-only or permission error raised while writing
    (``OSError``, or a Lance/Arrow error carrying the OS message); ``None`` for others."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code not in _OS_ERRORS:
        text = str(exc)
        code = next((c for m, c in _OS_MESSAGES.items() if m in text), None)
    if code is None:
        return None
    where = getattr(exc, "filename", None)
    where = f"{where}: " if where else ""
    return (
        f"{where}{_OS_ERRORS[code]}; the write that failed was not committed (each table keeps its last complete "
        "version; what this command committed before stays, e.g. compare's finished runs: re-run it to complete)"
    )
