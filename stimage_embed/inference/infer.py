"""``stimage-embed infer IMAGE --model RUN_ID``: predict expression on a slide that has
only an image.

Every check runs before anything is written (model, weights, vector provenance and stain
target, image and µm/px, tissue, gene names, slide id), so bad input leaves the store and
the output folder untouched. Then:

1. the image is registered as a slide without counts (``slides`` + one ``spots`` row per
   grid tile over the tissue);
2. the embedding pass embeds the tiles with the model's backbone and vector provenance
   (tiles are cut on demand, chunk by chunk; only thumbnails and per-chunk tiles are held
   for whole-slide formats);
3. the model predicts every tile (``predictions`` table, written chunk by chunk);
4. outputs in ``out``: ``<ID>.h5ad`` (AnnData for scanpy/squidpy), ``<ID>/<gene>.png``
   heatmaps, ``<ID>_pseudobulk.csv`` (also the ``pseudobulk`` table).

Re-running with the same image, model and grid reuses the cached vectors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.errors import InputError
from stimage_embed.evaluation.clusters import add_leiden
from stimage_embed.inference.anndata_out import build_anndata, write_anndata
from stimage_embed.inference.grid import MIN_TISSUE, TileGrid, tissue_grid
from stimage_embed.inference.heatmaps import top_genes, write_heatmaps
from stimage_embed.inference.label_predict import is_label_head, predict_label_tiles, write_label_outputs
from stimage_embed.inference.model import (
    check_stain_target,
    check_table_accepts,
    embedding_recipe,
    load_saved_model,
)
from stimage_embed.inference.predict_tiles import predict_slide_tiles
from stimage_embed.inference.pseudobulk import pseudobulk, write_pseudobulk_csv, write_pseudobulk_table
from stimage_embed.inference.slide_from_image import IMAGE_ONLY, check_slide_id, probe_image, read_image, register_slide
from stimage_embed.store.store import Store
from stimage_embed.tiles.tissue import TISSUE_THRESHOLD, tissue_mask

if TYPE_CHECKING:
    import numpy as np

    from stimage_embed.embeddings.embed_pass import EmbedReport
    from stimage_embed.inference.model import EmbeddingRecipe, SavedModel
    from stimage_embed.inference.predict_tiles import TilePredictions
    from stimage_embed.inference.slide_from_image import ImageInfo

log = logging.getLogger(__name__)

DEFAULT_TOP_GENES = 6


@dataclass
class InferResult:
    """What ``infer`` did: the slide, its grid, the outputs written."""

    slide_id: str
    run_id: str
    backbone: str
    head: str
    n_tiles: int
    n_pass_qc: int
    tile_um: float
    pitch_um: float
    um_per_px: float
    um_per_px_source: str
    backend: str
    tiles_embedded: int
    prediction_rows: int
    anndata: Path
    pseudobulk_csv: Path | None
    heatmaps: dict[str, Path] = field(default_factory=dict)

    def lines(self) -> list[str]:
        return [
            f"slide {self.slide_id}: {self.n_tiles} tiles of {self.tile_um:g} µm at {self.pitch_um:g} µm pitch "
            f"({self.n_pass_qc} pass tissue QC); {self.um_per_px:.4g} µm/px from {self.um_per_px_source}; "
            f"{self.backend}",
            f"model {self.run_id} ({self.head} on {self.backbone}): {self.tiles_embedded} tiles embedded, "
            f"{self.prediction_rows} prediction rows written",
            f"AnnData: {self.anndata}",
            f"heatmaps: {len(self.heatmaps)} in {next(iter(self.heatmaps.values())).parent if self.heatmaps else '-'}",
            f"pseudo-bulk: {self.pseudobulk_csv or '- (classifier head: no expression scale)'}",
        ]


def _tile_keys(slide_id: str, patient: str, grid: TileGrid) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "slide_id": [slide_id] * len(grid),
            "spot_id": grid.spot_ids.astype(str),
            "patient": [patient] * len(grid),
            "array_row": grid.row,
            "array_col": grid.col,
            "pixel_x": grid.x,
            "pixel_y": grid.y,
        }
    )


def _check_model_and_genes(store: Store, model: str, genes: list[str] | None) -> SavedModel:
    """The saved model, after checking every requested gene is one it predicts."""
    sm = load_saved_model(store, model)
    unknown = sorted(set(genes or []) - set(sm.genes))
    if unknown:
        raise InputError(
            None, "--genes", f"not predicted by model {sm.run_id}: {unknown}; its genes: {', '.join(sm.genes)}"
        )
    return sm


def _embed_and_predict(
    store: Store,
    sm: SavedModel,
    recipe: EmbeddingRecipe,
    sid: str,
    img: ImageInfo,
    grid: TileGrid,
    tissue_area_fraction: float,
    *,
    tissue_threshold: float,
    dataset: str,
    weights: str | None,
    embed_options: dict,
) -> tuple[EmbedReport, TilePredictions, pl.DataFrame | None]:
    """Under the store's writer lock: register the slide, embed its tiles, predict them and
    write the pseudo-bulk (``None`` for a classifier head). ``embed_options``: batch_size,
    num_workers, device, progress of the embedding pass."""
    with store.writer("infer"):
        check_slide_id(store, sid, img.path)  # again: another writer may have taken the id meanwhile
        register_slide(store, sid, img, grid, tissue_threshold, tissue_area_fraction, dataset=dataset)
        report = embed(
            store,
            [sm.backbone],
            slides=[sid],
            tile_um=recipe.embed_tile_um,
            stain=recipe.stain,
            stain_template=recipe.stain_choice,  # the model's recorded stain target
            precision=recipe.precision,
            weights={sm.backbone: weights} if weights else None,
            **embed_options,
        )
        if report.tiles:
            log.info("%s", report.line())
        predict = predict_label_tiles if is_label_head(sm.head_name) else predict_slide_tiles
        pred = predict(store, sm, sid, _tile_keys(sid, sid, grid))
        pb = (
            pseudobulk(sm.run_id, sid, sm.genes, pred.values["mean_log1p"], grid.passes_qc)
            if "mean_log1p" in pred.values
            else None
        )
        if pb is not None:
            write_pseudobulk_table(store, pb)
        else:
            log.info("model %s (%s) predicts classes, not expression: no pseudo-bulk", sm.run_id, sm.head_name)
    return report, pred, pb


def write_outputs(
    out: Path,
    sid: str,
    sm: SavedModel,
    provenance: str | None,
    img: ImageInfo,
    grid: TileGrid,
    pred: TilePredictions,
    pb: pl.DataFrame | None,
    genes: list[str] | None,
    n_top_genes: int,
    store: Store | None = None,
) -> tuple[Path, Path | None, dict[str, Path]]:
    """AnnData (with Leiden clusters of the predictions, also in the ``clusters`` table of
    ``store``), pseudo-bulk CSV (``None`` without pseudo-bulk) and heatmaps into ``out``
    (``provenance``: the id of the vectors' provenance record, kept in the AnnData)."""
    info = {
        "run_id": sm.run_id,
        "backbone": sm.backbone,
        "head": sm.head_name,
        "provenance_id": provenance,
        "image_path": str(img.path),
        "um_per_px_source": img.um_per_px_source,
    }
    adata = build_anndata(sid, grid, pred, img.thumbnail, img.downsample, info)
    add_leiden(adata, out / sid, store)  # obs['leiden'], <ID>/leiden.png, clusters table
    h5ad = write_anndata(adata, out / f"{sid}.h5ad")
    csv = write_pseudobulk_csv(pb, out / f"{sid}_pseudobulk.csv") if pb is not None else None

    x_name = adata.uns["stimage_embed"]["X"]
    values = pred.values.get("mean_log1p", pred.values.get("prob_high"))
    draw = list(dict.fromkeys(list(genes or []) + top_genes(values, sm.genes, n_top_genes, grid.passes_qc)))
    label = "predicted log1p(CP10k)" if x_name == "mean_log1p" else "P(high expression)"
    maps = write_heatmaps(
        out / sid,
        img.thumbnail,
        img.width,
        img.height,
        grid,
        values,
        sm.genes,
        draw,
        sid,
        f"{sm.head_name}/{sm.backbone}, model {sm.run_id[:10]}",
        label,
    )
    return h5ad, csv, maps


def _grid(
    img: ImageInfo,
    mask: np.ndarray,
    recipe: EmbeddingRecipe,
    pitch_um: float | None,
    min_tissue: float,
    tissue_threshold: float,
    region: tuple[float, float, float, float] | None,
) -> TileGrid:
    """The tissue grid of ``img`` at the model's tile width (µm); ``mask``: its thumbnail's tissue."""
    return tissue_grid(
        mask,
        img.downsample,
        img.width,
        img.height,
        img.um_per_px,
        recipe.tile_um,
        pitch_um,
        min_tissue=min_tissue,
        tissue_threshold=tissue_threshold,
        region=region,
        source=str(img.path),
    )


def infer(
    store: Store,
    image: str | Path,
    model: str,
    out: str | Path,
    slide_id: str | None = None,
    um_per_px: float | None = None,
    pitch_um: float | None = None,
    genes: list[str] | None = None,
    n_top_genes: int = DEFAULT_TOP_GENES,
    tissue_threshold: float = TISSUE_THRESHOLD,
    min_tissue: float = MIN_TISSUE,
    region: tuple[float, float, float, float] | None = None,
    weights: str | None = None,
    dataset: str = IMAGE_ONLY,
    batch_size: int = 32,
    num_workers: int | None = None,
    device: str = "auto",
    progress: bool = False,
) -> InferResult:
    """Predict the model's genes on every tissue tile of ``image`` (see module docstring).

    Args:
        image: whole-slide file (OpenSlide) or JPEG/PNG.
        model: run id under ``<store>/models`` or a model folder (from ``train``).
        out: output folder.
        slide_id: the new slide's id (default: the image file's stem).
        um_per_px: µm per level-0 px (required for JPEG/PNG; overrides WSI metadata).
        pitch_um: grid pitch, µm (default: the model's tile width).
        genes: genes to draw in addition to the ``n_top_genes`` most variable predictions.
        tissue_threshold: tiles whose disk is at least this much tissue pass QC.
        min_tissue: tiles with less tissue are left out of the grid.
        region: ``(x0, y0, x1, y1)`` level-0 px: only tiles centred in this box (a region
            of interest); the stain fit still uses the whole slide's thumbnail.
        weights: a local weights file for the model's backbone (as ``embed --weights``).
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(out, "--out", "exists and is not a folder")
    sm = _check_model_and_genes(store, model, genes)
    recipe = embedding_recipe(store, sm, weights, check_stain=False)
    check_table_accepts(store, recipe)  # the new vectors can join the store's table
    probe_image(image, um_per_px)  # cheap checks first: file, header, µm/px
    if slide_id is not None:
        check_slide_id(store, slide_id, Path(image))
    check_stain_target(store, recipe)
    img = read_image(image, um_per_px)
    sid = slide_id or img.path.stem
    check_slide_id(store, sid, img.path)
    mask = tissue_mask(img.thumbnail, source=str(img.path))
    grid = _grid(img, mask, recipe, pitch_um, min_tissue, tissue_threshold, region)

    # --- everything checked: write, under the store's writer lock ----------------------
    report, pred, pb = _embed_and_predict(
        store,
        sm,
        recipe,
        sid,
        img,
        grid,
        float(mask.mean()),
        tissue_threshold=tissue_threshold,
        dataset=dataset,
        weights=weights,
        embed_options={"batch_size": batch_size, "num_workers": num_workers, "device": device, "progress": progress},
    )
    writer = write_label_outputs if is_label_head(sm.head_name) else write_outputs
    files = writer(out, sid, sm, recipe.provenance_id, img, grid, pred, pb, genes, n_top_genes, store)
    return _result(sid, sm, img, grid, report, pred, files)


def _result(
    sid: str,
    sm: SavedModel,
    img: ImageInfo,
    grid: TileGrid,
    report: EmbedReport,
    pred: TilePredictions,
    files: tuple[Path, Path | None, dict[str, Path]],
) -> InferResult:
    """The :class:`InferResult` of a finished run."""
    h5ad, csv, maps = files
    return InferResult(
        slide_id=sid,
        run_id=sm.run_id,
        backbone=sm.backbone,
        head=sm.head_name,
        n_tiles=len(grid),
        n_pass_qc=int(grid.passes_qc.sum()),
        tile_um=grid.tile_um,
        pitch_um=grid.pitch_um,
        um_per_px=img.um_per_px,
        um_per_px_source=img.um_per_px_source,
        backend=img.backend,
        tiles_embedded=report.tiles,
        prediction_rows=pred.rows_written,
        anndata=h5ad,
        pseudobulk_csv=csv,
        heatmaps=maps,
    )
