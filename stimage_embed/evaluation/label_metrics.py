"""Metrics of a categorical label head: macro-F1, balanced accuracy, per-class F1 and the
confusion matrix (rows = true label, columns = predicted), all from one confusion matrix.

Definitions follow scikit-learn (``f1_score(average="macro")``, ``balanced_accuracy_score``):
a class absent from both truth and prediction has F1 0 and is left out of the macro mean
only when it is absent from the truth (``classes`` = the labels present in ``y_true``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl


@dataclass
class LabelScores:
    """Scores of predicted labels; ``chance_balanced_accuracy`` = 1 / number of classes."""

    classes: np.ndarray  # (k,) labels, the confusion matrix's row / column order
    confusion: np.ndarray  # (k, k) int counts, rows true, columns predicted
    per_class_f1: np.ndarray  # (k,)
    macro_f1: float
    balanced_accuracy: float
    accuracy: float
    n: int

    @property
    def chance_balanced_accuracy(self) -> float:
        return 1.0 / len(self.classes)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(k, k) counts of (true, predicted) over ``classes``; predictions outside ``classes``
    count as misses of their true row only."""
    idx = {c: i for i, c in enumerate(classes.tolist())}
    t = np.array([idx[c] for c in np.asarray(y_true).tolist()])
    p = np.array([idx.get(c, -1) for c in np.asarray(y_pred).tolist()])
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    ok = p >= 0
    np.add.at(cm, (t[ok], p[ok]), 1)
    return cm


def label_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: np.ndarray | None = None) -> LabelScores:
    """Scores of ``y_pred`` against ``y_true`` (both (n,) labels). ``classes`` default: the
    sorted labels of ``y_true`` (a label never true does not enter the macro means)."""
    y_true, y_pred = np.asarray(y_true).astype(str), np.asarray(y_pred).astype(str)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape}: expected two equal, non-empty 1-D arrays")
    classes = np.unique(y_true) if classes is None else np.asarray(classes).astype(str)
    cm = confusion(y_true, y_pred, classes)
    tp = np.diag(cm).astype(np.float64)
    support = np.array([(y_true == c).sum() for c in classes], dtype=np.float64)  # incl. predictions off `classes`
    predicted = np.array([(y_pred == c).sum() for c in classes], dtype=np.float64)
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    present = support > 0
    return LabelScores(
        classes=classes,
        confusion=cm,
        per_class_f1=f1,
        macro_f1=float(f1[present].mean()),
        balanced_accuracy=float(recall[present].mean()),
        accuracy=float((y_true == y_pred).mean()),
        n=len(y_true),
    )


#: the run columns every ``label_metrics`` row carries
RUN_COLUMNS = ("run_id", "dataset", "backbone", "head", "fold", "control", "label_set")


def slide_metric_rows(run: dict, slide_ids: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> pl.DataFrame:
    """``label_metrics`` rows of one run (``run``: the :data:`RUN_COLUMNS` values): per
    held-out slide of ``slide_ids`` (n,), its :func:`label_scores` as long rows."""
    rows = []
    for sid in sorted(set(np.asarray(slide_ids).tolist())):
        sel = np.asarray(slide_ids) == sid
        s = label_scores(y_true[sel], y_pred[sel])
        overall = {
            "macro_f1": s.macro_f1,
            "balanced_accuracy": s.balanced_accuracy,
            "accuracy": s.accuracy,
            "chance": s.chance_balanced_accuracy,
            "n_spots": float(s.n),
        }
        rows += [{"slide_id": sid, "metric": m, "class": None, "value": v} for m, v in overall.items()]
        rows += [
            {"slide_id": sid, "metric": "f1", "class": c, "value": float(f)} for c, f in zip(s.classes, s.per_class_f1)
        ]
    frame = pl.DataFrame(
        rows, schema={"slide_id": pl.String, "metric": pl.String, "class": pl.String, "value": pl.Float64}
    )
    return frame.with_columns(*(pl.lit(run[c], dtype=pl.String).alias(c) for c in RUN_COLUMNS))


def plot_confusion(scores: LabelScores, path: Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (fraction of each true class) as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = scores.confusion.astype(np.float64)
    frac = np.divide(cm, cm.sum(1, keepdims=True), out=np.zeros_like(cm), where=cm.sum(1, keepdims=True) > 0)
    k = len(scores.classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k))
    im = ax.imshow(frac, vmin=0, vmax=1, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), scores.classes, rotation=45, ha="right")
    ax.set_yticks(range(k), scores.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"macro-F1 {scores.macro_f1:.2f}, balanced acc. {scores.balanced_accuracy:.2f}")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
