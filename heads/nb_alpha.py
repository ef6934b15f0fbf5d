"""The L2 strength of the NB GLM heads: CV over an L2 path (:class:`heads.NBRegressor`,
:class:`heads.ContextNBRegressor`), its fold rule, and a warning at the path's end.

Fold rule (:func:`alpha_cv_folds`)
----------------------------------
* **3 or more training slides** (``groups``): ``GroupKFold``, each fold holds out whole
  slides, so the held-out loss measures transfer to an unseen slide.
* **exactly 2 slides**: grouped CV is not a reliable choice. Each fold would train on one
  slide and score the other, and the held-out loss is dominated by the shift between the
  two slides, which no slope on the vectors can fix: the CV then picks the strongest L2
  on its path and the predictions go flat (issue 25: alpha 2700 on B4+C4, a median
  per-gene range of 0.005-0.02 log1p against ridge's 1.3-2.9). The rule is then a
  **spot-level CV within slides**: ``StratifiedKFold`` over spots, stratified by slide,
  so every fold holds out the same share of each slide's spots and trains on the rest of
  both. Neighbouring spots fall on both sides, so the held-out loss is optimistic and
  the chosen L2 is, if anything, on the weak side.
* **one slide, or no groups**: a shuffled ``KFold`` over spots (as above, optimistic).

Whatever the rule, a choice at either end of the final path is reported with an
:class:`AlphaAtPathEnd` warning: the best strength may lie beyond the path.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold

from heads.nb_glm import fit_nb_glm, nb_nll_matrix
from heads.validation_split import grouped_cv_splits

logger = logging.getLogger(__name__)

#: fewer training slides than this: spot-level CV within slides instead of grouped CV
MIN_CV_GROUPS = 3
#: fold rules, as recorded in ``AlphaCV.rule`` (and an NB head's ``cv_rule_``)
CV_RULES = ("grouped", "spots within slides", "spots")


class AlphaAtPathEnd(UserWarning):
    """The CV chose the smallest or the largest alpha of its path."""


def alpha_cv_folds(
    n_spots: int, groups: np.ndarray | None, n_folds: int, random_state: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], str]:
    """``(folds, rule)``: (train rows, held-out rows) pairs and the rule of the module doc."""
    n_groups = 0 if groups is None else len(np.unique(groups))
    if n_groups >= MIN_CV_GROUPS or n_groups < 2:
        return grouped_cv_splits(n_spots, groups, n_folds, random_state), "grouped" if n_groups >= 2 else "spots"
    smallest = int(np.unique(groups, return_counts=True)[1].min())
    splitter = StratifiedKFold(n_splits=max(2, min(n_folds, smallest)), shuffle=True, random_state=random_state)
    logger.info("alpha CV: %d training slides; %d-fold CV of spots within slides", n_groups, splitter.n_splits)
    return [(tr, te) for tr, te in splitter.split(np.zeros(n_spots), np.asarray(groups).astype(str))], CV_RULES[1]


#: objective tolerance of the CV fits (the final fit uses 1e-6): on the HER2ST and MOB
#: leave-one-slide-out folds it picked the same alpha as 1e-6 on every fold, in 40 % less time
CV_TOL = 1e-4


@dataclass
class AlphaCV:
    """The CV choice of the L2 strength: ``alpha`` (lowest held-out loss), the path
    ``alphas``, ``cv_loss`` (held-out mean NB NLL per (spot, gene), per alpha), the
    groups held out in each fold (``cv_groups``) and the fold ``rule`` (:data:`CV_RULES`)."""

    alpha: float
    alphas: np.ndarray
    cv_loss: np.ndarray
    cv_groups: list[list[str]]
    rule: str = "grouped"


def select_alpha(
    Z: np.ndarray,
    Y: np.ndarray,
    offset: np.ndarray,
    groups: np.ndarray | None,
    alphas: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    log_theta: np.ndarray,
    max_iter: int,
    device: torch.device | str = "cpu",
    tol: float = CV_TOL,
) -> AlphaCV:
    """CV over the L2 path with the dispersions held at ``log_theta`` (G,) (a pilot fit's).

    ``folds``: (train rows, held-out rows) pairs, e.g.
    :func:`alpha_cv_folds`. Per fold, every alpha of the path is
    fitted at once as one batch on the fold's training rows only (no work is spent on
    zero-weight held-out rows), to the looser tolerance ``tol`` (the CV only ranks the
    alphas; see :data:`CV_TOL`), and scored by the mean NB NLL of the held-out rows."""
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if alphas.size == 0 or np.any(alphas < 0):
        raise ValueError("alphas: need at least one alpha, all >= 0")
    losses = []
    for tr, te in folds:
        fit = fit_nb_glm(
            Z[tr],
            Y[tr],
            offset[tr],
            np.ones((alphas.size, len(tr))),
            alphas,
            log_theta=log_theta,
            rounds=1,
            max_iter=max_iter,
            tol=tol,
            device=device,
        )
        losses.append(nb_nll_matrix(Z[te], Y[te], offset[te], fit).mean(axis=1))
    loss = np.mean(losses, axis=0)
    held_out = [sorted({str(g) for g in groups[te]}) if groups is not None else [] for _, te in folds]
    return AlphaCV(float(alphas[int(np.argmin(loss))]), alphas, loss, held_out)


def select_alpha_adaptive(
    Z: np.ndarray,
    Y: np.ndarray,
    offset: np.ndarray,
    groups: np.ndarray | None,
    start: tuple[float, ...],
    folds: list[tuple[np.ndarray, np.ndarray]],
    log_theta: np.ndarray,
    max_iter: int,
    device: torch.device | str = "cpu",
    bounds: tuple[float, float] = (1e-3, 1e4),
) -> AlphaCV:
    """:func:`select_alpha` over the geometric path ``start`` (ratio ``start[1] / start[0]``),
    extended by two more alphas past an end while the lowest held-out loss sits at that end
    (never beyond ``bounds``). The best alpha falls with the number of training spots, so a
    fixed path fits either small folds or large cohorts; and the smallest alphas, the
    slowest to fit, are only fitted when the loss points there."""
    alphas = np.asarray(start, dtype=np.float64)
    if alphas.size < 2 or np.any(alphas <= 0) or np.any(np.diff(alphas) <= 0):
        raise ValueError(f"start: need an increasing path of >= 2 positive alphas, got {start}")
    ratio = alphas[1] / alphas[0]
    cv = select_alpha(Z, Y, offset, groups, alphas, folds, log_theta, max_iter, device)
    a, loss = cv.alphas, cv.cv_loss
    while True:
        best = int(np.argmin(loss))
        if best == 0:
            new = a[0] / ratio ** np.array([2.0, 1.0])
        elif best == a.size - 1:
            new = a[-1] * ratio ** np.array([1.0, 2.0])
        else:
            break
        new = new[(new >= bounds[0] * (1 - 1e-9)) & (new <= bounds[1] * (1 + 1e-9))]
        if new.size == 0:
            break
        more = select_alpha(Z, Y, offset, groups, new, folds, log_theta, max_iter, device)
        a, loss = np.concatenate([a, more.alphas]), np.concatenate([loss, more.cv_loss])
        order = np.argsort(a)
        a, loss = a[order], loss[order]
    return AlphaCV(float(a[int(np.argmin(loss))]), a, loss, cv.cv_groups)


def warn_at_path_end(cv: AlphaCV, who: str = "NB") -> None:
    """An :class:`AlphaAtPathEnd` warning when ``cv.alpha`` is the smallest or the largest of
    ``cv.alphas`` (a path of one alpha is no choice and is not reported)."""
    a = np.sort(np.asarray(cv.alphas, dtype=np.float64))
    if a.size < 2 or cv.alpha not in (a[0], a[-1]):
        return
    end = "smallest" if cv.alpha == a[0] else "largest"
    warnings.warn(
        f"{who}: the CV ({cv.rule}) chose alpha {cv.alpha:g}, the {end} of its path {a[0]:g} .. {a[-1]:g}; "
        "the best L2 may lie beyond it (pass alphas= to extend the path, or alpha= to fix it)",
        AlphaAtPathEnd,
        stacklevel=3,
    )


def choose_alpha(
    Z: np.ndarray,
    Y: np.ndarray,
    offset: np.ndarray,
    groups: np.ndarray | None,
    alphas: tuple[float, ...] | None,
    default_path: tuple[float, ...],
    n_folds: int,
    random_state: int,
    log_theta: np.ndarray,
    max_iter: int,
    device: torch.device | str = "cpu",
) -> AlphaCV:
    """The CV choice of alpha with the folds of :func:`alpha_cv_folds`: over ``alphas`` as
    given, or (``None``) over ``default_path`` extended past an end while the best alpha is
    there (:func:`select_alpha_adaptive`); warns when the choice ends its path."""
    folds, rule = alpha_cv_folds(Z.shape[0], groups, n_folds, random_state)
    if alphas is None:
        cv = select_alpha_adaptive(Z, Y, offset, groups, default_path, folds, log_theta, max_iter, device)
    else:
        cv = select_alpha(Z, Y, offset, groups, np.asarray(alphas), folds, log_theta, max_iter, device)
    cv.rule = rule
    logger.debug("alpha %.3g chosen by %d-fold CV (%s), held-out NLL %s", cv.alpha, len(folds), rule, cv.cv_loss)
    warn_at_path_end(cv)
    return cv


__all__ = [
    "CV_RULES",
    "CV_TOL",
    "MIN_CV_GROUPS",
    "AlphaAtPathEnd",
    "AlphaCV",
    "alpha_cv_folds",
    "choose_alpha",
    "select_alpha",
    "select_alpha_adaptive",
    "warn_at_path_end",
]
