"""``train`` and ``predict``: fit one head on cached vectors and save it under the store;
apply a saved head to slides and write the ``predictions`` table.

A saved model is a folder ``<store>/models/<run_id>/``
(:mod:`stimage_embed.predictions.saved_model`: the head, ``run.json`` and ``vectors.json``).
``predict`` refuses vectors whose provenance differs from the training vectors'
(:meth:`VectorProvenance.differences`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import polars as pl

from stimage_embed.embeddings.provenance import VectorProvenance, describe
from stimage_embed.embeddings.stain_target import check_same_target, check_table_target
from stimage_embed.embeddings.vector_source import VectorSource
from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.predictions.arrays import load_spot_arrays, table_provenance
from stimage_embed.predictions.genes import fold_genes
from stimage_embed.predictions.registry import head_names
from stimage_embed.predictions.runner import fit_head, make_head, predict_head
from stimage_embed.predictions.runs import (
    commit_run_row,
    input_versions,
    model_run_row,
    run_identity,
    run_key,
)
from stimage_embed.predictions.saved_model import load_saved_model, training_vectors, write_model_folder
from stimage_embed.predictions.training_ref import drop_reference, keeps_training, write_reference
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)


def models_dir(store: Store) -> Path:
    """Local folder of the store's model folders (``Store.models_dir``: ``<store>/models``,
    or ``--models-dir`` for a store on object storage)."""
    return store.models_dir


def train(
    store: Store,
    backbone: str,
    head: str,
    genes: str,
    train_slides: list[str],
    params: dict | None = None,
    only_qc: bool = True,
    labels: str | None = None,
    copy_vectors: bool = False,
) -> tuple[str, Path]:
    """Fit ``head`` on ``backbone`` vectors of ``train_slides``; returns (run_id, model dir).
    ``labels``: the label set a label head learns (:mod:`.label_train`). A head that keeps
    its training spots (``knn``) saves a reference to them in this store
    (:mod:`.training_ref`), or with ``copy_vectors`` a copy of their vectors and profiles."""
    no_copy = InputError(None, "--knn-copy-vectors", f"the {head} head keeps no training vectors to copy (knn does)")
    if head in head_names(output="label"):
        from stimage_embed.predictions.label_train import train_label

        if copy_vectors:
            raise no_copy

        return train_label(store, backbone, head, labels, train_slides, params, only_qc)
    fitted = head_names(spans_backbones=False)
    if head not in fitted:
        raise InputError(
            None,
            "--head",
            f"train fits one backbone's head: {', '.join(fitted)} "
            "(heads spanning backbones are built by `compare` from runs of several backbones)",
        )
    if copy_vectors and not keeps_training(make_head(head, params)):
        raise no_copy
    known = set(store.slide_ids())
    unknown = sorted(set(train_slides) - known)
    if unknown or not train_slides:
        raise InputError(None, "--train", f"training slides not in the store: {unknown or 'none given'}")
    source = VectorSource.parse(backbone)
    prov = VectorProvenance.of(table_provenance(store, backbone))
    tables = source.tables
    check_same_target(store, tables)
    inputs = input_versions(store, tables, train_slides)  # refuses stale vectors
    gene_list = fold_genes(store, train_slides, genes)
    arrays = load_spot_arrays(store, backbone, train_slides, gene_list, only_qc=only_qc)
    base = {"train": sorted(train_slides), "genes": gene_list, "only_qc": only_qc, "kind": "train"}
    config = run_key(base, backbone=backbone, provenance=prov.setup_id, head=head, params=params or {})
    rid, cid = run_identity(config, inputs, train_slides)
    t0 = time.perf_counter()
    model = fit_head(head, make_head(head, params), arrays)
    fit_s = time.perf_counter() - t0
    meta = dict(run_id=rid, backbone=backbone, head=head, genes=gene_list, gene_spec=genes, params=params or {})
    meta |= dict(train_slides=sorted(train_slides), n_train_spots=int(arrays.X.shape[0]), fit_seconds=fit_s)
    out = models_dir(store) / rid
    if keeps_training(model) and not copy_vectors:  # reference the training spots, do not copy them
        write_reference(out, store, backbone, arrays, inputs, prov.id, only_qc)
        model = model.without_training()
    else:
        drop_reference(out)
    write_model_folder(out, model, prov, meta, training_vectors(store, source, train_slides))
    row = model_run_row(store, meta, prov.id, str(out), config_id=cid, inputs=inputs)
    with store.writer("train"):
        commit_run_row(store, row)
    log.info(
        "trained %s on %s (%d spots, %d genes) in %.1f s -> %s",
        head,
        backbone,
        arrays.X.shape[0],
        len(gene_list),
        fit_s,
        out,
    )
    return rid, out


def predict(store: Store, model: str, slides: list[str], all_spots: bool = True) -> pl.DataFrame:
    """Apply a saved model to ``slides``; replaces its rows of ``predictions`` for them.

    Under the store's writer lock; the model's ``runs`` row (split ``train``) is written if
    the store lacks it (a model trained elsewhere), then the predictions replace the old
    ones in ONE atomic ``merge_insert`` keyed on (run_id, slide_id, spot_id, gene): a kill
    leaves the old rows or the new ones, never neither. The run id must be hex (a hash)."""
    sm = load_saved_model(store, model)
    path, rid, meta = sm.path, sm.run_id, sm.meta
    with store.writer("predict"):
        prov = VectorProvenance.of(table_provenance(store, meta["backbone"]))
        diff = sm.identity.differences(prov)
        if diff:
            raise ProvenanceError(
                f"{path}: the store's {meta['backbone']} vectors differ from the training vectors: "
                f"provenance mismatch: {describe(diff, 'model', 'store')}"
            )
        for table in sm.source.tables:  # normalised against the store's current stain target
            check_table_target(store, table)
        unknown = sorted(set(slides) - set(store.slide_ids()))
        if unknown or not slides:
            raise InputError(None, "--slide", f"slides not in the store: {unknown or 'none given'}")
        arrays = load_spot_arrays(store, meta["backbone"], slides, meta["genes"], only_qc=not all_spots)
        pred = predict_head(meta["head"], sm.head, arrays).with_columns(pl.lit(rid).alias("run_id"))
        # make the predictions attributable to a committed run (a model trained elsewhere)
        commit_run_row(store, model_run_row(store, meta, prov.id, str(path)))
        store.replace_where(
            "predictions",
            pred,
            ("run_id", "slide_id", "spot_id", "gene"),
            f"run_id = '{rid}' AND slide_id IN ({sql_list(slides)})",
        )
    return pred
