"""The viewer on a store with a ``label`` run (issue 24's head) beside an ``nb`` run, on REAL
HER2ST sections: the runs picker lists both with their kind, a label run's "genes" are its
classes, its values are the stored ``label_predictions`` (read another way: pyarrow + numpy
argmax), the predicted / observed class layers share one categorical palette (matplotlib's
tab10 colours by name), an overlay tile paints a spot in its class colour, and unknown ids
get one-line 404s (never a 500)."""

from __future__ import annotations

import shutil
from io import BytesIO

import numpy as np
import polars as pl
import pytest
from matplotlib.colors import to_rgb
from PIL import Image
from store_cases import copy_store
from test_heads_label import _grey_terciles
from test_viewer_api import SHOWN, TRAIN, build_viewer_store
from typer.testing import CliRunner

CLASSES = ["dark", "mid", "pale"]  # the run's classes, sorted as the head stores them
TAB10 = {name: np.array(to_rgb(f"tab:{c}")) * 255 for name, c in zip(CLASSES, ("blue", "orange", "green"))}


def build_label_store(tmp_path_factory, embedded_store):
    """A copy of the viewer store (nb run on C4 -> C5) with the grey-tercile label set ``tone``
    of C4 and C5 and a ``label`` run trained on C4 that predicted C5; built once per session (a
    marker file in the session's temp root). Returns (Store, nb run, label run, C5's tones by spot)."""
    import pandas as pd

    from stimage_embed.cli import app
    from stimage_embed.store import Store

    root = tmp_path_factory.getbasetemp() / "viewer_label_store"
    marker = root / "runs.txt"
    if not marker.exists():
        src, nb_run = build_viewer_store(tmp_path_factory, embedded_store)
        if root.exists():
            shutil.rmtree(root)
        store = copy_store(src, root / "store")
        _grey_terciles(store, (TRAIN, SHOWN)).to_csv(root / "tone.csv", index=False)
        runner = CliRunner()

        def cli(*args) -> str:
            res = runner.invoke(app, [str(a) for a in args] + ["--store", str(store.path)])
            assert res.exit_code == 0, res.output
            return res.output

        cli("labels", "add", root / "tone.csv", "--key", "slide,spot", "--column", "tone")
        label_run = cli("train", "--head", "label", "--labels", "tone", "--train", TRAIN).split()[1]
        cli("predict", "--model", label_run, "--slide", SHOWN, "--out", root / "pred")
        marker.write_text(f"{nb_run} {label_run}")
    nb_run, label_run = marker.read_text().split()
    tones = pd.read_csv(root / "tone.csv", dtype=str)
    shown = tones[tones["slide"] == SHOWN]
    return Store(root / "store"), nb_run, label_run, dict(zip(shown["spot"], shown["tone"]))


@pytest.fixture(scope="module")
def label_store(tmp_path_factory, embedded_store):
    return build_label_store(tmp_path_factory, embedded_store)


@pytest.fixture(scope="module")
def client(label_store):
    from fastapi.testclient import TestClient

    from stimage_embed.viewer.app import create_app

    with TestClient(create_app(label_store[0])) as c:
        yield c


