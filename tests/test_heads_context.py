"""Spatial-context head: lattice neighbours against a brute-force reference, the head's
contract (sklearn, coords fallback, neighbours stay within a slide), that it uses its
neighbours (synthetic data where expression follows the neighbourhood), and the
shuffled-vector leak control on real HER2ST vectors (C4 -> C5)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.base import clone

from heads import ContextNBRegressor, NBRegressor
from heads.neighbours import find_neighbours, masked_neighbour_mean, slide_pitch

LIGHT = {"alphas": (1.0, 10.0, 100.0), "cv": 2, "device": "cpu"}


def hex_lattice(rows: int, cols: int, pitch: float = 100.0) -> np.ndarray:
    """Visium-like hexagonal lattice (every other row shifted by half a pitch), µm."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = c * pitch + (r % 2) * pitch / 2
    y = r * pitch * np.sqrt(3) / 2
    return np.c_[x.ravel(), y.ravel()].astype(float)


def square_lattice(rows: int, cols: int, pitch: float = 200.0) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.c_[c.ravel() * pitch, r.ravel() * pitch].astype(float)


def brute_force(coords, groups, k, radius, inner):
    """Reference: full distance matrix per slide, pitch = median nearest distance, keep
    (inner, radius] pitches, nearest k."""
    out = []
    for i in range(len(coords)):
        rows = np.flatnonzero(groups == groups[i])
        c = coords[rows]
        D = np.sqrt(((c[:, None] - c[None]) ** 2).sum(-1))
        np.fill_diagonal(D, np.inf)
        p = np.median(D.min(axis=1))
        d = np.sqrt(((coords[rows] - coords[i]) ** 2).sum(-1))
        ok = (rows != i) & (d > inner * p * (1 + 1e-9)) & (d <= radius * p * (1 + 1e-9))
        cand = rows[ok][np.argsort(d[ok], kind="stable")][:k]
        out.append(set(cand.tolist()))
    return out


@pytest.mark.parametrize("lattice,expected", [(hex_lattice, 6), (square_lattice, 8)])
def test_interior_spots_have_the_platforms_neighbours(lattice, expected):
    xy = lattice(9, 9)
    nb = find_neighbours(xy)
    interior = (
        (xy[:, 0] > xy[:, 0].min() + 250)
        & (xy[:, 0] < xy[:, 0].max() - 250)
        & (xy[:, 1] > xy[:, 1].min() + 250)
        & (xy[:, 1] < xy[:, 1].max() - 250)
    )
    assert (nb.count[interior] == expected).all()
    assert nb.count.min() < expected  # corners and edges: fewer, masked
    assert np.allclose(nb.distance[nb.mask].max(), 1.0 if expected == 6 else np.sqrt(2))
    np.testing.assert_allclose(nb.pitch, 100.0 if expected == 6 else 200.0)


def test_neighbours_equal_a_brute_force_reference_and_stay_in_their_slide():
    rng = np.random.default_rng(0)
    a = hex_lattice(8, 10) + rng.normal(0, 3, (80, 2))
    b = square_lattice(7, 7) + rng.normal(0, 5, (49, 2))  # overlapping frame, other slide
    keep = rng.random(129) > 0.15  # spots removed by QC: holes in the lattice
    xy = np.r_[a, b][keep]
    groups = np.array(["A"] * 80 + ["B"] * 49)[keep]
    for k, radius, inner in [(8, 1.5, 0.0), (16, 2.5, 1.5), (3, 1.5, 0.0)]:
        nb = find_neighbours(xy, groups, k=k, radius=radius, inner=inner)
        ref = brute_force(xy, groups, k, radius, inner)
        assert [set(nb.index[i, nb.mask[i]].tolist()) for i in range(len(xy))] == ref
        assert (groups[nb.index] == groups[:, None]).all()  # never across slides
        np.testing.assert_allclose(
            nb.offset[nb.mask], ((xy[nb.index] - xy[:, None]) / nb.pitch[:, None, None])[nb.mask]
        )
        assert (nb.offset[~nb.mask] == 0).all() and (nb.index[~nb.mask] == np.nonzero(~nb.mask)[0]).all()
    assert slide_pitch(xy[groups == "B"]) == pytest.approx(200.0, rel=0.05)


