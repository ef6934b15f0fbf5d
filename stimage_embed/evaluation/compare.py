"""``compare``: every fold x backbone x head from the cached vectors, plus FSTimage across
backbones, with all state in the store (``runs``, ``predictions``, ``metrics``).

A run is one head fitted on one fold's training slides with one backbone's vectors. Its
id (:func:`stimage_embed.predictions.runs.run_hash`) hashes everything that determines its
result (dataset, fold slides, genes, head and its parameters, the vectors' provenance ids,
the control), so re-running ``compare`` with one more backbone or head only computes what
is new. Which heads exist, and which of them span backbones or share a CV choice, comes
from the head registry (:mod:`stimage_embed.predictions.registry`).

Leak control (``controls=["shuffled"]``): every head is also trained and scored on the
same fold with each slide's vectors permuted among its own spots (train and test), so
image features no longer belong to their spots while everything else (slides, genes,
counts, the per-slide distribution of vectors) is unchanged. A pipeline that predicts
from the image alone scores about 0 there; a score well above 0 means something other
than the image (e.g. a test spot's measured library size) reaches the prediction. A run is committed by its ``runs`` row,
written after its predictions and metrics; rows of runs that never committed (a crash)
are removed at the start of the next ``compare``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from stimage_embed.embeddings.provenance import provenance_id
from stimage_embed.errors import InputError, StoreError
from stimage_embed.evaluation.scoring import score_run
from stimage_embed.evaluation.splits import Fold, make_folds, parse_split
from stimage_embed.evaluation.views import leaderboard
from stimage_embed.predictions.arrays import (
    SpotArrays,
    embedded_slides,
    load_spot_arrays,
    shuffled_within_slides,
    table_provenance,
)
from stimage_embed.predictions.fstimage import combine_backbones
from stimage_embed.predictions.genes import DEFAULT_GENE_SPEC, fold_genes
from stimage_embed.predictions.registry import HEADS, head_names, head_spec
from stimage_embed.predictions.runner import fit_head, head_config, make_head, predict_head
from stimage_embed.predictions.runs import committed_runs, run_hash, runs_row
from stimage_embed.predictions.workers import threaded_map
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

#: the leak controls ``compare`` can run beside the real vectors ("none" = the real vectors)
CONTROLS = ("none", "shuffled")


@dataclass
class CompareConfig:
    backbones: list[str]
    #: head names of the registry (:mod:`stimage_embed.predictions.registry`); default: all
    heads: list[str] = field(default_factory=lambda: list(head_names()))
    split: str = "loso"
    genes: str = DEFAULT_GENE_SPEC
    #: extra controls run beside the real vectors: "shuffled" (see the module doc)
    controls: list[str] = field(default_factory=list)
    datasets: list[str] | None = None
    only_qc: bool = True
    missing: str = "error"  # FSTimage policy for spots absent from a backbone
    #: constructor parameters per head (default: the registry's defaults for every head)
    head_params: dict[str, dict] = field(default_factory=dict)
    train_slides: list[str] | None = None  # explicit split (with test_slides)
    test_slides: list[str] | None = None


@dataclass
class CompareResult:
    leaderboard: pl.DataFrame
    computed: int
    reused: int
    seconds: float
    run_ids: list[str]


def _drop_uncommitted(store: Store) -> None:
    """Remove the rows of runs proven orphaned, under the store's writer lock.

    ``_write_runs`` marks a run pending (``<store>/.pending/compare/<run_id>``) before its
    first row and clears the mark after its ``runs`` row, all under the lock. So here, under
    the lock, a pending run without a ``runs`` row was cut short by a crash: its rows go.
    Rows of anything else without a ``runs`` row (``predict``, image-only inference, a run
    another process is writing) are never touched."""
    with store.writer("compare"):
        done = committed_runs(store)
        for rid in store.pending("compare"):
            if rid not in done:
                for name in ("predictions", "metrics"):
                    n = store.delete(name, f"run_id IN ({sql_list([rid])})")
                    if n:
                        log.warning(
                            "removing %d row(s) of run %s from %s: its writer was interrupted before committing it",
                            n,
                            rid,
                            name,
                        )
            store.clear_pending("compare", rid)


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


def _folds(store: Store, cfg: CompareConfig) -> list[tuple[str, Fold]]:
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


def _check_config(cfg: CompareConfig) -> list[str]:
    """Validate the heads and controls of ``cfg``; returns the controls to run ("none" first)."""
    bad = sorted(set(cfg.heads) - set(HEADS))
    if bad:
        raise InputError(None, "--heads", f"unknown heads {bad}; choose from {', '.join(HEADS)}")
    if "label" in cfg.heads:  # learns a labels table, not genes
        raise InputError(None, "--heads", "label learns a labels table: use `stimage-embed labels compare`")
    spanning = [h for h in cfg.heads if head_spec(h).spans_backbones]
    if spanning and len(cfg.backbones) < 2:
        raise InputError(
            None, "--heads", f"{', '.join(spanning)} average several backbones: give at least two --backbones"
        )
    bad = sorted(set(cfg.controls) - set(CONTROLS[1:]))
    if bad:
        raise InputError(None, "--control", f"unknown controls {bad}; choose from {', '.join(CONTROLS[1:])}")
    return ["none"] + [c for c in CONTROLS[1:] if c in cfg.controls]


def _single_backbone_heads(cfg: CompareConfig) -> list[str]:
    """The per-backbone heads to fit, each after the head it takes ``alpha`` from, plus the
    heads a spanning head combines (``nb`` for FSTimage) even when not asked for."""
    wanted = [h for h in cfg.heads if not head_spec(h).spans_backbones]
    wanted += [c for c in {head_spec(h).combines for h in cfg.heads} - set(wanted) if c]
    order = {h: i for i, h in enumerate(head_names())}
    sources = {head_spec(h).takes_alpha_from for h in wanted}
    return sorted(wanted, key=lambda h: (head_spec(h).takes_alpha_from is not None, h not in sources, order[h]))


@dataclass
class _Session:
    """What every run of one ``compare`` call shares."""

    store: Store
    cfg: CompareConfig
    done: set[str]
    spots: pl.DataFrame
    slides: pl.DataFrame
    provs: dict[str, dict]
    bar: Any
    run_ids: list[str] = field(default_factory=list)
    #: run id -> predictions of a run a spanning head combines, computed in this call
    member_predictions: dict[str, pl.DataFrame] = field(default_factory=dict)
    computed: int = 0
    reused: int = 0


@dataclass
class _Task:
    """One fold x backbone, every control: the unit of work of a fit thread."""

    fold: Fold
    backbone: str
    bases: list[dict]  # one per control: what identifies its runs (see ``compare``)


@dataclass
class _TaskResult:
    ids: list[dict[str, str]]  # per control: head -> run id
    computed: list[tuple[dict, pl.DataFrame, pl.DataFrame]]  # (runs row, predictions, metrics)
    reused: int


def compare(store: Store, cfg: CompareConfig, progress: bool = True, workers: int | None = None) -> CompareResult:
    """Run (or reuse) every fold x backbone x head (x control); returns the leaderboard.

    Fold x backbone tasks are fitted by ``workers`` threads (default: one per core, see
    :mod:`stimage_embed.predictions.workers`), the largest folds first. Once every backbone
    of a fold is fitted, this thread runs the heads spanning backbones (FSTimage) from the
    fold's predictions in memory and writes all the fold's runs in one batch."""
    t0 = time.perf_counter()
    controls = _check_config(cfg)
    provs = {bb: table_provenance(store, bb) for bb in cfg.backbones}
    _drop_uncommitted(store)
    folds = _folds(store, cfg)
    single = _single_backbone_heads(cfg)
    spanning = [h for h in cfg.heads if head_spec(h).spans_backbones]
    per_fold = len(cfg.backbones) * len(single) + len(spanning)
    bar = tqdm(total=len(folds) * len(controls) * per_fold, desc="compare", unit="run", disable=not progress)
    ses = _Session(
        store,
        cfg,
        committed_runs(store),
        pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"])),
        pl.from_arrow(store.read("slides", ["slide_id", "um_per_px", "spot_pitch_um", "platform"])),
        provs,
        bar,
    )
    tasks: list[_Task] = []
    # each fold's genes from its training counts, the folds side by side (reads and sparse sums)
    fold_gene_lists = dict(
        threaded_map(lambda i: fold_genes(store, folds[i][1].train_slides, cfg.genes), range(len(folds)), workers)
    )
    for i, (ds, fold) in enumerate(folds):
        genes = fold_gene_lists[i]
        bases = [
            {
                "dataset": ds,
                "split": cfg.split if cfg.train_slides is None else "explicit",
                "fold": fold.name,
                "train": sorted(fold.train_slides),
                "test": sorted(fold.test_slides),
                "genes": genes,
                "gene_spec": cfg.genes,
                "only_qc": cfg.only_qc,
                "control": control,
            }
            for control in controls
        ]
        tasks += [_Task(fold, bb, bases) for bb in cfg.backbones]
    # the largest folds first, so the last tasks to finish are short ones and no core idles long
    spots_per_slide = dict(ses.spots.group_by("slide_id").len().iter_rows())
    tasks.sort(key=lambda t: -sum(spots_per_slide.get(s, 0) for s in t.fold.train_slides))
    left = {id(t.bases): len(cfg.backbones) for t in tasks}
    fold_ids: dict[int, dict[str, list[dict[str, str]]]] = {}
    unwritten: dict[int, list[tuple[dict, pl.DataFrame, pl.DataFrame]]] = {}
    combined = {head_spec(h).combines for h in spanning}
    for task, res in threaded_map(lambda t: _compute_task(ses, t, single), tasks, workers):
        fold = id(task.bases)
        ses.reused += res.reused
        bar.update(res.reused + len(res.computed))
        unwritten.setdefault(fold, []).extend(res.computed)
        # predictions a spanning head will combine stay in memory until it has run
        ses.member_predictions.update({row["run_id"]: pred for row, pred, _ in res.computed if row["head"] in combined})
        for ids in res.ids:
            ses.run_ids += [rid for head, rid in ids.items() if head in cfg.heads]
        fold_ids.setdefault(fold, {})[task.backbone] = res.ids
        left[fold] -= 1
        if left[fold] == 0:  # every backbone of the fold is computed
            by_bb = fold_ids.pop(fold)
            runs = unwritten.pop(fold)
            for c, base in enumerate(task.bases):
                for head in spanning:
                    runs += _run_spanning(
                        ses, base, head, {bb: by_bb[bb][c][head_spec(head).combines] for bb in cfg.backbones}
                    )
            if runs:  # one write batch per fold: its backbones' runs and the spanning heads'
                _write_runs(ses, runs)
    bar.close()
    board = leaderboard(store, ses.run_ids)
    return CompareResult(board, ses.computed, ses.reused, time.perf_counter() - t0, ses.run_ids)


def _fold_arrays(ses: _Session, task: _Task, genes: list[str]) -> tuple[SpotArrays, SpotArrays]:
    """(train, test) arrays of a task's backbone on its fold."""
    return (
        load_spot_arrays(ses.store, task.backbone, task.fold.train_slides, genes, only_qc=ses.cfg.only_qc),
        load_spot_arrays(ses.store, task.backbone, task.fold.test_slides, genes, only_qc=ses.cfg.only_qc),
    )


