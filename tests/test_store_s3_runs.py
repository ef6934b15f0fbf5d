"""Runs on an ``s3://`` store (issue 18 item 7), on a moto S3 server: there is no
cross-process lock, so a second ``compare`` must never take a live writer's pending runs for
a crash, and a committed run without rows is recomputed, never reused.

Data: two tiny slides cut from HER2ST C5 (S1) and C4 (S2), 12 real spots each.
"""

from __future__ import annotations

import threading

import polars as pl
import pytest
from store_cases import BACKBONE, CHUNK, cli, mini_dataset

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from test_scaleout_ray_s3 import _s3_env, moto_server  # noqa: E402 - after the skips

from stimage_embed.embeddings.embed_pass import embed  # noqa: E402
from stimage_embed.evaluation.compare import CompareConfig, compare  # noqa: E402
from stimage_embed.ingest.pipeline import ingest  # noqa: E402
from stimage_embed.store import Store  # noqa: E402

BUCKET = "runs18"
FAST = dict(stain="none", precision="float32", batch_size=CHUNK, num_workers=0, progress=False)
CFG = CompareConfig(backbones=[BACKBONE], heads=["mean"], genes="hvg:5")


@pytest.fixture(scope="module")
def s3_mini(tmp_path_factory, real_data_root):
    """``s3://runs18/store`` holding S1, S2 ingested and embedded (no stain normalisation)."""
    root = tmp_path_factory.mktemp("s3mini")
    catalog = mini_dataset(root / "data", real_data_root)
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in _s3_env(endpoint).items():
            mp.setenv(k, v)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        uri = f"s3://{BUCKET}/store"
        store = Store(uri)
        ingest(str(catalog), store, progress=False)
        embed(store, [BACKBONE], **FAST)
        yield uri


def _prediction_counts(store: Store) -> dict[str, int]:
    runs = store.sql("SELECT run_id FROM runs")["run_id"].to_list()
    got = store.sql("SELECT run_id, COUNT(*) AS n FROM predictions GROUP BY 1")
    have = dict(zip(got["run_id"], got["n"]))
    return {r: have.get(r, 0) for r in runs}


def test_a_second_compare_on_s3_leaves_a_live_writers_pending_runs(s3_mini):
    """Before: compare B (no lock on s3://) took A's pending marks for a crash and deleted A's
    predictions; A then committed runs with none, and a later compare reported "0 computed,
    2 reused" over them."""
    first = Store(s3_mini)
    paused, resume = threading.Event(), threading.Event()
    append = first.append

    def slow_append(name, data, schema=None):
        if name == "runs" and not paused.is_set():  # a delayed commit: predictions written, runs row not yet
            paused.set()
            resume.wait(300)
        return append(name, data, schema)

    first.append = slow_append
    errors: list[str] = []

    def run_first():
        try:
            compare(first, CFG, progress=False)
        except Exception as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(repr(exc))

    thread = threading.Thread(target=run_first)
    thread.start()
    try:
        assert paused.wait(600), errors
        assert len(Store(s3_mini).pending("compare")) == 1  # the first fold's run
        # another process (a live owner's marks, lease not expired) compares other genes meanwhile
        other = cli("compare", "--store", s3_mini, "--backbones", BACKBONE, "--heads", "mean", "--genes", "hvg:4")
        assert other.returncode == 0
    finally:
        resume.set()
        thread.join()
    assert not errors, errors
    st = Store(s3_mini)
    counts = _prediction_counts(st)
    assert len(counts) == 4 and min(counts.values()) > 0, counts
    assert st.pending("compare") == []
    again = compare(st, CFG, progress=False)
    assert (again.computed, again.reused) == (0, 2)


def test_a_committed_run_without_rows_is_recomputed_not_reused(s3_mini):
    st = Store(s3_mini)
    res = compare(st, CFG, progress=False)
    lost = res.run_ids[0]
    st.delete("predictions", f"run_id = '{lost}'")  # what the old clean-up left: a runs row, no rows
    again = compare(st, CFG, progress=False)
    assert (again.computed, again.reused) == (1, 1)
    counts = _prediction_counts(st)
    assert counts[lost] > 0 and st.sql(f"SELECT COUNT(*) AS n FROM runs WHERE run_id = '{lost}'")["n"][0] == 1
    assert pl.DataFrame(again.leaderboard).height > 0


def test_on_s3_only_marks_of_an_expired_lease_or_a_dead_owner_are_cleaned(s3_mini):
    """A pending run whose owner is live keeps its rows; one whose lease expired, or whose
    owner was a process of this host that has exited, is removed by the next compare."""
    import json
    import socket
    import subprocess
    import sys
    import time

    from stimage_embed.predictions.runs import PENDING, drop_abandoned
    from stimage_embed.store import intents

    st = Store(s3_mini)
    compare(st, CFG, progress=False)
    rows = pl.from_arrow(st.read("predictions")).head(5)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    now = time.time()
    owners = {
        "live_elsewhere": {"owner": "another-host:1", "lease_until": now + 600},
        "expired": {"owner": "another-host:1", "lease_until": now - 1},
        "owner_exited": {"owner": f"{socket.gethostname()}:{gone.stdout.strip()}", "lease_until": now + 600},
    }
    for rid, body in owners.items():
        st.append("predictions", rows.with_columns(pl.lit(rid).alias("run_id")).to_arrow())
        st.location.write_bytes(f".pending/{PENDING}/{rid}", json.dumps(body).encode())
    assert [intents.abandoned(st, owners[r]) for r in owners] == [False, True, True]
    drop_abandoned(Store(s3_mini))
    left = set(st.sql("SELECT DISTINCT run_id FROM predictions")["run_id"])
    assert "live_elsewhere" in left and not {"expired", "owner_exited"} & left
    assert st.pending(PENDING) == ["live_elsewhere"]
    intents.clear(st, PENDING, "live_elsewhere")
    st.delete("predictions", "run_id = 'live_elsewhere'")
