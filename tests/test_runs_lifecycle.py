"""One run lifecycle (``predictions.runs``): run keys hash as the stored ids always did, the
``runs`` row records the vector source, and a store written before ``runs.vector_source``
is migrated on open (idempotently); its evaluation views still answer ``store.sql``."""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from stimage_embed import __version__
from stimage_embed.predictions.runs import combined_identity, run_hash, run_identity, run_key, runs_row
from stimage_embed.store import Store
from stimage_embed.store import schema as S
from stimage_embed.store import sql as store_sql

ROOT = Path(__file__).resolve().parents[1]
#: every SQL view name a query could use before the views moved to ``evaluation``
VIEW_NAMES = (
    "expression_long",
    "runs_status",
    "leaderboard",
    "leaderboard_slide",
    "model_scores",
    "gene_scores",
    "top_genes",
    "coverage",
    "gene_wins",
    "uncertainty_error",
)
#: ``runs.backbone`` as older stores hold it -> (backbone, vector_source) after migration
OLD_BACKBONES = {
    "efficientnet_lite0": ("efficientnet_lite0", "efficientnet_lite0"),
    "efficientnet_lite0__ctx300um": ("efficientnet_lite0", "efficientnet_lite0__ctx300um"),
    "efficientnet_lite0+efficientnet_lite0__ctx62p5um": (
        "efficientnet_lite0",
        "efficientnet_lite0+efficientnet_lite0__ctx62p5um",
    ),
    "a_b+c": ("a_b+c", "a_b+c"),
    "fstimage": ("fstimage", None),
}


def _sha(obj: dict) -> str:
    """The run-id hash, written out independently of ``runs.run_hash``."""
    body = {**obj, "package_version": __version__}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:20]


def test_run_keys_hash_to_the_ids_stores_hold():
    base = {"dataset": "her2st", "split": "loso", "fold": "loso:C5", "train": ["C4"], "test": ["C5"], "control": "none"}
    key = run_key(base, backbone="bb", provenance="p1", head="nb", params={"a": 1}, effective_params={"a": 1})
    hand = {
        **base,
        "backbone": "bb",
        "provenance": "p1",
        "head": "nb",
        "params": {"a": 1},
        "effective_params": {"a": 1},
    }
    assert key == hand
    versions = {"C4": {"expression": "e4"}, "C5": {"expression": "e5"}, "B1": {"expression": "x"}}
    rid, cid = run_identity(key, versions, ["C5", "C4"])
    assert cid == _sha(hand) == run_hash(hand)
    assert rid == _sha({**hand, "inputs": {"C4": {"expression": "e4"}, "C5": {"expression": "e5"}}})
    members, configs = {"a": "r1", "b": "r2"}, {"a": "c1", "b": "c2"}
    rid, cid = combined_identity(base, "fstimage", members, configs, "error")
    assert rid == _sha({**base, "head": "fstimage", "members": members, "missing": "error"})
    assert cid == _sha({**base, "head": "fstimage", "members": configs})
    assert len({rid, cid}) == 2 and all(len(x) == 20 for x in (rid, cid))


@pytest.mark.parametrize(("given", "head"), [(b, "fstimage" if b == "fstimage" else "nb") for b in OLD_BACKBONES])
def test_runs_row_records_the_vector_source_and_the_real_backbones(given, head):
    row = runs_row(
        **dict.fromkeys(("run_id", "dataset", "split", "fold", "gene_spec"), "x"),
        backbone=given,
        members=[given],
        head=head,
        train_slides=["C4"],
        test_slides=["C5"],
        genes=["G"],
        params=None,
        provenance_ids=["p"],
        n_train_spots=1,
        fit_seconds=0.0,
    )
    assert (row["backbone"], row["vector_source"]) == OLD_BACKBONES[given]
    assert set(row) == set(S.RUNS.names)


def _old_store(path: Path) -> Store:
    """A store whose ``runs`` table was written with the schema before ``vector_source``."""
    old_schema = pa.schema([f for f in S.RUNS if f.name != "vector_source"])
    store = Store(path)
    rows = [
        {"run_id": f"r{i}", "backbone": b, "head": "fstimage" if b == "fstimage" else "nb", "control": "none"}
        for i, b in enumerate(OLD_BACKBONES)
    ]
    rows[0] |= {"created_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)}
    store.append("runs", pa.Table.from_pylist(rows, schema=old_schema), schema=old_schema)
    return store


def _migrated(store: Store) -> dict[str, tuple[str, str | None]]:
    df = store.sql("SELECT run_id, backbone, vector_source FROM runs ORDER BY run_id")
    return {r: (b, v) for r, b, v in df.iter_rows()}


def test_an_old_store_reads_migrated_and_is_migrated_once_on_open(tmp_path):
    store = _old_store(tmp_path / "s")
    version = store.dataset("runs").version
    expected = {f"r{i}": OLD_BACKBONES[b] for i, b in enumerate(OLD_BACKBONES)}
    # a read-only session sees the migrated rows without writing anything
    assert _migrated(store) == expected and store.dataset("runs").version == version
    assert "vector_source" not in store.dataset("runs").schema.names
    with store.writer("test"):  # opening for writing migrates on disk
        pass
    assert "vector_source" in store.dataset("runs").schema.names
    assert _migrated(store) == expected
    migrated_version = store.dataset("runs").version
    with Store(store.path).writer("test"):  # idempotent: nothing left to migrate, no commit
        pass
    assert store.dataset("runs").version == migrated_version
    # old queries keep working on the migrated table
    status = store.sql("SELECT run_id, superseded FROM runs_status ORDER BY run_id")
    assert status.height == len(OLD_BACKBONES) and not any(status["superseded"])


def test_an_interrupted_migration_finishes_on_the_next_open(tmp_path):
    store = _old_store(tmp_path / "s")
    store.db.open_table("runs").add_columns([S.RUNS.field("vector_source")])  # killed after adding the column
    with store.writer("test"):
        pass
    assert _migrated(store) == {f"r{i}": OLD_BACKBONES[b] for i, b in enumerate(OLD_BACKBONES)}


def test_every_view_name_answers_and_the_store_never_imports_evaluation_at_module_level(tmp_path):
    store = _old_store(tmp_path / "s")
    empty = {"metrics": S.METRICS, "predictions": S.PREDICTIONS, "genes": S.GENES, "expression": S.EXPRESSION}
    for name, schema in empty.items():
        store.append(name, schema.empty_table(), schema=schema)
    for view in VIEW_NAMES:
        assert store.sql(f"SELECT * FROM {view}").height == (len(OLD_BACKBONES) if view == "runs_status" else 0)
    assert set(VIEW_NAMES) <= set(store_sql.available_views(set(store.table_names())))
    for path in (ROOT / "stimage_embed" / "store").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
        mods += [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        assert not [m for m in mods if m.startswith(("stimage_embed.evaluation", "stimage_embed.predictions"))], path
    # a table query stays light: the evaluation views' module is imported only when named
    code = (
        "import sys; from stimage_embed.store import Store; s = Store(sys.argv[1]); s.sql('SELECT * FROM runs');"
        "a = 'stimage_embed.evaluation' in sys.modules; s.sql('SELECT * FROM leaderboard');"
        "print(a, 'stimage_embed.evaluation.views' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(store.path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