def test_label_run_values_and_layers(client, label_store):
    store, nb_run, label_run, truth = label_store
    runs = {r["run_id"]: r for r in client.get("/api/runs").json()}
    assert set(runs) == {nb_run, label_run}
    assert runs[label_run]["kind"] == "label" and runs[label_run]["head"] == "label"
    assert runs[label_run]["slides"] == [SHOWN] and runs[nb_run]["kind"] == "expression"
    assert client.get(f"/api/runs/{label_run}/genes").json()["genes"] == CLASSES

    # the stored probabilities, read with pyarrow, pivoted wide; the predicted class by numpy argmax
    rows = pl.from_arrow(store.read("label_predictions")).filter(pl.col("run_id") == label_run)
    wide = rows.pivot("class", index="spot_id", values="prob").sort("spot_id")
    probs = wide.select(CLASSES).to_numpy()
    argmax = dict(zip(wide["spot_id"].to_list(), np.array(CLASSES)[probs.argmax(axis=1)]))
    for k, cls in enumerate(CLASSES):
        body = client.get(f"/api/runs/{label_run}/slides/{SHOWN}/values", params={"gene": cls}).json()
        assert body["kind"] == "label" and body["layers"] == ["prob_class", "label", "observed_label"]
        got = {s["spot_id"]: s for s in body["spots"]}
        assert list(got) == wide["spot_id"].to_list() and len(got) > 100
        np.testing.assert_allclose([got[s]["prob_class"] for s in got], probs[:, k], rtol=1e-6)
        assert {s: v["label"] for s, v in got.items()} == argmax
        assert {s: v["observed_label"] for s, v in got.items()} == {s: truth[s] for s in got}
        for layer in ("label", "observed_label"):  # one palette: tab10 in the run's class order
            lg = body["legend"][layer]
            assert lg["labels"] == CLASSES
            want = [TAB10[c] for c in CLASSES]
            np.testing.assert_allclose([np.array(to_rgb(h)) * 255 for h in lg["colors"]], want, atol=0.6)
        assert body["legend"]["prob_class"]["lo"] == 0.0 and body["legend"]["prob_class"]["hi"] == 1.0

    # a full-resolution overlay tile: the pixel at a spot's centre has its predicted class colour
    info = client.get(f"/api/slides/{SHOWN}/tiles").json()
    spot = body["spots"][len(body["spots"]) // 2]
    top = info["max_level"]
    col, row = int(spot["pixel_x"] // 254), int(spot["pixel_y"] // 254)
    r = client.get(f"/overlay/{label_run}/{SHOWN}/label/{top}/{col}_{row}.png", params={"gene": "mid"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    px = np.asarray(Image.open(BytesIO(r.content)).convert("RGBA"))
    x0, y0 = col * 254 - (1 if col else 0), row * 254 - (1 if row else 0)
    centre = px[int(spot["pixel_y"]) - y0, int(spot["pixel_x"]) - x0]
    assert centre[3] > 0
    np.testing.assert_allclose(centre[:3], TAB10[spot["label"]], atol=1.0)


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/api/runs/{label}/slides/C5/values?gene=SCGB2A2", 404, "unknown class 'SCGB2A2'"),
        ("/api/runs/{label}/slides/C4/values?gene=mid", 404, "no predictions for slide 'C4'"),
        ("/api/runs/{label}/slides/ZZ9/values?gene=mid", 404, "unknown slide 'ZZ9'"),
        ("/api/runs/{nb}/slides/C5/values?gene=mid", 404, "unknown gene 'mid'"),
        ("/overlay/{label}/C5/label/12/0_0.png?gene=nope", 404, "unknown class 'nope'"),
        ("/overlay/{label}/C5/klass/12/0_0.png?gene=mid", 400, "layer"),
    ],
)
def test_label_run_errors_are_one_line(client, label_store, path, status, words):
    _, nb_run, label_run, _ = label_store
    r = client.get(path.format(label=label_run, nb=nb_run))
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and words in detail


def test_ids_reach_sql_as_bound_parameters_only(client, label_store, monkeypatch):
    """Every statement the endpoints run (a spy on DuckDB's ``sql``): no run, slide, gene,
    class or spot id in its text; the ids arrive as bound parameters."""
    import duckdb

    from stimage_embed.viewer import queries

    store, nb_run, label_run, truth = label_store
    seen: list[tuple[str, list]] = []
    connect = duckdb.connect

    class Spy:
        def __init__(self, con):
            self._con = con

        def __getattr__(self, name):
            return getattr(self._con, name)

        def sql(self, query, params=None):
            seen.append((query, list(params or [])))
            return self._con.sql(query, params=params)

    monkeypatch.setattr(queries.duckdb, "connect", lambda *a, **k: Spy(connect(*a, **k)))
    gene = client.get(f"/api/runs/{nb_run}/genes").json()["genes"][2]
    spot = sorted(truth)[5]
    for path in (
        "/api/slides",
        "/api/runs",
        f"/api/runs/{label_run}/slides/{SHOWN}/values?gene=pale",
        f"/api/runs/{nb_run}/slides/{SHOWN}/values?gene={gene}",
        f"/overlay/{label_run}/{SHOWN}/observed_label/12/1_1.png?gene=pale",
        f"/thumb/{SHOWN}/{spot}.jpeg",
    ):
        assert client.get(path).status_code == 200, path
    ids = (nb_run, label_run, f"'{SHOWN}'", f"'{gene}'", "'pale'", f"'{spot}'")
    assert len(seen) >= 8
    assert not [(q, i) for q, _ in seen for i in ids if i in q]
    params = {p for _, ps in seen for p in ps}
    assert {nb_run, label_run, SHOWN, gene, "pale", spot} <= params
