"""The steps of an embedding pass's plan (:func:`stimage_embed.embeddings.pass_plan.plan_pass`):
options checked, the slides and their spots, the stain target, each backbone's table made
ready (``--overwrite``, provenance checks and repair, keys already stored), and the chunks
still to embed."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from heads.device import device_unavailable
from stimage_embed import __version__
from stimage_embed.backbones.speed import choose_precision
from stimage_embed.embeddings import provenance as P
from stimage_embed.embeddings.stain_target import RecordedTarget, resolve_template, use_recorded
from stimage_embed.embeddings.tile_stream import (
    Chunk,
    SlideJob,
    SlideStainFit,
    make_chunks,
    stored_stain_estimates,
    template_normalizer,
)
from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.ingest.fingerprint import image_fingerprint
from stimage_embed.store.store import Store, sql_list

#: precisions the pass accepts (``backbones.speed.choose_precision``'s names and aliases)
PRECISIONS = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_options(
    batch_size: int,
    num_workers: int | None = None,
    flush_rows: int = 1,
    precision: str = "auto",
    device: str = "auto",
    backbones: list[str] | None = None,
) -> None:
    """Refuse bad options of an embedding pass in one line, BEFORE anything is written
    (``--overwrite`` must never delete vectors for a pass that cannot run)."""
    if backbones is not None and not backbones:
        raise InputError(None, "--backbone", "name at least one backbone")
    for field_name, value, low in (("--batch-size", batch_size, 1), ("--flush-rows", flush_rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(None, field_name, f"must be an integer >= {low}, got {value!r}")
    bad_workers = isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    if num_workers is not None and bad_workers:
        raise InputError(None, "--workers", f"must be an integer >= 0 (0: threads), got {num_workers!r}")
    if str(precision).lower() not in PRECISIONS:
        raise InputError(None, "--precision", f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(None, "--device", f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from exc
    if (why := device_unavailable(dev)) is not None:
        raise InputError(None, "--device", f"{device!r}: {why}; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(None, "--device", f"unsupported device {device!r} (auto, cpu, cuda, cuda:N)")


def provenance_base(
    name: str,
    bb,
    tile_um: float | None,
    stain: str,
    template_id: str | None,
    stain_desc: dict,
    context_um: float | None,
) -> dict:
    """A backbone's provenance record before the precision is chosen (:func:`prepare_table`);
    ``tile_um`` / ``context_um`` in µm; ``stain_desc``: the stain target's description."""
    prov = {
        "backbone": name,
        "spec_hash": bb.spec.spec_hash(),
        "weights_sha256": bb.weights_sha256,
        "transform": bb.transform_description(),
        "tile_um": tile_um if tile_um is not None else "spot_diameter",
        "tile_px": bb.input_size,
        "stain_method": stain,
        "stain_template": template_id,
        "stain": stain_desc,
    }
    if stain_desc.get("target_hash"):
        prov["stain_target"] = stain_desc["target_hash"]  # part of the identity (``provenance.identity``)
    if context_um is not None:
        prov["context_um"] = float(context_um)
    return prov


