"""Similar spots for the click panel, from the search feature when it is installed.

The viewer does not depend on it: it tries ``from stimage_embed.search import similar_spots``
and, if that import fails, reports the feature as unavailable. The contract it calls:

``similar_spots(store, slide_id, spot_id, k) -> polars.DataFrame | list[dict]`` with one row
per similar spot, best first, columns ``slide_id``, ``spot_id`` and optionally ``score``
(higher = more similar) or ``distance``.
"""

from __future__ import annotations

import importlib
import logging

import polars as pl

from stimage_embed.store.store import Store

log = logging.getLogger(__name__)

SEARCH_MODULE = "stimage_embed.search"
SEARCH_FUNCTION = "similar_spots"


def search_function():
    """The search feature's ``similar_spots``, or None when it is not installed."""
    try:
        module = importlib.import_module(SEARCH_MODULE)
    except ImportError:
        return None
    return getattr(module, SEARCH_FUNCTION, None)


def similar(store: Store, slide_id: str, spot_id: str, k: int) -> dict:
    """``{"available": bool, "spots": [{slide_id, spot_id, score?, distance?}, ...]}``,
    spots from other slides only."""
    fn = search_function()
    if fn is None:
        return {"available": False, "spots": []}
    rows = fn(store, slide_id, spot_id, k)
    if isinstance(rows, pl.DataFrame):
        rows = rows.to_dicts()
    keep = ("slide_id", "spot_id", "score", "distance")
    spots = [{c: r[c] for c in keep if c in r} for r in rows if r.get("slide_id") != slide_id]
    return {"available": True, "spots": spots[:k]}