def test_masked_mean_matches_a_loop_and_bad_input_is_refused():
    rng = np.random.default_rng(1)
    xy = square_lattice(5, 5)[rng.random(25) > 0.2]
    X = rng.normal(size=(len(xy), 3))
    nb = find_neighbours(xy)
    want = np.array([X[nb.index[i, nb.mask[i]]].mean(0) if nb.mask[i].any() else X[i] for i in range(len(xy))])
    np.testing.assert_allclose(masked_neighbour_mean(X, nb), want)
    with pytest.raises(ValueError, match="coords"):
        find_neighbours(xy[:, :1])
    with pytest.raises(ValueError, match="groups"):
        find_neighbours(xy, groups=np.zeros(3))
    with pytest.raises(ValueError, match="radius"):
        find_neighbours(xy, radius=1.0, inner=1.5)


def _synthetic(seed: int):
    """Two slides on a legacy-ST lattice; expression follows the ring-1 neighbourhood's
    mean of feature 0 (plus the spot's own), so only a head that uses neighbours sees it."""
    rng = np.random.default_rng(seed)
    xy = np.r_[square_lattice(14, 14), square_lattice(14, 14)]
    groups = np.repeat(["S1", "S2"], 196)
    X = rng.normal(size=(392, 10)).astype(np.float32)
    ctx = masked_neighbour_mean(X, find_neighbours(xy, groups))
    eta = 1.5 * ctx[:, :1] * np.array([1.0, -1.0, 0.5]) + 0.3 * X[:, 1:2]
    lib = rng.integers(800, 1500, 392).astype(float)
    counts = rng.poisson(np.exp(eta) * lib[:, None] * 0.01)
    return X, counts, lib, groups, xy, eta


def test_the_context_head_uses_its_neighbours():
    X, counts, lib, groups, xy, _ = _synthetic(0)
    Xt, _, _, gt, xyt, eta_t = _synthetic(1)
    ctx = ContextNBRegressor(**LIGHT).fit(X, counts, groups=groups, library_size=lib, coords=xy)
    nb = NBRegressor(**LIGHT).fit(X, counts, groups=groups, library_size=lib)
    r_ctx = [pearsonr(np.log(ctx.predict_rate(Xt, groups=gt, coords=xyt))[:, j], eta_t[:, j])[0] for j in range(3)]
    r_nb = [pearsonr(np.log(nb.predict_rate(Xt))[:, j], eta_t[:, j])[0] for j in range(3)]
    assert min(r_ctx) > 0.9 and min(np.subtract(r_ctx, r_nb)) > 0.2  # nb sees only the own-vector part
    # without coordinates there are no neighbours: the ring summaries are the spot itself
    np.testing.assert_allclose(ctx.predict_rate(Xt), ctx.model_.predict_rate(np.concatenate([Xt] * 3, axis=1)))
    dist = ctx.predict_dist(Xt[:5], library_size=lib[:5], groups=gt[:5], coords=xyt[:5], quantiles=(0.05, 0.95))
    assert dist.quantiles.shape == (2, 5, 3) and (dist.quantiles[0] <= dist.quantiles[1]).all()
    np.testing.assert_allclose(dist.mean, ctx.predict(Xt[:5], library_size=lib[:5], groups=gt[:5], coords=xyt[:5]))


def test_saved_head_predicts_the_same(tmp_path):
    from heads import load_head, save_head

    X, counts, lib, groups, xy, _ = _synthetic(4)
    head = ContextNBRegressor(**LIGHT).fit(X, counts, groups=groups, library_size=lib, coords=xy)
    back = load_head(save_head(head, tmp_path / "ctx", {"backbone": "synthetic"}))
    np.testing.assert_array_equal(
        back.predict_rate(X, groups=groups, coords=xy), head.predict_rate(X, groups=groups, coords=xy)
    )
    assert back.get_params() == head.get_params()


