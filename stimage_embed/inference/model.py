"""A saved model (``<store>/models/<run_id>/``, written by ``train``) and the vector
provenance it needs, checked *before* anything is written.

``infer`` must embed a new slide exactly as the model's training vectors were embedded:
same backbone spec and weights (sha256), same tile width (µm) and input px, same stain
method and fitted stain target (template slide), same precision. :func:`embedding_recipe`
finds the full provenance record of the training vectors in the store, checks each part can
be reproduced here and returns the arguments for the embedding pass; otherwise it raises
a one-line error saying what is missing.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from heads import load_head
from stimage_embed.embeddings.provenance import IDENTITY_FIELDS, existing_provenance, provenance_id
from stimage_embed.errors import InputError, ProvenanceError, StimageError, StoreError
from stimage_embed.predictions.train_predict import models_dir, vector_identity
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)


@dataclass
class SavedModel:
    """A trained head with its ``run.json``: ``backbone``, ``head_name``, ``genes`` (model order)."""

    run_id: str
    path: Path
    meta: dict[str, Any]
    head: Any

    @property
    def backbone(self) -> str:
        return self.meta["backbone"]

    @property
    def head_name(self) -> str:
        return self.meta["head"]

    @property
    def genes(self) -> list[str]:
        return list(self.meta["genes"])

    @property
    def identity(self) -> dict[str, str]:
        """The head's training-vector identity (``vector_identity`` form: JSON strings)."""
        return {k: v for k, v in (self.head.provenance_ or {}).items() if k in (*IDENTITY_FIELDS, "stain_target")}


