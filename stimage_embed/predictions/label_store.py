"""Writing and reusing the label head's runs: ``label_predictions`` and ``label_metrics``
rows (schemas in :mod:`stimage_embed.store.schema_labels`) with their ``runs`` rows.

A label run's rows are written like an expression run's (:func:`stimage_embed.predictions.runs.write_runs`):
under the writer lock, pending marks first, then the rows, then the ``runs`` rows (the
commit markers), then the marks cleared. Rows left by an attempt that never committed are
removed before a run is written again, and a run is reused only when committed, current
(not superseded) and with prediction rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import polars as pl
import pyarrow as pa

from stimage_embed.predictions.runs import PENDING, RUNS_STATUS, committed_runs
from stimage_embed.store import intents
from stimage_embed.store import schema as S
from stimage_embed.store.schema_labels import (
    LABEL_METRICS,
    LABEL_METRICS_TABLE,
    LABEL_PREDICTION_KEYS,
    LABEL_PREDICTIONS,
    LABEL_PREDICTIONS_TABLE,
)
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)


def prediction_rows(
    run_id: str, keys: pl.DataFrame, proba: np.ndarray, classes: Sequence[str], observed: np.ndarray | None = None
) -> pl.DataFrame:
    """Long ``label_predictions`` rows: one per (spot of ``keys``, class); ``proba`` is
    (n_spots, n_classes) with columns in ``classes`` order; ``observed``: (n_spots,) labels or None."""
    n, k = proba.shape
    classes = np.asarray(classes).astype(str)
    if k != len(classes) or n != keys.height:
        raise ValueError(f"proba {proba.shape}: expected ({keys.height}, {len(classes)})")
    label = classes[np.argmax(proba, axis=1)] if n else np.array([], dtype=str)
    return pl.DataFrame(
        {
            "run_id": [run_id] * (n * k),
            "slide_id": np.repeat(keys["slide_id"].to_numpy(), k),
            "spot_id": np.repeat(keys["spot_id"].to_numpy(), k),
            "class": np.tile(classes, n),
            "prob": np.asarray(proba, np.float32).reshape(-1),
            "label": np.repeat(label, k),
            "observed": None if observed is None else np.repeat(np.asarray(observed).astype(str), k),
        },
        schema={
            "run_id": pl.String,
            "slide_id": pl.String,
            "spot_id": pl.String,
            "class": pl.String,
            "prob": pl.Float32,
            "label": pl.String,
            "observed": pl.String,
        },
    )


def reusable_label_runs(store: Store, run_ids: Sequence[str]) -> set[str]:
    """Label runs among ``run_ids`` that may be reused: committed, current, with rows."""
    if not run_ids or not store.has_table("runs") or not store.has_table(LABEL_PREDICTIONS_TABLE):
        return set()
    ids = sql_list(sorted(set(run_ids)))
    current = store.sql(f"SELECT run_id FROM ({RUNS_STATUS}) WHERE run_id IN ({ids}) AND NOT superseded")
    if current.height == 0:
        return set()
    have = store.read(LABEL_PREDICTIONS_TABLE, ["run_id"], where=f"run_id IN ({sql_list(current['run_id'])})")
    return set(have["run_id"].to_pylist())


def write_label_runs(store: Store, runs: list[tuple[dict, pl.DataFrame, pl.DataFrame]]) -> list[str]:
    """Commit scored label runs (``(runs row, label predictions, label metrics)``) together
    (see the module doc); returns the ids written (runs committed meanwhile are kept)."""
    with store.writer("compare", repair=False):
        keep = reusable_label_runs(store, [row["run_id"] for row, _, _ in runs])
        todo = [r for r in runs if r[0]["run_id"] not in keep]
        ids = [row["run_id"] for row, _, _ in todo]
        if not todo:
            return []
        for rid in ids:
            intents.mark(store, PENDING, rid)
        old = sorted(committed_runs(store, ids))  # committed without rows or superseded: rewritten
        if old:
            store.delete("runs", f"run_id IN ({sql_list(old)})")
        for table in (LABEL_PREDICTIONS_TABLE, LABEL_METRICS_TABLE):
            n = store.delete(table, f"run_id IN ({sql_list(ids)})")
            if n:
                log.warning("removing %d row(s) of uncommitted label run(s) from %s", n, table)
        store.append(LABEL_PREDICTIONS_TABLE, pl.concat([p for _, p, _ in todo]), schema=LABEL_PREDICTIONS)
        store.append(LABEL_METRICS_TABLE, pl.concat([m for _, _, m in todo]), schema=LABEL_METRICS)
        store.append("runs", pa.Table.from_pylist([row for row, _, _ in todo], schema=S.RUNS))
        for rid in ids:
            intents.clear(store, PENDING, rid)
        return ids


def replace_label_predictions(store: Store, run_id: str, slides: Sequence[str], rows: pl.DataFrame) -> None:
    """Make ``rows`` the run's only ``label_predictions`` rows of ``slides`` (one commit)."""
    scope = f"run_id = {sql_list([run_id])} AND slide_id IN ({sql_list(list(slides))})"
    store.replace_where(LABEL_PREDICTIONS_TABLE, rows, LABEL_PREDICTION_KEYS, scope, schema=LABEL_PREDICTIONS)
