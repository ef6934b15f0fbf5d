"""Content hashes recorded at ingest: of the image file, of what a slide's tiles are cut
from (the geometry), and of its counts, so later commands can tell when an input changed.

``image_fingerprint``: sha256 of the whole file up to :data:`FULL_HASH_MAX_BYTES` (measured
~500 MB/s on one busy core: 8 ms for a 4 MB HER2ST JPEG, 0.5 s at the limit); above it, the
file size and the sha256 of :data:`SAMPLES` blocks of :data:`SAMPLE_BYTES` spread evenly from
the first to the last byte (64 MiB read, whatever the file's size). Limitation of the sampled
form: an edit that keeps the size and touches only bytes between the samples is not seen.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

FULL_HASH_MAX_BYTES = 256 << 20
SAMPLES = 64
SAMPLE_BYTES = 1 << 20


def file_sha256(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def image_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of the file, or ``sampled-sha256:<size>:<hex>`` above
    :data:`FULL_HASH_MAX_BYTES` (see the module doc)."""
    path = Path(path)
    size = os.path.getsize(path)
    if size <= FULL_HASH_MAX_BYTES:
        return "sha256:" + file_sha256(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        for off in np.linspace(0, size - SAMPLE_BYTES, SAMPLES).astype(np.int64):
            fh.seek(int(off))
            h.update(fh.read(SAMPLE_BYTES))
    return f"sampled-sha256:{size}:{h.hexdigest()}"


def geometry_hash(
    image_path: Path,
    spot_ids: np.ndarray,
    pixel_x: np.ndarray,
    pixel_y: np.ndarray,
    um_per_px: float,
    spot_diameter_um: float,
    image_hash: str | None = None,
) -> str:
    """Hash of everything a slide's tiles are cut from: the image file's bytes, the spot ids
    with their centres (level-0 px), µm/px and the spot diameter (default tile width).
    ``image_hash``: the file's full sha256 (hex) when already computed."""
    order = np.argsort(np.asarray(spot_ids).astype(str), kind="stable")
    h = hashlib.sha256()
    h.update((image_hash or file_sha256(Path(image_path))).encode())
    h.update("\0".join(np.asarray(spot_ids).astype(str)[order]).encode())
    h.update(np.ascontiguousarray(np.asarray(pixel_x, np.float64)[order]).tobytes())
    h.update(np.ascontiguousarray(np.asarray(pixel_y, np.float64)[order]).tobytes())
    h.update(repr((float(um_per_px), float(spot_diameter_um))).encode())
    return h.hexdigest()[:32]


def expression_hash(spot_ids: np.ndarray, genes: np.ndarray, counts: sp.csr_matrix) -> str:
    """Hash of a slide's counts: spot ids, gene symbols and the (spot x gene) raw counts
    (CSR with sorted indices), so any change to the counts gives another hash. 32 hex digits."""
    c = counts.tocsr(copy=True)
    c.sort_indices()
    h = hashlib.sha256()
    h.update("\0".join(np.asarray(spot_ids).astype(str)).encode() + b"\1")
    h.update("\0".join(np.asarray(genes).astype(str)).encode() + b"\1")
    for arr in (c.indptr.astype(np.int64), c.indices.astype(np.int64), c.data.astype(np.int64)):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:32]
