"""Cross-validation folds over slides: leave-one-slide-out, leave-one-patient-out,
K folds grouped by patient, and explicit train/test slide lists.

Every fold is a list of **slide ids** on each side; spots never cross a fold boundary
on their own. A fold never holds the same slide on both sides (checked on construction).

Patients are keyed by ``(dataset, patient)`` when a ``dataset`` column is present, so two
datasets that both number their patients ``"1"`` are not merged into one group.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from sklearn.model_selection import GroupKFold

from stimage_embed.errors import InputError

log = logging.getLogger(__name__)

SPLIT_KINDS = ("loso", "lopo", "kfold", "explicit")
_KFOLD_RE = re.compile(r"^kfold:(\d+)(?::(\d+))?$")


@dataclass(frozen=True)
class Fold:
    """One train/test partition of slides.

    Attributes
    ----------
    name : e.g. ``"loso:B4"``, ``"lopo:her2st/B"``, ``"kfold5:2"``, ``"explicit"``.
    train_slides, test_slides : disjoint, sorted slide ids (both non-empty).
    """

    name: str
    train_slides: list[str]
    test_slides: list[str]

    def __post_init__(self) -> None:
        both = sorted(set(self.train_slides) & set(self.test_slides))
        if both:
            raise InputError(None, "split", f"fold {self.name!r}: slides on both train and test sides: {both}")
        if not self.train_slides:
            raise InputError(None, "split", f"fold {self.name!r}: no training slides")
        if not self.test_slides:
            raise InputError(None, "split", f"fold {self.name!r}: no test slides")


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split specification.

    ``kind`` is one of ``loso``, ``lopo``, ``kfold`` (with ``k`` folds and ``seed``) or
    ``explicit`` (with ``train``/``test`` slide lists).
    """

    kind: str
    k: int | None = None
    seed: int = 0
    train: tuple[str, ...] = ()
    test: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.kind == "kfold":
            return f"kfold:{self.k}:{self.seed}"
        if self.kind == "explicit":
            return f"explicit(train={list(self.train)}, test={list(self.test)})"
        return self.kind


def parse_split(spec: str, *, seed: int = 0) -> SplitSpec:
    """Parse ``"loso"``, ``"lopo"``, ``"kfold:K"`` or ``"kfold:K:SEED"``.

    ``seed`` is used for ``kfold:K`` when the string carries none. Explicit train/test
    lists are built with :func:`explicit_split` (they come from SQL, not a string).
    """
    text = spec.strip().lower()
    if text in ("loso", "lopo"):
        return SplitSpec(kind=text)
    m = _KFOLD_RE.match(text)
    if m:
        k = int(m.group(1))
        if k < 2:
            raise InputError(None, "split", f"{spec!r}: kfold needs K >= 2")
        return SplitSpec(kind="kfold", k=k, seed=int(m.group(2)) if m.group(2) is not None else seed)
    raise InputError(None, "split", f"unknown split {spec!r}; expected 'loso', 'lopo', 'kfold:K' or 'kfold:K:SEED'")


def explicit_split(train_slides: Sequence[str], test_slides: Sequence[str]) -> SplitSpec:
    """An explicit train/test split from two slide-id lists (checked for overlap here)."""
    train, test = tuple(dict.fromkeys(map(str, train_slides))), tuple(dict.fromkeys(map(str, test_slides)))
    Fold("explicit", list(train), list(test))  # validates: disjoint, both sides non-empty
    return SplitSpec(kind="explicit", train=train, test=test)


