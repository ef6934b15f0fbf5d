"""What the viewer reads of ``label`` runs (the label head, issue 24): which runs are label
runs, and a label run's values for one slide and class, from ``label_predictions`` (schema in
:mod:`stimage_embed.store.schema_labels`). DuckDB SQL over the store's tables; every id is a
bound parameter (``?``), never part of the SQL text.

A label run's "genes" (``runs.genes``) are its classes, so the page's gene picker picks a
class. Per spot: ``prob_class`` = P(class | the spot's image vector) in [0, 1] for the picked
class; ``label`` = the predicted class (the most probable, the same for every picked class);
``observed_label`` = the spot's stored label in the run's label set (NULL when unknown).
"""

from __future__ import annotations

import polars as pl

from stimage_embed.store.schema_labels import LABEL_PREDICTIONS_TABLE
from stimage_embed.store.store import Store
from stimage_embed.viewer.queries import NotFound, run_genes, run_query, slide

#: the layers of a label run, in the page's order
LABEL_LAYERS = ("prob_class", "label", "observed_label")


def is_label_run(store: Store, run_id: str) -> bool:
    """Whether ``run_id`` has rows in ``label_predictions``."""
    if not store.has_table(LABEL_PREDICTIONS_TABLE):
        return False
    df = run_query(
        store, [LABEL_PREDICTIONS_TABLE], f"SELECT 1 FROM {LABEL_PREDICTIONS_TABLE} WHERE run_id = ? LIMIT 1", [run_id]
    )
    return df.height > 0


def label_values(store: Store, run_id: str, slide_id: str, cls: str) -> pl.DataFrame:
    """One row per predicted spot of ``slide_id``: spot_id, pixel_x, pixel_y (level-0 px),
    prob_class, label, observed_label (see the module doc). :class:`NotFound` for an unknown
    run, slide or class, or a slide the run did not predict."""
    slide(store, slide_id)
    if cls not in run_genes(store, run_id):
        raise NotFound(f"unknown class {cls!r} for label run {run_id!r}")
    df = run_query(
        store,
        [LABEL_PREDICTIONS_TABLE, "spots"],
        f"""SELECT p.spot_id, s.pixel_x, s.pixel_y, CAST(p.prob AS DOUBLE) AS prob_class,
                   p.label AS label, p.observed AS observed_label
            FROM {LABEL_PREDICTIONS_TABLE} p JOIN spots s ON s.slide_id = p.slide_id AND s.spot_id = p.spot_id
            WHERE p.run_id = ? AND p.slide_id = ? AND p."class" = ?
            ORDER BY p.spot_id""",
        [run_id, slide_id, cls],
    )
    if df.height == 0:
        raise NotFound(f"run {run_id!r} has no predictions for slide {slide_id!r}")
    return df
