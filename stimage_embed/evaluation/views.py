"""The leaderboard of some runs, from the SQL views declared in
:mod:`stimage_embed.store.views` (registered in every ``Store.sql`` session)."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from stimage_embed.store.views import CURRENT_ONLY, EVALUATION_VIEWS, SCORES


def leaderboard(store, run_ids: Sequence[str] | None = None) -> pl.DataFrame:
    """The leaderboard, optionally restricted to some runs."""
    sql = EVALUATION_VIEWS["leaderboard"][0]
    if run_ids is not None:
        ids = ", ".join("'" + r + "'" for r in run_ids) or "''"
        sql = sql.replace(SCORES, SCORES.replace(CURRENT_ONLY, f"WHERE run_id IN ({ids})"))  # exactly these runs
    return store.sql(
        f"SELECT * FROM ({sql}) ORDER BY dataset, split, gene_spec, control, pcc_mean DESC NULLS LAST, head"
    )
