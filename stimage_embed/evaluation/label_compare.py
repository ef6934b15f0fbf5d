"""The ``label`` head in ``compare``: a categorical label per spot (``labels`` table, label
set ``CompareConfig.labels``) learned from each backbone's vectors on the same folds as the
expression heads.

A fold's label run trains on the labelled spots of its training slides and predicts the
labelled spots of its test slides (folds whose test or training slides carry no label are
skipped). Its id comes from the same key builder as every run
(:func:`stimage_embed.predictions.runs.run_identity`): the configuration (fold, backbone
and vector provenance, label set, head parameters, control) and, per slide, the content
version of its vectors and of its labels, so a rerun reuses it and re-added labels or
re-embedded vectors recompute. Rows: ``label_predictions``, ``label_metrics`` (per run x
held-out slide) and the ``runs`` row (``gene_spec`` = ``labels:<set>``, ``genes`` = the
classes).

Control ``shuffled``: the training labels are permuted among the spots of each training
slide (class frequencies kept, the image-label link broken); its balanced accuracy must sit
at chance (1 / classes).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from stimage_embed.embeddings.provenance import provenance_id, setup_id
from stimage_embed.errors import InputError
from stimage_embed.evaluation.label_metrics import slide_metric_rows
from stimage_embed.evaluation.splits import Fold
from stimage_embed.predictions.arrays import vector_parts
from stimage_embed.predictions.label_runs import LabelArrays, label_arrays, label_versions, shuffle_within
from stimage_embed.predictions.label_store import prediction_rows, reusable_label_runs, write_label_runs
from stimage_embed.predictions.registry import head_spec
from stimage_embed.predictions.runner import head_config, make_head
from stimage_embed.predictions.runs import input_versions, run_identity, runs_row
from stimage_embed.store import schema as S
from stimage_embed.store.labels import read_labels
from stimage_embed.store.store import Store

if TYPE_CHECKING:
    from stimage_embed.evaluation.compare import CompareConfig

log = logging.getLogger(__name__)


def label_heads(heads: list[str]) -> list[str]:
    """The heads of ``heads`` that learn a label set (registry output ``label``)."""
    return [h for h in heads if head_spec(h).output == "label"]


@dataclass
class LabelPlan:
    """What the label heads of one ``compare`` call run: checked before anything is written."""

    label_set: str
    labels: pl.DataFrame  # slide_id, spot_id, label
    folds: list[tuple[str, Fold]]  # (dataset, fold) with labelled training and test slides
    heads: list[str]
    run_ids: list[str] = field(default_factory=list)
    computed: int = 0
    reused: int = 0


def plan_labels(store: Store, cfg: CompareConfig, folds: list[tuple[str, Fold]]) -> LabelPlan | None:
    """The label heads' plan (None without one): the label set must exist and label spots
    of at least one fold's training and test slides."""
    heads = label_heads(cfg.heads)
    if not heads:
        return None
    labels = pl.from_pandas(read_labels(store, cfg.labels or ""))
    have = set(labels["slide_id"])
    usable = [(ds, f) for ds, f in folds if have & set(f.train_slides) and have & set(f.test_slides)]
    if not usable:
        raise InputError(
            store.path,
            "--labels",
            f"label set {cfg.labels!r} labels slides {sorted(have)}: no fold has labelled training and test slides",
        )
    if len(usable) < len(folds):
        log.warning(
            "label set %r: %d fold(s) without labelled train/test slides skipped", cfg.labels, len(folds) - len(usable)
        )
    return LabelPlan(cfg.labels or "", labels, usable, heads)


def _slides(plan: LabelPlan) -> list[str]:
    have = set(plan.labels["slide_id"])
    return sorted(have & {s for _, f in plan.folds for s in (*f.train_slides, *f.test_slides)})


