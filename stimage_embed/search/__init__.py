"""Morphology search over a store's vectors: a LanceDB vector index per backbone
(:mod:`~stimage_embed.search.index`), k-nearest-spot queries with SQL prefilters
(:mod:`~stimage_embed.search.query`, :mod:`~stimage_embed.search.where`), queries by a new
image region (:mod:`~stimage_embed.search.image_query`) and a montage of the hits
(:mod:`~stimage_embed.search.montage`)."""

from stimage_embed.search.index import EXACT_BELOW, IndexReport, build_index
from stimage_embed.search.query import SearchOptions, search

__all__ = ["EXACT_BELOW", "IndexReport", "SearchOptions", "build_index", "search"]
