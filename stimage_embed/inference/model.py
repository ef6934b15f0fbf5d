"""How to embed new tiles exactly as a saved model's training tiles were embedded, checked
*before* anything is written (``infer``, ``search --image``, ``explain``).

The model's training vectors fix the backbone spec and weights (sha256), the tile width
(µm) and input px, the stain method and fitted stain target, and the precision.
:func:`embedding_recipe` takes them from the model folder (``vectors.json``,
:mod:`stimage_embed.predictions.saved_model`), so a folder works on any store: the stain
target is the one recorded there (the normaliser's fitted parameters, not refitted from a
template slide). Folders written before ``vectors.json`` existed fall back to the records
of the store they were trained in. Anything that cannot be reproduced here is a one-line
error saying what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import polars as pl

from stimage_embed.embeddings.provenance import VectorProvenance, describe, existing_provenance, tile_widths_um
from stimage_embed.embeddings.stain_target import RecordedTarget
from stimage_embed.errors import InputError, ProvenanceError, StimageError
from stimage_embed.predictions.saved_model import VECTORS_FILE, SavedModel, load_saved_model
from stimage_embed.store.store import Store

__all__ = [
    "EmbeddingRecipe",
    "SavedModel",
    "check_stain_target",
    "check_table_accepts",
    "embedding_recipe",
    "load_saved_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingRecipe:
    """How to embed new tiles so their vectors share the model's provenance.

    ``tile_um``: tile width, µm; ``embed_tile_um``: the value to pass to the pass (None when
    the training vectors used each slide's spot diameter, then the new slide's
    ``spot_diameter_um`` must equal ``tile_um``); ``record``: the full provenance record;
    ``stain_target``: the recorded stain target to embed with (None: the store's template
    slide ``stain_template``, refitted, for a folder without ``vectors.json``).
    """

    backbone: str
    tile_um: float
    embed_tile_um: float | None
    stain: str
    stain_template: str | None
    precision: str
    provenance_id: str
    record: dict[str, Any]
    stain_target: RecordedTarget | None = None

    @property
    def stain_choice(self) -> RecordedTarget | str | None:
        """What the embedding pass takes as ``stain_template``: the recorded target, else the slide."""
        return self.stain_target if self.stain_target is not None else self.stain_template


def _check_source(sm: SavedModel) -> str:
    """The model's one spot-tile vector table (composites and context windows are refused)."""
    source = sm.source
    if source.is_composite or source.context_um is not None:
        raise ProvenanceError(
            f"{sm.path}: the model was trained on {'composite' if source.is_composite else 'context-window'} "
            f"vectors ({sm.backbone}); this embeds one backbone's spot tiles per pass and cannot rebuild them "
            "yet: train on a single spot-tile vector table"
        )
    if not sm.has_identity:
        raise ProvenanceError(
            f"{sm.path}: the saved head records no provenance of its training vectors; cannot reproduce them"
        )
    return source.table


def _training_record(store: Store, sm: SavedModel, table: str) -> tuple[dict[str, Any], float | None]:
    """The training vectors' full record and tile width (µm; None if not one), from the
    model folder (``vectors.json``), else from the store the model was trained in."""
    want = sm.identity
    if sm.vectors is not None:
        parts = [p for p in sm.vectors if p.get("table") == table]
        if not parts:
            raise InputError(sm.path / VECTORS_FILE, "parts", f"no record of the training vectors' table {table}")
        diff = want.differences(VectorProvenance.of(parts[0]["record"]))
        if diff:
            raise ProvenanceError(
                f"{sm.path}: {VECTORS_FILE} and head.json disagree on the training vectors "
                f"({describe(diff, 'head.json', VECTORS_FILE)})"
            )
        width = parts[0].get("tile_um")
        return parts[0]["record"], None if width is None else float(width)
    for rec in existing_provenance(store, table) if store.has_table("provenance") else []:
        prov = VectorProvenance.of(rec)
        if not want.differences(prov):
            widths = tile_widths_um(store, prov, [str(s) for s in sm.meta.get("train_slides") or []])
            return rec, widths[0] if len(widths) == 1 else None
    raise ProvenanceError(
        f"{sm.path}: the model folder has no {VECTORS_FILE} (saved by an older version) and this store "
        f"({store.path}) has no record of its training vectors ({sm.backbone}, stain "
        f"{want.stain_method}/{want.stain_template}); use the store it was trained in, or train it again"
    )


def _tile_um(sm: SavedModel, rec: dict[str, Any], width: float | None) -> tuple[float, float | None]:
    """(tile width µm, the pass's ``tile_um``: None for each slide's spot diameter)."""
    value = rec.get("tile_um")
    if isinstance(value, (int, float)):
        return float(value), float(value)
    if width is None:
        raise ProvenanceError(
            f"{sm.path}: the model's training tiles have no single recorded width; "
            "cannot choose one tile width for new slides"
        )
    return width, None


