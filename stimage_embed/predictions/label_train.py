"""``train --head label --labels NAME``: fit the label head on the labelled spots of the
training slides and save it like every head (``<store>/models/<run_id>/``: the head via
``heads.save_head`` with its training vectors' provenance, and ``run.json``).

The model folder's ``run.json`` has the fields of every model, with ``genes`` replaced by
the class list (the columns of ``predict_proba``), plus ``label_set`` and ``classes``. The
run id comes from the same key builder as every run (configuration + per slide the content
version of its vectors and of its labels), so a retrain on changed labels is a new run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from stimage_embed.embeddings.provenance import VectorProvenance
from stimage_embed.embeddings.stain_target import check_same_target
from stimage_embed.embeddings.vector_source import VectorSource
from stimage_embed.errors import InputError
from stimage_embed.predictions.arrays import table_provenance
from stimage_embed.predictions.label_runs import label_arrays, label_versions
from stimage_embed.predictions.runner import make_head
from stimage_embed.predictions.runs import (
    commit_run_row,
    input_versions,
    model_run_row,
    run_identity,
    run_key,
)
from stimage_embed.predictions.saved_model import training_vectors, write_model_folder
from stimage_embed.store.labels import read_labels
from stimage_embed.store.store import Store

log = logging.getLogger(__name__)


def train_label(
    store: Store,
    backbone: str,
    head: str,
    label_set: str | None,
    train_slides: list[str],
    params: dict | None = None,
    only_qc: bool = True,
) -> tuple[str, Path]:
    """Fit the label head ``head`` on ``label_set`` over ``train_slides``; returns (run_id, model dir)."""
    import polars as pl

    from stimage_embed.predictions.train_predict import models_dir

    if not label_set:
        raise InputError(None, "--labels", f"{head} learns a label set: give --labels NAME (see `labels add`)")
    unknown = sorted(set(train_slides) - set(store.slide_ids()))
    if unknown or not train_slides:
        raise InputError(None, "--train", f"training slides not in the store: {unknown or 'none given'}")
    labels = pl.from_pandas(read_labels(store, label_set))
    source = VectorSource.parse(backbone)
    prov = VectorProvenance.of(table_provenance(store, backbone))
    tables = source.tables
    check_same_target(store, tables)
    versions = input_versions(store, tables, train_slides)  # refuses stale vectors
    data = label_arrays(store, backbone, label_set, train_slides, only_qc, labels)
    lv = label_versions(labels, train_slides)
    inputs = {s: {**{t: versions.get(s, {}).get(t) for t in tables}, "labels": lv[s]} for s in sorted(train_slides)}
    base = {"train": sorted(train_slides), "label_set": label_set, "only_qc": only_qc, "kind": "train"}
    config = run_key(base, backbone=backbone, provenance=prov.setup_id, head=head, params=params or {})
    rid, cid = run_identity(config, inputs, train_slides)
    t0 = time.perf_counter()
    try:
        model = make_head(head, params).fit(data.X, data.y)
    except ValueError as exc:  # e.g. a single class among the training spots
        raise InputError(None, "--labels", f"{label_set}: {exc}") from exc
    fit_s = time.perf_counter() - t0
    classes = [str(c) for c in model.classes_]
    meta = dict(run_id=rid, backbone=backbone, head=head, genes=classes, gene_spec=f"labels:{label_set}")
    meta |= dict(label_set=label_set, classes=classes, params=params or {}, train_slides=sorted(train_slides))
    meta |= dict(n_train_spots=int(data.X.shape[0]), fit_seconds=fit_s)
    vectors = training_vectors(store, source, train_slides)
    out = write_model_folder(models_dir(store) / rid, model, prov, meta, vectors)
    row = model_run_row(store, meta, prov.id, str(out), config_id=cid, inputs=inputs)
    with store.writer("train"):
        commit_run_row(store, row)
    log.info(
        "trained %s on %s (%d spots, classes %s) in %.1f s -> %s", head, backbone, len(data.y), classes, fit_s, out
    )
    return rid, out
