"""The driver's plan of a distributed embedding pass: what the local pass decides before
its first tile (slides and spots, stain target, each table made ready, keys already
stored, the chunks left), made with the local pass's own functions (``embed_plan``) and
handed to the Ray stages as plain rows (:meth:`Plan.chunk_rows`).

Provenance records hold the local pass's fields, so a table can be filled by either engine
and resumed by the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from stimage_embed.backbones import create_model
from stimage_embed.embeddings import provenance as P
from stimage_embed.embeddings.embed_plan import (
    check_images,
    check_options,
    prepare_table,
    provenance_base,
    select_spots,
    stain_target,
    work_list,
)
from stimage_embed.embeddings.ray_stages import need_column
from stimage_embed.embeddings.stain_target import record as stain_target_record
from stimage_embed.embeddings.tile_stream import Chunk, SlideJob, SlideStainFit
from stimage_embed.errors import InputError, StoreError
from stimage_embed.store.store import Store

log = logging.getLogger(__name__)


@dataclass
class Plan:
    models: dict[str, Any] = field(default_factory=dict)  # backbone -> Backbone (driver copy: spec, dims)
    tables: dict[str, str] = field(default_factory=dict)  # backbone -> table name
    pids: dict[str, str] = field(default_factory=dict)  # backbone -> provenance id
    precision: dict[str, str] = field(default_factory=dict)
    weights: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, dict] = field(default_factory=dict)
    stain_factory: SlideStainFit | None = None
    chunks: list[Chunk] = field(default_factory=list)  # chunks holding a key some backbone lacks
    jobs: dict[str, SlideJob] = field(default_factory=dict)
    tissue: dict[tuple[str, str], float] = field(default_factory=dict)
    done: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # backbone -> keys stored
    slide_meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # tile_um, um_per_px, geometry_hash

    def chunk_rows(self) -> list[dict[str, Any]]:
        """One row per chunk, in order: what a cutting task needs (see ``ray_stages.cut_tiles``)."""
        rows = []
        for c in self.chunks:
            job = self.jobs[c.slide_id]
            row = {
                "slide_id": c.slide_id,
                "chunk": c.index,
                "spot_ids": list(c.spot_ids),
                "pixel_x": list(c.pixel_x),
                "pixel_y": list(c.pixel_y),
                "tissue_fraction": [float(self.tissue[(c.slide_id, s)]) for s in c.spot_ids],
                "image_path": job.image_path,
                "um_per_px": job.um_per_px,
                "tile_um": job.tile_um,
            }
            for name in self.models:
                row[need_column(name)] = [(c.slide_id, s) not in self.done[name] for s in c.spot_ids]
            rows.append(row)
        return rows


def plan_pass(
    store: Store,
    backbones: list[str],
    slides: list[str] | None = None,
    tile_um: float | None = None,
    stain: str = "macenko",
    stain_template: str | None = None,
    precision: str = "auto",
    weights: dict[str, str] | None = None,
    only_qc: bool = False,
    overwrite: bool = False,
    batch_size: int = 32,
    device: str = "cpu",
    overrides: dict[str, dict] | None = None,
    context_um: float | None = None,
) -> Plan:
    """Everything decided before the first tile, as the local pass decides it; commits the
    provenance records (and, with ``overwrite``, drops or deletes the old vectors).
    Units: ``tile_um`` / ``context_um`` in µm. ``device``: where the workers run the models
    (``cuda``: precision from the spec, as the local pass on a GPU)."""
    check_options(batch_size, precision=precision, device=device, backbones=backbones)  # before any write
    if not store.has_table("spots"):
        raise StoreError(f"{store.path}: no spots; run `stimage-embed ingest` first")
    if context_um is not None:
        if tile_um is not None and float(tile_um) != float(context_um):
            raise InputError(None, "--context-um", f"gives the tile width itself; got --tile-um {tile_um} as well")
        P.context_width_label(context_um)  # a positive width, or a one-line error
        tile_um = float(context_um)
    slide_tab, spots = select_spots(store, slides, only_qc)
    check_images(slide_tab)  # before --overwrite deletes anything
    plan = Plan(weights=dict(weights or {}), overrides=dict(overrides or {}))
    plan.models = {
        n: create_model(n, weights=plan.weights.get(n), device="cpu", overrides=plan.overrides.get(n))
        for n in backbones
    }
    names = {P.vector_table_name(b, context_um) for b in backbones}
    template_id, plan.stain_factory, stain_desc, chosen_by = stain_target(
        store, backbones, stain, stain_template, names if overwrite and not slides else set()
    )
    provs = {}
    for name, bb in plan.models.items():
        prov = provenance_base(name, bb, tile_um, stain, template_id, stain_desc, context_um)
        plan.tables[name] = P.vector_table_name(name, context_um)
        plan.precision[name], provs[name], plan.done[name] = prepare_table(
            store,
            name,
            bb,
            prov,
            precision,
            torch.device(device),
            slide_tab,
            overwrite,
            slides,
            table=plan.tables[name],
        )
    plan.jobs, plan.chunks = work_list(slide_tab, spots, tile_um, batch_size, plan.done)
    if plan.chunks:  # as the local pass: a record only for a pass that writes vectors
        stain_target_record(store, template_id, chosen_by)
        plan.pids = {name: P.record(store, plan.tables[name], provs[name]) for name in plan.models}
    plan.tissue = dict(zip(zip(spots["slide_id"], spots["spot_id"]), spots["tissue_fraction"]))
    ghash = dict(zip(slide_tab["slide_id"], slide_tab["geometry_hash"])) if "geometry_hash" in slide_tab.columns else {}
    plan.slide_meta = {
        sid: {"tile_um": job.tile_um, "um_per_px": job.um_per_px, "geometry_hash": ghash.get(sid)}
        for sid, job in plan.jobs.items()
    }
    return plan
