"""Shared fixtures: the real sample data root and a store with both datasets ingested."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stimage_embed.paths import data_root

EXPECTED_SPOTS = {
    "B4": 283,
    "C2": 187,
    "C3": 180,
    "C4": 184,
    "C5": 181,
    "MOB1": 379,
    "MOB2": 407,
    "MOB3": 438,
    "MOB4": 403,
}


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    root = data_root()
    if not (root / "her2st").is_dir():
        pytest.fail(f"real sample data not found at {root}; set STIMAGE_DATA_ROOT")
    return root


@pytest.fixture(scope="session")
def ingested_store(tmp_path_factory, real_data_root):
    """A store with her2st and stutility_mob ingested (session-wide, read-only for tests)."""
    from stimage_embed.ingest.pipeline import ingest
    from stimage_embed.store import Store

    store = Store(tmp_path_factory.mktemp("store") / "store")
    logging.getLogger("stimage_embed").setLevel(logging.WARNING)
    ingest("her2st", store, progress=False)
    ingest("stutility_mob", store, progress=False)
    return store


EMBED_SLIDES = ["C4", "C5", "MOB1"]


@pytest.fixture(scope="session")
def embedded_store(tmp_path_factory, ingested_store):
    """A copy of the ingested store with efficientnet_lite0 vectors for C4, C5 and MOB1."""
    import shutil

    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.store import Store

    path = tmp_path_factory.mktemp("embedded") / "store"
    shutil.copytree(ingested_store.path, path)
    store = Store(path)
    embed(store, ["efficientnet_lite0"], slides=EMBED_SLIDES, precision="float32", num_workers=1, progress=False)
    return store


@pytest.fixture(scope="session")
def infer_model_store(tmp_path_factory, embedded_store):
    """A copy of ``embedded_store`` with a ridge model trained on C4's Lite0 vectors
    (var:20 genes), for ``infer``. Returns (store, run_id)."""
    import shutil

    from stimage_embed.predictions.train_predict import train
    from stimage_embed.store import Store

    path = tmp_path_factory.mktemp("infer") / "store"
    shutil.copytree(embedded_store.path, path)
    store = Store(path)
    run_id, _ = train(store, "efficientnet_lite0", "ridge", "var:20", ["C4"])
    return store, run_id


@pytest.fixture(scope="session")
def mini_cli_store(tmp_path_factory, real_data_root):
    """A small real store for command-line tests, built once: S1 and S2 (12 spots each of
    HER2ST C5 and C4, real counts and image crops) ingested, with Lite0 vectors and a ridge
    model (var:10) trained on S1; ``data/new`` holds the files of two more slides, S3 (C3) and
    S4 (B4), not ingested. Returns (store path, run id, data folder); copy before writing."""
    from store_cases import mini_dataset

    from stimage_embed.embeddings.embed_pass import embed
    from stimage_embed.ingest.pipeline import ingest
    from stimage_embed.predictions.train_predict import train
    from stimage_embed.store import Store

    root = tmp_path_factory.mktemp("bad_input")
    catalog = mini_dataset(root / "data", real_data_root)
    store = Store(root / "store")
    ingest(str(catalog), store, progress=False)
    embed(store, ["efficientnet_lite0"], precision="float32", num_workers=0, progress=False)
    run_id, _ = train(store, "efficientnet_lite0", "ridge", "var:10", ["S1"])
    # files of two new slides (real crops of C3 and B4), cut once and copied by each case
    mini_dataset(root / "data" / "new", real_data_root, slides={"S3": "C3", "S4": "B4"}, name="new")
    return root / "store", run_id, root / "data"
