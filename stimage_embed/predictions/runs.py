"""Run bookkeeping: run ids, the committed-runs check and the one ``runs`` row builder
shared by ``train``, ``predict`` and ``compare``.

A run is one head fitted on some training slides with some vectors (or, for FSTimage,
combined from other runs). Its id hashes everything that determines its result, so a
repeated command reuses it instead of recomputing; a run counts as done once its ``runs``
row is committed (written last, after its predictions and metrics).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from stimage_embed import __version__
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list


def run_hash(obj: dict) -> str:
    """Id of a run: hash of everything that determines its result (incl. the package version,
    so a new release recomputes instead of reusing results of older code). 20 hex digits."""
    obj = {**obj, "package_version": __version__}
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]


def committed_runs(store: Store, run_ids: Sequence[str] | None = None) -> set[str]:
    """Ids of the runs with a committed ``runs`` row (all, or those among ``run_ids``)."""
    if not store.has_table("runs"):
        return set()
    where = None if run_ids is None else f"run_id IN ({sql_list(list(run_ids))})"
    return set(store.read("runs", ["run_id"], where=where)["run_id"].to_pylist())


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
) -> dict[str, Any]:
    """One ``runs`` row (schema :data:`stimage_embed.store.schema.RUNS`)."""
    return {
        "run_id": run_id,
        "dataset": dataset,
        "backbone": backbone,
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
    }


def commit_run_row(store: Store, row: dict[str, Any]) -> bool:
    """Append ``row`` to ``runs`` unless its run is committed already; True if written.
    Call under the store's writer lock when other writers may race."""
    if row["run_id"] in committed_runs(store, [row["run_id"]]):
        return False
    store.append("runs", pa.Table.from_pylist([row], schema=S.RUNS))
    return True
