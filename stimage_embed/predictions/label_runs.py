"""Train and evaluate the ``label`` head: image vectors -> a categorical label per spot.

Rows are spots with both a vector of the backbone and a label of the label set. Folds are
leave-one-slide-out over the labelled slides, or an explicit train / test split. Nothing
but the vectors reaches a prediction; the labels of test slides are only scored.

Control ``shuffled_labels``: the training labels are permuted among the spots of each
training slide (class frequencies kept, image–label link broken); its scores must sit at
chance (balanced accuracy ~ 1 / n_classes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from stimage_embed.errors import InputError
from stimage_embed.predictions.arrays import embedded_slides, load_embeddings
from stimage_embed.predictions.registry import head_spec
from stimage_embed.store.labels import read_labels
from stimage_embed.store.store import Store, sql_list

CONTROLS = ("none", "shuffled_labels")


@dataclass
class LabelArrays:
    keys: pl.DataFrame  # slide_id, spot_id (sorted)
    X: np.ndarray  # (n, dim) float32 vectors
    y: np.ndarray  # (n,) str labels


@dataclass
class LabelRun:
    """One fold: the test spots' keys, true and predicted labels and class probabilities."""

    fold: str
    control: str
    train_slides: list[str]
    test_slides: list[str]
    keys: pl.DataFrame
    y_true: np.ndarray
    y_pred: np.ndarray
    proba: np.ndarray  # (n_test, n_classes), columns = classes
    classes: np.ndarray


def label_arrays(
    store: Store,
    backbone: str,
    label_set: str,
    slides: Sequence[str] | None = None,
    only_qc: bool = False,
    labels: pl.DataFrame | None = None,
) -> LabelArrays:
    """Vectors and labels of the spots that have both (restricted to ``slides``; to spots
    passing tissue QC with ``only_qc``). ``labels``: the label set's rows, if read already."""
    labels = pl.from_pandas(read_labels(store, label_set)) if labels is None else labels
    have = embedded_slides(store, backbone)
    wanted = sorted(set(labels["slide_id"]) & have if slides is None else set(slides))
    missing = sorted(set(wanted) - have)
    if missing or not wanted:
        raise InputError(
            store.path,
            "--labels",
            f"no {backbone} vectors for labelled slide(s) {missing or sorted(labels['slide_id'])}",
        )
    keys, X = load_embeddings(store, backbone, wanted)
    joined = keys.with_row_index("_row").join(labels, on=["slide_id", "spot_id"], how="inner").sort("_row")
    if only_qc:
        qc = pl.from_arrow(
            store.read("spots", ["slide_id", "spot_id", "passes_qc"], where=f"slide_id IN ({sql_list(wanted)})")
        )
        joined = joined.join(qc.filter(pl.col("passes_qc")), on=["slide_id", "spot_id"], how="inner").sort("_row")
    if joined.height == 0:
        raise InputError(store.path, "--labels", f"no spot of {wanted} has both a vector and a {label_set!r} label")
    rows = joined["_row"].to_numpy()
    return LabelArrays(joined.select("slide_id", "spot_id"), X[rows], joined["label"].to_numpy().astype(str))


def label_versions(labels: pl.DataFrame, slides: Sequence[str]) -> dict[str, str]:
    """Per slide, a content hash of its (spot_id, label) rows: part of a label run's id, so
    re-added labels make new runs."""
    out = {}
    for s in sorted(set(slides)):
        rows = labels.filter(pl.col("slide_id") == s).sort("spot_id")
        body = "\n".join(f"{a}\t{b}" for a, b in zip(rows["spot_id"], rows["label"]))
        out[s] = hashlib.sha256(body.encode()).hexdigest()[:16]
    return out


def shuffle_within(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """``y`` permuted among the rows of each group (seeded): the shuffled-labels control."""
    rng = np.random.default_rng(seed)
    out = y.copy()
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[idx] = y[rng.permutation(idx)]
    return out


def run_labels(
    store: Store,
    backbone: str,
    label_set: str,
    train_slides: Sequence[str] | None = None,
    test_slides: Sequence[str] | None = None,
    control: str = "none",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> list[LabelRun]:
    """Fit the label head per fold and predict the held-out slides (see the module doc)."""
    if control not in CONTROLS:
        raise InputError(None, "--control", f"expected one of {CONTROLS}, got {control!r}")
    explicit = train_slides is not None
    data = label_arrays(store, backbone, label_set, None if not explicit else [*train_slides, *test_slides])
    groups = data.keys["slide_id"].to_numpy()
    slides = sorted(set(groups))
    if explicit:
        folds = [(list(train_slides), list(test_slides))]
    elif len(slides) < 2:
        raise InputError(store.path, "--labels", f"leave-one-slide-out needs >= 2 labelled slides, got {slides}")
    else:
        folds = [([s for s in slides if s != t], [t]) for t in slides]
    runs = []
    for train, test in folds:
        tr, te = np.isin(groups, train), np.isin(groups, test)
        y_train = data.y[tr] if control == "none" else shuffle_within(data.y[tr], groups[tr], seed)
        head = head_spec("label").make(params).fit(data.X[tr], y_train)
        proba = head.predict_proba(data.X[te])
        runs.append(
            LabelRun(
                fold=",".join(test),
                control=control,
                train_slides=train,
                test_slides=test,
                keys=data.keys.filter(pl.Series(te)),
                y_true=data.y[te],
                y_pred=head.classes_[np.argmax(proba, 1)],
                proba=proba,
                classes=head.classes_,
            )
        )
    return runs
