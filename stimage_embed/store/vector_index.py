"""LanceDB vector-index configurations (the store's side of ``stimage_embed.search``)."""

from __future__ import annotations

import lancedb.index as li

#: index type name -> LanceDB index configuration class
INDEX_TYPES = {
    "IVF_HNSW_SQ": li.IvfHnswSq,
    "IVF_PQ": li.IvfPq,
    "IVF_HNSW_PQ": li.HnswPq,
    "IVF_SQ": li.IvfSq,
    "IVF_FLAT": li.IvfFlat,
}


def index_config(index_type: str, num_partitions: int, metric: str):
    """The LanceDB index configuration of ``index_type`` (``metric`` distance, ``num_partitions`` IVF partitions)."""
    return INDEX_TYPES[index_type](distance_type=metric, num_partitions=num_partitions)