def run_label_plan(store: Store, cfg: CompareConfig, plan: LabelPlan, controls: list[str], provs: dict) -> LabelPlan:
    """Run (or reuse) every fold x backbone x label head x control of ``plan``; one write
    batch per backbone. Returns ``plan`` with its run ids and counts filled in."""
    slides = _slides(plan)
    lv = label_versions(plan.labels, slides)
    for backbone in cfg.backbones:
        tables = sorted(S.embedding_table_name(p) for p in vector_parts(backbone))
        versions = input_versions(store, tables, slides)
        inputs = {s: {**{t: versions[s][t] for t in tables}, "labels": lv[s]} for s in slides}
        data: LabelArrays | None = None
        todo = []
        for head in plan.heads:
            params = cfg.head_params.get(head, {})
            for ds, fold in plan.folds:
                train = sorted(set(fold.train_slides) & set(lv))
                test = sorted(set(fold.test_slides) & set(lv))
                for control in controls:
                    config = {
                        "dataset": ds,
                        "split": cfg.split if cfg.train_slides is None else "explicit",
                        "fold": fold.name,
                        "train": train,
                        "test": test,
                        "label_set": plan.label_set,
                        "only_qc": cfg.only_qc,
                        "control": control,
                        "backbone": backbone,
                        "provenance": setup_id(provs[backbone]),
                        "head": head,
                        "params": params,
                        "effective_params": head_config(head, params),
                    }
                    rid, cid = run_identity(config, inputs, [*train, *test])
                    plan.run_ids.append(rid)
                    todo.append((rid, cid, config, {s: inputs[s] for s in (*train, *test)}))
        done = reusable_label_runs(store, [t[0] for t in todo])
        plan.reused += sum(t[0] in done for t in todo)
        computed = []
        for rid, cid, config, run_inputs in (t for t in todo if t[0] not in done):
            data = data or label_arrays(store, backbone, plan.label_set, slides, cfg.only_qc, plan.labels)
            run = _fit_label_run(data, rid, cid, config, params=cfg.head_params.get(config["head"], {}))
            if run is not None:
                run[0].update(
                    provenance_ids=[provenance_id(provs[backbone])],
                    input_versions=json.dumps(run_inputs, sort_keys=True),
                )
                computed.append(run)
        if computed:
            plan.computed += len(write_label_runs(store, computed))
    return plan


def _fit_label_run(
    data: LabelArrays, rid: str, cid: str, config: dict, params: dict
) -> tuple[dict, pl.DataFrame, pl.DataFrame] | None:
    """Fit one label run on ``data``'s training rows, predict and score its test rows."""
    groups = data.keys["slide_id"].to_numpy()
    tr, te = np.isin(groups, config["train"]), np.isin(groups, config["test"])
    y_train = data.y[tr] if config["control"] == "none" else shuffle_within(data.y[tr], groups[tr], seed=0)
    if len(np.unique(y_train)) < 2 or not te.any():
        log.warning("label run %s (%s): fewer than 2 training classes or no test spot; skipped", rid, config["fold"])
        return None
    t0 = time.perf_counter()
    head = make_head(config["head"], params).fit(data.X[tr], y_train)
    fit_s = time.perf_counter() - t0
    proba = head.predict_proba(data.X[te])
    classes = np.asarray(head.classes_).astype(str)
    y_pred = classes[np.argmax(proba, axis=1)]
    row = runs_row(
        run_id=rid,
        dataset=config["dataset"],
        backbone=config["backbone"],
        members=[config["backbone"]],
        head=config["head"],
        split=config["split"],
        fold=config["fold"],
        train_slides=config["train"],
        test_slides=config["test"],
        gene_spec=f"labels:{config['label_set']}",
        genes=classes.tolist(),
        params=params,
        provenance_ids=[],
        n_train_spots=int(tr.sum()),
        fit_seconds=fit_s,
        control=config["control"],
        config_id=cid,
    )
    keys = data.keys.filter(pl.Series(te))
    pred = prediction_rows(rid, keys, proba, classes, observed=data.y[te])
    run = {**{c: config[c] for c in ("dataset", "backbone", "head", "fold", "control", "label_set")}, "run_id": rid}
    return row, pred, slide_metric_rows(run, groups[te], data.y[te], y_pred)