def _compute_task(ses: _Session, task: _Task, heads: list[str]) -> _TaskResult:
    """In a fit thread: fit, predict and score every per-backbone head of one fold x
    backbone, for every control, skipping committed runs (nothing is written here)."""
    pid = provenance_id(ses.provs[task.backbone])
    out = _TaskResult([], [], 0)
    arrays: tuple[SpotArrays, SpotArrays] | None = None
    for base in task.bases:
        alphas: dict[str, float] = {}  # head -> its CV choice of alpha on this fold
        ids: dict[str, str] = {}
        for head in heads:
            spec = head_spec(head)
            params = ses.cfg.head_params.get(head, {})
            rid = run_hash(
                {
                    **base,
                    "backbone": task.backbone,
                    "provenance": pid,
                    "head": head,
                    "params": params,
                    "effective_params": head_config(head, params),
                }
            )
            ids[head] = rid
            if rid in ses.done:
                out.reused += 1
                continue
            arrays = arrays or _fold_arrays(ses, task, base["genes"])
            train, test = arrays
            if base["control"] == "shuffled":
                train, test = shuffled_within_slides(train, seed=0), shuffled_within_slides(test, seed=1)
            fit_params = dict(params)
            if spec.takes_alpha_from in alphas and "alpha" not in fit_params:
                fit_params["alpha"] = alphas[spec.takes_alpha_from]
            t1 = time.perf_counter()
            model = fit_head(head, make_head(head, fit_params), train)
            fit_s = time.perf_counter() - t1
            if getattr(model, "alpha_", None) is not None:
                alphas[head] = model.alpha_
            pred = predict_head(head, model, test).with_columns(pl.lit(rid).alias("run_id"))
            row = runs_row(
                run_id=rid,
                dataset=base["dataset"],
                backbone=task.backbone,
                members=[task.backbone],
                head=head,
                split=base["split"],
                fold=base["fold"],
                train_slides=base["train"],
                test_slides=base["test"],
                gene_spec=base["gene_spec"],
                genes=base["genes"],
                params=params,
                provenance_ids=[pid],
                n_train_spots=train.X.shape[0],
                fit_seconds=fit_s,
                control=base["control"],
            )
            out.computed.append((row, pred, score_run(pred, ses.spots, ses.slides, head)))
        out.ids.append(ids)
    return out


