"""``search --image``: embed one region of a new image exactly as a vector table's rows were
embedded, without writing anything to the store.

The table's provenance is checked with the checks ``infer`` runs
(:func:`stimage_embed.inference.model.embedding_recipe`: backbone spec and weights sha256,
one tile width in µm, stain method and the recorded stain target, precision); a region whose
vector cannot carry that provenance is refused with one line. The tile is then cut and
normalised by the embedding pass's own stream (:class:`~stimage_embed.embeddings.tile_stream.TileStream`
with a :class:`~stimage_embed.embeddings.tile_stream.SlideStainFit` of the table's recorded
stain target) and embedded by the pass's forward at the recorded precision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from stimage_embed.embeddings.provenance import VectorProvenance
from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.inference.model import EmbeddingRecipe, SavedModel, embedding_recipe
from stimage_embed.predictions.arrays import table_provenance
from stimage_embed.predictions.saved_model import training_vectors
from stimage_embed.store.store import Store

log = logging.getLogger(__name__)

#: a query tile may reach past the image edge by at most this fraction of its area
MAX_PADDED = 0.25
QUERY_SLIDE = "<query>"


@dataclass
class QueryTile:
    """The embedded query region: ``vector`` float32 (dim,), the raw ``tile`` (uint8, the
    model's input px, before stain normalisation, for the montage), centre (level-0 px),
    tile width (µm) and the image's µm/px."""

    vector: np.ndarray
    tile: np.ndarray
    image: Path
    x: float
    y: float
    tile_um: float
    um_per_px: float


def table_recipe(store: Store, backbone: str, weights: str | None = None) -> EmbeddingRecipe:
    """How the table's vectors were embedded, checked reproducible here (``infer``'s checks)."""
    prov = VectorProvenance.of(table_provenance(store, backbone))
    stand_in = SavedModel(
        run_id="search",
        path=store.path,
        meta={"backbone": backbone, "train_slides": [], "genes": []},
        head=SimpleNamespace(provenance_=prov.saved()),
        vectors=training_vectors(store, prov.source, []),
    )
    try:
        return embedding_recipe(store, stand_in, weights)
    except ProvenanceError as exc:
        raise ProvenanceError(f"--image: the table's vectors cannot be reproduced for a new image: {exc}") from exc


def embed_region(
    store: Store,
    backbone: str,
    image: str | Path,
    um_per_px: float,
    x: float | None = None,
    y: float | None = None,
    weights: str | None = None,
    device: str = "auto",
) -> QueryTile:
    """Embed the tile centred on (``x``, ``y``) level-0 px of ``image`` (default: its centre)
    with the provenance of ``backbone``'s table (see the module doc)."""
    from heads.device import resolve_device
    from stimage_embed.backbones import create_model
    from stimage_embed.embeddings.embed_pass import _Model
    from stimage_embed.embeddings.tile_stream import Chunk, SlideJob, SlideStainFit, TileStream
    from stimage_embed.inference.slide_from_image import probe_image
    from stimage_embed.tiles.image import SlideImage

    path = probe_image(image, um_per_px)
    if um_per_px is None:
        raise InputError(path, "--um-per-px", "give the image's µm per pixel")
    recipe = table_recipe(store, backbone, weights)
    with SlideImage.open(path) as img:
        width, height = img.width, img.height
    cx = width / 2 if x is None else float(x)
    cy = height / 2 if y is None else float(y)
    if not (0 <= cx < width and 0 <= cy < height):
        raise InputError(path, "--x/--y", f"({cx:g}, {cy:g}) px is outside the {width} x {height} px image")
    stain = None if recipe.stain_target is None else SlideStainFit(recipe.stain_target.normalizer())
    dev = resolve_device(device)
    bb = create_model(backbone, weights=weights, device=str(dev))
    job = SlideJob(QUERY_SLIDE, str(path), float(um_per_px), recipe.tile_um)
    chunk = Chunk(QUERY_SLIDE, 0, ("query",), (cx,), (cy,))
    stream = TileStream([chunk], {QUERY_SLIDE: job}, (bb.input_size,), stain_factory=stain)
    batch = next(iter(stream.batches([chunk])))
    padded = float(batch["padded"][0])
    if padded > MAX_PADDED:
        raise InputError(
            path,
            "--x/--y",
            f"the {recipe.tile_um:g} µm tile at ({cx:g}, {cy:g}) px is {padded:.0%} outside the image "
            f"(at most {MAX_PADDED:.0%}); is --um-per-px right?",
        )
    with torch.inference_mode():
        vec = _Model(bb, dev, recipe.precision)(batch["tiles"][bb.input_size])[0]
    raw = TileStream([chunk], {QUERY_SLIDE: job}, (bb.input_size,), stain_factory=None)
    tile = next(iter(raw.batches([chunk])))["tiles"][bb.input_size][0].numpy()
    # rounded as the stored vectors are (float16), so a region already in the store is found at distance 0
    return QueryTile(vec.astype(np.float16).astype(np.float32), tile, path, cx, cy, recipe.tile_um, float(um_per_px))
