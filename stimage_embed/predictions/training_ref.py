"""Training data a saved model references instead of copying (the ``knn`` head).

A ``knn`` model predicts from its training spots' vectors and log1p(CP10k) profiles. By
default its folder does not copy them (a cohort of thousands of slides would make a huge
folder of training-derived data): it records where they are and what they were, and
:func:`attach_training` reads them back from that store when the model is loaded.

``training_ref.json`` holds the store's location (a local path made absolute but not
symlink-resolved, or the object-store URI, as the user named it), the vector source and
tables, the training vectors' provenance id, the genes, the QC filter, the number of spots,
per training slide the content versions a run id is built from
(:func:`~stimage_embed.predictions.runs.input_versions`: counts, and vectors per table), and
the sha256 of the arrays read at training (raw vectors, counts, library sizes);
``training_keys.parquet`` the (slide_id, spot_id) of the training spots in training order.

Loading refuses, in one line naming the store, what is missing or changed and what to run:
a store that is gone, a training slide, table, vector or spot that is gone, a content version
that changed (re-ingested counts, re-embedded vectors, another stain target), or arrays that
do not hash to the trained ones. Never silently wrong. ``train --knn-copy-vectors`` keeps
the arrays in the folder instead (self-contained, for sharing; no reference written).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from stimage_embed.errors import StimageError, StoreError
from stimage_embed.predictions.arrays import SpotArrays, load_spot_arrays
from stimage_embed.store.store import Store
from stimage_embed.store.uri import is_remote

REF_FILE = "training_ref.json"
KEYS_FILE = "training_keys.parquet"
REF_FORMAT = "stimage-embed/training-ref/1"


def keeps_training(head: Any) -> bool:
    """Whether ``head`` holds training data a folder may reference instead of copy."""
    return callable(getattr(head, "without_training", None)) and callable(getattr(head, "attach_training", None))


def store_location(store: Store) -> str:
    """The store as the user named it: an object-store URI, or a local path made absolute
    against the current folder with symlinks kept (``os.path.abspath``, not ``resolve``)."""
    if store.remote:
        return store.uri
    return os.path.abspath(os.path.expanduser(store.location.given))


def content_sha256(arrays: SpotArrays) -> str:
    """sha256 of what a head is fitted on: float32 vectors, int64 counts, float64 library sizes."""
    h = hashlib.sha256()
    for a, dtype in ((arrays.X, np.float32), (arrays.counts, np.int64), (arrays.library_size, np.float64)):
        h.update(np.ascontiguousarray(a, dtype=dtype).tobytes())
    return h.hexdigest()


def write_reference(
    out: Path, store: Store, backbone: str, arrays: SpotArrays, inputs: dict, provenance_id: str, only_qc: bool
) -> None:
    """Write ``training_ref.json`` and ``training_keys.parquet`` into the folder ``out``."""
    from stimage_embed.embeddings.vector_source import VectorSource

    slides = sorted(set(arrays.keys["slide_id"].to_list()))
    doc = {
        "format": REF_FORMAT,
        "store": store_location(store),
        "backbone": backbone,
        "tables": list(VectorSource.parse(backbone).tables),
        "provenance_id": provenance_id,
        "genes": list(arrays.genes),
        "only_qc": only_qc,
        "n_spots": int(arrays.X.shape[0]),
        "versions": {s: inputs[s] for s in slides},
        "content_sha256": content_sha256(arrays),
    }
    out.mkdir(parents=True, exist_ok=True)
    arrays.keys.select("slide_id", "spot_id").write_parquet(out / KEYS_FILE)
    (out / REF_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True))


def drop_reference(out: Path) -> None:
    """Remove a reference a former save of the same run left (the folder now copies the arrays)."""
    for name in (REF_FILE, KEYS_FILE):
        (out / name).unlink(missing_ok=True)


def read_reference(path: Path) -> dict[str, Any] | None:
    """``training_ref.json`` of a model folder (None if it has none)."""
    file = path / REF_FILE
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StoreError(f"{file}: unreadable or malformed JSON: {exc}") from exc
    keys = ("store", "backbone", "tables", "provenance_id", "genes", "only_qc", "n_spots", "versions")
    if not isinstance(doc, dict) or doc.get("format") != REF_FORMAT or any(k not in doc for k in keys):
        raise StoreError(f"{file}: format: expected {REF_FORMAT!r} with {', '.join(keys)}")
    return doc


class _Refusal:
    """Builds the one-line refusal of a model whose referenced training data is unusable."""

    def __init__(self, path: Path, meta: dict[str, Any], ref: dict[str, Any]):
        self.path, self.meta, self.ref = path, meta, ref

    def __call__(self, what: str) -> StoreError:
        slides = sorted(self.ref["versions"])
        shown = ",".join(slides[:5]) + (",..." if len(slides) > 5 else "")
        run = (
            f"stimage-embed train --store {self.ref['store']} --backbone {self.meta['backbone']} "
            f"--head {self.meta['head']} --genes {self.meta.get('gene_spec') or 'SPEC'} --train {shown}"
        )
        return StoreError(
            f"{self.path / REF_FILE}: store: the {self.meta['head']} model {self.meta['run_id']} reads its training "
            f"vectors from the store {self.ref['store']}, but {what}; train it again (`{run}`), or use a folder "
            "saved with `train --knn-copy-vectors`"
        )


def _open_store(ref: dict[str, Any], current: Store, refuse: _Refusal) -> Store:
    """The referenced store (``current`` itself when it is the same folder), never created."""
    where = ref["store"]
    if not is_remote(where):
        if not Path(where).is_dir():
            raise refuse("that store is gone (no such folder)")
        if not current.remote and Path(where).resolve() == current.path:
            return current
    try:
        store = Store(where)
        missing = [t for t in ("slides", "spots", "expression", *ref["tables"]) if not store.has_table(t)]
    except (OSError, StimageError) as exc:
        raise refuse(f"that store cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})") from exc
    if missing:
        raise refuse(f"its table(s) {', '.join(missing)} are gone")
    return store


def _check_versions(store: Store, ref: dict[str, Any], refuse: _Refusal) -> None:
    """Refuse unless every training slide's counts and vectors have the recorded content versions."""
    from stimage_embed.predictions.runs import input_versions

    want: dict[str, dict[str, str]] = ref["versions"]
    try:
        have = input_versions(store, ref["tables"], sorted(want))
    except StimageError as exc:
        raise refuse(str(exc).splitlines()[0]) from exc
    for slide in sorted(want):
        now = have.get(slide)
        if now is None:
            raise refuse(f"training slide {slide} is gone from it")
        for part, version in sorted(want[slide].items()):
            if part not in now:
                raise refuse(f"the {part} rows of training slide {slide} are gone")
            if now[part] != version:
                kind = "counts" if part == "expression" else f"vectors in {part}"
                raise refuse(
                    f"the {kind} of training slide {slide} changed since training (re-ingested or re-embedded)"
                )


