"""Scale-out: stores on object storage (a moto S3 server on 127.0.0.1, started and stopped
here) and the embedding pass on Ray (a local Ray instance).

* ingest -> ray embed -> SQL -> compare / train / predict, all on an ``s3://`` store; the
  vectors equal the local pass's within float16 rounding;
* a Ray model worker SIGKILLed mid-pass: the pass completes with one row per key, and a
  re-run writes nothing;
* an unreachable endpoint, a missing bucket and refused credentials each give one clear
  error (exit code 2, one line) and leave nothing written.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("lance_ray")
pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

from typer.testing import CliRunner

from stimage_embed.cli import app

BUCKET = "stimage"
SLIDES = ["C4", "C5"]  # two HER2ST sections (~180 spots each): enough for a leave-one-slide-out compare
TEMPLATE = "C5"  # stain template, in both the s3 store and the local reference store
BACKBONE = "efficientnet_lite0"
TABLE = f"embeddings_{BACKBONE}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_server(auth_free_requests: str = "inf"):
    """A moto S3/IAM server on 127.0.0.1 (a subprocess); yields its endpoint URL.
    ``auth_free_requests``: requests served before moto starts checking credentials."""
    port = _free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=auth_free_requests)
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _s3_env(endpoint: str, key: str = "testing", secret: str = "testing") -> dict[str, str]:
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _objects(bucket: str, prefix: str = "") -> list[str]:
    resp = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for o in resp.get("Contents", [])]


@pytest.fixture(scope="module")
def s3(real_data_root):
    """A moto server with bucket ``stimage``, the AWS variables set for it, and a local Ray
    started with them (the engine reuses it; its workers inherit the variables)."""
    import ray

    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in _s3_env(endpoint).items():
            mp.setenv(k, v)
        mp.setenv("STIMAGE_DATA_ROOT", str(real_data_root))
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def s3_store(s3):
    """``s3://stimage/flow/store`` with C4 and C5 ingested through the CLI."""
    uri = f"s3://{BUCKET}/flow/store"
    res = CliRunner().invoke(app, ["ingest", "her2st", "--store", uri, *[a for s in SLIDES for a in ("--slide", s)]])
    assert res.exit_code == 0, res.output
    return uri


def _vectors(store, slide: str) -> dict[str, np.ndarray]:
    t = store.read(TABLE, ["spot_id", "vector"], where=f"slide_id = '{slide}'")
    vec = np.stack(t["vector"].to_numpy(zero_copy_only=False)).astype(np.float16)
    return dict(zip(t["spot_id"].to_pylist(), vec))


