"""Provenance of a table of vectors: what produced them, recorded once per table.

A provenance record holds the backbone id, its spec hash and the sha256 of the weights
actually loaded, the input transform, the tile policy (µm and px), the stain method and
template, the numeric precision and the package version. Its id is a hash of the
canonical JSON. Every vector row carries that id; µm/px per vector comes from ``slides``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from stimage_embed.embeddings.vector_source import (  # noqa: F401  (re-exported: the pass builds table names here)
    VectorSource,
    VectorTable,
    context_width_label,
    vector_table_name,
)
from stimage_embed.errors import InputError, ProvenanceError
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

#: fields that must agree for vectors to share a table
IDENTITY_FIELDS = (
    "backbone",
    "spec_hash",
    "weights_sha256",
    "transform",
    "tile_um",
    "tile_px",
    "stain_method",
    "stain_template",
    "precision",
)


#: a stain target a saved head's record lacks (saved before the target was part of the
#: identity): not compared
NOT_RECORDED = "<not recorded>"
#: an identity field a saved head's record lacks: differs from every recorded value
MISSING = "<missing>"


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _hash(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VectorProvenance:
    """The identity of a set of vectors: two sets are interchangeable iff their values are equal.

    The :data:`IDENTITY_FIELDS` and ``stain_target``, the ``target_hash`` of the stain target the
    vectors were normalised against (a record keeps it in ``stain``; None without stain
    normalisation). Built from a stored record (:meth:`of`; a composite's record holds one value
    per part) or from the JSON-encoded form a saved head carries (:meth:`from_saved`). The one
    identity check of ``embed`` (appending), ``train``/``predict``, ``infer``, ``search --image``
    and ``explain``: :meth:`differences`. ``record``: the full record (not compared).
    """

    backbone: Any
    spec_hash: Any
    weights_sha256: Any
    transform: Any
    tile_um: Any
    tile_px: Any
    stain_method: Any
    stain_template: Any
    precision: Any
    stain_target: Any = None
    legacy_id: bool = field(default=False, compare=False)  # record predates the target in its id
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, prov: Mapping[str, Any]) -> VectorProvenance:
        """The identity of a provenance record (a composite's: lists of its parts' values)."""
        stain = prov.get("stain")
        if "stain_target" in prov:
            target = prov["stain_target"]
        elif isinstance(stain, list):  # a composite's provenance: one value per part
            target = [(s or {}).get("target_hash") for s in stain]
        else:
            target = (stain or {}).get("target_hash")
        values = {k: _plain(prov.get(k)) for k in IDENTITY_FIELDS}
        return cls(**values, stain_target=_plain(target), legacy_id="stain_target" not in prov, record=dict(prov))

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any] | None) -> VectorProvenance:
        """From :meth:`saved`'s form (JSON strings), as a saved head carries it; an identity
        field it lacks is :data:`MISSING`, a lacking stain target :data:`NOT_RECORDED`."""
        saved = saved or {}

        def value(key: str, absent: str) -> Any:
            if key not in saved:
                return absent
            try:
                return json.loads(saved[key]) if isinstance(saved[key], str) else saved[key]
            except ValueError:
                return saved[key]

        return cls(**{k: value(k, MISSING) for k in IDENTITY_FIELDS}, stain_target=value("stain_target", NOT_RECORDED))

    def identity(self) -> dict[str, Any]:
        """The compared fields as a dict."""
        return {k: getattr(self, k) for k in (*IDENTITY_FIELDS, "stain_target")}

    def saved(self) -> dict[str, str]:
        """The identity JSON-encoded per field: the form a saved head carries (``head.json``)."""
        return {k: json.dumps(v, sort_keys=True, default=str) for k, v in self.identity().items()}

    @property
    def id(self) -> str:
        """Hash of the identity; a record written before the stain target was part of the
        identity (no top-level ``stain_target``) keeps the id its vectors carry (without it)."""
        ident = self.identity()
        if self.legacy_id:
            ident.pop("stain_target")
        return _hash(ident)

    @property
    def setup_id(self) -> str:
        """Id of how vectors are made, without the stain target's fitted numbers (see :func:`setup_id`)."""
        ident = self.identity()
        ident.pop("stain_target")
        return _hash(ident)

    def differences(self, other: VectorProvenance) -> dict[str, tuple[Any, Any]]:
        """``field -> (this value, other's value)`` of every field that differs (empty: the
        same vectors). A stain target :data:`NOT_RECORDED` on either side is not compared."""
        out = {}
        for key, mine in self.identity().items():
            theirs = getattr(other, key)
            if key == "stain_target" and NOT_RECORDED in (mine, theirs):
                continue
            if mine != theirs:
                out[key] = (mine, theirs)
        return out

    @property
    def source(self) -> VectorSource:
        """The vector source these vectors make (a composite's: one part per record)."""
        context = self.record.get("context_um")
        if isinstance(self.backbone, list):
            ctx = context if isinstance(context, list) else [None] * len(self.backbone)
            return VectorSource(tuple(VectorTable(b, c) for b, c in zip(self.backbone, ctx)))
        return VectorSource.of(self.backbone, context)

    @property
    def table_name(self) -> str:
        """The vector table of a single source's vectors."""
        return self.source.table


