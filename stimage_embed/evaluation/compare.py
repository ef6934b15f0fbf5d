"""``compare``: every fold x backbone x head from the cached vectors, plus FSTimage across
backbones, with all state in the store (``runs``, ``predictions``, ``metrics``).

A run is one head fitted on one fold's training slides with one backbone's vectors. Its
id (:func:`stimage_embed.predictions.runs.run_identity` of its ``runs.run_key``) hashes
everything that determines its result (dataset, fold slides, genes, head and its
parameters, the vectors' provenance ids, the control), so re-running ``compare`` with one
more backbone or head only computes what is new. Which heads exist, and which of them span
backbones or share a CV choice, comes from the head registry
(:mod:`stimage_embed.predictions.registry`).

Leak control (``controls=["shuffled"]``): every head is also trained and scored on the
same fold with each slide's vectors permuted among its own spots (train and test), so
image features no longer belong to their spots while everything else (slides, genes,
counts, the per-slide distribution of vectors) is unchanged. A pipeline that predicts
from the image alone scores about 0 there; a score well above 0 means something other
than the image (e.g. a test spot's measured library size) reaches the prediction.

Run keys, identity and life cycle (pending marks with owner and lease, metric rows tagged
and written in one batch, the ``runs`` row written last, clean-up of abandoned runs, reuse
only of current runs with rows) live in
:mod:`stimage_embed.predictions.runs`: a run id covers the content of its inputs, so a
re-ingested or re-embedded slide makes new runs and the old ones are marked superseded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import polars as pl
from tqdm.auto import tqdm

from stimage_embed.embeddings.provenance import provenance_id, setup_id
from stimage_embed.evaluation.compare_plan import (
    check_config,
    check_targets,
    fold_slides,
    folds_of,
    single_backbone_heads,
)
from stimage_embed.evaluation.label_compare import plan_labels, run_label_plan
from stimage_embed.evaluation.paired import paired_comparisons
from stimage_embed.evaluation.scoring import score_run
from stimage_embed.evaluation.splits import Fold
from stimage_embed.evaluation.views import leaderboard
from stimage_embed.predictions.arrays import (
    SpotArrays,
    load_spot_arrays,
    shuffled_within_slides,
    table_provenance,
    vector_parts,
)
from stimage_embed.predictions.fstimage import combine_backbones
from stimage_embed.predictions.genes import DEFAULT_GENE_SPEC, fold_genes
from stimage_embed.predictions.registry import head_names, head_spec
from stimage_embed.predictions.runner import fit_head, head_config, make_head, predict_head
from stimage_embed.predictions.runs import (
    combined_identity,
    committed_runs,
    drop_abandoned,
    input_versions,
    reusable_runs,
    run_identity,
    run_key,
    runs_row,
    write_runs,
)
from stimage_embed.predictions.workers import threaded_map
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)


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
    #: the label set the ``label`` head learns (``labels`` table; :mod:`.label_compare`)
    labels: str | None = None


@dataclass
class CompareResult:
    """Everything ``compare`` found, as the CLI prints it and the report shows it."""

    #: :func:`stimage_embed.evaluation.views.leaderboard` of exactly these runs
    leaderboard: pl.DataFrame
    computed: int  # runs fitted (or combined) and written by this call
    reused: int  # runs found committed in the store
    seconds: float  # wall time of the call
    run_ids: list[str]  # every run of the comparison (controls included)
    #: :func:`stimage_embed.evaluation.paired.paired_comparisons` of the runs on the real vectors
    paired: pl.DataFrame = field(default_factory=pl.DataFrame)
    label_run_ids: list[str] = field(default_factory=list)  # runs of the label head (own tables)


def _table(backbone: str) -> str:
    return S.embedding_table_name(backbone)


def _inputs_of(ses: _Session, base: dict, tables: set[str]) -> dict[str, dict[str, str]]:
    """The input versions of a run on ``base``'s slides: counts and the ``tables`` used."""
    return {
        s: {k: v for k, v in ses.versions[s].items() if k == "expression" or k in tables}
        for s in sorted({*base["train"], *base["test"]})
    }


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
    #: slide -> content version of its counts and of each vector table (``runs.input_versions``)
    versions: dict[str, dict[str, str]] = field(default_factory=dict)
    #: run id -> its config id (spanning heads hash their members' config ids)
    config_of: dict[str, str] = field(default_factory=dict)
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
    """Run (or reuse) every fold x backbone x head (x control); returns what the CLI prints
    and the report shows: counts, the leaderboard and the paired comparisons (their bootstrap
    runs here, once).

    Fold x backbone tasks are fitted by ``workers`` threads (default: one per core, see
    :mod:`stimage_embed.predictions.workers`), the largest folds first. Once every backbone
    of a fold is fitted, this thread runs the heads spanning backbones (FSTimage) from the
    fold's predictions in memory and writes all the fold's runs in one batch."""
    t0 = time.perf_counter()
    controls = check_config(cfg)
    provs = {bb: table_provenance(store, bb) for bb in cfg.backbones}
    check_targets(store, cfg)
    drop_abandoned(store)
    folds = folds_of(store, cfg)
    labels = plan_labels(store, cfg, folds)  # checked before anything is written
    single = single_backbone_heads(cfg)
    spanning = [h for h in cfg.heads if head_spec(h).spans_backbones]
    per_fold = len(cfg.backbones) * len(single) + len(spanning)
    bar = tqdm(total=len(folds) * len(controls) * per_fold, desc="compare", unit="run", disable=not progress)
    ses = _Session(
        store,
        cfg,
        reusable_runs(store, sorted(committed_runs(store))),
        pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"])),
        pl.from_arrow(store.read("slides", ["slide_id", "um_per_px", "spot_pitch_um", "platform"])),
        provs,
        bar,
        input_versions(store, sorted({_table(p) for b in cfg.backbones for p in vector_parts(b)}), fold_slides(folds)),
    )
    _run_tasks(ses, _tasks(ses, folds, controls, workers), single, spanning, workers)
    bar.close()
    if labels is not None:
        run_label_plan(store, cfg, labels, controls, provs)
        ses.computed, ses.reused = ses.computed + labels.computed, ses.reused + labels.reused
    if not ses.run_ids:  # label heads only: no expression leaderboard
        return CompareResult(
            pl.DataFrame(), ses.computed, ses.reused, time.perf_counter() - t0, [], label_run_ids=labels.run_ids
        )
    return CompareResult(
        leaderboard(store, ses.run_ids),
        ses.computed,
        ses.reused,
        time.perf_counter() - t0,
        ses.run_ids,
        paired_comparisons(store, run_ids=ses.run_ids),
        labels.run_ids if labels else [],
    )