def load_saved_model(store: Store, model: str) -> SavedModel:
    """Load a model by run id (under ``<store>/models``) or by folder path."""
    path = Path(model).expanduser()
    if not path.is_dir():
        path = models_dir(store) / model
    meta_file = path / "run.json"
    if not meta_file.is_file():
        known = (
            sorted(p.name for p in models_dir(store).glob("*") if (p / "run.json").is_file())
            if models_dir(store).is_dir()
            else []
        )
        hint = (
            f"models in this store: {', '.join(known[:5])}{' ...' if len(known) > 5 else ''}"
            if known
            else "this store has no saved models; see `stimage-embed train`"
        )
        raise InputError(None, "--model", f"unknown model {model!r}: no {meta_file} ({hint})")
    try:
        meta = json.loads(meta_file.read_text())
        head = load_head(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(path, "model", f"cannot load the saved model: {exc}") from exc
    missing = [k for k in ("run_id", "backbone", "head", "genes") if k not in meta]
    if missing:
        raise InputError(meta_file, ",".join(missing), "missing from run.json")
    return SavedModel(meta["run_id"], path, meta, head)


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How to embed new tiles so their vectors share the model's provenance.

    ``tile_um``: tile width, µm; ``embed_tile_um``: the value to pass to the pass (None when
    the training vectors used each slide's spot diameter, then the new slide's
    ``spot_diameter_um`` must equal ``tile_um``); ``record``: the full provenance record.
    """

    backbone: str
    tile_um: float
    embed_tile_um: float | None
    stain: str
    stain_template: str | None
    precision: str
    provenance_id: str
    record: dict[str, Any]


def _training_record(store: Store, sm: SavedModel) -> dict[str, Any]:
    if "+" in sm.backbone:
        raise ProvenanceError(
            f"{sm.path}: the model was trained on composite vectors ({sm.backbone}); infer embeds one "
            "backbone's tiles per pass and cannot rebuild them yet: train on a single vector table"
        )
    table = S.embedding_table_name(sm.backbone)
    want = sm.identity
    if not want:
        raise ProvenanceError(
            f"{sm.path}: the saved head records no provenance of its training vectors; cannot reproduce them"
        )
    for rec in existing_provenance(store, table):
        if vector_identity(rec) == want:
            return rec
    raise ProvenanceError(
        f"{sm.path}: this store ({store.path}) has no record of the model's training vectors ({sm.backbone}, "
        f"provenance {want.get('stain_method')}/{want.get('stain_template')}); infer needs the store "
        "the model was trained in, "
        "to reproduce its stain target and tile policy"
    )


def _training_tile_um(store: Store, sm: SavedModel, rec: dict[str, Any]) -> tuple[float, float | None]:
    value = rec.get("tile_um")
    if isinstance(value, (int, float)):
        return float(value), float(value)
    # "spot_diameter": the width actually used for the training slides' vectors
    table = S.embedding_table_name(sm.backbone)
    train = sm.meta.get("train_slides") or []
    where = f"provenance_id = '{provenance_id(rec)}'" + (f" AND slide_id IN ({sql_list(train)})" if train else "")
    widths = sorted({round(float(w), 6) for w in store.read(table, ["tile_um"], where=where)["tile_um"].to_pylist()})
    if len(widths) != 1:
        raise ProvenanceError(
            f"{sm.path}: the model's training tiles have "
            f"{'no recorded width' if not widths else f'several widths {widths} µm'}; "
            "cannot choose one tile width for new slides"
        )
    return widths[0], None


def _check_weights(sm: SavedModel, weights: str | None) -> None:
    from stimage_embed.backbones import get_spec
    from stimage_embed.backbones.weights import file_sha256, resolve_weights

    spec = get_spec(sm.backbone)
    want = sm.identity
    resolved = resolve_weights(spec, weights)  # WeightsUnavailableError when missing
    if json.dumps(spec.spec_hash()) != want.get("spec_hash"):
        raise ProvenanceError(
            f"{sm.path}: backbone {sm.backbone!r} is registered here with another spec (hash "
            f"{spec.spec_hash()[:12]}) than the "
            f"one the model was trained with ({json.loads(want.get('spec_hash', 'null'))!s:.12}); its "
            "vectors cannot be reproduced"
        )
    sha = file_sha256(resolved.path)
    wanted = json.loads(want.get("weights_sha256", "null"))
    if sha != wanted:
        raise ProvenanceError(
            f"{sm.path}: the model was trained on {sm.backbone} vectors from weights with sha256 "
            f"{str(wanted)[:16]}..., "
            f"but the weights found here ({resolved.source}: {resolved.path}) have sha256 {sha[:16]}...; "
            "pass --weights PATH to the weights file the model was trained with"
        )


def _check_stain_target(store: Store, rec: dict[str, Any]) -> None:
    """Refit the stain target as the embedding pass will (stored estimate of the template
    slide, else its thumbnail) and compare it with the one recorded with the vectors."""
    from stimage_embed.embeddings.tile_stream import stored_stain_estimates, template_normalizer

    method, template = rec.get("stain_method"), rec.get("stain_template")
    if method in (None, "none"):
        return
    cols = [c for c in ("slide_id", "image_path", "stain_estimate") if c in store.dataset("slides").schema.names]
    slides = pl.from_arrow(store.read("slides", cols))
    row = slides.filter(pl.col("slide_id") == template)
    if template is None or row.height == 0:
        raise ProvenanceError(
            f"{store.path}: the model's stain target was fitted on template slide {template!r}, which "
            "is not in the store; "
            "its fitted normaliser cannot be reproduced"
        )
    image_path = row["image_path"][0]
    try:
        target = template_normalizer(method, image_path, stored_stain_estimates(row).get(template))
    except StimageError as exc:
        raise ProvenanceError(
            f"the model's stain template slide {template!r} cannot be read to refit its stain target: {exc}"
        ) from exc
    want = (rec.get("stain") or {}).get("target_hash")
    if want is not None and target.target_hash != want:
        raise ProvenanceError(
            f"{image_path}: the {method} stain target refitted on template slide {template!r} (hash "
            f"{target.target_hash[:12]}) "
            f"differs from the one the model's vectors used ({want[:12]}); was the image replaced?"
        )


def embedding_recipe(
    store: Store, sm: SavedModel, weights: str | None = None, check_stain: bool = True
) -> EmbeddingRecipe:
    """Check that the model's training-vector provenance can be reproduced; return how.

    Raises :class:`ProvenanceError` (or ``WeightsUnavailableError``) naming what is missing:
    weights, the provenance record, a single tile width, the stain template
    (``check_stain=False`` defers that, the costly check, to :func:`check_stain_target`).
    """
    if not store.has_table("slides"):
        raise StoreError(f"{store.path}: empty store; infer needs the store the model was trained in")
    _check_weights(sm, weights)
    rec = _training_record(store, sm)
    tile_um, embed_tile_um = _training_tile_um(store, sm, rec)
    if check_stain:
        _check_stain_target(store, rec)
    return EmbeddingRecipe(
        backbone=sm.backbone,
        tile_um=tile_um,
        embed_tile_um=embed_tile_um,
        stain=rec.get("stain_method") or "none",
        stain_template=rec.get("stain_template"),
        precision=rec.get("precision") or "float32",
        provenance_id=provenance_id(rec),
        record=rec,
    )


def check_stain_target(store: Store, recipe: EmbeddingRecipe) -> None:
    """The stain part of :func:`embedding_recipe` (refits the template's target)."""
    _check_stain_target(store, recipe.record)
