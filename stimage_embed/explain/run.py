"""``stimage-embed explain``: why does the model predict this gene here? LIME over the nuclei
of spot tiles.

For each spot tile of the slide (given spots, or the ``top`` K spots by the gene's prediction
from the slide's stored vectors): cut the raw tile exactly as the embedding pass cuts it
(the model's tile width in µm, its backbone's input px), segment its nuclei
(:mod:`~stimage_embed.explain.segment`), measure them (:mod:`~stimage_embed.explain.morphology`),
run LIME with the whole model as the classifier (:mod:`~stimage_embed.explain.model_fn`,
:mod:`~stimage_embed.explain.lime_tile`), write an overlay PNG, and store one ``nuclei`` row
per nucleus (:data:`stimage_embed.store.schema_explain.NUCLEI`), replacing the rows of the
same (run, slide, spot, gene). Every check (model, gene, weights, stain target, slide, spots)
runs before anything is computed or written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from stimage_embed.errors import InputError, StoreError
from stimage_embed.explain.lime_tile import DEFAULT_SAMPLES, TileExplanation, explain_tile
from stimage_embed.explain.model_fn import TileModel, check_gene, load_tile_model
from stimage_embed.explain.morphology import TileFrame, measure_nuclei
from stimage_embed.explain.overlay import write_overlay
from stimage_embed.explain.segment import DEFAULT_SEGMENTER, get_segmenter
from stimage_embed.inference.predict_tiles import check_vector_provenance
from stimage_embed.store import schema as S
from stimage_embed.store.schema_explain import NUCLEI, NUCLEI_KEYS
from stimage_embed.store.store import Store, sql_list
from stimage_embed.tiles.image import SlideImage

log = logging.getLogger(__name__)

VALUE_LABELS = {"mean_log1p": "log1p(CP10k)", "prob_high": "P(high)", "prob_class": "P(class)"}


@dataclass
class TileResult:
    spot_id: str
    n_nuclei: int
    prediction: float
    r2: float
    seconds: float
    overlay: Path


@dataclass
class ExplainResult:
    run_id: str
    slide_id: str
    gene: str
    value: str
    samples: int
    tiles: list[TileResult] = field(default_factory=list)
    rows_written: int = 0

    def lines(self) -> list[str]:
        out = [
            f"model {self.run_id}, gene {self.gene} ({VALUE_LABELS[self.value]}), slide {self.slide_id}: "
            f"{len(self.tiles)} tile(s) explained with {self.samples} LIME samples each"
        ]
        for t in self.tiles:
            what = f"{t.n_nuclei} nuclei" if t.n_nuclei else "no nucleus found: explained over background regions only"
            out.append(
                f"  spot {t.spot_id}: prediction {t.prediction:.3f}, {what}, R² {t.r2:.2f}, "
                f"{t.seconds:.1f} s -> {t.overlay}"
            )
        out.append(f"{self.rows_written} rows written to table nuclei")
        return out


def _slide_row(store: Store, slide: str) -> dict:
    rows = store.read("slides", ["slide_id", "image_path", "um_per_px"], where=f"slide_id = {sql_list([slide])}")
    if rows.num_rows == 0:
        raise InputError(None, "--slide", f"slide {slide!r} is not in the store {store.path}")
    return rows.to_pylist()[0]


def _spot_table(store: Store, slide: str) -> pl.DataFrame:
    cols = ["spot_id", "pixel_x", "pixel_y", "tissue_fraction", "passes_qc"]
    return pl.from_arrow(store.read("spots", cols, where=f"slide_id = {sql_list([slide])}"))


def _given_spots(spots: pl.DataFrame, slide: str, ids: list[str]) -> pl.DataFrame:
    known = dict(zip(spots["spot_id"], spots["passes_qc"]))
    for s in ids:
        if s not in known:
            raise InputError(None, "--spots", f"{s!r} is not a spot of slide {slide!r}")
        if not known[s]:
            frac = spots.filter(pl.col("spot_id") == s)["tissue_fraction"][0]
            raise InputError(
                None, "--spots", f"spot {s!r} of slide {slide!r} is outside the tissue (tissue fraction {frac:.2f})"
            )
    return spots.filter(pl.col("spot_id").is_in(ids))


def _top_spots(store: Store, tm: TileModel, spots: pl.DataFrame, slide: str, k: int, gene: str) -> pl.DataFrame:
    """The ``k`` tissue spots with the highest prediction of ``gene`` from the slide's stored vectors."""
    if k < 1:
        raise InputError(None, "--top", f"must be at least 1, got {k}")
    table = S.embedding_table_name(tm.sm.backbone)
    where = f"slide_id = {sql_list([slide])}"
    vec = store.read(table, ["spot_id", "vector"], where=where) if store.has_table(table) else None
    if vec is None or vec.num_rows == 0:
        raise InputError(
            None,
            "--top",
            f"slide {slide!r} has no {tm.sm.backbone} vectors to rank its spots; run embed --slide {slide}",
        )
    check_vector_provenance(store, tm.sm, slide)
    dim = vec.column("vector").type.list_size
    X = vec.column("vector").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    pred = pl.DataFrame({"spot_id": vec.column("spot_id").to_pylist(), "pred": tm.predict_vectors(X, [gene])[:, 0]})
    ranked = spots.filter(pl.col("passes_qc")).join(pred, on="spot_id").sort("pred", descending=True)
    return ranked.head(k).drop("pred")


