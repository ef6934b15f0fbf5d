"""The one plan of an embedding pass: everything decided before the first tile, made once by
:func:`plan_pass` from an :class:`EmbedRequest` and executed by either engine (the local pass,
:mod:`.embed_pass`, or the Ray pass, :mod:`.ray_engine`); engines only execute a plan.

The plan holds the slides and their spots, the stain target, each backbone's table made
ready (``--overwrite``, provenance checked and repaired, keys already stored), its full
provenance record and id, and the chunks still to embed (``embed_plan`` holds the steps).
Old vectors an ``--overwrite`` replaces are not deleted while planning: the engine replaces
them with its first write to the table (:meth:`Plan.take_replaced`), so a pass that fails
before writing anything leaves them in place. A table can be filled by either engine and
resumed by the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from heads.device import resolve_device
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
from stimage_embed.embeddings.stain_target import record as stain_target_record
from stimage_embed.embeddings.tile_stream import Chunk, SlideJob, SlideStainFit
from stimage_embed.errors import InputError, StoreError
from stimage_embed.store.maintenance import bytes_added, data_snapshot, maintain
from stimage_embed.store.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedRequest:
    """What a user asks of one embedding pass (the CLI's ``embed`` options, engine aside).

    ``tile_um``: tile width, µm (default each slide's catalog tile width, else its spot
    diameter); ``context_um``: embed instead a wider window of this width (µm) into its own
    table (``provenance.vector_table_name``); ``device``: where the models run (auto, cpu,
    cuda, cuda:N); ``weights`` / ``overrides``: per backbone, a local weights file and spec
    overrides; ``only_qc``: only spots passing tissue QC; ``overwrite``: replace the stored
    vectors (with ``slides``: only theirs)."""

    backbones: tuple[str, ...]
    slides: tuple[str, ...] | None = None
    tile_um: float | None = None
    context_um: float | None = None
    stain: str = "macenko"
    stain_template: str | None = None
    precision: str = "auto"
    batch_size: int = 32
    device: str = "auto"
    weights: dict[str, str] = field(default_factory=dict)
    overrides: dict[str, dict] = field(default_factory=dict)
    only_qc: bool = False
    overwrite: bool = False

    @classmethod
    def of(cls, backbones, slides=None, weights=None, overrides=None, **options) -> EmbedRequest:
        """A request from the library functions' arguments (lists, ``None`` for empty maps)."""
        return cls(
            tuple(backbones),
            tuple(slides) if slides else None,
            weights=dict(weights or {}),
            overrides=dict(overrides or {}),
            **options,
        )

    def at_width(self, context_um: float | None) -> EmbedRequest:
        """The same request for the context width ``context_um`` (µm; None: the spot tile)."""
        return replace(self, context_um=context_um)

    def tile_width(self) -> float | None:
        """The tile width (µm) of the pass: ``context_um`` when given (a different ``tile_um``
        as well is an error), else ``tile_um``."""
        if self.context_um is None:
            return self.tile_um
        if self.tile_um is not None and float(self.tile_um) != float(self.context_um):
            raise InputError(None, "--context-um", f"gives the tile width itself; got --tile-um {self.tile_um} as well")
        P.context_width_label(self.context_um)  # a positive width, or a one-line error
        return float(self.context_um)


@dataclass(frozen=True)
class RunOptions:
    """How an engine runs a plan: ``num_workers`` (local: DataLoader worker processes, 0 =
    threads, None = by the job's size; Ray: model actors), ``flush_rows`` (vectors per
    commit), ``progress`` (a progress bar)."""

    num_workers: int | None = None
    flush_rows: int = 512
    progress: bool = True


@dataclass
class Plan:
    """Everything an engine needs to run a pass (see the module doc). Models are the driver's
    CPU copies (spec, input size, dims); ``device``: where the engine runs them."""

    request: EmbedRequest
    device: torch.device
    models: dict[str, Any] = field(default_factory=dict)  # backbone -> Backbone
    tables: dict[str, str] = field(default_factory=dict)  # backbone -> table name
    provenance: dict[str, dict] = field(default_factory=dict)  # backbone -> full provenance record
    pids: dict[str, str] = field(default_factory=dict)  # backbone -> provenance id (committed)
    precision: dict[str, str] = field(default_factory=dict)
    done: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # backbone -> keys stored
    replace: dict[str, str] = field(default_factory=dict)  # table -> Lance filter of old vectors replaced
    stain_factory: SlideStainFit | None = None
    jobs: dict[str, SlideJob] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)  # chunks holding a key some backbone lacks
    tissue: dict[tuple[str, str], float] = field(default_factory=dict)
    slide_meta: dict[str, dict[str, Any]] = field(default_factory=dict)  # tile_um (µm), um_per_px, geometry_hash

    @property
    def n_tiles(self) -> int:
        """Tiles the pass cuts (each chunk's spots once, shared by every backbone)."""
        return sum(len(c.spot_ids) for c in self.chunks)

    def missing(self, name: str, sid: str, ids) -> list[int]:
        """Positions in ``ids`` (spot ids of slide ``sid``) of the keys backbone ``name`` lacks."""
        done = self.done[name]
        return [j for j, s in enumerate(ids) if (sid, s) not in done]

    def take_replaced(self, table: str) -> str | None:
        """The Lance filter of the old vectors of ``table`` the engine's first write replaces
        (None once taken, or when nothing is replaced)."""
        return self.replace.pop(table, None)

    def backbone_of(self, table: str) -> str:
        """The backbone whose vectors ``table`` holds."""
        return next(n for n, t in self.tables.items() if t == table)