def test_s3_store_ray_embed_sql_compare(s3_store, tmp_path):
    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.ingest.pipeline import ingest
    from stimage_embed.store import Store

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "embed",
            "--engine",
            "ray",
            "--store",
            s3_store,
            "--backbone",
            BACKBONE,
            "--workers",
            "2",
            "--stain-template",
            TEMPLATE,
            "--precision",
            "float32",
        ],
    )
    assert res.exit_code == 0, res.output
    st = Store(s3_store)
    counts = st.sql(
        f"SELECT slide_id, COUNT(*) AS n, COUNT(DISTINCT spot_id) AS k FROM {TABLE} GROUP BY slide_id ORDER BY slide_id"
    )
    spots = st.sql("SELECT slide_id, COUNT(*) AS n FROM spots GROUP BY slide_id ORDER BY slide_id")
    assert counts["slide_id"].to_list() == SLIDES
    assert counts["n"].to_list() == counts["k"].to_list() == spots["n"].to_list()
    res = runner.invoke(app, ["info", "--store", s3_store])
    assert res.exit_code == 0 and TABLE in res.output, res.output
    res = runner.invoke(app, ["query", f"SELECT COUNT(*) AS n FROM {TABLE}", "--store", s3_store, "--format", "csv"])
    assert res.exit_code == 0 and res.output.split()[-1] == str(sum(spots["n"])), res.output
    # nothing of the store on the local disk: every table lives in the bucket
    keys = _objects(BUCKET, "flow/store/")
    assert any(k.startswith(f"flow/store/{TABLE}.lance/data/") for k in keys)
    assert not os.path.exists("s3:") and not os.path.exists(os.path.join(str(tmp_path), "s3:"))

    # the local pass on a local store of the same slide gives the same vectors (float16 rounding)
    local = Store(tmp_path / "local")
    ingest("her2st", local, slides=[TEMPLATE], progress=False)
    embed(local, [BACKBONE], stain_template=TEMPLATE, precision="float32", progress=False)
    ref, got = _vectors(local, TEMPLATE), _vectors(st, TEMPLATE)
    assert sorted(ref) == sorted(got) and len(ref) > 100
    a = np.stack([ref[k] for k in sorted(ref)]).astype(np.float32)
    b = np.stack([got[k] for k in sorted(ref)]).astype(np.float32)
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(a - b) <= ulp), f"max diff {np.abs(a - b).max()} beyond one float16 step"

    # compare, train and predict read the same s3 store; model folders go to --models-dir
    res = runner.invoke(
        app, ["compare", "--store", s3_store, "--backbones", BACKBONE, "--heads", "ridge", "--genes", "var:20"]
    )
    assert res.exit_code == 0, res.output
    lb = st.sql("SELECT folds, genes, pcc_mean FROM leaderboard WHERE head = 'ridge' AND control = 'none'")
    assert lb.height == 1 and lb["folds"][0] == 2 and lb["genes"][0] >= 20, lb  # var:20 per fold
    res = runner.invoke(
        app,
        ["train", "--store", s3_store, "--backbone", BACKBONE, "--head", "ridge", "--genes", "var:20", "--train", "C4"],
    )
    assert res.exit_code == 2 and "--models-dir" in res.output  # no silent local default for a remote store
    models = tmp_path / "models"
    res = runner.invoke(
        app,
        [
            "train",
            "--store",
            s3_store,
            "--backbone",
            BACKBONE,
            "--head",
            "ridge",
            "--genes",
            "var:20",
            "--train",
            "C4",
            "--models-dir",
            str(models),
        ],
    )
    assert res.exit_code == 0, res.output
    run_id = res.output.split()[1]
    assert (models / run_id / "run.json").is_file()
    res = runner.invoke(
        app, ["predict", "--store", s3_store, "--model", run_id, "--slide", "C5", "--models-dir", str(models)]
    )
    assert res.exit_code == 0, res.output
    pred = st.sql(
        "SELECT COUNT(DISTINCT spot_id) AS spots, COUNT(DISTINCT gene) AS genes FROM predictions "
        f"WHERE run_id = '{run_id}'"
    )
    assert pred["spots"][0] == spots.filter(spots["slide_id"] == "C5")["n"][0] and pred["genes"][0] == 20


def test_killed_ray_worker_one_row_per_key(s3_store, tmp_path):
    from stimage_embed.embeddings.ray_engine import RayConfig, embed_ray
    from stimage_embed.embeddings.ray_stages import KILL_ONCE_ENV
    from stimage_embed.store import Store

    st = Store(s3_store)
    marker = tmp_path / "killed"
    cfg = RayConfig(workers=2, extra_env={KILL_ONCE_ENV: f"{marker}@2"})  # a worker dies at its 2nd batch
    rep = embed_ray(
        st,
        [BACKBONE],
        slides=["C5"],
        overwrite=True,
        stain_template=TEMPLATE,
        precision="float32",
        flush_rows=64,
        progress=False,
        config=cfg,
    )
    assert marker.exists(), "no Ray worker was killed"
    n_spots = st.sql("SELECT COUNT(*) AS n FROM spots WHERE slide_id = 'C5'")["n"][0]
    assert rep.vectors[BACKBONE] == n_spots
    keys = st.sql(f"SELECT spot_id, COUNT(*) AS n FROM {TABLE} WHERE slide_id = 'C5' GROUP BY ALL")
    assert keys.height == n_spots and keys["n"].max() == 1
    rep = embed_ray(
        st,
        [BACKBONE],
        slides=["C5"],
        stain_template=TEMPLATE,
        precision="float32",
        progress=False,
        config=RayConfig(workers=1),
    )  # a re-run: nothing left to embed
    assert rep.vectors == {}
    assert st.sql(f"SELECT COUNT(*) AS n FROM {TABLE} WHERE slide_id = 'C5'")["n"][0] == n_spots


