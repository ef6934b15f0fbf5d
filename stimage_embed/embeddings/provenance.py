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
from typing import Any

import polars as pl
import pyarrow as pa

from stimage_embed.errors import ProvenanceError
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store

#: fields that must agree for vectors to share a table
IDENTITY_FIELDS = (
    "backbone", "spec_hash", "weights_sha256", "transform", "tile_um", "tile_px", "stain_method",
    "stain_template", "precision",
)


def provenance_id(prov: dict[str, Any]) -> str:
    canon = json.dumps({k: prov.get(k) for k in IDENTITY_FIELDS}, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def existing_provenance(store: Store, table_name: str) -> list[dict[str, Any]]:
    if not store.has_table("provenance"):
        return []
    rows = pl.from_arrow(store.read("provenance", where=f"table_name = '{table_name}'"))
    return [json.loads(j) for j in rows["json"].to_list()]


def check_compatible(store: Store, table_name: str, prov: dict[str, Any]) -> None:
    """Refuse to append vectors whose provenance differs from the table's."""
    if not store.has_table(table_name):
        return
    for old in existing_provenance(store, table_name):
        diff = {k: (old.get(k), prov.get(k)) for k in IDENTITY_FIELDS if old.get(k) != prov.get(k)}
        if diff:
            lines = "; ".join(f"{k}: table has {a!r}, this run has {b!r}" for k, (a, b) in diff.items())
            raise ProvenanceError(
                f"{store.path}/{table_name}: refusing to append vectors with a different provenance ({lines}). "
                "Use --overwrite to replace the table's vectors, or embed into another store."
            )


def record(store: Store, table_name: str, prov: dict[str, Any]) -> str:
    pid = provenance_id(prov)
    if any(provenance_id(p) == pid for p in existing_provenance(store, table_name)):
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
    if store.has_table("provenance"):
        store.table("provenance").delete(f"table_name = '{table_name}'")
