"""stimage-embed: embed H&E spot tiles once, cache vectors in LanceDB, query with DuckDB.

Data flow (one sub-package per stage):
``ingest`` (catalogs, readers) -> ``tiles`` (images, tissue QC, stain) -> ``embeddings``
(backbones, the embedding pass) -> ``heads`` (separate top-level package, arrays only)
-> ``predictions`` -> ``evaluation`` (splits, genes, metrics, compare, report).
"""

__version__ = "0.3.0"