def _cli_error(args: list[str], env: dict[str, str]) -> str:
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.output
    return lines[0]


def test_bad_object_store_clear_errors(s3, tmp_path):
    ingest = ["ingest", "her2st", "--slide", "C5", "--store"]
    # unreachable endpoint: nothing listens on a fresh port
    dead = _s3_env(f"http://127.0.0.1:{_free_port()}")
    msg = _cli_error(ingest + [f"s3://{BUCKET}/dead/store"], dead)
    assert "cannot reach the object store" in msg and "127.0.0.1" in msg
    msg = _cli_error(["embed", "--engine", "ray", "--store", f"s3://{BUCKET}/dead/store"], dead)
    assert "cannot reach the object store" in msg
    # a bucket that does not exist: not created, nothing written
    msg = _cli_error(ingest + ["s3://no-such-bucket/store"], _s3_env(s3))
    assert "bucket 'no-such-bucket' does not exist" in msg
    assert "no-such-bucket" not in [b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]]
    # refused credentials: a moto server that checks them (after the 3 set-up requests below)
    with moto_server(auth_free_requests="3") as endpoint:
        admin = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        admin.create_user(UserName="u")
        key = admin.create_access_key(UserName="u")["AccessKey"]
        admin.put_user_policy(
            UserName="u",
            PolicyName="all",
            PolicyDocument=(
                '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}'
            ),
        )
        good = _s3_env(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=good["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=good["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket="locked")
        msg = _cli_error(ingest + ["s3://locked/store"], _s3_env(endpoint, "AKIAWRONGWRONGWRONG1", "wrong"))
        assert "refused the credentials" in msg
        assert client.list_objects_v2(Bucket="locked").get("KeyCount", 0) == 0


def test_store_uri_parsing(monkeypatch, tmp_path):
    """URIs vs paths, joins, Lance options from the AWS variables, the models folder rule."""
    from stimage_embed.errors import InputError, StoreError
    from stimage_embed.store import Store
    from stimage_embed.store.uri import ObjectPath, is_remote, storage_options

    assert is_remote("s3://b/p") and is_remote("gs://b/p") and not is_remote(tmp_path) and not is_remote("s3:/b/p")
    st = Store("s3://bucket/some/prefix/")
    assert st.remote and st.uri == "s3://bucket/some/prefix" and isinstance(st.path, ObjectPath)
    assert str(st.path / "embeddings_x.lance") == "s3://bucket/some/prefix/embeddings_x.lance"
    assert (st.location.bucket, st.location.prefix) == ("bucket", "some/prefix")
    monkeypatch.delenv("STIMAGE_MODELS_DIR", raising=False)
    with pytest.raises(InputError, match="--models-dir"):
        _ = st.models_dir
    assert Store("s3://bucket/p", models_dir=tmp_path / "m").models_dir == tmp_path / "m"
    local = Store(tmp_path / "store")
    assert not local.remote and local.models_dir == tmp_path / "store" / "models" and local.storage_options is None
    with pytest.raises(StoreError, match="no bucket"):
        Store("s3:///prefix")
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_ALLOW_HTTP", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage_options() == {
        "aws_endpoint": "http://127.0.0.1:9000",
        "allow_http": "true",
        "aws_region": "eu-west-1",
    }
