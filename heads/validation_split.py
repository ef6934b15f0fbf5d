"""Train/validation split for early stopping: whole groups (slides/patients) held out."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, ShuffleSplit

logger = logging.getLogger(__name__)


def validation_split(
    n_spots: int, groups: np.ndarray | None, val_fraction: float, random_state: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(train, val)`` for early stopping.

    With ``groups`` (one slide or patient label per spot) whole groups are held out
    (``sklearn.model_selection.GroupShuffleSplit``: ``ceil(val_fraction * n_groups)`` >= 1
    groups go to validation), so validation never sees spots of a training slide. It needs
    at least 2 groups. Without ``groups`` the split is a random split of spots
    (``ShuffleSplit``) — neighbouring spots of the same slide then sit on both sides, so
    the validation loss is optimistic. ``val_fraction == 0`` returns no validation rows.
    """
    idx = np.arange(n_spots)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return idx, idx[:0]
    if groups is None:
        logger.info("early stopping on a random (ungrouped) %.0f%% split of spots", 100 * val_fraction)
        splitter = ShuffleSplit(n_splits=1, test_size=val_fraction, random_state=random_state)
        train, val = next(splitter.split(idx))
        return np.sort(train), np.sort(val)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(
            f"groups: {n_groups} distinct group; grouped early stopping needs >= 2 groups "
            "(pass groups=None for a random split of spots, or val_fraction=0 to disable early stopping)"
        )
    splitter = GroupShuffleSplit(n_splits=1, test_size=val_fraction, random_state=random_state)
    try:
        train, val = next(splitter.split(idx, groups=groups))
    except ValueError as err:
        raise ValueError(f"groups: cannot hold out {val_fraction:.0%} of {n_groups} groups: {err}") from err
    return np.sort(train), np.sort(val)


def grouped_cv_splits(
    n_spots: int, groups: np.ndarray | None, n_folds: int, random_state: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Row indices ``(train, held_out)`` of a CV that holds out whole groups.

    ``GroupKFold`` with ``min(n_folds, n_groups)`` folds over the groups (slides), so a
    held-out fold never shares a slide with its training rows. With fewer than 2 groups
    (or ``groups=None``) it falls back, with a warning, to a shuffled ``KFold`` over
    spots, whose held-out loss is optimistic (neighbouring spots on both sides).
    """
    idx = np.arange(n_spots)
    n_groups = 0 if groups is None else len(np.unique(groups))
    if n_groups < 2:
        logger.warning(
            "grouped CV: %s; falling back to a %d-fold split of spots",
            "no groups" if groups is None else "a single group",
            n_folds,
        )
        splitter = KFold(n_splits=min(n_folds, n_spots), shuffle=True, random_state=random_state)
        return [(tr, te) for tr, te in splitter.split(idx)]
    splitter = GroupKFold(n_splits=min(n_folds, n_groups))
    return [(tr, te) for tr, te in splitter.split(idx, groups=groups)]
