"""The store's one stain target: the template slide every stain-normalised vector table is
normalised against, recorded once (table ``stain_target``).

Choice, made by the first ``embed`` that normalises stains, then recorded:

1. ``--stain-template SLIDE`` if given;
2. else, in a store written before the record existed, the template its vector tables'
   provenance already names;
3. else the rule: the smallest slide id among the slides with counts at that time. Image-only
   slides (``infer``) never qualify. Recorded, it does not move when slides are added.

A later ``--stain-template`` naming another slide is refused while any stain-normalised table
would keep vectors normalised against the recorded one; re-embedding every such table with
``--overwrite`` moves the record.

The target itself (the normaliser fitted on the template, identified by its ``target_hash``)
is part of every vector table's provenance identity (``provenance.identity``). Re-ingesting
the template slide with another image changes the target: every table normalised against the
old one is stale, and ``embed`` (appending) and ``compare``/``train``/``predict`` refuse it in
one line naming the ``embed --overwrite`` to run. A run combining tables of different targets
is refused (:func:`check_same_target`).

A target can also come with the vectors' provenance instead of the store
(:class:`RecordedTarget`: a saved model folder carries its training vectors' target), so a
model embeds new slides of any store as its training slides were embedded, without the
template slide and whatever target that store records (``infer``, ``explain``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from stimage_embed.embeddings import provenance as P
from stimage_embed.embeddings.tile_stream import SlideStainFit, stored_stain_estimates, template_normalizer
from stimage_embed.errors import InputError, StoreError
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store

TABLE = "stain_target"
IMAGE_ONLY = "image_only"


def candidates(slides: pl.DataFrame) -> list[str]:
    """Slides that may be the template: those with counts (not image-only), sorted by id."""
    ok = slides.filter((pl.col("platform").fill_null("") != IMAGE_ONLY) & (pl.col("n_genes").fill_null(0) > 0))
    return sorted(ok["slide_id"].to_list())


def recorded(store: Store) -> dict | None:
    """The recorded target row (``template_slide``, ``chosen_by``, ``recorded_at``) or None."""
    if not store.has_table(TABLE):
        return None
    rows = store.read(TABLE).to_pylist()
    return rows[0] if rows else None


def _normalised_tables(store: Store) -> list[str]:
    """Vector tables holding stain-normalised vectors."""
    out = []
    for t in store.table_names():
        if t.startswith(S.EMBEDDING_PREFIX):
            if any(p.get("stain_method") not in (None, "none") for p in P.existing_provenance(store, t)):
                out.append(t)
    return out


def resolve_template(store: Store, explicit: str | None, replacing: set[str]) -> tuple[str, str | None]:
    """``(template slide, how it was chosen)`` for this pass (see the module doc); the second
    is None when it is the recorded one, else the pass records it with :func:`record` before
    its first vectors. ``replacing``: vector tables this pass rewrites whole (``--overwrite``
    without ``--slide``). Writes nothing."""
    slides = pl.from_arrow(store.read("slides", ["slide_id", "platform", "n_genes"]))
    allowed = candidates(slides)
    if explicit is not None and explicit not in allowed:
        why = "is not in the store" if explicit not in set(slides["slide_id"]) else "has no counts (image-only)"
        raise InputError(None, "--stain-template", f"template slide {explicit!r} {why}")
    rec = recorded(store)
    if rec is not None:
        if explicit is None or explicit == rec["template_slide"]:
            return rec["template_slide"], None
        kept = sorted(set(_normalised_tables(store)) - set(replacing))
        if kept:
            raise InputError(
                None,
                "--stain-template",
                f"the store's stain template is slide {rec['template_slide']!r}, and {', '.join(kept)} "
                f"are normalised against it; to change it re-embed every table: stimage-embed embed --overwrite "
                f"--backbone {','.join(t.removeprefix('embeddings_') for t in kept)} --stain-template {explicit}",
            )
        return explicit, "explicit"
    legacy = P.recorded_stain_template(store, _normalised_tables(store))
    if explicit is not None:
        return explicit, "explicit"
    if legacy is not None and legacy in allowed:  # a template not here: vectors embedded with a model's target
        return legacy, "recorded"
    if not allowed:
        raise StoreError(f"{store.path}: no slide with counts to take the stain target from; ingest one first")
    return allowed[0], "rule"


@dataclass(frozen=True)
class RecordedTarget:
    """A stain target as a provenance record carries it: ``target``, the fitted normaliser's
    parameters (``Normalizer.to_dict()``: method, settings, the fitted target, e.g. Macenko's
    stain matrix and 99th-percentile concentrations, and its ``target_hash``), and the template
    slide it was fitted on (a name only: it need not be in the store that uses it)."""

    method: str
    template_slide: str | None
    target: dict[str, Any]

    @classmethod
    def from_record(cls, rec: dict[str, Any], source: str | Path | None = None) -> RecordedTarget | None:
        """The target of a provenance record (None without stain normalisation); ``source``:
        the file the record was read from, named in the one-line error of a record without one."""
        method = rec.get("stain_method")
        if method in (None, "none"):
            return None
        stain = rec.get("stain")
        if not isinstance(stain, dict) or "target" not in stain or stain.get("method") != method:
            raise InputError(source, "stain", f"the record holds no fitted {method} stain target")
        return cls(method, rec.get("stain_template"), stain)

    @property
    def target_hash(self) -> str | None:
        return self.target.get("target_hash")

    def normalizer(self, source: str | Path | None = None):
        """The normaliser with this target (its hash checked against the parameters)."""
        from stimage_embed.tiles.stain import normalizer_from_dict

        try:
            return normalizer_from_dict(self.target)
        except InputError as exc:
            raise InputError(source, "stain", f"the recorded stain target is unusable: {exc}") from exc


def use_recorded(store: Store, method: str, target: RecordedTarget) -> tuple[str | None, SlideStainFit, dict, None]:
    """``embed_plan.stain_target`` for a :class:`RecordedTarget`: (template slide named by the
    record, per-slide stain fit against the recorded target, its description, None: the
    store's own target is neither used nor recorded). Per-slide estimates come from ingest."""
    if target.method != method:
        raise InputError(None, "--stain", f"{method!r} given, but the recorded stain target is {target.method!r}")
    norm = target.normalizer()
    slides = pl.from_arrow(store.read("slides")) if store.has_table("slides") else pl.DataFrame()
    return target.template_slide, SlideStainFit(norm, estimates=stored_stain_estimates(slides)), norm.to_dict(), None


def record(store: Store, template: str, chosen_by: str | None) -> str:
    """Record ``template`` as the store's stain target (one commit; nothing if ``chosen_by`` is None)."""
    if chosen_by is None:
        return template
    row = {"template_slide": template, "chosen_by": chosen_by, "recorded_at": dt.datetime.now(dt.timezone.utc)}
    store.replace_where(
        TABLE, pa.Table.from_pylist([row], schema=S.STAIN_TARGET), ("template_slide",), "template_slide IS NOT NULL"
    )
    return template


def fit_target(store: Store, method: str, template: str):
    """The normaliser ``method`` fitted on ``template`` as the store holds it now (its stored
    estimate from ingest; the image only for older stores)."""
    row = pl.from_arrow(store.read("slides")).filter(pl.col("slide_id") == template)
    if row.height == 0:
        raise StoreError(f"{store.path}: the stain template slide {template!r} is no longer in the store")
    return template_normalizer(method, row["image_path"][0], stored_stain_estimates(row).get(template))


def current_target_hash(store: Store, method: str) -> str | None:
    """``target_hash`` of the store's recorded target for ``method`` now (None: none recorded)."""
    rec = recorded(store)
    if rec is None:
        return None
    return fit_target(store, method, rec["template_slide"]).to_dict().get("target_hash")


def check_table_target(store: Store, table: str) -> None:
    """Refuse vectors of ``table`` normalised against another target than the store's current
    one (the template slide was re-ingested with another image since), in one line."""
    for prov in P.existing_provenance(store, table):
        method = prov.get("stain_method")
        if method in (None, "none"):
            continue
        have = P.identity(prov)["stain_target"]
        now = current_target_hash(store, method)
        if now is not None and have is not None and have != now:
            backbone = prov.get("backbone", table.removeprefix(S.EMBEDDING_PREFIX))
            raise StoreError(
                f"{store.path}/{table}: its vectors were normalised against an older stain target (template "
                f"slide {prov.get('stain_template')!r} changed since); re-embed them: "
                f"stimage-embed embed --overwrite --backbone {backbone}"
            )


def check_same_target(store: Store, tables: list[str]) -> None:
    """Refuse a run combining vector tables normalised differently (method or target)."""
    seen = {}
    for t in tables:
        for prov in P.existing_provenance(store, t):
            seen[t] = (prov.get("stain_method"), P.identity(prov)["stain_target"])
    if len(set(seen.values())) > 1:
        detail = "; ".join(f"{t}: {m} {(h or '')[:12]}" for t, (m, h) in sorted(seen.items()))
        raise InputError(None, "--backbones", f"the vector tables were stain-normalised differently ({detail})")
