"""A saved model folder: what ``train`` writes (:func:`write_model_folder`) and ``predict``,
``infer``, ``search --image`` and ``explain`` load (:func:`load_saved_model`, the one loader).

``<models>/<run_id>/`` holds

* ``head.json`` + ``arrays.safetensors``: the fitted head (``heads.save_head``: JSON and
  safetensors, no pickle) with the identity of its training vectors
  (:meth:`~stimage_embed.embeddings.provenance.VectorProvenance.saved`);
* ``run.json``: run id, vector source (``backbone``), head name, genes (model order),
  gene spec, parameters, training slides;
* ``vectors.json``: per vector table of the source, the full provenance record of the
  training vectors (backbone spec hash and weights sha256, transform, tile policy, precision,
  stain method and the fitted stain target's parameters with its ``target_hash``) and the tile
  width in µm they were cut at: everything needed to embed new tiles as the training tiles
  were, so the folder works on any store or machine (``infer --model DIR --store OTHER``).
  Folders written before it existed lack it: they need the store they were trained in.
* for a head that keeps training data (``knn``), by default ``training_ref.json`` +
  ``training_keys.parquet`` instead of a copy of the training vectors and profiles: the
  loader reads them back from the training store
  (:mod:`stimage_embed.predictions.training_ref`; ``train --knn-copy-vectors`` copies them).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heads import load_head, save_head
from stimage_embed.embeddings.provenance import VectorProvenance, existing_provenance, tile_widths_um
from stimage_embed.embeddings.vector_source import VectorSource
from stimage_embed.errors import InputError
from stimage_embed.predictions.training_ref import attach_training
from stimage_embed.store.store import Store

RUN_FILE = "run.json"
VECTORS_FILE = "vectors.json"
VECTORS_FORMAT = "stimage-embed/vectors/1"
#: keys every ``run.json`` holds
RUN_KEYS = ("run_id", "backbone", "head", "genes")


@dataclass
class SavedModel:
    """A trained head with its ``run.json`` (``meta``) and, for folders that carry it, the
    training vectors' records (``vectors``: one ``{"table", "record", "tile_um"}`` per table)."""

    run_id: str
    path: Path
    meta: dict[str, Any]
    head: Any
    vectors: list[dict[str, Any]] | None = None

    @property
    def backbone(self) -> str:
        """The vector source's name (``a+b`` for a composite)."""
        return self.meta["backbone"]

    @property
    def source(self) -> VectorSource:
        return VectorSource.parse(self.backbone, "backbone")

    @property
    def head_name(self) -> str:
        return self.meta["head"]

    @property
    def genes(self) -> list[str]:
        return list(self.meta["genes"])

    @property
    def identity(self) -> VectorProvenance:
        """The identity of the training vectors, as the saved head records it."""
        return VectorProvenance.from_saved(getattr(self.head, "provenance_", None))

    @property
    def has_identity(self) -> bool:
        """Whether the saved head records its training vectors' identity at all."""
        return bool(getattr(self.head, "provenance_", None))


def training_vectors(store: Store, source: VectorSource, slides: list[str]) -> list[dict[str, Any]]:
    """``vectors.json``'s entries for vectors of ``source``: per table, its provenance record
    and the one tile width (µm) its vectors of ``slides`` were cut at (None if several)."""
    out = []
    for part in source.parts:
        records = existing_provenance(store, part.table)
        if not records:
            continue
        prov = VectorProvenance.of(records[0])
        widths = tile_widths_um(store, prov, slides)
        out.append({"table": part.table, "record": records[0], "tile_um": widths[0] if len(widths) == 1 else None})
    return out


def write_model_folder(
    out: Path, head: Any, prov: VectorProvenance, meta: dict[str, Any], vectors: list[dict[str, Any]]
) -> Path:
    """Write a model folder (see the module doc): the head with ``prov``'s identity,
    ``vectors.json`` and ``run.json`` (last: the folder is a model once it is there)."""
    save_head(head, out, provenance=prov.saved())
    doc = {"format": VECTORS_FORMAT, "backbone": meta["backbone"], "parts": vectors}
    (out / VECTORS_FILE).write_text(json.dumps(doc, indent=1, sort_keys=True, default=str))
    (out / RUN_FILE).write_text(json.dumps(meta, indent=2))
    return out


def _unknown(models: Path, model: str, meta_file: Path) -> InputError:
    known = sorted(p.name for p in models.glob("*") if (p / RUN_FILE).is_file()) if models.is_dir() else []
    hint = (
        f"models in this store: {', '.join(known[:5])}{' ...' if len(known) > 5 else ''}"
        if known
        else "this store has no saved models; see `stimage-embed train`"
    )
    return InputError(None, "--model", f"unknown model {model!r}: no {meta_file} ({hint})")


def _read_meta(meta_file: Path) -> dict[str, Any]:
    """``run.json``, checked: JSON, keys present, run id a hex hash, a vector source name."""
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(meta_file, RUN_FILE, f"unreadable or malformed JSON: {exc}") from exc
    missing = [k for k in RUN_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise InputError(meta_file, ", ".join(missing), f"missing from the model's {RUN_FILE}")
    rid = meta["run_id"]
    if not isinstance(rid, str) or not re.fullmatch(r"[0-9a-f]{8,64}", rid):
        raise InputError(meta_file, "run_id", f"not a run id (lower-case hex, 8-64 digits): {rid!r}")
    VectorSource.parse(meta["backbone"], "backbone")
    return meta


def _read_head(path: Path) -> Any:
    from safetensors import SafetensorError

    try:
        return load_head(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise InputError(
            path, "model", f"cannot load the saved head (missing or truncated file?): {type(exc).__name__}: {first}"
        ) from exc


def _read_vectors(path: Path) -> list[dict[str, Any]] | None:
    """``vectors.json``'s parts (None for a folder written before it existed)."""
    file = path / VECTORS_FILE
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(file, VECTORS_FILE, f"unreadable or malformed JSON: {exc}") from exc
    parts = doc.get("parts") if isinstance(doc, dict) else None
    if doc.get("format") != VECTORS_FORMAT or not isinstance(parts, list):
        raise InputError(file, "format", f"expected {VECTORS_FORMAT!r} with a list of parts")
    if not all(isinstance(p, dict) and isinstance(p.get("record"), dict) for p in parts):
        raise InputError(file, "parts", "each part must hold a provenance record")
    return parts


def load_saved_model(store: Store, model: str, *, training: bool = True) -> SavedModel:
    """Load a model by run id (under the store's models folder) or by folder path; one-line
    :class:`InputError` naming the file and field for an unknown or damaged folder.
    ``training``: give a head that references its training data (``knn``) those arrays,
    read from its training store (one-line refusal if they are gone or changed); False
    when only the folder's metadata is needed."""
    models = store.models_dir
    path = Path(model).expanduser()
    if not path.is_dir():
        path = models / model
    meta_file = path / RUN_FILE
    if not meta_file.is_file():
        raise _unknown(models, model, meta_file)
    meta = _read_meta(meta_file)
    head = _read_head(path)
    if training:
        attach_training(store, path, meta, head)
    return SavedModel(meta["run_id"], path, meta, head, _read_vectors(path))
