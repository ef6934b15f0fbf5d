"""Treatment response from expression: an RBF-SVM scored by nested stratified CV (sklearn).

The model is ``make_pipeline(StandardScaler(), SVC(kernel="rbf"))``. The outer loop is a
stratified ``n_outer``-fold split (shuffled, ``seed``); inside each outer training set a
``GridSearchCV`` over ``C`` x ``gamma`` (stratified ``n_inner`` folds, same seed, scored by
ROC AUC) chooses the hyper-parameters, refits on the whole outer training set, and the
held-out fold is scored by ROC AUC of the SVM's decision function. No held-out unit
reaches the scaler, the grid search or the fit of its own fold.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from stimage_embed.errors import InputError

#: the inner grid (STimage's RBF-SVM: C and gamma)
DEFAULT_GRID = {"svc__C": [0.1, 1.0, 10.0, 100.0], "svc__gamma": ["scale", 1e-3, 1e-2, 1e-1]}


@dataclasses.dataclass
class ResponseResult:
    """Per outer fold: AUC, chosen C and gamma, n; ROC points per fold; the mean AUC."""

    folds: pl.DataFrame  # fold, n_test, n_positive, auc, C, gamma
    roc: pl.DataFrame  # fold, fpr, tpr
    auc_mean: float
    auc_sd: float


def svm_search(n_inner: int = 5, seed: int = 0, grid: dict | None = None) -> GridSearchCV:
    """The inner model: scaler + RBF-SVM tuned by stratified ``n_inner``-fold grid search."""
    inner = StratifiedKFold(n_inner, shuffle=True, random_state=seed)
    pipe = make_pipeline(StandardScaler(), SVC(kernel="rbf"))
    return GridSearchCV(pipe, grid or DEFAULT_GRID, cv=inner, scoring="roc_auc")


def binary_labels(values: list, positive: str | None = None, field: str = "--label") -> np.ndarray:
    """0/1 labels from a column with two distinct values; ``positive`` names the 1 class
    (default: the value ``1`` / ``true`` / ``yes`` when the column has it)."""
    text = [str(v) for v in values]
    kinds = sorted(set(text))
    if len(kinds) != 2:
        raise InputError(None, field, f"expected two classes, found {len(kinds)}: {', '.join(kinds[:10])}")
    if positive is None:
        known = [k for k in kinds if k.lower() in ("1", "1.0", "true", "yes", "pcr", "responder")]
        if len(known) != 1:
            raise InputError(None, "--positive", f"name the positive class: one of {', '.join(kinds)}")
        positive = known[0]
    if positive not in kinds:
        raise InputError(None, "--positive", f"{positive!r} is not a class (classes: {', '.join(kinds)})")
    return np.array([t == positive for t in text], dtype=int)


def nested_cv_auc(
    x: np.ndarray, y: np.ndarray, n_outer: int = 5, n_inner: int = 5, seed: int = 0, grid: dict | None = None
) -> ResponseResult:
    """Nested stratified CV of the RBF-SVM on ``x`` (units x genes) and 0/1 ``y``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, int)
    if np.isnan(x).any():
        raise InputError(None, "--genes", "the expression matrix has missing values; choose genes every unit has")
    minority = int(min(y.sum(), (1 - y).sum()))
    if minority < n_outer:
        raise InputError(None, "--label", f"the smaller class has {minority} unit(s): too few for {n_outer} folds")
    outer = StratifiedKFold(n_outer, shuffle=True, random_state=seed)
    rows, rocs = [], []
    for f, (tr, te) in enumerate(outer.split(x, y)):
        search = svm_search(n_inner, seed, grid).fit(x[tr], y[tr])
        score = search.decision_function(x[te])
        fpr, tpr, _ = roc_curve(y[te], score)
        best = search.best_params_
        rows.append(
            {
                "fold": f,
                "n_test": len(te),
                "n_positive": int(y[te].sum()),
                "auc": float(roc_auc_score(y[te], score)),
                "C": float(best["svc__C"]),
                "gamma": str(best["svc__gamma"]),
            }
        )
        rocs.append(pl.DataFrame({"fold": [f] * len(fpr), "fpr": fpr, "tpr": tpr}))
    folds = pl.DataFrame(rows)
    return ResponseResult(folds, pl.concat(rocs), float(folds["auc"].mean()), float(folds["auc"].std()))


def roc_plot(result: ResponseResult, path, title: str) -> None:
    """ROC curve of every outer fold and the fold-mean AUC, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for (f,), g in result.roc.group_by("fold", maintain_order=True):
        auc = result.folds.filter(pl.col("fold") == f)["auc"][0]
        ax.plot(g["fpr"], g["tpr"], lw=1, label=f"fold {f}: AUC {auc:.2f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{title}\nnested CV AUC {result.auc_mean:.3f} ± {result.auc_sd:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
