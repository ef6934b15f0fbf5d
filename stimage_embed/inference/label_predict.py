"""A saved label model (``train --head label``) applied to slides: ``predict --model RID
--slide S`` and ``infer --model RID IMAGE`` write per-spot (per-tile) class probabilities and
the predicted class into ``label_predictions`` (long: one row per spot x class; schema in
:mod:`stimage_embed.store.schema_labels`), from the image vectors only.

``predict`` also scores slides whose spots carry labels of the model's label set (balanced
accuracy, macro-F1) and, with ``--out``, draws a class map per slide; ``infer`` writes an
AnnData (``X``: class probabilities, ``obs['label']``: the predicted class) and a class map
over the slide's thumbnail.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import polars as pl

from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.evaluation.label_metrics import label_scores
from stimage_embed.inference.label_maps import class_map
from stimage_embed.inference.predict_tiles import TilePredictions, check_vector_provenance
from stimage_embed.predictions.arrays import load_embeddings, table_provenance
from stimage_embed.predictions.label_store import prediction_rows, replace_label_predictions
from stimage_embed.predictions.registry import HEADS
from stimage_embed.predictions.runs import commit_run_row, model_run_row
from stimage_embed.store.labels import LABELS_TABLE
from stimage_embed.store.store import Store, sql_list

if TYPE_CHECKING:
    from stimage_embed.inference.grid import TileGrid
    from stimage_embed.inference.model import SavedModel
    from stimage_embed.inference.slide_from_image import ImageInfo

log = logging.getLogger(__name__)


def is_label_head(name: str) -> bool:
    """Whether head ``name`` learns a label set (registry output ``label``)."""
    spec = HEADS.get(name)
    return spec is not None and spec.output == "label"


def is_label_model(store: Store, model: str) -> bool:
    """Whether ``model`` (run id or folder) is a saved label head; False when it cannot be
    read (the caller's loader then reports what is wrong)."""
    path = Path(model).expanduser()
    meta = (path if path.is_dir() else store.models_dir / model) / "run.json"
    try:
        head = json.loads(meta.read_text()).get("head")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False
    return isinstance(head, str) and is_label_head(head)


def _observed(store: Store, label_set: str | None, keys: pl.DataFrame) -> np.ndarray | None:
    """The stored labels of ``keys`` in ``label_set`` (None where the store has none)."""
    if not label_set or not store.has_table(LABELS_TABLE) or keys.height == 0:
        return None
    where = f"label_set = {sql_list([label_set])} AND slide_id IN ({sql_list(sorted(set(keys['slide_id'])))})"
    lab = pl.from_arrow(store.read(LABELS_TABLE, ["slide_id", "spot_id", "label"], where=where))
    joined = keys.select("slide_id", "spot_id").join(lab, on=["slide_id", "spot_id"], how="left", maintain_order="left")
    return None if joined["label"].null_count() == joined.height else joined["label"].to_numpy()


def _check_model_vectors(store: Store, sm: SavedModel) -> dict:
    """The store's provenance record of the model's vectors, after checking they are the
    training vectors (:class:`~stimage_embed.embeddings.provenance.VectorProvenance`) and are
    normalised against the store's current stain target."""
    from stimage_embed.embeddings.provenance import VectorProvenance, describe
    from stimage_embed.embeddings.stain_target import check_table_target

    prov = table_provenance(store, sm.backbone)
    diff = sm.identity.differences(VectorProvenance.of(prov))
    if diff:
        raise ProvenanceError(
            f"{sm.path}: the store's {sm.backbone} vectors differ from the training vectors: "
            f"provenance mismatch: {describe(diff, 'model', 'store')}"
        )
    for table in sm.source.tables:
        check_table_target(store, table)
    return prov


def predict_labels(store: Store, model: str, slides: Sequence[str]) -> pl.DataFrame:
    """Class probabilities of every spot with vectors of ``slides`` (with or without counts);
    replaces the model's ``label_predictions`` rows of those slides. Returns the rows."""
    from stimage_embed.embeddings.provenance import provenance_id
    from stimage_embed.inference.model import load_saved_model

    with store.writer("predict"):
        sm = load_saved_model(store, model)
        prov = _check_model_vectors(store, sm)
        unknown = sorted(set(slides) - set(store.slide_ids()))
        if unknown or not slides:
            raise InputError(None, "--slide", f"slides not in the store: {unknown or 'none given'}")
        keys, X = load_embeddings(store, sm.backbone, list(slides))
        if keys.height == 0:
            raise InputError(None, "--slide", f"no {sm.backbone} vectors for slides {list(slides)}: run embed first")
        rows = prediction_rows(
            sm.run_id, keys, sm.head.predict_proba(X), sm.genes, _observed(store, sm.meta.get("label_set"), keys)
        )
        # a model trained elsewhere: its predictions belong to a committed run
        commit_run_row(store, model_run_row(store, sm.meta, provenance_id(prov), str(sm.path)))
        replace_label_predictions(store, sm.run_id, list(slides), rows)
    return rows


def predict_label_lines(store: Store, model: str, slides: Sequence[str], out: Path | None = None) -> list[str]:
    """``predict`` of a label model: rows written, per labelled slide its scores, class maps in ``out``."""
    rows = predict_labels(store, model, slides)
    spots = rows.unique(["slide_id", "spot_id"], maintain_order=True)
    rid = rows["run_id"][0]
    lines = [f"{rows.height} label prediction rows written for {spots.height} spot(s), run {rid}"]
    for (sid,), g in spots.group_by("slide_id", maintain_order=True):
        have = g.filter(pl.col("observed").is_not_null())
        if have.height:
            s = label_scores(have["observed"].to_numpy(), have["label"].to_numpy())
            lines.append(
                f"slide {sid}: against its labels ({have.height} spots): balanced accuracy "
                f"{s.balanced_accuracy:.3f} (chance {s.chance_balanced_accuracy:.3f}), macro-F1 {s.macro_f1:.3f}"
            )
        if out is not None:
            xy = pl.from_arrow(
                store.read("spots", ["spot_id", "pixel_x", "pixel_y"], where=f"slide_id = {sql_list([sid])}")
            )
            xy = g.select("spot_id").join(xy, on="spot_id", how="left", maintain_order="left")
            png = class_map(Path(out) / sid / "class_map.png", xy.select("pixel_x", "pixel_y").to_numpy(), g["label"])
            lines.append(f"class map: {png}")
    return lines


def predict_label_tiles(store: Store, sm: SavedModel, slide_id: str, keys: pl.DataFrame) -> TilePredictions:
    """``infer``: class probabilities of the tiles of ``keys`` (their order), written to
    ``label_predictions``; ``values['proba']`` is (n_tiles, n_classes), columns = ``genes``."""
    check_vector_provenance(store, sm, slide_id)
    vkeys, X = load_embeddings(store, sm.backbone, [slide_id])
    row = {s: i for i, s in enumerate(vkeys["spot_id"].to_list())}
    missing = [s for s in keys["spot_id"].to_list() if s not in row]
    if missing:
        raise InputError(None, "--slide", f"{len(missing)} tile(s) of {slide_id!r} have no vectors, e.g. {missing[:3]}")
    proba = sm.head.predict_proba(X[[row[s] for s in keys["spot_id"].to_list()]])
    rows = prediction_rows(sm.run_id, keys.select("slide_id", "spot_id"), proba, sm.genes)
    replace_label_predictions(store, sm.run_id, [slide_id], rows)
    return TilePredictions(keys["spot_id"].to_numpy(), sm.genes, {"proba": proba.astype(np.float32)}, rows.height)


def write_label_outputs(
    out: Path,
    sid: str,
    sm: SavedModel,
    provenance: str | None,
    img: ImageInfo,
    grid: TileGrid,
    pred: TilePredictions,
    pb: pl.DataFrame | None = None,
    genes: list[str] | None = None,
    n_top_genes: int = 0,
    store: Store | None = None,
) -> tuple[Path, None, dict[str, Path]]:
    """``infer`` outputs of a label model (same arguments as ``infer.write_outputs``):
    ``<ID>.h5ad`` (``X`` = class probabilities, ``obs['label']``) and ``<ID>/class_map.png``."""
    from stimage_embed.inference.anndata_out import build_anndata, write_anndata

    proba = pred.values["proba"]
    classes = np.asarray(sm.genes)
    label = classes[np.argmax(proba, axis=1)]
    info = {"run_id": sm.run_id, "backbone": sm.backbone, "head": sm.head_name, "provenance_id": provenance}
    info |= {"image_path": str(img.path), "um_per_px_source": img.um_per_px_source}
    adata = build_anndata(
        sid, grid, TilePredictions(pred.spot_ids, sm.genes, {"prob_high": proba}), img.thumbnail, img.downsample, info
    )
    adata.uns["stimage_embed"]["X"] = "class_probability"
    adata.obs["label"] = pd.Categorical(label, categories=list(classes))
    h5ad = write_anndata(adata, out / f"{sid}.h5ad")
    xy = np.column_stack([grid.x, grid.y])
    title = f"{sid}: {sm.head_name}/{sm.backbone}, model {sm.run_id[:10]}"
    png = class_map(out / sid / "class_map.png", xy, label, classes, title, img.thumbnail, img.downsample)
    return h5ad, None, {"class_map": png}
