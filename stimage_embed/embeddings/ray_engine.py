"""The embedding pass on Ray Data: ``stimage-embed embed --engine ray``.

Same work, provenance and resume rules as the local pass (:mod:`.embed_pass`), spread over
a Ray cluster (a local one by default, or ``--address auto|ray://HOST:10001``):

1. the driver makes the one plan of the pass, as the local pass does (``pass_plan.plan_pass``:
   resume chunks of each slide, keys already stored skipped, the stain target and each
   backbone's provenance record committed before any vector);
2. CPU tasks cut the tiles (decode, window, stain; ``ray_stages.cut_tiles``);
3. an actor pool of model workers (one model per backbone per actor; ``--gpus-per-worker``
   GPUs each, else ``num_cpus=0.5`` so that on two cores the cutting tasks still get a core
   and the pipeline does not stall) embeds them;
4. tasks write the vectors as Lance fragments of ``embeddings_<backbone>`` with the
   ``lance-ray`` package; the driver commits them as they come (``LanceOperation.Append``,
   one commit per ``flush_rows`` rows): a killed run leaves only whole commits, and fragments
   written by a killed worker are never committed (Ray re-runs its batch on a new actor).
   Old vectors an ``--overwrite`` replaces are deleted just before the table's first commit.

Ray Data's own ``Dataset.write_lance`` is not used: it commits once at the end (nothing of
a long pass would survive a crash), and with Ray 2.60 and pylance 14 it fails outright
(``TypeError: LanceDataset.__init__() got an unexpected keyword argument
'storage_options_provider'``, checked).

Resume: keys present are not embedded again, so after a killed worker or a re-run every
key has exactly one row. Concurrency: on a local store the driver holds the store's writer
lock; on object storage there is none (``store.lock``), and two passes racing on one table
may both append a key; the next pass's ``provenance.repair`` deletes such duplicates and
embeds them once.

On a multi-node cluster the store must be reachable from every node: an ``s3://`` URI, with
the ``AWS_*`` variables forwarded to the workers (``runtime_env``), and this package
installed on the nodes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pickle
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from stimage_embed.embeddings import ray_stages as RS
from stimage_embed.embeddings.embed_pass import EmbedReport
from stimage_embed.embeddings.embed_plan import check_options
from stimage_embed.embeddings.pass_plan import (
    EmbedRequest,
    Plan,
    RunOptions,
    finish_pass,
    nothing_to_do,
    plan_pass,
    snapshot,
)
from stimage_embed.errors import InputError, StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.lock import writes
from stimage_embed.store.store import Store
from stimage_embed.store.uri import forwarded_env

log = logging.getLogger(__name__)

#: chunk rows per cutting task (consecutive chunks of a slide share one decode)
CHUNKS_PER_TASK = 8
#: input blocks of chunk rows (one chunk each on small passes, so every worker gets work)
MAX_INPUT_BLOCKS = 4096


@dataclass
class RayConfig:
    """How the pass uses the cluster. ``workers``: model actors (default: the cluster's GPUs
    / ``gpus_per_worker``, else one per two CPUs); ``cpus_per_worker``: CPUs each actor
    reserves (0.5 on a small machine, see the module doc); ``threads_per_worker``: torch
    threads per actor on CPU."""

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    threads_per_worker: int = 1
    cut_cpus: float = 1.0
    progress: bool = False  # Ray Data's own progress bars
    extra_env: dict[str, str] = field(default_factory=dict)


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Connect to (or start) Ray; shut down only a Ray this call started."""
    try:
        import ray
    except ImportError as exc:
        raise InputError(
            None, "--engine", "the Ray engine needs the [distributed] extra (pip install 'stimage-embed[distributed]')"
        ) from exc
    started = not ray.is_initialized()
    if started:
        env = {**forwarded_env(), **cfg.extra_env}
        with warnings.catch_warnings():  # Ray forks its daemons after LanceDB started: harmless here
            warnings.filterwarnings("ignore", message="lancedb fork support", category=RuntimeWarning)
            try:
                ray.init(
                    address=cfg.address,
                    runtime_env={"env_vars": env} if env else None,
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                    log_to_driver=False,
                )
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(
                    None,
                    "--address",
                    f"cannot start or reach Ray at {cfg.address or 'a new local instance'}: "
                    f"{' '.join(str(exc).split())[:300]}",
                ) from exc
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    ctx.print_on_execution_start = False
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _pool_size(ray, cfg: RayConfig) -> int:
    if cfg.workers:
        return int(cfg.workers)
    res = ray.cluster_resources()
    if cfg.gpus_per_worker > 0:
        gpus = int(res.get("GPU", 0) // cfg.gpus_per_worker)
        if gpus < 1:
            raise InputError(
                None,
                "--gpus-per-worker",
                f"the Ray cluster has {res.get('GPU', 0)} GPU(s); "
                f"none can host a worker of {cfg.gpus_per_worker} GPU(s)",
            )
        return gpus
    return max(1, int(res.get("CPU", 2) // 2))


def _pipeline(ray, plan: Plan, cfg: RayConfig, store: Store, batch_size: int, flush_rows: int):
    """The Ray Data pipeline: chunk rows -> tile rows -> vectors -> fragment metadata rows."""
    sizes = tuple(sorted({bb.input_size for bb in plan.models.values()}))
    names = tuple(plan.models)
    # blocks of about one chunk of tiles, so the model workers start on the first chunks
    # while the next are cut (Ray would otherwise pack a task's output into 128 MiB blocks);
    # set before the dataset is made, which takes a copy of the context
    ray.data.DataContext.get_current().target_max_block_size = int(1.5 * batch_size * sum(3 * s * s for s in sizes))
    ds = ray.data.from_items(RS.chunk_rows(plan), override_num_blocks=min(len(plan.chunks), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(
        RS.cut_tiles,
        batch_size=CHUNKS_PER_TASK,
        batch_format="numpy",
        num_cpus=cfg.cut_cpus,
        fn_kwargs={"sizes": sizes, "backbones": names, "stain_factory": plan.stain_factory},
    )
    gpu = cfg.gpus_per_worker > 0
    workers = _pool_size(ray, cfg)
    specs = [
        {
            "name": n,
            "weights": plan.request.weights.get(n),
            "overrides": plan.request.overrides.get(n),
            "precision": plan.precision[n],
        }
        for n in names
    ]
    ds = ds.map_batches(
        RS.ModelWorker,
        fn_constructor_kwargs={"specs": specs, "device": "cuda" if gpu else "cpu", "threads": cfg.threads_per_worker},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker if gpu else None,
        runtime_env={"env_vars": dict(cfg.extra_env)} if cfg.extra_env else None,
    )
    tables = {
        n: {
            "table": plan.tables[n],
            "uri": str(store.path / f"{plan.tables[n]}.lance"),
            "dim": plan.models[n].embed_dim,
            "provenance_id": plan.pids[n],
            "slides": plan.slide_meta,
        }
        for n in names
    }
    # writes are light I/O: no CPU reserved (a reserved share stalls them behind the cutting
    # on two cores), at most one in flight per model worker (and one more)
    return ds.map_batches(
        RS.write_fragments,
        batch_size=flush_rows,
        batch_format="numpy",
        num_cpus=0,
        concurrency=workers + 1,
        fn_kwargs={"tables": tables, "storage_options": store.storage_options},
    )


def _device(device: str, cfg: RayConfig) -> str:
    """Where Ray runs the models (cuda with ``gpus_per_worker``, else cpu); ``device``: auto
    or one that agrees."""
    used = "cuda" if cfg.gpus_per_worker > 0 else "cpu"
    if device not in ("auto", used) and not device.startswith(used):
        raise InputError(
            None,
            "--device",
            f"the Ray engine runs the models on {used} "
            f"(--gpus-per-worker {cfg.gpus_per_worker}); got --device {device}",
        )
    return used


def _commit(store: Store, plan: Plan, batch: dict, report: EmbedReport, bar) -> None:
    """Commit one batch of fragment rows of the pipeline: one append per table (the first
    one after deleting the old vectors an ``--overwrite`` replaces)."""
    by_table: dict[str, list] = {}
    for table, frag, rows in zip(batch["table"], batch["fragment"], batch["rows"]):
        by_table.setdefault(str(table), []).append(pickle.loads(frag))
        name = plan.backbone_of(str(table))
        report.vectors[name] = report.vectors.get(name, 0) + int(rows)
        bar.update(int(rows))
    for table, frags in by_table.items():
        scope = plan.take_replaced(table)
        if scope is not None:
            store.delete(table, scope)
        store.append_fragments(table, frags)  # one commit per written chunk of vectors


@writes("embed")
def execute(store: Store, request: EmbedRequest, run: RunOptions | None = None, config: RayConfig | None = None):
    """The Ray engine: plan the pass (``pass_plan.plan_pass``, models placed by ``config``)
    and run it on Ray (see the module doc). ``run.num_workers``: model actors (unless
    ``config.workers``); ``run.flush_rows``: vectors per fragment write and commit."""
    run, cfg = run or RunOptions(), config or RayConfig()
    if run.num_workers and not cfg.workers:
        cfg = dataclasses.replace(cfg, workers=run.num_workers)
    check_options(request.batch_size, flush_rows=run.flush_rows)
    plan = plan_pass(store, dataclasses.replace(request, device=_device(request.device, cfg)))
    report = EmbedReport(precision=dict(plan.precision))
    if nothing_to_do(store, plan):
        return report
    for name, table in plan.tables.items():  # the fragments need a table to be committed to
        store.ensure_table(table, S.embedding_schema(plan.models[name].embed_dim, optional=True))
    before, t0 = snapshot(store, plan), time.perf_counter()
    desc = "embed (ray) " + ",".join(plan.models)
    bar = tqdm(total=plan.n_tiles * len(plan.tables), unit="vec", desc=desc, disable=not run.progress)
    with ray_session(cfg) as ray:
        ds = _pipeline(ray, plan, cfg, store, request.batch_size, run.flush_rows)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                _commit(store, plan, batch, report, bar)
        except ray.exceptions.RayError as exc:
            raise StoreError(f"{store.path}: the Ray pass failed: {' '.join(str(exc).split())[:500]}") from exc
    bar.close()
    report.tiles = plan.n_tiles
    report.seconds = time.perf_counter() - t0
    report.bytes_written = finish_pass(store, plan, before)
    return report


def embed_ray(
    store: Store,
    backbones: list[str],
    slides: list[str] | None = None,
    tile_um: float | None = None,
    stain: str = "macenko",
    stain_template: str | None = None,
    batch_size: int = 32,
    precision: str = "auto",
    weights: dict[str, str] | None = None,
    only_qc: bool = False,
    overwrite: bool = False,
    flush_rows: int = 512,
    progress: bool = True,
    config: RayConfig | None = None,
    backbone_overrides: dict[str, dict] | None = None,
    num_workers: int | None = None,
    device: str = "auto",
    context_um: float | None = None,
) -> EmbedReport:
    """The embedding pass on Ray (see the module doc): :func:`execute` of the
    :class:`~stimage_embed.embeddings.pass_plan.EmbedRequest` these arguments make (as
    ``embed_pass.embed``'s). ``tile_um`` in µm (default: each slide's spot diameter);
    ``batch_size``: tiles per model call; ``flush_rows``: vectors per fragment write and
    commit; ``num_workers``: model actors (unless ``config.workers``); ``device``: auto, or
    cpu / cuda agreeing with ``config.gpus_per_worker`` (Ray places the models);
    ``context_um``: a wider window (µm) into its own table, as the local pass's ``--context-um``."""
    request = EmbedRequest.of(
        backbones,
        slides,
        weights,
        backbone_overrides,
        tile_um=tile_um,
        context_um=context_um,
        stain=stain,
        stain_template=stain_template,
        precision=precision,
        batch_size=batch_size,
        device=device,
        only_qc=only_qc,
        overwrite=overwrite,
    )
    return execute(store, request, RunOptions(num_workers, flush_rows, progress), config)