def test_sklearn_contract_and_errors():
    head = ContextNBRegressor(aggregation="attention", hidden=8)
    assert clone(head).get_params()["hidden"] == 8 and not hasattr(clone(head), "model_")
    X, counts, lib, groups, xy, _ = _synthetic(2)
    with pytest.raises(ValueError, match="coords"):
        ContextNBRegressor(**LIGHT).fit(X, counts, groups=groups, library_size=lib, coords=xy[:, :1])
    with pytest.raises(ValueError, match="aggregation"):
        ContextNBRegressor(aggregation="max").fit(X, counts, groups=groups, library_size=lib, coords=xy)


def test_attention_variant_fits_and_predicts_from_vectors_only():
    X, counts, lib, groups, xy, eta = _synthetic(3)
    head = ContextNBRegressor(aggregation="attention", hidden=8, max_epochs=40, weight_decays=(1e-2,), **LIGHT)
    head.fit(X, counts, groups=groups, library_size=lib, coords=xy)
    rate = head.predict_rate(X, groups=groups, coords=xy)
    assert rate.shape == (392, 3) and np.isfinite(rate).all()
    assert pearsonr(np.log(rate[:, 0]), eta[:, 0])[0] > 0.6
    pooled = head.attention_.attention_pool(X, head._neighbours(xy, groups, len(X)))
    assert pooled.shape == X.shape and not np.allclose(pooled, X)  # a mix of the neighbours, not the spot
    net = clone(head).set_params(readout="net").fit(X, counts, groups=groups, library_size=lib, coords=xy)
    assert np.isfinite(net.predict_rate(X, groups=groups, coords=xy)).all() and not hasattr(net.model_, "alpha_")


def test_real_vectors_beat_the_shuffled_control_and_slides_do_not_mix(embedded_store):
    from heads.scale import log1p_normalise
    from stimage_embed.predictions.arrays import (
        load_spot_arrays,
        shuffled_within_slides,
    )
    from stimage_embed.predictions.genes import fold_genes

    genes = fold_genes(embedded_store, ["C4"], "var:20")
    a = load_spot_arrays(embedded_store, "efficientnet_lite0", ["C4", "C5"], genes)
    umpp = dict(embedded_store.sql("SELECT slide_id, um_per_px FROM slides").iter_rows())
    xy = (
        np.c_[a.keys["pixel_x"].to_numpy(), a.keys["pixel_y"].to_numpy()]
        * np.array([umpp[s] for s in a.groups])[:, None]
    )
    tr, te = a.groups == "C4", a.groups == "C5"
    truth = log1p_normalise(a.counts[te], a.library_size[te])
    scores = {}
    for name, arr in [("real", a), ("shuffled", shuffled_within_slides(a, seed=0))]:
        head = ContextNBRegressor(**LIGHT).fit(
            arr.X[tr], arr.counts[tr], groups=arr.groups[tr], library_size=arr.library_size[tr], coords=xy[tr]
        )
        pred = np.log1p(head.predict_rate(arr.X[te], groups=arr.groups[te], coords=xy[te]) * 1e4)
        scores[name] = np.nanmean([pearsonr(truth[:, j], pred[:, j])[0] for j in range(len(genes))])
        if name == "real":  # C5's prediction does not depend on another slide's vectors
            both = head.predict_rate(arr.X, groups=arr.groups, coords=xy)[te]
            np.testing.assert_allclose(
                both, head.predict_rate(arr.X[te], groups=arr.groups[te], coords=xy[te]), rtol=1e-6
            )
    assert abs(scores["shuffled"]) < 0.05
    assert scores["real"] > scores["shuffled"] + 0.1