def _run_spanning(
    ses: _Session, base: dict, head: str, nb_runs: dict[str, str]
) -> list[tuple[dict, pl.DataFrame, pl.DataFrame]]:
    """Run (or reuse) a head spanning backbones (FSTimage) from the fold's runs of the head
    it combines (``nb_runs``: backbone -> run id); returns the run to write (none if reused)."""
    rid = run_hash({**base, "head": head, "members": nb_runs, "missing": ses.cfg.missing})
    ses.run_ids.append(rid)
    if rid in ses.done:
        for r in nb_runs.values():
            ses.member_predictions.pop(r, None)
        ses.reused += 1
        ses.bar.update()
        return []
    members = {bb: ses.member_predictions.pop(r) for bb, r in nb_runs.items() if r in ses.member_predictions}
    stored = [r for bb, r in nb_runs.items() if bb not in members]  # runs reused from the store
    if stored:
        allp = pl.from_arrow(ses.store.read("predictions", where=f"run_id IN ({sql_list(stored)})"))
        members.update({bb: allp.filter(pl.col("run_id") == r) for bb, r in nb_runs.items() if bb not in members})
    members = {bb: members[bb] for bb in nb_runs}  # the backbones' order
    pred = combine_backbones(members, missing=ses.cfg.missing).with_columns(pl.lit(rid).alias("run_id"))
    row = runs_row(
        run_id=rid,
        dataset=base["dataset"],
        backbone=head,
        members=list(nb_runs),
        head=head,
        split=base["split"],
        fold=base["fold"],
        train_slides=base["train"],
        test_slides=base["test"],
        gene_spec=base["gene_spec"],
        genes=base["genes"],
        params={"missing": ses.cfg.missing},
        provenance_ids=[provenance_id(ses.provs[b]) for b in nb_runs],
        n_train_spots=0,
        fit_seconds=0.0,
        control=base["control"],
    )
    ses.bar.update()
    return [(row, pred, score_run(pred, ses.spots, ses.slides, head))]


