"""The embedding pass on real slides: one row per spot, provenance, SQL joins, refusal of
mismatched provenance, and resume after SIGKILL to vectors equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import EMBED_SLIDES, EXPECTED_SPOTS

from stimage_embed.embeddings.embed_pass import embed
from stimage_embed.errors import ProvenanceError
from stimage_embed.predictions.arrays import load_embeddings
from stimage_embed.store import Store


def test_one_row_per_spot_with_finite_1280d_vectors(embedded_store):
    df = embedded_store.sql(
        "SELECT slide_id, COUNT(*) AS n, COUNT(DISTINCT spot_id) AS u "
        "FROM embeddings_efficientnet_lite0 GROUP BY 1 ORDER BY 1"
    )
    assert dict(zip(df["slide_id"], df["n"])) == {s: EXPECTED_SPOTS[s] for s in EMBED_SLIDES}
    assert (df["n"] == df["u"]).all()
    keys, X = load_embeddings(embedded_store, "efficientnet_lite0", EMBED_SLIDES)
    assert X.shape == (sum(EXPECTED_SPOTS[s] for s in EMBED_SLIDES), 1280)
    assert np.isfinite(X).all() and X.std(0).mean() > 0.01  # real features, not constants
    assert np.unique(X, axis=0).shape[0] == X.shape[0]  # every spot has its own vector
    # the vectors tell the tissues apart: most spots sit nearer their own slide's centroid
    slide = keys["slide_id"].to_numpy()
    two = np.isin(slide, ["C5", "MOB1"])
    centroids = np.stack([X[slide == s].mean(0) for s in ("C5", "MOB1")])
    nearest = np.linalg.norm(X[two][:, None] - centroids[None], axis=2).argmin(1)
    assert np.mean(nearest == (slide[two] == "MOB1")) > 0.8


def test_provenance_is_stored_and_readable(embedded_store):
    prov = embedded_store.sql("SELECT * FROM provenance WHERE table_name = 'embeddings_efficientnet_lite0'")
    assert prov.height == 1
    rec = json.loads(prov["json"][0])
    assert rec["backbone"] == "efficientnet_lite0" and rec["embed_dim"] == 1280
    assert len(rec["weights_sha256"]) == 64 and rec["stain_method"] == "macenko"
    assert rec["transform"]["input_size"] == 224 and rec["tile_um"] == "spot_diameter"
    ids = embedded_store.sql("SELECT DISTINCT provenance_id, tile_um FROM embeddings_efficientnet_lite0")
    assert ids["provenance_id"].to_list() == [prov["provenance_id"][0]] and ids["tile_um"].to_list() == [100.0]
    # every vector carries the µm/px of its source image, equal to the slide's
    um = embedded_store.sql(
        """SELECT e.slide_id, max(abs(e.um_per_px - s.um_per_px)) AS d, any_value(s.um_per_px) AS umpp
           FROM embeddings_efficientnet_lite0 e JOIN slides s USING (slide_id) GROUP BY 1 ORDER BY 1"""
    )
    assert (um["d"] < 1e-5).all()
    assert 0.6 < um["umpp"][0] < 0.8 and 4 < um["umpp"][2] < 5


def test_duckdb_joins_vectors_to_spots_and_expression(embedded_store):
    df = embedded_store.sql(
        """SELECT e.slide_id, COUNT(*) AS n, SUM(l.count)::BIGINT AS erbb2
           FROM embeddings_efficientnet_lite0 e
           JOIN spots s USING (slide_id, spot_id)
           JOIN expression_long l ON l.slide_id = e.slide_id AND l.spot_id = e.spot_id AND l.gene = 'ERBB2'
           WHERE s.passes_qc
           GROUP BY 1"""
    )
    assert sorted(df["slide_id"].to_list()) == ["C4", "C5"] and (df["erbb2"] > 1000).all()


def test_appending_with_a_different_provenance_is_refused(tmp_path, embedded_store):
    store = Store(tmp_path / "s")
    shutil.copytree(embedded_store.path, store.path)
    before = store.table("embeddings_efficientnet_lite0").version
    with pytest.raises(ProvenanceError, match="stain_method: table has 'macenko', this run has 'reinhard'"):
        embed(
            store,
            ["efficientnet_lite0"],
            slides=["C3"],
            stain="reinhard",
            precision="float32",
            num_workers=0,
            progress=False,
        )
    assert store.table("embeddings_efficientnet_lite0").version == before
    assert store.sql("SELECT COUNT(*) AS n FROM embeddings_efficientnet_lite0 WHERE slide_id = 'C3'")["n"][0] == 0


def _cli(store, *extra):
    return [
        sys.executable,
        "-m",
        "stimage_embed.cli",
        "embed",
        "--store",
        str(store),
        "--slide",
        "C5",
        "--precision",
        "float32",
        "--batch-size",
        "32",
        "--flush-rows",
        "32",
        "--workers",
        "0",
        *extra,
    ]


def _vectors(store, slide="C5"):
    t = store.read(
        "embeddings_efficientnet_lite0", ["slide_id", "spot_id", "vector"], where=f"slide_id = '{slide}'"
    ).to_pandas()
    t = t.sort_values(["slide_id", "spot_id"])
    return t.spot_id.tolist(), np.stack(t.vector.to_numpy())


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, ingested_store, embedded_store):
    """The uninterrupted reference is the session's embedded store (same chunking: 32)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ref_ids, ref_vec = _vectors(embedded_store, "C5")
    assert len(ref_ids) == 181

    killed = Store(tmp_path / "killed")
    shutil.copytree(ingested_store.path, killed.path)
    table_dir = killed.path / "embeddings_efficientnet_lite0.lance"
    # kill 1: as soon as the first append has committed (mid-run)
    proc = subprocess.Popen(_cli(killed.path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        versions = list((table_dir / "_versions").glob("*.manifest")) if table_dir.exists() else []
        if len(versions) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = killed.sql("SELECT COUNT(*) AS n FROM embeddings_efficientnet_lite0")["n"][0]
    assert 0 < partial < 181
    # kill 2: right after start of the resumed run (during start-up or the first batch)
    proc = subprocess.Popen(_cli(killed.path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # the re-run completes the table
    subprocess.run(_cli(killed.path), check=True, env=env, capture_output=True)
    ids, vec = _vectors(killed)
    assert ids == ref_ids, "not exactly one row per key"
    assert np.array_equal(vec, ref_vec), "resumed vectors differ from the uninterrupted run"


@pytest.mark.parametrize("n_workers", [1, 2, 3])
def test_chunks_are_dealt_to_workers_exactly_once(n_workers):
    from stimage_embed.embeddings.tile_stream import assign_chunks, make_chunks

    chunks = []
    for slide, n in [("a", 100), ("b", 50), ("c", 70), ("d", 10), ("e", 33), ("f", 64)]:
        chunks += make_chunks(slide, np.array([f"s{i}" for i in range(n)]), np.zeros(n), np.zeros(n), 32)
    dealt = [assign_chunks(chunks, w, n_workers) for w in range(n_workers)]
    flat = [(c.slide_id, c.index) for d in dealt for c in d]
    assert sorted(flat) == sorted((c.slide_id, c.index) for c in chunks)
    # 6 slides >= 2 per worker: every slide is handled by a single worker
    owners = {}
    for w, d in enumerate(dealt):
        for c in d:
            owners.setdefault(c.slide_id, set()).add(w)
    assert all(len(v) == 1 for v in owners.values())
    # one big slide: chunks round-robin across workers
    one = make_chunks("z", np.array([f"s{i}" for i in range(200)]), np.zeros(200), np.zeros(200), 32)
    got = [len(assign_chunks(one, w, n_workers)) for w in range(n_workers)]
    assert sum(got) == len(one) and max(got) - min(got) <= 1