def describe(diff: dict[str, tuple[Any, Any]], mine: str, theirs: str) -> str:
    """``field: <mine> has 'a', <theirs> has 'b'; ...``: :meth:`VectorProvenance.differences` in words."""
    return "; ".join(f"{k}: {mine} has {a!r}, {theirs} has {b!r}" for k, (a, b) in diff.items())


def identity(prov: dict[str, Any]) -> dict[str, Any]:
    """What decides whether two sets of vectors are interchangeable (:class:`VectorProvenance`)."""
    return VectorProvenance.of(prov).identity()


def provenance_id(prov: dict[str, Any]) -> str:
    """Id of a provenance record (:attr:`VectorProvenance.id`)."""
    return VectorProvenance.of(prov).id


def setup_id(prov: dict[str, Any]) -> str:
    """Id of how vectors are made, without the stain target's fitted numbers (the id an older
    record has): part of a run's configuration (``predictions.runs``), while the target
    itself is part of the input versions, so a new target supersedes runs instead of
    starting a new configuration."""
    return VectorProvenance.of(prov).setup_id


def _used_ids(store: Store, table_name: str) -> set[str]:
    """Provenance ids carried by at least one vector row of ``table_name``."""
    if not store.has_table(table_name):
        return set()
    return set(pc.unique(store.read(table_name, ["provenance_id"])["provenance_id"]).to_pylist())


def existing_provenance(store: Store, table_name: str) -> list[dict[str, Any]]:
    """The provenance records of a table's vectors.

    Only records some vector row uses count: a record committed by a run killed before its
    first vectors (or left by an overwrite) describes nothing and is ignored, so it can
    neither mislabel the table's vectors nor block a later run."""
    if not store.has_table("provenance"):
        return []
    used = _used_ids(store, table_name)
    if not used:
        return []
    rows = pl.from_arrow(
        store.read("provenance", ["provenance_id", "json"], where=f"table_name = {_quote(table_name)}")
    )
    rows = rows.filter(pl.col("provenance_id").is_in(sorted(used))).unique(
        "provenance_id", keep="first", maintain_order=True
    )
    return [json.loads(j) for j in rows["json"].to_list()]


def recorded_stain_template(store: Store, table_names: list[str]) -> str | None:
    """The stain template recorded in the provenance of these tables' vectors (None if no
    table has vectors). Tables that disagree are refused: name the template explicitly."""
    found = {}
    for t in table_names:
        for prov in existing_provenance(store, t):
            if prov.get("stain_method") not in (None, "none") and prov.get("stain_template"):
                found.setdefault(prov["stain_template"], []).append(t)
    if len(found) > 1:
        raise InputError(
            None,
            "--stain-template",
            f"the vector tables were normalised against different templates "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(found.items()))}); name one with --stain-template",
        )
    return next(iter(found), None)


def prune(store: Store, table_name: str) -> int:
    """Delete provenance records of ``table_name`` that no vector row uses (under the lock)."""
    if not store.has_table("provenance"):
        return 0
    rows = pl.from_arrow(store.read("provenance", ["provenance_id"], where=f"table_name = {_quote(table_name)}"))
    unused = sorted(set(rows["provenance_id"]) - _used_ids(store, table_name))
    if not unused:
        return 0
    log.info("%s: dropping %d provenance record(s) no vector uses: %s", table_name, len(unused), unused)
    return store.delete("provenance", f"table_name = {_quote(table_name)} AND provenance_id IN ({sql_list(unused)})")


def _quote(value: str) -> str:
    return sql_list([value])


def check_compatible(store: Store, table_name: str, prov: dict[str, Any]) -> None:
    """Refuse to append vectors whose provenance differs from the table's."""
    if not store.has_table(table_name):
        return
    new = VectorProvenance.of(prov)
    for old in existing_provenance(store, table_name):
        diff = VectorProvenance.of(old).differences(new)
        if diff:
            hint = (
                " The stain target changed (its template slide was re-ingested): every vector normalised "
                "against the old one is stale; re-embed the table: "
                f"stimage-embed embed --overwrite --backbone {prov['backbone']}"
                if set(diff) == {"stain_target"}
                else " Use --overwrite to replace the table's vectors, or embed into another store."
            )
            raise ProvenanceError(
                f"{store.path}/{table_name}: refusing to append vectors with a different provenance "
                f"({describe(diff, 'table', 'this run')}).{hint}"
            )


