"""Run bookkeeping, in one place: run keys and identity, the committed-runs check and the
``runs_status`` view, the one ``runs`` row builder, and the life cycle of runs written in
several commits (pending marks, write, commit, clean-up of abandoned writes), shared by
``compare``, ``train`` and ``predict`` (``infer`` writes under the id of the saved model's run).

Keys. :func:`run_key` builds the configuration a fitted run hashes, :func:`combined_identity`
that of a run combining other runs (FSTimage); :func:`run_hash` is the only hash of a run id.

Identity. A run is one head fitted on some training slides with some vectors (or, for
FSTimage, combined from other runs). Its ``config_id`` hashes the configuration (dataset,
fold slides, genes, head and parameters, the vectors' provenance id, the control, the
package version); its ``run_id`` hashes the configuration AND the content version of every
input, per slide (:func:`input_versions`): the slide's counts (``slides.expression_hash``,
recorded at ingest) and, per vector table, the vectors (row count, provenance ids and
geometry hashes they were cut under, recorded with every vector). Re-ingested counts,
re-embedded vectors, a moved spot or another stain target make a new run id; the old run
stays in the store, marked superseded (``runs_status`` view: a newer run of the same
``config_id`` exists) and left out of the leaderboard views.

Life cycle. A run counts as done once its ``runs`` row is committed, after its predictions
and metrics, and only if it has predictions and is not superseded (:func:`reusable_runs`).
The writer marks its runs pending first (``store.intents``: owner and lease), and clean-up
(:func:`drop_abandoned`) removes rows only of runs whose writer is gone.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import polars as pl
import pyarrow as pa

from stimage_embed import __version__
from stimage_embed.errors import StoreError
from stimage_embed.predictions.registry import head_spec
from stimage_embed.store import intents
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

#: the pending-mark kind of runs written by ``compare``
PENDING = "compare"

#: every run with ``superseded``: a newer run of the same configuration exists (computed on
#: changed inputs: re-ingested counts, re-embedded vectors). Runs of older stores have no
#: ``config_id``: their run id stands for it.
RUNS_STATUS = """
    SELECT *, coalesce(config_id, run_id) AS config_key,
           coalesce(created_at < max(created_at) OVER (PARTITION BY coalesce(config_id, run_id)), false) AS superseded
    FROM runs