def _bases(cfg: CompareConfig, ds: str, fold: Fold, genes: list[str], controls: list[str]) -> list[dict]:
    """What identifies the runs of one fold, per control (``runs.run_key``'s ``base``)."""
    return [
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


def _tasks(ses: _Session, folds: list[tuple[str, Fold]], controls: list[str], workers: int | None) -> list[_Task]:
    """Every fold x backbone task, the largest folds first (so the last tasks to finish are
    short ones and no core idles long); each fold's genes from its training counts, the
    folds side by side (reads and sparse sums)."""
    cfg = ses.cfg
    fold_gene_lists = dict(
        threaded_map(lambda i: fold_genes(ses.store, folds[i][1].train_slides, cfg.genes), range(len(folds)), workers)
    )
    tasks: list[_Task] = []
    for i, (ds, fold) in enumerate(folds):
        bases = _bases(cfg, ds, fold, fold_gene_lists[i], controls)
        tasks += [_Task(fold, bb, bases) for bb in cfg.backbones]
    spots_per_slide = dict(ses.spots.group_by("slide_id").len().iter_rows())
    tasks.sort(key=lambda t: -sum(spots_per_slide.get(s, 0) for s in t.fold.train_slides))
    return tasks


def _run_tasks(ses: _Session, tasks: list[_Task], single: list[str], spanning: list[str], workers: int | None) -> None:
    """Fit the tasks in threads; once every backbone of a fold is done, run its spanning
    heads and write the fold's runs in one batch."""
    cfg = ses.cfg
    left = {id(t.bases): len(cfg.backbones) for t in tasks}
    fold_ids: dict[int, dict[str, list[dict[str, str]]]] = {}
    unwritten: dict[int, list[tuple[dict, pl.DataFrame, pl.DataFrame]]] = {}
    combined = {head_spec(h).combines for h in spanning}
    for task, res in threaded_map(lambda t: _compute_task(ses, t, single), tasks, workers):
        fold = id(task.bases)
        ses.reused += res.reused
        ses.bar.update(res.reused + len(res.computed))
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
                    members = {bb: by_bb[bb][c][head_spec(head).combines] for bb in cfg.backbones}
                    runs += _run_spanning(ses, base, head, members)
            if runs:  # one write batch per fold: its backbones' runs and the spanning heads'
                write_runs(ses.store, runs)
                ses.done.update(row["run_id"] for row, _, _ in runs)
                ses.computed += len(runs)


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
            config = run_key(
                base,
                backbone=task.backbone,
                provenance=setup_id(ses.provs[task.backbone]),
                head=head,
                params=params,
                effective_params=head_config(head, params),
            )
            tables = {_table(p) for p in vector_parts(task.backbone)}
            inputs = _inputs_of(ses, base, tables)
            rid, ses.config_of[rid] = run_identity(config, inputs, list(inputs))
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
                config_id=ses.config_of[rid],
                inputs=inputs,
            )
            out.computed.append((row, pred, score_run(pred, ses.spots, ses.slides, head)))
        out.ids.append(ids)
    return out


def _run_spanning(
    ses: _Session, base: dict, head: str, nb_runs: dict[str, str]
) -> list[tuple[dict, pl.DataFrame, pl.DataFrame]]:
    """Run (or reuse) a head spanning backbones (FSTimage) from the fold's runs of the head
    it combines (``nb_runs``: backbone -> run id); returns the run to write (none if reused)."""
    configs = {b: ses.config_of[r] for b, r in nb_runs.items()}
    rid, cid = combined_identity(base, head, nb_runs, configs, ses.cfg.missing)
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
        config_id=cid,
    )
    ses.bar.update()
    return [(row, pred, score_run(pred, ses.spots, ses.slides, head))]