def _check_weights(sm: SavedModel, weights: str | None) -> None:
    """The backbone's spec and weights here must be the ones the training vectors used."""
    from stimage_embed.backbones import get_spec
    from stimage_embed.backbones.weights import file_sha256, resolve_weights

    spec = get_spec(sm.source.backbone)
    want = sm.identity
    resolved = resolve_weights(spec, weights)  # WeightsUnavailableError when missing
    if spec.spec_hash() != want.spec_hash:
        raise ProvenanceError(
            f"{sm.path}: backbone {sm.backbone!r} is registered here with another spec (hash "
            f"{spec.spec_hash()[:12]}) than the one the model was trained with ({want.spec_hash!s:.12}); its "
            "vectors cannot be reproduced"
        )
    sha = file_sha256(resolved.path)
    if sha != want.weights_sha256:
        raise ProvenanceError(
            f"{sm.path}: the model was trained on {sm.backbone} vectors from weights with sha256 "
            f"{str(want.weights_sha256)[:16]}..., "
            f"but the weights found here ({resolved.source}: {resolved.path}) have sha256 {sha[:16]}...; "
            "pass --weights PATH to the weights file the model was trained with"
        )


def _recorded_target(sm: SavedModel, rec: dict[str, Any]) -> RecordedTarget | None:
    """The stain target carried by the folder's record, rebuilt and checked against its hash."""
    where = sm.path / VECTORS_FILE
    target = RecordedTarget.from_record(rec, where)
    if target is None:
        return None
    norm = target.normalizer(where)
    want = VectorProvenance.of(rec).stain_target
    if want is not None and norm.target_hash != want:
        raise InputError(where, "stain", f"the stain target's parameters do not give its hash {str(want)[:12]}")
    return target


def _check_stain_target(store: Store, rec: dict[str, Any]) -> None:
    """Refit the stain target as the embedding pass will (stored estimate of the template
    slide, else its thumbnail) and compare it with the one recorded with the vectors (a
    folder without ``vectors.json``: the store's template slide is needed)."""
    from stimage_embed.embeddings.tile_stream import stored_stain_estimates, template_normalizer

    method, template = rec.get("stain_method"), rec.get("stain_template")
    if method in (None, "none"):
        return
    cols = [c for c in ("slide_id", "image_path", "stain_estimate") if c in store.dataset("slides").schema.names]
    row = pl.from_arrow(store.read("slides", cols)).filter(pl.col("slide_id") == template)
    if template is None or row.height == 0:
        raise ProvenanceError(
            f"{store.path}: the model's stain target was fitted on template slide {template!r}, which "
            "is not in the store; its fitted normaliser cannot be reproduced"
        )
    image_path = row["image_path"][0]
    try:
        target = template_normalizer(method, image_path, stored_stain_estimates(row).get(template))
    except StimageError as exc:
        raise ProvenanceError(
            f"the model's stain template slide {template!r} cannot be read to refit its stain target: {exc}"
        ) from exc
    want = VectorProvenance.of(rec).stain_target
    if want is not None and target.target_hash != want:
        raise ProvenanceError(
            f"{image_path}: the {method} stain target refitted on template slide {template!r} (hash "
            f"{target.target_hash[:12]}) differs from the one the model's vectors used ({want[:12]}); "
            "was the image replaced?"
        )


def embedding_recipe(
    store: Store, sm: SavedModel, weights: str | None = None, check_stain: bool = True
) -> EmbeddingRecipe:
    """Check that the model's training-vector provenance can be reproduced; return how.

    Raises :class:`ProvenanceError` (or ``WeightsUnavailableError``) naming what is missing:
    weights, the provenance record, a single tile width, the stain target (for a folder
    without ``vectors.json``, ``check_stain=False`` defers that, the costly refit, to
    :func:`check_stain_target`).
    """
    table = _check_source(sm)
    _check_weights(sm, weights)
    rec, width = _training_record(store, sm, table)
    tile_um, embed_tile_um = _tile_um(sm, rec, width)
    target = _recorded_target(sm, rec) if sm.vectors is not None else None
    if target is None and sm.vectors is None and check_stain:
        _check_stain_target(store, rec)
    prov = VectorProvenance.of(rec)
    return EmbeddingRecipe(
        backbone=sm.backbone,
        tile_um=tile_um,
        embed_tile_um=embed_tile_um,
        stain=prov.stain_method or "none",
        stain_template=prov.stain_template,
        precision=prov.precision or "float32",
        provenance_id=prov.id,
        record=rec,
        stain_target=target,
    )


def check_stain_target(store: Store, recipe: EmbeddingRecipe) -> None:
    """The deferred stain part of :func:`embedding_recipe` (refits the template's target;
    nothing to do for a recorded target)."""
    if recipe.stain_target is None:
        _check_stain_target(store, recipe.record)


def check_table_accepts(store: Store, recipe: EmbeddingRecipe) -> None:
    """Refuse, before anything is written, a store whose vector table holds vectors of
    another provenance than the model's (e.g. normalised against the store's own stain
    target): the new tiles' vectors could not join it (``provenance.check_compatible``)."""
    want = VectorProvenance.of(recipe.record)
    table = want.table_name
    for rec in existing_provenance(store, table) if store.has_table(table) else []:
        diff = VectorProvenance.of(rec).differences(want)
        if diff:
            raise ProvenanceError(
                f"{store.path}/{table}: holds vectors of another provenance than the model's training vectors "
                f"({describe(diff, 'store', 'model')}); infer into another store"
            )
