"""The ``labels`` table: categorical labels per spot (cell type, pathologist region ...).

One row per (slide_id, spot_id, label_set); ``label_set`` names the column the labels came
from (e.g. ``cell_type``), so a store holds several label sets side by side. Written by
``stimage-embed labels add``; read by the label head's training and evaluation.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa

from stimage_embed.errors import InputError
from stimage_embed.store.store import Store, sql_list

log = logging.getLogger(__name__)

LABELS = pa.schema(
    [
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("label_set", pa.string(), nullable=False),  # the source column, e.g. cell_type
        pa.field("label", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("added_at", pa.timestamp("us", tz="UTC")),
    ]
)
LABELS_TABLE = "labels"
LABEL_KEYS = ("slide_id", "spot_id", "label_set")
N_EXAMPLES = 5


def read_label_file(path: Path, key: tuple[str, str], column: str) -> pd.DataFrame:
    """(slide_id, spot_id, label) rows of a CSV/TSV/parquet file; ``key`` names its slide and
    spot columns. Raises naming the file and column on anything missing or empty."""
    if not path.is_file():
        raise InputError(path, "FILE", "label file does not exist")
    try:
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
        else:
            df = pd.read_csv(path, sep="\t" if path.suffix in (".tsv", ".txt") else ",", dtype=str)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(path, "FILE", f"cannot read the label table: {exc}") from exc
    missing = [c for c in (*key, column) if c not in df.columns]
    if missing:
        raise InputError(path, ",".join(missing), f"no such column(s) {missing}; the file has {list(df.columns)}")
    out = pd.DataFrame({"slide_id": df[key[0]], "spot_id": df[key[1]], "label": df[column]})
    empty = out["label"].isna() | (out["label"].astype(str).str.strip() == "")
    if empty.any():
        raise InputError(
            path, column, f"{int(empty.sum())} row(s) without a label (first at row {int(empty.idxmax()) + 2})"
        )
    out = out.astype(str)
    dup = out.duplicated(["slide_id", "spot_id"])
    if dup.any():
        raise InputError(
            path, ",".join(key), f"duplicate keys, e.g. {out.loc[dup, ['slide_id', 'spot_id']].iloc[0].tolist()}"
        )
    return out


def check_known_keys(store: Store, labels: pd.DataFrame, path: Path, key: tuple[str, str]) -> None:
    """Raise naming the file and key columns when a (slide, spot) key is not in ``spots``."""
    if not store.has_table("spots"):
        raise InputError(store.path, "spots", "the store has no spots: ingest a catalog first")
    slides = sorted(labels["slide_id"].unique())
    spots = store.read("spots", ["slide_id", "spot_id"], where=f"slide_id IN ({sql_list(slides)})").to_pandas()
    known = pd.MultiIndex.from_frame(spots[["slide_id", "spot_id"]])
    unknown = ~pd.MultiIndex.from_frame(labels[["slide_id", "spot_id"]]).isin(known)
    if unknown.any():
        ex = labels.loc[unknown, ["slide_id", "spot_id"]].head(N_EXAMPLES).values.tolist()
        raise InputError(
            path, ",".join(key), f"{int(unknown.sum())} of {len(labels)} key(s) are not spots of the store, e.g. {ex}"
        )


def add_labels(store: Store, path: Path, key: tuple[str, str], column: str, name: str | None = None) -> int:
    """Store the labels of ``path`` as label set ``name`` (default: ``column``), replacing that
    set's rows of the same slides in one commit. Returns the number of rows written."""
    labels = read_label_file(path, key, column)
    label_set = name or column
    with store.writer("labels"):
        check_known_keys(store, labels, path, key)
        now = dt.datetime.now(dt.timezone.utc)
        data = pa.table(
            {
                "slide_id": labels["slide_id"].to_numpy(),
                "spot_id": labels["spot_id"].to_numpy(),
                "label_set": [label_set] * len(labels),
                "label": labels["label"].to_numpy(),
                "source_file": [str(path)] * len(labels),
                "added_at": [now] * len(labels),
            },
            schema=LABELS,
        )
        scope = f"label_set = {sql_list([label_set])} AND slide_id IN ({sql_list(sorted(labels['slide_id'].unique()))})"
        store.replace_where(LABELS_TABLE, data, LABEL_KEYS, scope, schema=LABELS)
    log.info("%s: %d label(s) of set %r stored", path, len(labels), label_set)
    return len(labels)


def read_labels(store: Store, label_set: str) -> pd.DataFrame:
    """(slide_id, spot_id, label) of one label set; raises when the set is unknown."""
    if not store.has_table(LABELS_TABLE):
        raise InputError(store.path, "--labels", "the store has no labels: run `stimage-embed labels add` first")
    t = store.read(LABELS_TABLE, ["slide_id", "spot_id", "label"], where=f"label_set = {sql_list([label_set])}")
    if t.num_rows == 0:
        sets = sorted(set(store.read(LABELS_TABLE, ["label_set"])["label_set"].to_pylist()))
        raise InputError(store.path, "--labels", f"no label set {label_set!r}; the store has {sets}")
    return t.to_pandas()
