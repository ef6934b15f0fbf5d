"""A saved model as a function of RGB tiles: tile -> the model's stain normalisation ->
its backbone's preprocessing and forward pass -> the head -> one gene's prediction.

Everything that fixes the vectors is reproduced from the model's training provenance with the
code ``infer`` uses (:func:`stimage_embed.inference.model.embedding_recipe`: backbone spec and
weights sha256, tile width in µm, stain method and the recorded stain target, precision), so an
unperturbed tile gives the vector the embedding pass stored for it (rounded to float16 like
the stored vectors) and the prediction ``predict`` made from it. When any part cannot be
reproduced the recipe raises its one-line error before anything runs.

The value is the gene's predicted log1p(CP10k) (``mean_log1p``), P(high) (``prob_high``)
for a classifier head (``highlow``), or P(class) (``prob_class``) for a label model
(``train --head label``), whose "genes" are its classes: ``--gene`` names the class.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from heads.device import resolve_device
from stimage_embed.backbones import create_model
from stimage_embed.embeddings.embed_pass import _Model
from stimage_embed.embeddings.embed_plan import stain_target
from stimage_embed.embeddings.tile_stream import SlideStainFit
from stimage_embed.errors import InputError
from stimage_embed.inference.model import EmbeddingRecipe, SavedModel, embedding_recipe, load_saved_model
from stimage_embed.predictions.arrays import SpotArrays
from stimage_embed.predictions.registry import head_spec
from stimage_embed.predictions.runner import predict_head
from stimage_embed.store.store import Store
from stimage_embed.tiles.image import SlideImage
from stimage_embed.tiles.window import TileGeometry, TileReader

#: the value explained, by the head's registry output kind (default ``mean_log1p``)
VALUE_BY_OUTPUT = {"classifier": "prob_high", "label": "prob_class"}


def value_column(sm: SavedModel) -> str:
    """The value explained: ``prob_high`` (classifiers), ``prob_class`` (label models), else ``mean_log1p``."""
    return VALUE_BY_OUTPUT.get(head_spec(sm.head_name).output, "mean_log1p")


def check_gene(sm: SavedModel, gene: str) -> None:
    """One line when ``gene`` is not one of the model's genes (a label model's classes)."""
    if gene not in sm.genes:
        shown = ", ".join(sm.genes[:20]) + (" ..." if len(sm.genes) > 20 else "")
        if value_column(sm) == "prob_class":
            msg = f"{gene!r} is not a class of label model {sm.run_id}; its classes: {shown}"
        else:
            msg = f"{gene!r} is not predicted by model {sm.run_id}; its genes: {shown}"
        raise InputError(None, "--gene", msg)


@dataclass
class TileModel:
    """The model as a function of tiles (see the module docstring). ``tile_um``: tile width,
    µm; ``tile_px``: the backbone's input width, px; ``stain_fit``: per-slide stain fit (None
    for ``stain none``)."""

    sm: SavedModel
    recipe: EmbeddingRecipe
    forward: _Model
    stain_fit: SlideStainFit | None
    tile_px: int
    batch_size: int = 32

    @property
    def tile_um(self) -> float:
        return self.recipe.tile_um

    @property
    def column(self) -> str:
        return value_column(self.sm)

    def reader(self, slide_id: str, image: SlideImage, um_per_px: float) -> TileReader:
        """A reader of raw (not stain-normalised) tiles of the model's width and input px."""
        return TileReader(image, um_per_px, TileGeometry(self.tile_um, self.tile_px))

    def normalizer(self, slide_id: str, image: SlideImage) -> Callable[[np.ndarray], np.ndarray] | None:
        """The slide's tile stain transform, fitted as the embedding pass fits it."""
        return None if self.stain_fit is None else self.stain_fit.for_slide(slide_id, image)

    def vectors(self, tiles: np.ndarray, normalize: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
        """float32 (N, dim) vectors of RGB tiles (N, px, px, 3), rounded through float16 as stored."""
        out = []
        for start in range(0, len(tiles), self.batch_size):
            batch = np.ascontiguousarray(np.clip(tiles[start : start + self.batch_size], 0, 255).astype(np.uint8))
            if normalize is not None:
                batch = np.stack([normalize(t) for t in batch])
            with torch.inference_mode():
                out.append(self.forward(torch.from_numpy(batch)))
        return np.concatenate(out).astype(np.float16).astype(np.float32)

    def predict_vectors(self, X: np.ndarray, genes: list[str]) -> np.ndarray:
        """(N, len(genes)) predicted values (``column``) of vectors ``X`` (classes for a label model)."""
        if self.column == "prob_class":  # columns of predict_proba = the model's classes (run.json genes)
            proba = np.asarray(self.sm.head.predict_proba(X), np.float64)
            return proba[:, [self.sm.genes.index(g) for g in genes]]
        keys = pl.DataFrame({"slide_id": ["_"] * len(X), "spot_id": [str(i) for i in range(len(X))]})
        arrays = SpotArrays(keys, X, None, None, self.sm.genes, self.sm.identity.identity())
        pred = predict_head(self.sm.head_name, self.sm.head, arrays)
        wide = np.asarray(pred[self.column].to_numpy(), np.float64).reshape(len(X), len(self.sm.genes))
        return wide[:, [self.sm.genes.index(g) for g in genes]]

    def classifier(
        self, gene: str, normalize: Callable[[np.ndarray], np.ndarray] | None
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``tiles (N, px, px, 3) -> (N, 1)`` predicted value of ``gene`` (LIME's classifier_fn)."""
        check_gene(self.sm, gene)

        def fn(tiles: np.ndarray) -> np.ndarray:
            return self.predict_vectors(self.vectors(np.asarray(tiles), normalize), [gene])

        return fn


def load_tile_model(
    store: Store, model: str, weights: str | None = None, device: str = "auto", batch_size: int = 32
) -> TileModel:
    """The saved model ``model`` (run id or folder) as a :class:`TileModel`; one-line errors
    for an unknown run, a context head, weights or a stain target that cannot be reproduced."""
    sm = load_saved_model(store, model)
    if getattr(sm.head, "spatial_context", False):
        raise InputError(None, "--model", f"model {sm.run_id}: a {sm.head_name} head reads neighbouring tiles")
    recipe = embedding_recipe(store, sm, weights)
    dev = resolve_device(device)
    bb = create_model(sm.backbone, weights=weights, device=str(dev))
    _, fit, _, _ = stain_target(store, [sm.backbone], recipe.stain, recipe.stain_choice, set())
    return TileModel(sm, recipe, _Model(bb, dev, recipe.precision), fit, bb.input_size, batch_size)