"""

#: the views of this module registered in every ``Store.sql`` session (``store.sql.VIEW_PROVIDERS``)
SQL_VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {"runs_status": (RUNS_STATUS, ("runs",))}


def run_hash(obj: dict) -> str:
    """Hash of everything that determines a result (incl. the package version, so a new
    release recomputes instead of reusing results of older code). 20 hex digits."""
    obj = {**obj, "package_version": __version__}
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def run_key(base: dict, *, backbone: str, provenance: str, head: str, params: dict, **extra: Any) -> dict:
    """The configuration of a fitted run, as hashed into its ids (:func:`run_identity`):
    ``base`` (what the command fixed: ``compare``: dataset, split, fold slides, genes, gene
    spec, QC filter, control; ``train``: training slides, genes, QC filter, kind) plus the
    vector source ``backbone``, its vectors' setup id ``provenance``, the ``head`` and its
    ``params`` (``extra``: e.g. the effective parameters)."""
    return {**base, "backbone": backbone, "provenance": provenance, "head": head, "params": params, **extra}


def combined_identity(
    base: dict, head: str, members: dict[str, str], member_configs: dict[str, str], missing: str
) -> tuple[str, str]:
    """``(run_id, config_id)`` of a run combining other runs (a head spanning backbones):
    ``members``: backbone -> the run id it combines (they cover the inputs' content),
    ``member_configs``: backbone -> that run's config id; ``missing``: the missing-spot policy."""
    rid = run_hash({**base, "head": head, "members": members, "missing": missing})
    return rid, run_hash({**base, "head": head, "members": member_configs})


def run_identity(config: dict, versions: dict[str, dict[str, str]], slides: Sequence[str]) -> tuple[str, str]:
    """``(run_id, config_id)`` of a run: ``config_id`` hashes ``config``; ``run_id`` also
    the input versions (:func:`input_versions`) of ``slides`` (its training and test slides)."""
    inputs = {s: versions[s] for s in sorted(set(slides))}
    return run_hash({**config, "inputs": inputs}), run_hash(config)


def _vector_versions(store: Store, table: str, slides: Sequence[str], current: dict) -> dict[str, str]:
    """Per slide, the content version of its vectors in ``table``; refuses vectors cut under
    another geometry than the slide's current one (``current``: slide -> geometry_hash)."""
    from stimage_embed.embeddings.provenance import existing_provenance, identity
    from stimage_embed.embeddings.stain_target import check_table_target

    check_table_target(store, table)
    targets = sorted({str(identity(p)["stain_target"]) for p in existing_provenance(store, table)})
    cols = ["slide_id", "provenance_id"]
    if "geometry_hash" in store.dataset(table).schema.names:
        cols.append("geometry_hash")
    rows = pl.from_arrow(store.read(table, cols, where=f"slide_id IN ({sql_list(slides)})"))
    if "geometry_hash" not in rows.columns:
        rows = rows.with_columns(pl.lit(None, pl.String).alias("geometry_hash"))
    out = {}
    for (sid,), g in rows.group_by("slide_id"):
        ghashes = sorted(set(g["geometry_hash"].drop_nulls()))
        if current.get(sid) and any(h != current[sid] for h in ghashes):
            raise StoreError(
                f"{store.path}/{table}: the vectors of slide {sid} were cut from an older version of the slide "
                f"(re-ingested since); run `stimage-embed embed --backbone {table.removeprefix('embeddings_')}` first"
            )
        body = {"n": g.height, "provenance": sorted(set(g["provenance_id"])), "geometry": ghashes, "stain": targets}
        out[sid] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return out


def input_versions(store: Store, tables: Sequence[str], slides: Sequence[str]) -> dict[str, dict[str, str]]:
    """``slide -> {"expression": v, <vector table>: v, ...}``: the content version of each
    input of a run on ``slides`` (see the module doc), read from what ingest and the
    embedding pass recorded. Slides of older stores without ``expression_hash`` use the time
    of their ingest."""
    slides = sorted(set(slides))
    cols = [c for c in ("slide_id", "expression_hash", "geometry_hash", "ingested_at")]
    have = set(store.dataset("slides").schema.names)
    srows = pl.from_arrow(
        store.read("slides", [c for c in cols if c in have], where=f"slide_id IN ({sql_list(slides)})")
    )
    for c in cols:
        if c not in srows.columns:
            srows = srows.with_columns(pl.lit(None, pl.String).alias(c))
    out: dict[str, dict[str, str]] = {}
    for r in srows.iter_rows(named=True):
        out[r["slide_id"]] = {"expression": r["expression_hash"] or f"ingested:{r['ingested_at']}"}
    current = dict(zip(srows["slide_id"], srows["geometry_hash"]))
    for table in tables:
        for sid, v in _vector_versions(store, table, slides, current).items():
            out.setdefault(sid, {})[table] = v
    return out


def committed_runs(store: Store, run_ids: Sequence[str] | None = None) -> set[str]:
    """Ids of the runs with a committed ``runs`` row (all, or those among ``run_ids``)."""
    if not store.has_table("runs"):
        return set()
    where = None if run_ids is None else f"run_id IN ({sql_list(list(run_ids))})"
    return set(store.read("runs", ["run_id"], where=where)["run_id"].to_pylist())


def reusable_runs(store: Store, run_ids: Sequence[str]) -> set[str]:
    """Runs among ``run_ids`` a command may reuse: committed, current (not superseded: see
    the module doc) and with at least one prediction row. A committed run without rows (its
    rows removed by a faulty clean-up) is recomputed, never reported as reused."""
    if not run_ids or not store.has_table("runs") or not store.has_table("predictions"):
        return set()
    ids = sql_list(sorted(set(run_ids)))
    current = store.sql(f"SELECT run_id FROM ({RUNS_STATUS}) WHERE run_id IN ({ids}) AND NOT superseded")
    if current.height == 0:
        return set()
    have = store.read("predictions", ["run_id"], where=f"run_id IN ({sql_list(current['run_id'])})")
    return set(have["run_id"].to_pylist())


def datasets_of(store: Store, slides: Sequence[str]) -> str:
    """Comma-joined sorted datasets of ``slides`` (the ``runs.dataset`` of a train run)."""
    if not slides:
        return ""
    ds = store.read("slides", ["dataset"], where=f"slide_id IN ({sql_list(list(slides))})")["dataset"].to_pylist()
    return ",".join(sorted(set(ds)))


def runs_row(
    *,
    run_id: str,
    dataset: str,
    backbone: str,
    members: Sequence[str],
    head: str,
    split: str,
    fold: str,
    train_slides: Sequence[str],
    test_slides: Sequence[str],
    gene_spec: str | None,
    genes: Sequence[str],
    params: dict[str, Any] | None,
    provenance_ids: Sequence[str],
    n_train_spots: int | None,
    fit_seconds: float | None,
    model_dir: str = "",
    control: str = "none",
    config_id: str | None = None,
    inputs: dict | None = None,
) -> dict[str, Any]:
    """One ``runs`` row (schema :data:`stimage_embed.store.schema.RUNS`); ``inputs``: the
    input versions of its slides (:func:`input_versions`). ``backbone``: the vector source
    the run read (a table's backbone, a context table ``x__ctx300um``, a composite ``a+b``),
    stored as ``vector_source``, with its real backbone names as ``backbone``
    (:func:`~stimage_embed.store.schema.source_backbones`); for a head spanning backbones
    (it reads other runs' predictions) its name, stored as ``backbone`` (no vector source)."""
    source = None if head_spec(head).spans_backbones else backbone
    return {
        "run_id": run_id,
        "dataset": dataset,
        "backbone": backbone if source is None else S.source_backbones(source),
        "vector_source": source,
        "members": list(members),
        "head": head,
        "control": control,
        "split": split,
        "fold": fold,
        "train_slides": sorted(train_slides),
        "test_slides": list(test_slides),
        "gene_spec": gene_spec,
        "genes": list(genes),
        "head_params": json.dumps(params or {}, sort_keys=True),
        "provenance_ids": list(provenance_ids),
        "n_train_spots": n_train_spots,
        "fit_seconds": fit_seconds,
        "model_dir": model_dir,
        "created_at": dt.datetime.now(dt.timezone.utc),
        "config_id": config_id,
        "input_versions": None if inputs is None else json.dumps(inputs, sort_keys=True),
    }


def model_run_row(
    store: Store,
    meta: dict[str, Any],
    provenance_id: str,
    model_dir: str,
    *,
    config_id: str | None = None,
    inputs: dict | None = None,
) -> dict[str, Any]:
    """The ``runs`` row of a saved model (split ``train``) from its ``run.json`` ``meta``
    (run_id, backbone, head, genes or classes, gene_spec, params, train_slides, n_train_spots,
    fit_seconds): written by ``train``, or by ``predict`` for a model trained elsewhere."""
    train = [str(x) for x in meta.get("train_slides", [])]
    return runs_row(
        run_id=meta["run_id"],
        dataset=datasets_of(store, train),
        backbone=meta["backbone"],
        members=[meta["backbone"]],
        head=meta["head"],
        split="train",
        fold="train",
        train_slides=train,
        test_slides=[],
        gene_spec=meta.get("gene_spec"),
        genes=meta["genes"],
        params=meta.get("params"),
        provenance_ids=[provenance_id],
        n_train_spots=meta.get("n_train_spots"),
        fit_seconds=meta.get("fit_seconds"),
        model_dir=model_dir,
        config_id=config_id,
        inputs=inputs,
    )


def commit_run_row(store: Store, row: dict[str, Any]) -> bool:
    """Append ``row`` to ``runs`` unless its run is committed already; True if written.
    Call under the store's writer lock when other writers may race."""
    if row["run_id"] in committed_runs(store, [row["run_id"]]):
        return False
    store.append("runs", pa.Table.from_pylist([row], schema=S.RUNS))
    return True


def _delete_rows(store: Store, run_ids: Sequence[str], tables=("predictions", "metrics")) -> None:
    for name in tables:
        n = store.delete(name, f"run_id IN ({sql_list(run_ids)})")
        if n:
            log.warning("removing %d row(s) of run(s) %s from %s (not committed, or to be rewritten)", n, run_ids, name)


def drop_abandoned(store: Store) -> None:
    """Remove the rows of runs whose writer is gone before committing them (under the store's
    writer lock): runs marked pending (``store.intents``) whose mark is abandoned (local: any
    mark found under the lock; object store: lease expired or owner process gone) and that
    have no ``runs`` row. Rows of anything else (``predict``, image-only inference, a run a
    live writer is writing) are never touched."""
    with store.writer("compare"):
        done = committed_runs(store)
        for rid in intents.stale_marks(store, PENDING):
            if rid not in done:
                _delete_rows(store, [rid])
            intents.clear(store, PENDING, rid)


def run_label(row: dict[str, Any]) -> str:
    """What a run is labelled by in ``metrics.backbone`` and the evaluation views: its vector
    source, or the name of a head spanning backbones."""
    return row.get("vector_source") or row["backbone"]


def tagged_metrics(row: dict[str, Any], metrics: pl.DataFrame) -> pl.DataFrame:
    """A run's metric rows as stored: NaN values as NULL, tagged with the run's id, dataset,
    label (:func:`run_label`, as ``backbone``), head, fold and control."""
    tags = {**{c: row[c] for c in ("run_id", "dataset", "head", "fold", "control")}, "backbone": run_label(row)}
    return metrics.with_columns(pl.col("value").fill_nan(None)).with_columns(
        *(pl.lit(v).alias(c) for c, v in tags.items())
    )


def write_runs(store: Store, runs: list[tuple[dict, pl.DataFrame, pl.DataFrame]]) -> list[str]:
    """Commit scored runs (``(runs row, predictions, metrics)``) together, under the store's
    writer lock: mark them pending (owner and lease), remove rows a former attempt left (and
    the ``runs`` row of a run to be rewritten: empty or superseded), write all their
    predictions, then all their metrics (:func:`tagged_metrics`), then their ``runs`` rows
    (the commit markers), then clear the marks. A run another writer committed meanwhile is
    kept, not written twice. Returns the ids written."""
    with store.writer("compare", repair=False):  # the command repaired the store when it started
        ids = [row["run_id"] for row, _, _ in runs]
        keep = reusable_runs(store, ids)
        if keep:
            log.info("runs %s were committed meanwhile by another writer; keeping them", sorted(keep))
        marked = {r: intents.read(store, PENDING, r) for r in set(ids) & set(store.pending(PENDING))}
        busy = {r for r, body in marked.items() if not intents.abandoned(store, body)}
        if busy:  # object store: a live writer is writing these very runs
            log.info("runs %s are being written by another live writer; leaving them to it", sorted(busy))
        todo = [r for r in runs if r[0]["run_id"] not in keep | busy]
        ids = [row["run_id"] for row, _, _ in todo]
        if not todo:
            return []
        for rid in ids:
            intents.mark(store, PENDING, rid)
        # rows of these runs exist only if a former attempt left them (its writer gone, or
        # committed empty or superseded): removed before the new rows; a fresh run costs no scan
        old = sorted(set(ids) & committed_runs(store, ids))
        if old:
            _delete_rows(store, old, ("runs",))
        if old or marked:
            _delete_rows(store, sorted(set(old) | (set(marked) & set(ids))))
        store.append("predictions", pl.concat([pred for _, pred, _ in todo], how="vertical_relaxed"))
        store.append("metrics", pl.concat([tagged_metrics(row, m) for row, _, m in todo], how="vertical_relaxed"))
        store.append("runs", pa.Table.from_pylist([row for row, _, _ in todo], schema=S.RUNS))
        for rid in ids:
            intents.clear(store, PENDING, rid)
        return ids