def _write_runs(ses: _Session, runs: list[tuple[dict, pl.DataFrame, pl.DataFrame]]) -> None:
    """Commit scored runs (``(runs row, predictions, metrics)``) together under the store's
    writer lock: mark them pending, drop rows an interrupted attempt left, write all their
    predictions, then all their metrics, then their ``runs`` rows (the commit markers), then
    clear the marks: five commits for a whole fold (every backbone and head) instead of five per run. A run
    another writer committed meanwhile is kept, not written twice."""
    store = ses.store
    with store.writer("compare", repair=False):  # compare() repaired the store when it started
        already = committed_runs(store, [row["run_id"] for row, _, _ in runs])
        if already:
            log.info("runs %s were committed meanwhile by another writer; keeping them", sorted(already))
        todo = [r for r in runs if r[0]["run_id"] not in already]
        ids = [row["run_id"] for row, _, _ in todo]
        if todo:
            # rows of these runs can exist only if a writer was killed writing them: it left
            # them marked pending (writers mark under the lock we hold), so only those are
            # deleted, and a fresh run costs no scan of the predictions table
            stale = sorted(set(ids) & set(store.pending("compare")))
            for rid in ids:
                store.mark_pending("compare", rid)
            if stale:
                for name in ("predictions", "metrics"):
                    store.delete(name, f"run_id IN ({sql_list(stale)})")
            store.append("predictions", pl.concat([pred for _, pred, _ in todo], how="vertical_relaxed"))
            store.append(
                "metrics",
                pl.concat(
                    [
                        metrics.with_columns(pl.col("value").fill_nan(None)).with_columns(
                            pl.lit(row["run_id"]).alias("run_id"),
                            pl.lit(row["dataset"]).alias("dataset"),
                            pl.lit(row["backbone"]).alias("backbone"),
                            pl.lit(row["head"]).alias("head"),
                            pl.lit(row["fold"]).alias("fold"),
                            pl.lit(row["control"]).alias("control"),
                        )
                        for row, _, metrics in todo
                    ],
                    how="vertical_relaxed",
                ),
            )
            store.append("runs", pa.Table.from_pylist([row for row, _, _ in todo], schema=S.RUNS))
            for rid in ids:
                store.clear_pending("compare", rid)
    for row, _, _ in runs:
        ses.done.add(row["run_id"])
    ses.computed += len(runs)