def record(store: Store, table_name: str, prov: dict[str, Any]) -> str:
    """Commit the provenance record (if not there yet) and return its id. Commit it before
    the vectors that carry its id: until some vector uses it, it is ignored."""
    new = VectorProvenance.of(prov)
    same = [p for p in existing_provenance(store, table_name) if VectorProvenance.of(p) == new]
    if same:  # the table's own record (an older one may lack the top-level stain_target): its id
        return VectorProvenance.of(same[0]).id
    pid = new.id
    if (
        store.has_table("provenance")
        and store.read(
            "provenance",
            ["provenance_id"],
            where=f"table_name = {_quote(table_name)} AND provenance_id = {_quote(pid)}",
        ).num_rows
    ):
        return pid
    row = {
        "provenance_id": pid,
        "table_name": table_name,
        "backbone": prov["backbone"],
        "spec_hash": prov.get("spec_hash"),
        "weights_sha256": prov.get("weights_sha256"),
        "transform": json.dumps(prov.get("transform"), sort_keys=True),
        "tile_um": prov.get("tile_um") if isinstance(prov.get("tile_um"), (int, float)) else None,
        "tile_px": prov.get("tile_px"),
        "stain_method": prov.get("stain_method"),
        "stain_template": prov.get("stain_template"),
        "package_version": prov.get("package_version"),
        "json": json.dumps(prov, sort_keys=True, default=str),
        "created_at": dt.datetime.now(dt.timezone.utc),
    }
    store.append("provenance", pa.Table.from_pylist([row], schema=S.PROVENANCE))
    return pid


def forget(store: Store, table_name: str) -> None:
    store.delete("provenance", f"table_name = {_quote(table_name)}")


def repair(store: Store, table_name: str, slides: pl.DataFrame) -> None:
    """Make a vector table consistent before embedding into it (under the writer lock):

    * provenance records no vector uses are dropped (a run killed before its first vectors);
    * keys held more than once (written by unsynchronised writers of older versions) are
      deleted, to be embedded again, so the table ends with one row per key;
    * vectors of ``slides`` (columns slide_id, geometry_hash) cut under another geometry
      hash than the slide's current one (re-ingested with moved spots, another image or
      µm/px) are deleted, to be embedded again.
    """
    prune(store, table_name)
    if not store.has_table(table_name):
        return
    cols = ["slide_id", "spot_id"] + (
        ["geometry_hash"] if "geometry_hash" in store.dataset(table_name).schema.names else []
    )
    rows = pl.from_arrow(store.read(table_name, cols, where=f"slide_id IN ({sql_list(slides['slide_id'])})"))
    dup = rows.filter(pl.struct("slide_id", "spot_id").is_duplicated())
    for sid, keys in dup.group_by("slide_id"):
        ids = sorted(set(keys["spot_id"]))
        log.warning(
            "%s: slide %s: %d key(s) stored more than once; deleting them to embed them once",
            table_name,
            sid[0],
            len(ids),
        )
        store.delete(table_name, f"slide_id = {_quote(sid[0])} AND spot_id IN ({sql_list(ids)})")
    if "geometry_hash" not in cols or "geometry_hash" not in slides.columns:
        return
    for sid, current in zip(slides["slide_id"], slides["geometry_hash"]):
        if current is None:
            continue
        mine = rows.filter(pl.col("slide_id") == sid)
        stale = mine.filter(pl.col("geometry_hash").is_not_null() & (pl.col("geometry_hash") != current)).height
        legacy = mine["geometry_hash"].null_count()
        if stale:
            log.warning(
                "%s: slide %s changed since its vectors were cut (geometry hash: image, spots or µm/px); "
                "deleting %d stale vector(s) to embed them again",
                table_name,
                sid,
                stale,
            )
            store.delete(
                table_name,
                f"slide_id = {_quote(sid)} AND geometry_hash IS NOT NULL AND geometry_hash != {_quote(current)}",
            )
        if legacy:
            log.info(
                "%s: slide %s: %d vector(s) predate geometry hashes and cannot be checked against the slide; "
                "if it was re-ingested with moved spots, re-embed it with --overwrite --slide %s",
                table_name,
                sid,
                legacy,
                sid,
            )


def tile_widths_um(store: Store, prov: VectorProvenance, slides: list[str]) -> list[float]:
    """The tile widths (µm) of a single source's vectors: ``[tile_um]`` of the record, or for
    a record of ``"spot_diameter"`` the distinct widths its vectors of ``slides`` (all slides
    if empty) were cut at, as the table's ``tile_um`` column records them."""
    if isinstance(prov.tile_um, (int, float)):
        return [float(prov.tile_um)]
    where = f"provenance_id = {_quote(prov.id)}" + (f" AND slide_id IN ({sql_list(slides)})" if slides else "")
    got = store.read(prov.table_name, ["tile_um"], where=where)["tile_um"].to_pylist()
    return sorted({round(float(w), 6) for w in got if w is not None})
