"""``search --where``: a SQL predicate on slides/spots columns, checked to be a filter only
and turned into a LanceDB prefilter on the vector table.

The predicate is parsed by DuckDB (``json_serialize_sql``) and its syntax tree walked: only
comparisons, AND/OR/NOT, IN lists, BETWEEN, IS [NOT] NULL, LIKE, arithmetic, casts,
constants, column names and a few pure scalar functions are accepted (no subquery, no
table function, no file or network access, no second statement). Its columns are then bound
against an empty relation typed like ``slides`` joined to ``spots`` (a missing column or a
type error is refused). Columns: every ``spots`` column, and every ``slides`` column
(``slides.total_counts`` is ``slide_total_counts``; ``spots.total_counts`` is the spot's).

How it reaches LanceDB (what stays fast on a large table):

* only ``slides`` columns: resolved by DuckDB to a slide list, prefilter ``slide_id IN (...)``;
* only columns the vector table itself holds (``tissue_fraction``, ``padded_fraction``,
  ``tile_um``, ``um_per_px``, ``slide_id``, ``spot_id``): passed to LanceDB as it is;
* otherwise: resolved by DuckDB over ``slides JOIN spots`` to the matching keys, prefilter
  ``slide_id IN (whole slides) OR (slide_id = s AND spot_id IN (...))`` (exact, slower when
  millions of single spots match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from stimage_embed.errors import InputError
from stimage_embed.store import schema as S
from stimage_embed.store.store import Store, sql_list

FIELD = "--where"
#: syntax-tree node classes a filter may contain
ALLOWED_CLASSES = frozenset(
    {"CONJUNCTION", "COMPARISON", "COLUMN_REF", "CONSTANT", "OPERATOR", "BETWEEN", "CAST", "FUNCTION", "CASE"}
)
#: scalar functions allowed (pure, no I/O); DuckDB writes LIKE, ILIKE and arithmetic as functions
ALLOWED_FUNCTIONS = frozenset(
    {"~~", "!~~", "~~*", "!~~*", "+", "-", "*", "/", "%", "//"}
    | {"lower", "upper", "abs", "round", "length", "coalesce", "starts_with", "ends_with", "contains", "prefix"}
)
#: columns of the vector table a predicate may be pushed down on as it is
VECTOR_TABLE_COLUMNS = frozenset({"slide_id", "spot_id", "tissue_fraction", "padded_fraction", "tile_um", "um_per_px"})


def filter_schema() -> pa.Schema:
    """The columns a predicate may name: ``spots`` then ``slides`` (see the module doc)."""
    fields = list(S.SPOTS)
    names = {f.name for f in fields}
    for f in S.SLIDES:
        if f.name == "total_counts":
            fields.append(pa.field("slide_total_counts", f.type))
        elif f.name not in names:
            fields.append(f)
    return pa.schema(fields)


SLIDE_COLUMNS = frozenset({f.name for f in S.SLIDES} - {"total_counts"} | {"slide_total_counts"})


def _walk(node: object, columns: set[str], predicate: str) -> None:
    if isinstance(node, list):
        for item in node:
            _walk(item, columns, predicate)
        return
    if not isinstance(node, dict):
        return
    cls = node.get("class")
    if cls is not None:
        if cls not in ALLOWED_CLASSES:
            raise InputError(None, FIELD, f"{predicate!r}: only a filter is allowed, not a {cls.lower()} expression")
        if cls == "FUNCTION" and node.get("function_name", "").lower() not in ALLOWED_FUNCTIONS:
            raise InputError(None, FIELD, f"{predicate!r}: function {node.get('function_name')!r} is not allowed")
        if cls == "COLUMN_REF":
            columns.add(node["column_names"][-1])
    for key, value in node.items():
        if key != "literal" and isinstance(value, (dict, list)):
            _walk(value, columns, predicate)


def _parse(predicate: str) -> set[str]:
    """The columns the predicate names, after checking it is a filter and nothing else."""
    if not predicate.strip():
        raise InputError(None, FIELD, "empty predicate")
    if ";" in predicate:
        raise InputError(None, FIELD, f"{predicate!r}: one predicate only (no ';')")
    con = duckdb.connect()
    try:
        text = con.execute("SELECT json_serialize_sql(?)", [f"SELECT * FROM t WHERE ({predicate})"]).fetchone()[0]
    finally:
        con.close()
    tree = json.loads(text)
    if tree.get("error"):
        raise InputError(None, FIELD, f"{predicate!r} does not parse: {tree.get('error_message')}")
    stmts = tree["statements"]
    node = stmts[0]["node"] if len(stmts) == 1 else {}
    plain = (
        node.get("type") == "SELECT_NODE"
        and not node.get("modifiers")
        and not node.get("group_expressions")
        and node.get("having") is None
        and node.get("from_table", {}).get("type") == "BASE_TABLE"
        and len(node.get("select_list", [])) == 1
    )
    if not plain or node.get("where_clause") is None:
        raise InputError(None, FIELD, f"{predicate!r}: must be a single predicate (a WHERE condition)")
    columns: set[str] = set()
    _walk(node["where_clause"], columns, predicate)
    return columns


def _bind(predicate: str) -> None:
    """Bind the predicate against an empty relation of :func:`filter_schema` (sandboxed)."""
    con = duckdb.connect()
    try:
        con.execute("SET enable_external_access = false")
        con.register("t", filter_schema().empty_table())
        con.execute(f"SELECT count(*) FROM t WHERE ({predicate})").fetchall()
    except duckdb.Error as exc:
        msg = str(exc).splitlines()[0]
        raise InputError(None, FIELD, f"{predicate!r}: {msg}") from exc
    finally:
        con.close()


@dataclass(frozen=True)
class Prefilter:
    """A checked predicate: ``lance``, the filter for the vector table (None: no filter);
    ``route``: slides | table | keys (see the module doc); ``columns`` it names."""

    predicate: str | None
    lance: str | None
    route: str
    columns: frozenset[str]


def check_where(predicate: str | None) -> frozenset[str]:
    """Parse and bind ``predicate`` (see the module doc); returns the columns it names."""
    if predicate is None:
        return frozenset()
    columns = _parse(predicate)
    _bind(predicate)
    return frozenset(columns)


JOINED = """SELECT sp.*, sl.* EXCLUDE (slide_id, total_counts), sl.total_counts AS slide_total_counts
            FROM spots sp JOIN slides sl USING (slide_id)"""
SLIDES_ONLY = "SELECT * EXCLUDE (total_counts), total_counts AS slide_total_counts FROM slides"


def resolve_where(store: Store, predicate: str | None) -> Prefilter:
    """The LanceDB prefilter of a checked predicate on ``store`` (see the module doc)."""
    columns = check_where(predicate)
    if predicate is None:
        return Prefilter(None, None, "none", columns)
    if columns <= VECTOR_TABLE_COLUMNS:
        return Prefilter(predicate, predicate, "table", columns)
    if columns <= SLIDE_COLUMNS:
        q = f"SELECT slide_id FROM ({SLIDES_ONLY}) WHERE ({predicate})"
        slides = sorted(store.sql(q, file_access=False)["slide_id"].to_list())
        return Prefilter(predicate, f"slide_id IN ({sql_list(slides)})" if slides else "false", "slides", columns)
    keys = store.sql(f"SELECT slide_id, spot_id FROM ({JOINED}) WHERE ({predicate})", file_access=False)
    total = store.sql(
        "SELECT slide_id, count(*)::BIGINT AS n FROM spots GROUP BY slide_id", file_access=False
    ).rows_by_key("slide_id")
    parts, whole = [], []
    for (sid,), group in keys.group_by(["slide_id"], maintain_order=True):
        if group.height == total[sid][0][0]:
            whole.append(sid)
        else:
            parts.append(f"(slide_id = {sql_list([sid])} AND spot_id IN ({sql_list(group['spot_id'].to_list())}))")
    if whole:
        parts.insert(0, f"slide_id IN ({sql_list(sorted(whole))})")
    return Prefilter(predicate, " OR ".join(parts) if parts else "false", "keys", columns)