def slide_table(table: pl.DataFrame, datasets: Sequence[str] | None = None) -> pl.DataFrame:
    """One row per slide (``slide_id``, ``patient``, ``group``) from a spot or slide table.

    ``group`` is ``"<dataset>/<patient>"`` if a ``dataset`` column exists, else the patient.
    ``datasets`` restricts to those datasets (requires the ``dataset`` column).
    """
    for col in ("slide_id", "patient"):
        if col not in table.columns:
            raise InputError(None, col, f"slide table has no {col!r} column (columns: {table.columns})")
    has_ds = "dataset" in table.columns
    if datasets is not None:
        if not has_ds:
            raise InputError(
                None, "dataset", "a dataset subset was asked for but the slide table has no 'dataset' column"
            )
        wanted = [str(d) for d in datasets]
        unknown = sorted(set(wanted) - set(table["dataset"].unique().to_list()))
        if unknown:
            raise InputError(None, "dataset", f"unknown dataset(s) {unknown}")
        table = table.filter(pl.col("dataset").is_in(wanted))
    cols = ["slide_id", "patient"] + (["dataset"] if has_ds else [])
    slides = table.select(cols).unique().sort("slide_id")
    if slides["slide_id"].n_unique() != slides.height:
        dup = slides.filter(pl.col("slide_id").is_duplicated())
        raise InputError(None, "slide_id", f"slides with more than one patient/dataset: {sorted(set(dup['slide_id']))}")
    for col in ("patient", "dataset") if has_ds else ("patient",):
        if slides[col].null_count():
            bad = slides.filter(pl.col(col).is_null())["slide_id"].to_list()
            raise InputError(None, col, f"slides without a {col}: {bad}")
    group = (pl.col("dataset") + pl.lit("/") + pl.col("patient")) if has_ds else pl.col("patient")
    return slides.with_columns(group.alias("group")).select("slide_id", "patient", "group")


def make_folds(table: pl.DataFrame, spec: SplitSpec | str, *, datasets: Sequence[str] | None = None) -> list[Fold]:
    """Folds of slides for ``spec`` over the slides of ``table``.

    Parameters
    ----------
    table : polars DataFrame with at least ``slide_id`` and ``patient`` (spot-level or
        slide-level; duplicates are collapsed), optionally ``dataset``.
    spec : a :class:`SplitSpec` or a string for :func:`parse_split`.
    datasets : restrict the slides (and so the folds) to these datasets.

    Raises
    ------
    InputError : when the split is impossible (fewer than 2 slides for loso, fewer than 2
        patients for lopo, fewer patients than K for kfold, explicit slides not in the table).
    """
    if isinstance(spec, str):
        spec = parse_split(spec)
    slides = slide_table(table, datasets)
    ids = slides["slide_id"].to_list()
    groups = slides["group"].to_list()

    if spec.kind == "explicit":
        missing = sorted((set(spec.train) | set(spec.test)) - set(ids))
        if missing:
            raise InputError(None, "split", f"explicit split names slides not in the slide table: {missing}")
        folds = [Fold("explicit", sorted(spec.train), sorted(spec.test))]
    elif spec.kind == "loso":
        if len(ids) < 2:
            raise InputError(None, "split", f"loso needs at least 2 slides, found {len(ids)}: {ids}")
        folds = [Fold(f"loso:{s}", [t for t in ids if t != s], [s]) for s in ids]
    elif spec.kind == "lopo":
        uniq = sorted(set(groups))
        if len(uniq) < 2:
            raise InputError(None, "split", f"lopo needs at least 2 patients, found {len(uniq)}: {uniq}")
        folds = [
            Fold(
                f"lopo:{g}",
                [s for s, h in zip(ids, groups, strict=True) if h != g],
                [s for s, h in zip(ids, groups, strict=True) if h == g],
            )
            for g in uniq
        ]
    elif spec.kind == "kfold":
        k = int(spec.k or 0)
        n_groups = len(set(groups))
        if k < 2 or k > n_groups:
            raise InputError(None, "split", f"kfold:{k} needs 2 <= K <= number of patients ({n_groups})")
        gkf = GroupKFold(n_splits=k, shuffle=True, random_state=spec.seed)
        arr = np.asarray(ids, dtype=object)
        folds = [
            Fold(f"kfold{k}:{i}", sorted(arr[tr].tolist()), sorted(arr[te].tolist()))
            for i, (tr, te) in enumerate(gkf.split(arr, groups=np.asarray(groups, dtype=object)))
        ]
    else:
        raise InputError(None, "split", f"unknown split kind {spec.kind!r}; expected one of {SPLIT_KINDS}")
    if spec.kind in ("lopo", "kfold"):  # Fold checks slides; also guarantee no patient on both sides
        group_of = dict(zip(ids, groups, strict=True))
        for f in folds:
            shared = {group_of[s] for s in f.train_slides} & {group_of[s] for s in f.test_slides}
            if shared:
                raise AssertionError(f"fold {f.name}: patients on both sides {sorted(shared)}")
    log.debug("split %s over %d slides -> %d folds", spec, len(ids), len(folds))
    return folds
