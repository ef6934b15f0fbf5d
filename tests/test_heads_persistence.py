"""save_head / load_head round trips (JSON + safetensors, no pickle) and provenance checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from heads import (
    HighLowClassifier,
    MeanBaseline,
    NBRegressor,
    ProvenanceMismatch,
    RidgeBaseline,
    SeedEnsemble,
    check_provenance,
    highlow_labels,
    load_head,
    save_head,
)

PROVENANCE = {
    "backbone": "uni",
    "weights_sha256": "ab" * 32,
    "transform": "imagenet",
    "tile_um": 110.0,
    "stain": "macenko",
}


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 12)).astype(np.float16)
    y = rng.negative_binomial(4, 4 / (4 + np.exp(1 + 0.5 * X[:, :5].astype(float))))
    lib = y.sum(1) + 300.0
    groups = np.repeat(["s1", "s2", "s3", "s4"], 40)
    X_new = rng.normal(size=(50, 12)).astype(np.float32)
    return X, y, lib, groups, X_new


HEADS = {
    "nb_linear": lambda: NBRegressor(cv=2, alphas=(0.3, 3.0)),
    "nb_linear_adam": lambda: NBRegressor(solver="adam", max_epochs=8),
    "nb_hidden_stimage": lambda: NBRegressor(max_epochs=8, hidden=6, parametrisation="stimage", batch_size=32),
    "seed_ensemble": lambda: SeedEnsemble(NBRegressor(max_epochs=4, hidden=3), n_members=3),
    "seed_ensemble_bootstrap": lambda: SeedEnsemble(NBRegressor(alpha=1.0, bootstrap=True), n_members=3),
    "ridge": lambda: RidgeBaseline(n_components=6, alphas=[0.1, 10.0]),
    "mean": lambda: MeanBaseline(),
}


def assert_only_json_and_safetensors(directory):
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["arrays.safetensors", "head.json"]
    raw = (directory / "arrays.safetensors").read_bytes() + (directory / "head.json").read_bytes()
    assert b"\x80\x04\x95" not in raw and b"\x80\x05\x95" not in raw  # no pickle protocol 4/5 frames


@pytest.mark.parametrize("name", list(HEADS))
def test_regression_heads_round_trip(name, data, tmp_path):
    X, y, lib, groups, X_new = data
    head = HEADS[name]().fit(X, y, groups=groups, library_size=lib)
    out = save_head(head, tmp_path / name, PROVENANCE)
    assert_only_json_and_safetensors(out)
    loaded = load_head(out)
    assert type(loaded) is type(head)
    assert loaded.get_params(deep=False).keys() == head.get_params(deep=False).keys()
    np.testing.assert_array_equal(loaded.predict(X_new), head.predict(X_new))
    np.testing.assert_array_equal(
        loaded.predict(X_new, library_size=lib[:50]), head.predict(X_new, library_size=lib[:50])
    )
    assert loaded.ref_library_size_ == head.ref_library_size_
    assert loaded.provenance_ == json.loads(json.dumps(PROVENANCE))
    if isinstance(head, NBRegressor):
        a = head.predict_dist(X_new, quantiles=(0.1, 0.9))
        b = loaded.predict_dist(X_new, quantiles=(0.1, 0.9))
        np.testing.assert_array_equal(a.variance, b.variance)
        np.testing.assert_array_equal(a.quantiles, b.quantiles)
        if head.solver_ == "adam":
            assert loaded.history_ == head.history_ and loaded.best_epoch_ == head.best_epoch_
        else:
            assert loaded.alpha_ == head.alpha_ and loaded.cv_groups_ == head.cv_groups_
            np.testing.assert_array_equal(loaded.cv_loss_, head.cv_loss_)
    if isinstance(head, SeedEnsemble):
        np.testing.assert_array_equal(loaded.predict_uncertainty(X_new).total, head.predict_uncertainty(X_new).total)
        assert len(loaded.members_) == 3


def test_classifier_round_trip(data, tmp_path):
    X, y, lib, groups, X_new = data
    clf = HighLowClassifier(n_jobs=2).fit(
        X, np.column_stack([highlow_labels(np.log1p(y), groups), np.zeros(160, bool)])
    )
    loaded = load_head(save_head(clf, tmp_path / "clf", PROVENANCE))
    assert_only_json_and_safetensors(tmp_path / "clf")
    np.testing.assert_array_equal(loaded.predict_proba(X_new), clf.predict_proba(X_new))
    np.testing.assert_array_equal(loaded.constant_genes_, clf.constant_genes_)


def test_arrays_are_plain_tensors(data, tmp_path):
    X, y, lib, groups, _ = data
    head = NBRegressor(solver="adam", max_epochs=3).fit(X, y, groups=groups, library_size=lib)
    save_head(head, tmp_path, PROVENANCE)
    arrays = load_file(str(tmp_path / "arrays.safetensors"))
    np.testing.assert_array_equal(arrays["module_.out.weight"], head.module_.out.weight.detach().numpy())
    glm = NBRegressor(alpha=1.0).fit(X, y, groups=groups, library_size=lib)
    save_head(glm, tmp_path / "glm", PROVENANCE)
    glm_arrays = load_file(str(tmp_path / "glm" / "arrays.safetensors"))
    np.testing.assert_array_equal(glm_arrays["coef_"], glm.coef_)
    np.testing.assert_array_equal(glm_arrays["theta_"], glm.theta_)
    np.testing.assert_array_equal(arrays["scaler_mean_"], head.scaler_mean_)
    doc = json.loads((tmp_path / "head.json").read_text())
    assert doc["head"]["class"] == "NBRegressor"
    assert doc["head"]["params"]["__dict__"]["max_epochs"] == 3
    assert doc["provenance"]["backbone"] == "uni"


def test_provenance_mismatch_is_refused(data, tmp_path):
    X, y, lib, groups, _ = data
    head = load_head(save_head(MeanBaseline().fit(X, y, library_size=lib), tmp_path, PROVENANCE))
    check_provenance(head, PROVENANCE)  # same provenance: accepted
    check_provenance(head, {"backbone": "uni"})  # a subset of keys is checked
    other = dict(PROVENANCE, backbone="conch", tile_um=224.0)
    with pytest.raises(ProvenanceMismatch) as err:
        check_provenance(head, other)
    assert isinstance(err.value, ValueError)
    assert set(err.value.differences) == {"backbone", "tile_um"}
    assert "backbone: head has 'uni', expected 'conch'" in str(err.value)
    assert "tile_um: head has 110.0, expected 224.0" in str(err.value)
    with pytest.raises(ProvenanceMismatch, match="stain_v2: head has '<missing>'"):
        check_provenance(head, {"stain_v2": "x"})
    with pytest.raises(ProvenanceMismatch, match="backbone"):
        save_head(head, tmp_path / "again", other)  # re-saving under another provenance
    with pytest.raises(ProvenanceMismatch):
        check_provenance(MeanBaseline().fit(X, y), PROVENANCE)  # no provenance at all


def test_unfitted_and_unsupported_heads_are_refused(tmp_path):
    from sklearn.exceptions import NotFittedError
    from sklearn.linear_model import Ridge

    with pytest.raises(NotFittedError):
        save_head(NBRegressor(), tmp_path / "x", PROVENANCE)
    with pytest.raises(TypeError, match="unsupported head class Ridge"):
        save_head(Ridge().fit(np.zeros((3, 1)), np.zeros(3)), tmp_path / "y", PROVENANCE)
    with pytest.raises(FileNotFoundError, match="head.json"):
        load_head(tmp_path / "nothing")


def test_context_head_round_trip_with_its_inner_glm(tmp_path):
    """The context head saves its inner NB GLM as a nested member and predicts identically
    after loading, neighbours recomputed from the same coordinates."""
    from heads.context import ContextNBRegressor

    rng = np.random.default_rng(3)
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(6)), -1).reshape(-1, 2) * 100.0  # µm, a square lattice
    coords = np.concatenate([grid, grid, grid])
    groups = np.repeat(["s1", "s2", "s3"], len(grid))
    X = rng.normal(size=(len(coords), 10)).astype(np.float32)
    y = rng.poisson(4.0, size=(len(coords), 5))
    head = ContextNBRegressor().fit(X, y, groups=groups, library_size=y.sum(1) + 40.0, coords=coords)
    back = load_head(save_head(head, tmp_path / "ctx", PROVENANCE))
    doc = json.loads((tmp_path / "ctx" / "head.json").read_text())
    assert doc["head"]["class"] == "ContextNBRegressor" and doc["head"]["members"]["model_"]["kind"] == "one"
    np.testing.assert_array_equal(
        back.predict_rate(X, groups=groups, coords=coords), head.predict_rate(X, groups=groups, coords=coords)
    )
    with pytest.raises(TypeError, match="unsupported head class"):
        save_head(object.__new__(type("Unknown", (NBRegressor,), {})), tmp_path / "x", PROVENANCE)
