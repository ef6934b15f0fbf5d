"""One plan, two engines (issue 19 item 1): the local pass and the Ray pass get the same
:class:`~stimage_embed.embeddings.pass_plan.Plan` for the same request, and the store's one
keyed write (``Store.write_keyed``) skips keys already stored on a local and an ``s3://``
store (a moto S3 server), also keys another writer stored meanwhile.

Data: two tiny slides cut from HER2ST C5 (S1) and C4 (S2), 12 real spots each
(tests/store_cases.py ``mini_dataset``); the rows written by key are synthetic.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
from store_cases import BACKBONE, CHUNK, TABLE, copy_store, mini_dataset

from stimage_embed.embeddings import embed_pass, ray_engine
from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.embeddings.pass_plan import plan_pass
from stimage_embed.ingest.pipeline import ingest
from stimage_embed.store import Store
from stimage_embed.store import schema as S

FAST = dict(stain="none", precision="float32", batch_size=CHUNK, progress=False)
KEY = ("slide_id", "spot_id")
DIM = 4


@pytest.fixture(scope="module")
def mini(tmp_path_factory, real_data_root):
    """A store with S1, S2 ingested and embedded (no stain normalisation)."""
    root = tmp_path_factory.mktemp("plan19")
    store = Store(root / "store")
    ingest(str(mini_dataset(root / "data", real_data_root)), store, progress=False)
    embed(store, [BACKBONE], num_workers=0, **FAST)
    return store


class _Planned(Exception):
    """Stops an engine right after it planned (the plan is what is compared)."""


def _plan_of(engine, module, store: Store, monkeypatch, **kwargs):
    """The plan ``engine`` (``embed`` or ``embed_ray``) makes on ``store`` for ``kwargs``."""
    seen = []

    def spy(st, request):
        seen.append(plan_pass(st, request))
        raise _Planned

    monkeypatch.setattr(module, "plan_pass", spy)
    with pytest.raises(_Planned):
        engine(store, [BACKBONE], **kwargs)
    return seen[0]


@pytest.mark.parametrize("overwrite", [False, True])
def test_local_and_ray_engines_get_the_same_plan(tmp_path, mini, monkeypatch, overwrite):
    local_store, ray_store = copy_store(mini, tmp_path / "local"), copy_store(mini, tmp_path / "ray")
    for st in (local_store, ray_store):  # S2's vectors go, so that there is something to plan
        st.delete(TABLE, "slide_id = 'S2'")
    args = dict(slides=["S1", "S2"], overwrite=overwrite, **FAST)
    local = _plan_of(embed_pass.embed, embed_pass, local_store, monkeypatch, **args)
    ray = _plan_of(ray_engine.embed_ray, ray_engine, ray_store, monkeypatch, **args)

    assert dataclasses.replace(local.request, device="cpu") == ray.request  # Ray places the models: cpu here
    assert str(local.device) == str(ray.device) == "cpu"
    for field in ("tables", "provenance", "pids", "precision", "done", "replace", "tissue", "slide_meta"):
        assert getattr(local, field) == getattr(ray, field), field
    assert [(c.slide_id, c.index, list(c.spot_ids)) for c in local.chunks] == [
        (c.slide_id, c.index, list(c.spot_ids)) for c in ray.chunks
    ]

    # ... and that plan is the store's: keys, tissue map and geometry hashes as SQL reads them
    spots = local_store.sql("SELECT slide_id, spot_id, tissue_fraction FROM spots ORDER BY ALL")
    assert local.tissue == {(a, b): c for a, b, c in spots.iter_rows()}
    ghash = dict(local_store.sql("SELECT slide_id, geometry_hash FROM slides").iter_rows())
    assert {s: m["geometry_hash"] for s, m in local.slide_meta.items()} == ghash
    stored = set(local_store.sql(f"SELECT slide_id, spot_id FROM {TABLE}").iter_rows())
    assert local.done == {BACKBONE: set() if overwrite else stored}
    assert len(stored) == 12 and {s for s, _ in stored} == {"S1"}
    assert local.replace == ({TABLE: "slide_id IN ('S1', 'S2')"} if overwrite else {})
    missing = {(c.slide_id, s) for c in local.chunks for s in c.spot_ids}
    assert missing == {(a, b) for a, b, _ in spots.iter_rows()} - local.done[BACKBONE]
    assert local.provenance[BACKBONE]["backbone"] == BACKBONE and local.pids[BACKBONE]
    pid_rows = local_store.sql(f"SELECT provenance_id FROM provenance WHERE table_name = '{TABLE}'")
    assert local.pids[BACKBONE] in pid_rows["provenance_id"].to_list()


def _rows(slide: str, spots: list[str], value: float) -> pa.Table:
    n = len(spots)
    vec = np.full((n, DIM), value, np.float16)
    return pa.table(
        {
            "slide_id": [slide] * n,
            "spot_id": spots,
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel(), pa.float16()), DIM),
            "tissue_fraction": pa.array(np.ones(n), pa.float32()),
            "padded_fraction": pa.array(np.zeros(n), pa.float32()),
            "tile_um": pa.array(np.full(n, 100.0), pa.float32()),
            "um_per_px": pa.array(np.full(n, 0.5), pa.float32()),
            "provenance_id": ["p"] * n,
        }
    )


def _stored(store: Store) -> dict[tuple[str, str], float]:
    t = store.read("embeddings_k", ["slide_id", "spot_id", "vector"])
    vec = t["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(t.num_rows, DIM)
    keys = list(zip(t["slide_id"].to_pylist(), t["spot_id"].to_pylist()))
    assert len(keys) == len(set(keys)), "a key stored twice"
    return {k: float(v[0]) for k, v in zip(keys, vec)}


def _keyed_writes(uri) -> None:
    """Keyed writes on the store at ``uri``: stored keys are skipped (also those another
    Store object, a second writer, stored meanwhile); ``replacing`` replaces its scope."""
    schema = S.embedding_schema(DIM)
    store, other = Store(uri), Store(uri)
    assert store.write_keyed("embeddings_k", _rows("A", ["a", "b", "c"], 1.0), KEY, schema=schema) == 3
    assert store.write_keyed("embeddings_k", _rows("A", ["b", "c", "d"], 2.0), KEY, schema=schema) == 1
    assert other.write_keyed("embeddings_k", _rows("A", ["e"], 3.0), KEY, schema=schema) == 1
    assert store.write_keyed("embeddings_k", _rows("A", ["e", "f"], 4.0), KEY, schema=schema) == 1
    store.delete("embeddings_k", "spot_id = 'a'")  # a key deleted may be written again
    assert store.write_keyed("embeddings_k", _rows("A", ["a", "b"], 5.0), KEY, schema=schema) == 1
    want = {("A", "a"): 5.0, ("A", "b"): 1.0, ("A", "c"): 1.0, ("A", "d"): 2.0, ("A", "e"): 3.0, ("A", "f"): 4.0}
    assert _stored(store) == want
    store.write_keyed("embeddings_k", _rows("A", ["b", "g"], 6.0), KEY, schema=schema, replacing="spot_id < 'c'")
    want = {k: v for k, v in {**want, ("A", "b"): 6.0, ("A", "g"): 6.0}.items() if k != ("A", "a")}
    assert _stored(other) == want


def test_keyed_write_skips_stored_keys_on_a_local_store(tmp_path):
    _keyed_writes(tmp_path / "s")


def test_keyed_write_skips_stored_keys_on_s3():
    pytest.importorskip("moto")
    boto3 = pytest.importorskip("boto3")
    from test_scaleout_ray_s3 import _s3_env, moto_server

    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in _s3_env(endpoint).items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket="keyed19")
        _keyed_writes("s3://keyed19/store")