def check_images(slide_tab: pl.DataFrame, slide_ids=None) -> None:
    """Refuse, in one line naming the file, to cut tiles from an image whose content changed
    since ingest (``slides.image_hash``; its spots, tissue QC and stain estimate were made on
    the old file): the slide must be ingested again. ``slide_ids``: only these slides (default
    all of ``slide_tab``); slides of older stores (no hash) are not checked."""
    if "image_hash" not in slide_tab.columns:
        return
    rows = slide_tab if slide_ids is None else slide_tab.filter(pl.col("slide_id").is_in(sorted(slide_ids)))
    for sid, path, recorded, dataset in rows.select("slide_id", "image_path", "image_hash", "dataset").iter_rows():
        if recorded is None:
            continue
        try:
            now = image_fingerprint(path)
        except OSError as exc:
            raise InputError(path, "image", f"slide {sid!r}: cannot read its image ({exc.strerror or exc})") from exc
        if now != recorded:
            raise InputError(
                path,
                "image",
                f"slide {sid!r}: the image changed on disk since it was ingested (content hash); "
                f"re-ingest it first: stimage-embed ingest {dataset} --slide {sid}",
            )


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
    store: Store, backbones: list[str], stain: str, stain_template: str | RecordedTarget | None, replacing: set[str]
) -> tuple[str | None, SlideStainFit | None, dict, str | None]:
    """(template slide, per-slide stain fit for the stream, stain description for provenance,
    how the template was chosen if the pass must record it: ``stain_target.record``).

    The template is the store's one stain target (:mod:`stimage_embed.embeddings.stain_target`),
    or a :class:`RecordedTarget` given as ``stain_template`` (a saved model's: used as recorded,
    not refitted); ``replacing``: the tables this pass rewrites whole. Per-slide estimates come from ingest."""
    if stain == "none":
        return None, None, {"method": stain}, None
    if isinstance(stain_template, RecordedTarget):
        return use_recorded(store, stain, stain_template)
    template_id, chosen_by = resolve_template(store, stain_template, replacing)
    all_slides = pl.from_arrow(store.read("slides")).sort("slide_id")
    row = all_slides.filter(pl.col("slide_id") == template_id)
    check_images(row)
    # per-slide stain estimates made at ingest (same thumbnail and tissue mask): not recomputed
    estimates = stored_stain_estimates(all_slides)
    target = template_normalizer(stain, row["image_path"][0], estimates.get(template_id))
    fit = SlideStainFit(target, template_slide=template_id, estimates=estimates)
    return template_id, fit, target.to_dict(), chosen_by


def prepare_table(
    store: Store,
    name: str,
    bb,
    prov: dict,
    precision: str,
    dev: torch.device,
    slide_tab: pl.DataFrame,
    overwrite: bool,
    slides: Sequence[str] | None,
    table: str,
    deferred: dict[str, str],
) -> tuple[str, dict, set]:
    """Ready one backbone's ``table`` for this pass: ``--overwrite`` (whole table, or only
    ``slides``' vectors), provenance checked and repaired. ``prov``: provenance without
    the precision. Returns (precision, full provenance, keys already stored).

    ``deferred`` receives ``table -> Lance filter`` of the old vectors an ``--overwrite``
    replaces, instead of deleting them now: the engine replaces them with its first write
    to the table, so a pass that fails before it wrote anything leaves them in place (a
    table of another vector width is dropped here: its vectors cannot be kept beside new ones)."""
    whole = overwrite and not slides and store.has_table(table)
    if whole and _stored_dim(store, table) != bb.embed_dim:
        store.drop_table(table)
        P.forget(store, table)
        whole = False
    old = [] if whole else P.existing_provenance(store, table)
    if precision == "auto" and old:
        precision = old[0].get("precision", "auto")  # resume with the table's precision
    precision, probe = choose_precision(bb, dev, precision)
    prov = prov | {
        "precision": precision,
        "precision_probe": probe,
        "package_version": __version__,
        "embed_dim": bb.embed_dim,
    }
    if whole:  # every stored vector is replaced: keys, provenance and repairs of the old ones do not matter
        deferred[table] = "slide_id IS NOT NULL"
        return precision, prov, set()
    try:
        P.check_compatible(store, table, prov)
    except ProvenanceError as exc:
        if overwrite and slides:
            raise ProvenanceError(
                f"{exc} (--overwrite with --slide replaces only these slides' vectors, which must keep "
                "the table's provenance; omit --slide to replace every slide's)"
            ) from exc
        raise
    P.repair(store, table, slide_tab)
    keys = existing_keys(store, table)
    if overwrite and slides and store.has_table(table):  # replace only these slides' vectors
        deferred[table] = f"slide_id IN ({sql_list(slide_tab['slide_id'])})"
        keys = {k for k in keys if k[0] not in set(slide_tab["slide_id"])}
    return precision, prov, keys


def _stored_dim(store: Store, table: str) -> int | None:
    """Width of the stored vectors of ``table`` (None if it has no fixed-size vector column)."""
    field = store.dataset(table).schema.field("vector")
    return getattr(field.type, "list_size", None)


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
