"""What the embedding pass embeds (:mod:`stimage_embed.embeddings.embed_pass`): the slides
and their spots, the stain target, each backbone's table made ready (``--overwrite``,
provenance checks and repair, keys already stored), and the chunks still to embed."""

from __future__ import annotations

import polars as pl
import torch

from stimage_embed import __version__
from stimage_embed.backbones.speed import choose_precision
from stimage_embed.embeddings import provenance as P
from stimage_embed.embeddings.tile_stream import (
    Chunk,
    SlideJob,
    SlideStainFit,
    make_chunks,
    stored_stain_estimates,
    template_normalizer,
)
from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list


def existing_keys(store: Store, table: str) -> set[tuple[str, str]]:
    if not store.has_table(table):
        return set()
    t = store.read(table, ["slide_id", "spot_id"])
    return set(zip(t["slide_id"].to_pylist(), t["spot_id"].to_pylist()))


def select_spots(store: Store, slides: list[str] | None, only_qc: bool) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The slides to embed (sorted by id) and their spots (pixel positions in level-0 px)."""
    slide_tab = pl.from_arrow(store.read("slides"))
    if slides:
        unknown = sorted(set(slides) - set(slide_tab["slide_id"]))
        if unknown:
            raise InputError(None, "--slide", f"slides not in the store: {unknown}")
        slide_tab = slide_tab.filter(pl.col("slide_id").is_in(slides))
    slide_tab = slide_tab.sort("slide_id")
    where = f"slide_id IN ({sql_list(slide_tab['slide_id'])})" + (" AND passes_qc" if only_qc else "")
    spots = pl.from_arrow(
        store.read("spots", ["slide_id", "spot_id", "pixel_x", "pixel_y", "tissue_fraction"], where=where)
    )
    return slide_tab, spots


def stain_target(
    store: Store, backbones: list[str], stain: str, stain_template: str | None, fresh: bool
) -> tuple[str | None, SlideStainFit | None, dict]:
    """(template slide, per-slide stain fit for the stream, stain description for provenance).

    Default template: the one the tables' vectors were normalised against (unless ``fresh``:
    every table is replaced), else the first slide. Per-slide estimates come from ingest."""
    if stain == "none":
        return None, None, {"method": stain}
    all_slides = pl.from_arrow(store.read("slides")).sort("slide_id")
    recorded = (
        None
        if stain_template or fresh
        else P.recorded_stain_template(store, [S.embedding_table_name(b) for b in backbones])
    )
    template_id = stain_template or recorded or all_slides["slide_id"][0]
    row = all_slides.filter(pl.col("slide_id") == template_id)
    if row.height == 0:
        raise InputError(None, "--stain-template", f"template slide {template_id!r} is not in the store")
    # per-slide stain estimates made at ingest (same thumbnail and tissue mask): not recomputed
    estimates = stored_stain_estimates(all_slides)
    target = template_normalizer(stain, row["image_path"][0], estimates.get(template_id))
    return template_id, SlideStainFit(target, template_slide=template_id, estimates=estimates), target.to_dict()


def prepare_table(
    store: Store,
    name: str,
    bb,
    prov: dict,
    precision: str,
    dev: torch.device,
    slide_tab: pl.DataFrame,
    overwrite: bool,
    slides: list[str] | None,
    table: str | None = None,
) -> tuple[str, dict, set]:
    """Ready one backbone's table for this pass: ``--overwrite`` (whole table, or only
    ``slides``' vectors), provenance checked and repaired. ``prov``: provenance without
    the precision. Returns (precision, full provenance, keys already stored)."""
    table = table or S.embedding_table_name(name)
    if overwrite and not slides and store.has_table(table):
        store.drop_table(table)
        P.forget(store, table)
    old = P.existing_provenance(store, table)
    if precision == "auto" and old:
        precision = old[0].get("precision", "auto")  # resume with the table's precision
    precision, probe = choose_precision(bb, dev, precision)
    prov = prov | {
        "precision": precision,
        "precision_probe": probe,
        "package_version": __version__,
        "embed_dim": bb.embed_dim,
    }
    try:
        P.check_compatible(store, table, prov)
    except ProvenanceError as exc:
        if overwrite and slides:
            raise ProvenanceError(
                f"{exc} (--overwrite with --slide replaces only these slides' vectors, which must keep "
                "the table's provenance; omit --slide to replace every slide's)"
            ) from exc
        raise
    if overwrite and slides:  # replace only these slides' vectors
        store.delete(table, f"slide_id IN ({sql_list(slide_tab['slide_id'])})")
    P.repair(store, table, slide_tab)
    return precision, prov, existing_keys(store, table)


def work_list(
    slide_tab: pl.DataFrame, spots: pl.DataFrame, tile_um: float | None, batch_size: int, done_keys: dict[str, set]
) -> tuple[dict[str, SlideJob], list[Chunk]]:
    """Slide jobs and the chunks holding any key missing for any backbone (``tile_um`` in µm,
    default each slide's catalog ``tile_um``, else its spot diameter)."""
    jobs, chunks = {}, []
    for srow in slide_tab.iter_rows(named=True):
        sid = srow["slide_id"]
        sp = spots.filter(pl.col("slide_id") == sid)
        if sp.height == 0:
            continue
        width = tile_um or srow.get("tile_um") or srow["spot_diameter_um"]  # CLI > catalog tile_um > spot
        jobs[sid] = SlideJob(sid, srow["image_path"], srow["um_per_px"], float(width))
        for ch in make_chunks(
            sid, sp["spot_id"].to_numpy(), sp["pixel_x"].to_numpy(), sp["pixel_y"].to_numpy(), batch_size
        ):
            if any((sid, s) not in done for done in done_keys.values() for s in ch.spot_ids):
                chunks.append(ch)
    return jobs, chunks