def _explain_one(
    tm: TileModel, seg, reader, normalize, row: dict, gene: str, samples: int, seed: int, um_per_px: float
) -> tuple[np.ndarray, np.ndarray, TileExplanation, pl.DataFrame]:
    tile, _ = reader.read(row["pixel_x"], row["pixel_y"])
    labels = seg.segment(tile, tm.tile_um / tm.tile_px)
    frame = TileFrame.centred(row["pixel_x"], row["pixel_y"], reader.window_px, tm.tile_px, um_per_px)
    morph = measure_nuclei(tile, labels, frame)
    ex = explain_tile(tile, labels, tm.classifier(gene, normalize), samples, seed, tm.batch_size)
    return tile, labels, ex, morph


def _nuclei_rows(tm: TileModel, slide: str, spot: str, gene: str, ex: TileExplanation, morph: pl.DataFrame, meta: dict):
    return morph.with_columns(
        pl.lit(tm.sm.run_id).alias("run_id"),
        pl.lit(slide).alias("slide_id"),
        pl.lit(spot).alias("spot_id"),
        pl.lit(gene).alias("gene"),
        pl.Series("weight", ex.nucleus_weights[morph["nucleus"].to_numpy() - 1], pl.Float64),
        pl.lit(ex.r2).alias("r2"),
        pl.lit(tm.column).alias("value"),
        pl.lit(ex.prediction).alias("prediction"),
        *(pl.lit(v).alias(k) for k, v in meta.items()),
    )


def explain(
    store: Store,
    model: str,
    slide: str,
    gene: str,
    spots: list[str] | None = None,
    top: int | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    out: str | Path = "explain",
    weights: str | None = None,
    device: str = "auto",
    segmenter: str = DEFAULT_SEGMENTER,
    segmenter_weights: str | None = None,
    batch_size: int = 32,
) -> ExplainResult:
    """Explain ``gene``'s prediction on spot tiles of ``slide`` (see the module docstring).

    ``spots``: spot ids; or ``top``: the K tissue spots with the highest prediction. ``samples``:
    LIME perturbations per tile (one forward pass each, in batches of ``batch_size``).
    """
    if (spots is None) == (top is None):
        raise InputError(None, "--spots/--top", "give either --spots A,B or --top K")
    if samples < 2:
        raise InputError(None, "--samples", f"must be at least 2, got {samples}")
    seg = get_segmenter(segmenter, segmenter_weights)  # cheap checks first
    tm = load_tile_model(store, model, weights=weights, device=device, batch_size=batch_size)
    check_gene(tm.sm, gene)
    srow = _slide_row(store, slide)
    table = _spot_table(store, slide)
    chosen = _given_spots(table, slide, spots) if spots is not None else _top_spots(store, tm, table, slide, top, gene)
    res = ExplainResult(tm.sm.run_id, slide, gene, tm.column, samples)
    meta = {"segmenter": seg.name, "samples": samples, "seed": seed}
    frames = []
    out = Path(out).expanduser()
    with SlideImage.open(srow["image_path"]) as image:
        reader, normalize = tm.reader(slide, image, srow["um_per_px"]), tm.normalizer(slide, image)
        for row in chosen.iter_rows(named=True):
            t0 = time.perf_counter()
            um = srow["um_per_px"]
            tile, labels, ex, morph = _explain_one(tm, seg, reader, normalize, row, gene, samples, seed, um)
            if not ex.n_nuclei:
                log.warning("spot %s: no nucleus found; explained over background regions only", row["spot_id"])
            png = out / f"{slide}_{row['spot_id']}_{gene}.png"
            title = f"{gene} on {slide} spot {row['spot_id']} (model {tm.sm.run_id[:10]}, {tm.sm.head_name})"
            write_overlay(png, tile, labels, ex, title, VALUE_LABELS[tm.column])
            frames.append(_nuclei_rows(tm, slide, row["spot_id"], gene, ex, morph, meta))
            res.tiles.append(
                TileResult(row["spot_id"], ex.n_nuclei, ex.prediction, ex.r2, time.perf_counter() - t0, png)
            )
    data = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    scope = (
        f"run_id = {sql_list([tm.sm.run_id])} AND slide_id = {sql_list([slide])} AND gene = {sql_list([gene])} "
        f"AND spot_id IN ({sql_list(chosen['spot_id'])})"
    )
    if chosen.height:
        with store.writer("explain"):
            rows = data.to_arrow() if data.height else NUCLEI.empty_table()
            store.replace_where("nuclei", rows, NUCLEI_KEYS, scope, NUCLEI)
    elif top is not None:
        raise StoreError(f"slide {slide!r}: no tissue spot with a stored vector to explain")
    res.rows_written = data.height
    return res