def _training_arrays(store: Store, path: Path, ref: dict[str, Any], refuse: _Refusal) -> SpotArrays:
    """The training spots' arrays read back from ``store``, in training order, checked."""
    keys = pl.read_parquet(path / KEYS_FILE).select("slide_id", "spot_id")
    try:
        arrays = load_spot_arrays(store, ref["backbone"], sorted(ref["versions"]), ref["genes"], ref["only_qc"])
    except StimageError as exc:
        raise refuse(str(exc).splitlines()[0]) from exc
    have = arrays.keys.select("slide_id", "spot_id").with_row_index("_row")
    rows = keys.join(have, on=["slide_id", "spot_id"], how="left", maintain_order="left")
    gone = rows.filter(pl.col("_row").is_null())
    if gone.height or keys.height != ref["n_spots"]:
        first = ":".join(gone.row(0)[:2]) if gone.height else "?"
        raise refuse(f"{gone.height} of its {ref['n_spots']} training spots are gone (first: {first})")
    if list(arrays.genes) != list(ref["genes"]):
        raise refuse("its genes differ from the training genes")
    idx = rows["_row"].to_numpy()
    picked = SpotArrays(
        keys=arrays.keys[idx], X=arrays.X[idx], counts=arrays.counts[idx], library_size=arrays.library_size[idx],
        genes=arrays.genes, provenance=arrays.provenance,
    )  # fmt: skip
    if ref.get("content_sha256") and content_sha256(picked) != ref["content_sha256"]:
        raise refuse("the training spots' vectors or counts read there differ from those trained on")
    return picked


def attach_training(current: Store, path: Path, meta: dict[str, Any], head: Any) -> None:
    """Give a loaded head that references its training data (``training_ref.json``) its
    training arrays, read from the referenced store; a head saved with them, or without a
    reference, is left as it is. One-line :class:`StoreError` when they cannot be had."""
    if not keeps_training(head) or all(hasattr(head, a) for a in head.TRAINING_ARRAYS):
        return
    ref = read_reference(path)
    if ref is None:
        raise StoreError(
            f"{path / REF_FILE}: missing: the {meta['head']} model {meta['run_id']} holds neither its training "
            "vectors nor a reference to them (damaged folder); train it again"
        )
    refuse = _Refusal(path, meta, ref)
    if not (path / KEYS_FILE).is_file():
        raise refuse(f"the folder's {KEYS_FILE} (the training spots) is missing")
    store = _open_store(ref, current, refuse)
    _check_versions(store, ref, refuse)
    arrays = _training_arrays(store, path, ref, refuse)
    head.attach_training(arrays.X, arrays.counts, library_size=arrays.library_size)