def plan_pass(store: Store, request: EmbedRequest) -> Plan:
    """Everything decided before the first tile (see the module doc). Every option is checked
    before anything is written; commits the stain target and provenance records when there
    is something to embed."""
    r = request
    check_options(r.batch_size, precision=r.precision, device=r.device, backbones=list(r.backbones))
    if not store.has_table("spots"):
        raise StoreError(f"{store.path}: no spots; run `stimage-embed ingest` first")
    tile_um = r.tile_width()
    plan = Plan(r, resolve_device(r.device))
    slide_tab, spots = select_spots(store, list(r.slides) if r.slides else None, r.only_qc)
    plan.models = {
        n: create_model(n, weights=r.weights.get(n), device="cpu", overrides=r.overrides.get(n)) for n in r.backbones
    }
    plan.tables = {n: P.vector_table_name(n, r.context_um) for n in r.backbones}
    replacing = set(plan.tables.values()) if r.overwrite and not r.slides else set()
    template_id, plan.stain_factory, stain_desc, chosen_by = stain_target(
        store, list(r.backbones), r.stain, r.stain_template, replacing
    )
    for name, bb in plan.models.items():
        prov = provenance_base(name, bb, tile_um, r.stain, template_id, stain_desc, r.context_um)
        plan.precision[name], plan.provenance[name], plan.done[name] = prepare_table(
            store,
            name,
            bb,
            prov,
            r.precision,
            plan.device,
            slide_tab,
            r.overwrite,
            r.slides,
            plan.tables[name],
            plan.replace,
        )
    plan.jobs, plan.chunks = work_list(slide_tab, spots, tile_um, r.batch_size, plan.done)
    plan.tissue = dict(zip(zip(spots["slide_id"], spots["spot_id"]), spots["tissue_fraction"]))
    ghash = dict(zip(slide_tab["slide_id"], slide_tab["geometry_hash"])) if "geometry_hash" in slide_tab.columns else {}
    plan.slide_meta = {
        sid: {"tile_um": job.tile_um, "um_per_px": job.um_per_px, "geometry_hash": ghash.get(sid)}
        for sid, job in plan.jobs.items()
    }
    if plan.chunks:  # a record only for a pass that writes vectors
        check_images(slide_tab, {c.slide_id for c in plan.chunks})  # before the first vector is written
        stain_target_record(store, template_id, chosen_by)  # the store's stain target, recorded once
        plan.pids = {name: P.record(store, plan.tables[name], plan.provenance[name]) for name in plan.models}
    return plan


def nothing_to_do(store: Store, plan: Plan) -> bool:
    """Whether every key is stored already; if so, the upkeep an earlier (maybe killed) run's
    commits still need is done here."""
    if plan.chunks:
        return False
    log.info("all spots already embedded for %s", ", ".join(plan.models))
    maintain(store, list(plan.tables.values()))
    return True


def finish_pass(store: Store, plan: Plan, before: dict[str, dict[str, int]]) -> int:
    """After an engine's last write: bytes its commits added to the plan's tables since
    ``before`` (:func:`~stimage_embed.store.maintenance.data_snapshot`, measured before the
    upkeep rewrites them), then the provenance records of replaced vectors dropped and the
    upkeep (slide_id index, compaction, old versions: ``store.maintenance``)."""
    written = bytes_added(store, before)
    for table in plan.tables.values():
        P.prune(store, table)
    maintain(store, list(plan.tables.values()) + ["provenance"])
    return written


def snapshot(store: Store, plan: Plan) -> dict[str, dict[str, int]]:
    """The data files of the plan's tables now (``finish_pass`` counts the bytes added since)."""
    return data_snapshot(store, plan.tables.values())
