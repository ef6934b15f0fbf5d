"""``compare``: every fold x backbone x head from the cached vectors, plus FSTimage across
backbones, with all state in the store (``runs``, ``predictions``, ``metrics``).

A run is one head fitted on one fold's training slides with one backbone's vectors. Its
id hashes everything that determines its result (dataset, fold slides, genes, head and
its parameters, the vectors' provenance ids, the control), so re-running ``compare`` with
one more backbone or head only computes what is new.

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

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa
from tqdm.auto import tqdm

from stimage_embed import __version__
from stimage_embed.errors import InputError, StoreError
from stimage_embed.evaluation.genes import DEFAULT_GENE_SPEC, parse_gene_spec, select_genes
from stimage_embed.evaluation.scoring import score_run
from stimage_embed.evaluation.splits import Fold, make_folds, parse_split
from stimage_embed.evaluation.views import leaderboard
from stimage_embed.predictions.arrays import load_spot_arrays, shuffled_within_slides, table_provenance
from stimage_embed.predictions.runner import (
    ALL_HEADS,
    SINGLE_BACKBONE_HEADS,
    combine_backbones,
    fit_head,
    head_config,
    make_head,
    predict_head,
)
from stimage_embed.embeddings.provenance import provenance_id
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    backbones: list[str]
    heads: list[str] = field(default_factory=lambda: ["nb", "ensemble", "highlow", "ridge", "mean", "fstimage"])
    split: str = "loso"
    genes: str = DEFAULT_GENE_SPEC
    #: extra controls run beside the real vectors: "shuffled" (see the module doc)
    controls: list[str] = field(default_factory=list)
    datasets: list[str] | None = None
    only_qc: bool = True
    missing: str = "error"  # FSTimage policy for spots absent from a backbone
    #: constructor parameters per head. highlow: STimage's saga / C 0.1 / l1_ratio 0.5, with
    #: iterations capped at 100 (tol 1e-3): on HER2ST B4,C2-C4 -> C5 the mean AUC was 0.581
    #: vs 0.588 at sklearn's 1000 iterations, 16x faster.
    head_params: dict[str, dict] = field(default_factory=lambda: {"highlow": {"max_iter": 100, "tol": 1e-3}})
    train_slides: list[str] | None = None  # explicit split (with test_slides)
    test_slides: list[str] | None = None


@dataclass
class CompareResult:
    leaderboard: pl.DataFrame
    computed: int
    reused: int
    seconds: float
    run_ids: list[str]


def run_hash(obj: dict) -> str:
    """Id of a run: hash of everything that determines its result (incl. the package version,
    so a new release recomputes instead of reusing results of older code)."""
    obj = {**obj, "package_version": __version__}
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _committed_runs(store: Store) -> set[str]:
    if not store.has_table("runs"):
        return set()
    return set(store.read("runs", ["run_id"])["run_id"].to_pylist())


def _drop_uncommitted(store: Store) -> None:
    """Remove the rows of runs proven orphaned, under the store's writer lock.

    ``_write_run`` marks a run pending (``<store>/.pending/compare/<run_id>``) before its
    first row and clears the mark after its ``runs`` row, all under the lock. So here, under
    the lock, a pending run without a ``runs`` row was cut short by a crash: its rows go.
    Rows of anything else without a ``runs`` row (``predict``, image-only inference, a run
    another process is writing) are never touched."""
    with store.writer("compare"):
        done = _committed_runs(store)
        for rid in store.pending("compare"):
            if rid not in done:
                for name in ("predictions", "metrics"):
                    n = store.delete(name, f"run_id IN ({sql_list([rid])})")
                    if n:
                        log.warning("removing %d row(s) of run %s from %s: its writer was interrupted before committing it", n, rid, name)
            store.clear_pending("compare", rid)


def _embedded_slides(store: Store, backbones: list[str]) -> set[str]:
    """Slides with counts (rows in ``expression``) and vectors in every backbone's table;
    image-only slides (``infer``) have no counts and are never in a fold."""
    with_counts = set(store.sql("SELECT DISTINCT slide_id FROM expression")["slide_id"]) if store.has_table("expression") else set()
    sets = [set(store.sql(f"SELECT DISTINCT slide_id FROM {S.embedding_table_name(b)}")["slide_id"]) for b in backbones]
    return set.intersection(with_counts, *sets) if sets else set()


def _folds(store: Store, cfg: CompareConfig) -> list[tuple[str, Fold]]:
    slides = pl.from_arrow(store.read("slides", ["dataset", "slide_id", "patient"]))
    have = _embedded_slides(store, cfg.backbones)
    skipped = sorted(set(slides["slide_id"]) - have)
    if skipped:
        log.warning("slides without vectors for every backbone (%s) are left out of the folds: %s", ", ".join(cfg.backbones), skipped)
    slides = slides.filter(pl.col("slide_id").is_in(sorted(have)))
    if slides.height == 0:
        raise StoreError(f"{store.path}: no slide has vectors for all of {cfg.backbones}; run `stimage-embed embed` first")
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


def fold_genes(store: Store, fold: Fold, spec: str) -> list[str]:
    """Genes of a fold, selected from its training slides only."""
    keys, genes, counts, lib = store.expression_matrix(fold.train_slides)
    return select_genes(parse_gene_spec(spec), counts, genes, keys["slide_id"].to_numpy(), fold.train_slides, library_size=lib)


CONTROLS = ("none", "shuffled")


def compare(store: Store, cfg: CompareConfig, progress: bool = True) -> CompareResult:
    """Run (or reuse) every fold x backbone x head (x control); returns the leaderboard."""
    t0 = time.perf_counter()
    bad = sorted(set(cfg.heads) - set(ALL_HEADS))
    if bad:
        raise InputError(None, "--heads", f"unknown heads {bad}; choose from {', '.join(ALL_HEADS)}")
    if "fstimage" in cfg.heads and len(cfg.backbones) < 2:
        raise InputError(None, "--heads", "fstimage averages several backbones: give at least two --backbones")
    bad = sorted(set(cfg.controls) - set(CONTROLS[1:]))
    if bad:
        raise InputError(None, "--control", f"unknown controls {bad}; choose from {', '.join(CONTROLS[1:])}")
    controls = ["none"] + [c for c in CONTROLS[1:] if c in cfg.controls]
    provs = {bb: table_provenance(store, bb) for bb in cfg.backbones}
    _drop_uncommitted(store)
    done = _committed_runs(store)
    spots = pl.from_arrow(store.read("spots", ["slide_id", "spot_id", "array_row", "array_col", "pixel_x", "pixel_y"]))
    slides = pl.from_arrow(store.read("slides", ["slide_id", "um_per_px", "spot_pitch_um", "platform"]))
    folds = _folds(store, cfg)
    computed = reused = 0
    run_ids: list[str] = []
    # nb first: the ensemble's members reuse its CV choice of the L2 strength (same data,
    # same grouped folds: the same choice), which halves the CV work per fold
    single = sorted((h for h in cfg.heads if h in SINGLE_BACKBONE_HEADS), key=lambda h: h != "nb")
    need_nb = "fstimage" in cfg.heads and "nb" not in single
    per_fold = len(cfg.backbones) * (len(single) + need_nb) + ("fstimage" in cfg.heads)
    bar = tqdm(total=len(folds) * len(controls) * per_fold, desc="compare", unit="run", disable=not progress)
    for ds, fold in folds:
        genes = fold_genes(store, fold, cfg.genes)
        arrays: dict[str, tuple] = {}
        for control in controls:
            nb_runs: dict[str, str] = {}
            base = {"dataset": ds, "split": cfg.split if cfg.train_slides is None else "explicit", "fold": fold.name,
                    "train": sorted(fold.train_slides), "test": sorted(fold.test_slides), "genes": genes,
                    "gene_spec": cfg.genes, "only_qc": cfg.only_qc, "control": control}
            for bb in cfg.backbones:
                pid = provenance_id(provs[bb])
                nb_alpha: float | None = None
                for head in (["nb"] if need_nb else []) + single:
                    params = cfg.head_params.get(head, {})
                    rid = run_hash({**base, "backbone": bb, "provenance": pid, "head": head, "params": params,
                                    "effective_params": head_config(head, params)})
                    if head == "nb":
                        nb_runs[bb] = rid
                    if head in cfg.heads:
                        run_ids.append(rid)
                    bar.set_postfix(fold=fold.name, backbone=bb, head=head, control=control)
                    if rid in done:
                        reused += 1
                        bar.update()
                        continue
                    if bb not in arrays:
                        arrays[bb] = (load_spot_arrays(store, bb, fold.train_slides, genes, only_qc=cfg.only_qc),
                                      load_spot_arrays(store, bb, fold.test_slides, genes, only_qc=cfg.only_qc))
                    train, test = arrays[bb]
                    if control == "shuffled":
                        train, test = shuffled_within_slides(train, seed=0), shuffled_within_slides(test, seed=1)
                    t1 = time.perf_counter()
                    fit_params = dict(params)
                    if head == "ensemble" and nb_alpha is not None and "alpha" not in fit_params:
                        fit_params["alpha"] = nb_alpha
                    model = fit_head(head, make_head(head, fit_params), train)
                    fit_s = time.perf_counter() - t1
                    if head == "nb":
                        nb_alpha = getattr(model, "alpha_", None)
                    pred = predict_head(head, model, test).with_columns(pl.lit(rid).alias("run_id"))
                    _write_run(store, rid, pred, score_run(pred, spots, slides, head), ds, bb, [bb], head,
                               base, genes, params, [pid], train.X.shape[0], fit_s)
                    done.add(rid)
                    computed += 1
                    bar.update()
            if "fstimage" in cfg.heads:
                rid = run_hash({**base, "head": "fstimage", "members": nb_runs, "missing": cfg.missing})
                run_ids.append(rid)
                if rid in done:
                    reused += 1
                else:
                    members = {bb: pl.from_arrow(store.read("predictions", where=f"run_id = '{r}'")) for bb, r in nb_runs.items()}
                    pred = combine_backbones(members, missing=cfg.missing).with_columns(pl.lit(rid).alias("run_id"))
                    _write_run(store, rid, pred, score_run(pred, spots, slides, "fstimage"), ds, "fstimage",
                               list(nb_runs), "fstimage", base, genes, {"missing": cfg.missing},
                               [provenance_id(provs[b]) for b in nb_runs], 0, 0.0)
                    done.add(rid)
                    computed += 1
                bar.update()
    bar.close()
    board = leaderboard(store, run_ids)
    return CompareResult(board, computed, reused, time.perf_counter() - t0, run_ids)


def _write_run(store, rid, pred, metrics, ds, backbone, members, head, base, genes, params, pids, n_train, fit_s):
    """Commit one run under the store's writer lock: mark it pending, drop rows an interrupted
    attempt left, write predictions, metrics, then its ``runs`` row (the commit marker), then
    clear the mark. A run another writer committed meanwhile is kept, not written twice."""
    with store.writer("compare"):
        if rid in _committed_runs(store):
            log.info("run %s was committed meanwhile by another writer; keeping it", rid)
            return
        store.mark_pending("compare", rid)
        for name in ("predictions", "metrics"):
            store.delete(name, f"run_id IN ({sql_list([rid])})")
        store.append("predictions", pred)
        store.append(
            "metrics",
            metrics.with_columns(pl.col("value").fill_nan(None)).with_columns(
                pl.lit(rid).alias("run_id"), pl.lit(ds).alias("dataset"), pl.lit(backbone).alias("backbone"),
                pl.lit(head).alias("head"), pl.lit(base["fold"]).alias("fold"), pl.lit(base["control"]).alias("control"),
            ),
        )
        row = {
            "run_id": rid, "dataset": ds, "backbone": backbone, "members": members, "head": head,
            "control": base["control"], "split": base["split"],
            "fold": base["fold"], "train_slides": base["train"], "test_slides": base["test"], "gene_spec": base["gene_spec"], "genes": genes,
            "head_params": json.dumps(params, sort_keys=True), "provenance_ids": pids, "n_train_spots": n_train,
            "fit_seconds": fit_s, "model_dir": "", "created_at": dt.datetime.now(dt.timezone.utc),
        }
        store.append("runs", pa.Table.from_pylist([row], schema=S.RUNS))
        store.clear_pending("compare", rid)
