"""What ``compare`` runs (:mod:`stimage_embed.evaluation.compare`): its configuration checked,
the folds formed from the slides with counts and vectors for every backbone, and the order
of the per-backbone heads."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import polars as pl

from stimage_embed.embeddings.stain_target import check_same_target, check_table_target
from stimage_embed.errors import InputError, StoreError
from stimage_embed.evaluation.splits import Fold, make_folds, parse_split
from stimage_embed.predictions.arrays import embedded_slides, vector_parts
from stimage_embed.predictions.registry import HEADS, head_names, head_spec
from stimage_embed.store.schema import embedding_table_name
from stimage_embed.store.store import Store

if TYPE_CHECKING:
    from stimage_embed.evaluation.compare import CompareConfig

log = logging.getLogger(__name__)

#: the leak controls ``compare`` can run beside the real vectors ("none" = the real vectors)
CONTROLS = ("none", "shuffled")


def _embedded_slides(store: Store, backbones: list[str]) -> set[str]:
    """Slides with counts (rows in ``expression``) and vectors in every backbone's table;
    image-only slides (``infer``) have no counts and are never in a fold."""
    with_counts = (
        set(store.sql("SELECT DISTINCT slide_id FROM expression")["slide_id"])
        if store.has_table("expression")
        else set()
    )
    sets = [embedded_slides(store, b) for b in backbones]
    return set.intersection(with_counts, *sets) if sets else set()


def folds_of(store: Store, cfg: CompareConfig) -> list[tuple[str, Fold]]:
    slides = pl.from_arrow(store.read("slides", ["dataset", "slide_id", "patient"]))
    have = _embedded_slides(store, cfg.backbones)
    skipped = sorted(set(slides["slide_id"]) - have)
    if skipped:
        log.warning(
            "slides without vectors for every backbone (%s) are left out of the folds: %s",
            ", ".join(cfg.backbones),
            skipped,
        )
    slides = slides.filter(pl.col("slide_id").is_in(sorted(have)))
    if slides.height == 0:
        raise StoreError(
            f"{store.path}: no slide has vectors for all of {cfg.backbones}; run `stimage-embed embed` first"
        )
    datasets = cfg.datasets or sorted(slides["dataset"].unique().to_list())
    unknown = sorted(set(datasets) - set(slides["dataset"]))
    if unknown:
        raise InputError(None, "--dataset", f"datasets not in the store: {unknown}")
    out = []
    for ds in datasets:
        if cfg.train_slides is not None:
            sub = set(slides.filter(pl.col("dataset") == ds)["slide_id"])
            tr, te = [s for s in cfg.train_slides if s in sub], [s for s in cfg.test_slides or [] if s in sub]
            if tr and te:
                out.append((ds, Fold("explicit", tr, te)))
            continue
        for fold in make_folds(slides, parse_split(cfg.split), datasets=[ds]):
            out.append((ds, fold))
    if not out:
        raise InputError(None, "--split", "no fold could be formed from the store's slides")
    return out


def fold_slides(folds: list[tuple[str, Fold]]) -> list[str]:
    return sorted({s for _, f in folds for s in (*f.train_slides, *f.test_slides)})


def check_config(cfg: CompareConfig) -> list[str]:
    """Validate the heads and controls of ``cfg``; returns the controls to run ("none" first)."""
    bad = sorted(set(cfg.heads) - set(HEADS))
    if bad:
        raise InputError(None, "--heads", f"unknown heads {bad}; choose from {', '.join(HEADS)}")
    learns_labels = [h for h in cfg.heads if head_spec(h).output == "label"]
    if learns_labels and not cfg.labels:
        raise InputError(None, "--labels", f"{', '.join(learns_labels)} learns a label set: give --labels NAME")
    if cfg.labels and not learns_labels:
        raise InputError(None, "--labels", "a label set is learned by the label head: add label to --heads")
    spanning = [h for h in cfg.heads if head_spec(h).spans_backbones]
    if spanning and len(cfg.backbones) < 2:
        raise InputError(
            None, "--heads", f"{', '.join(spanning)} average several backbones: give at least two --backbones"
        )
    bad = sorted(set(cfg.controls) - set(CONTROLS[1:]))
    if bad:
        raise InputError(None, "--control", f"unknown controls {bad}; choose from {', '.join(CONTROLS[1:])}")
    return ["none"] + [c for c in CONTROLS[1:] if c in cfg.controls]


def single_backbone_heads(cfg: CompareConfig) -> list[str]:
    """The per-backbone heads to fit, each after the head it takes ``alpha`` from, plus the
    heads a spanning head combines (``nb`` for FSTimage) even when not asked for."""
    wanted = [h for h in cfg.heads if not head_spec(h).spans_backbones and head_spec(h).output != "label"]
    wanted += [c for c in {head_spec(h).combines for h in cfg.heads} - set(wanted) if c]
    order = {h: i for i, h in enumerate(head_names())}
    sources = {head_spec(h).takes_alpha_from for h in wanted}
    return sorted(wanted, key=lambda h: (head_spec(h).takes_alpha_from is not None, h not in sources, order[h]))


def check_targets(store: Store, cfg: CompareConfig) -> None:
    """Refuse vectors normalised against a stain target that is no longer the store's, and
    runs combining vectors of different targets (a composite ``a+b``; FSTimage across the
    backbones): one line naming the ``embed`` to run (:mod:`stimage_embed.embeddings.stain_target`)."""
    tables = {b: [embedding_table_name(p) for p in vector_parts(b)] for b in cfg.backbones}
    for parts in tables.values():
        check_same_target(store, parts)
        for t in parts:
            check_table_target(store, t)
    if any(head_spec(h).spans_backbones for h in cfg.heads):
        check_same_target(store, sorted({t for parts in tables.values() for t in parts}))
