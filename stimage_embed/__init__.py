"""stimage-embed: embed H&E spot tiles once, cache vectors in LanceDB, query with DuckDB.

Data flow (one sub-package per stage):
``ingest`` (catalogs, readers) -> ``tiles`` (images, tissue QC, stain) -> ``embeddings``
(backbones, the embedding pass) -> ``heads`` (separate top-level package, arrays only; also
importable as :mod:`stimage_embed.heads`) -> ``predictions`` -> ``evaluation`` (splits, genes,
metrics, compare, report).

The public API is the names in ``__all__`` (imported on first use, so ``import
stimage_embed`` stays light)::

    from stimage_embed import Store, ingest, embed, train, predict, infer, compare, CompareConfig

    store = Store("store")
    ingest("her2st", store)                      # a catalog name or a catalog YAML path
    embed(store, ["efficientnet_lite0"])
    run_id, folder = train(store, "efficientnet_lite0", "nb", "var:50", ["B4", "C2"])
    predictions = predict(store, run_id, ["C5"])  # polars DataFrame, one row per spot x gene
    result = compare(store, CompareConfig(backbones=["efficientnet_lite0"], heads=["nb", "ridge"]))
    store.sql("SELECT * FROM leaderboard")       # DuckDB over every table, returns polars

Anything else is internal and may change between versions.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

#: public name -> "module:attribute" it is imported from on first use
_API = {
    "Store": "stimage_embed.store:Store",
    "data_root": "stimage_embed.paths:data_root",
    "load_catalog": "stimage_embed.ingest.catalog:load_catalog",
    "ingest": "stimage_embed.ingest.pipeline:ingest",
    "list_backbones": "stimage_embed.backbones:list_backbones",
    "create_model": "stimage_embed.backbones:create_model",
    "embed": "stimage_embed.embeddings.embed_pass:embed",
    "train": "stimage_embed.predictions.train_predict:train",
    "predict": "stimage_embed.predictions.train_predict:predict",
    "infer": "stimage_embed.inference.infer:infer",
    "CompareConfig": "stimage_embed.evaluation.compare:CompareConfig",
    "compare": "stimage_embed.evaluation.compare:compare",
    "paired_comparisons": "stimage_embed.evaluation.paired:paired_comparisons",
    "write_compare_report": "stimage_embed.evaluation.report_driver:write_compare_report",
    "build_index": "stimage_embed.search:build_index",
    "search": "stimage_embed.search:search",
    "explain": "stimage_embed.explain.run:explain",
    "create_viewer_app": "stimage_embed.viewer.app:create_app",
    "add_labels": "stimage_embed.store.labels:add_labels",
    "add_clinical": "stimage_embed.downstream:add_clinical",
    "run_survival": "stimage_embed.downstream:run_survival",
    "run_response": "stimage_embed.downstream:run_response",
    "SYNTHETIC_NOTE": "stimage_embed.downstream:SYNTHETIC_NOTE",
    "pseudobulk_agreement": "stimage_embed.evaluation.pseudobulk_agreement:pseudobulk_agreement",
    "agreement_summary": "stimage_embed.evaluation.pseudobulk_agreement:agreement_summary",
    "InputError": "stimage_embed.errors:InputError",
    "StimageError": "stimage_embed.errors:StimageError",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name not in _API:
        raise AttributeError(f"module 'stimage_embed' has no attribute {name!r}")
    module, _, attr = _API[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(__all__)
