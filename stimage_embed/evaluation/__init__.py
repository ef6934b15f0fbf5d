"""Array-level evaluation engine: folds over slides, per-fold gene selection, per-gene
metrics (vectorised over genes) and spatial statistics (Moran's I, STimage spatial IoU).

Works on numpy / scipy.sparse arrays and polars tables; the store and the ``compare``
command wire it to cached data.

The names below are imported on first use (PEP 562), so importing one light submodule
(e.g. ``evaluation.views``, whose SQL every ``Store.sql`` session may need) does not load
the metrics and their heads.
"""

from __future__ import annotations

import importlib

#: module -> the public names it gives this package
_EXPORTS: dict[str, tuple[str, ...]] = {
    "stimage_embed.evaluation.metrics": (
        "REGRESSION_METRICS",
        "ccc",
        "classification_metrics",
        "coverage_metrics",
        "evaluate_regression",
        "f1",
        "interval_coverage",
        "mae",
        "mse",
        "normalise_log1p",
        "pearson",
        "per_slide_classification_metrics",
        "per_slide_regression_metrics",
        "regression_metrics",
        "roc_auc",
        "spearman",
    ),
    "stimage_embed.evaluation.spatial": (
        "SpatialIoU",
        "bivariate_morans_i",
        "grid_adjacency",
        "grid_weights",
        "knn_weights",
        "morans_i",
        "radius_weights",
        "row_standardise",
        "spatial_iou",
        "spot_raster_index",
    ),
    "stimage_embed.evaluation.splits": (
        "Fold",
        "SplitSpec",
        "explicit_split",
        "make_folds",
        "parse_split",
        "slide_table",
    ),
    "stimage_embed.predictions.genes": (
        "GeneSpec",
        "HVGStats",
        "available_panels",
        "detection_fraction",
        "hvg_seurat",
        "load_gene_list",
        "panel_path",
        "parse_gene_spec",
        "read_gene_list",
        "resolve_gene_list",
        "select_genes",
        "top_hvg",
    ),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "REGRESSION_METRICS",
    "Fold",
    "GeneSpec",
    "HVGStats",
    "SpatialIoU",
    "SplitSpec",
    "available_panels",
    "bivariate_morans_i",
    "ccc",
    "classification_metrics",
    "coverage_metrics",
    "detection_fraction",
    "evaluate_regression",
    "explicit_split",
    "f1",
    "grid_adjacency",
    "grid_weights",
    "hvg_seurat",
    "interval_coverage",
    "knn_weights",
    "load_gene_list",
    "mae",
    "make_folds",
    "morans_i",
    "mse",
    "normalise_log1p",
    "panel_path",
    "parse_gene_spec",
    "parse_split",
    "pearson",
    "per_slide_classification_metrics",
    "per_slide_regression_metrics",
    "radius_weights",
    "read_gene_list",
    "regression_metrics",
    "resolve_gene_list",
    "roc_auc",
    "row_standardise",
    "select_genes",
    "slide_table",
    "spatial_iou",
    "spearman",
    "spot_raster_index",
    "top_hvg",
]


def __getattr__(name: str):
    """A public name (imported from its module on first use) or a submodule."""
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":  # the submodule exists but needs something missing
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from exc


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
