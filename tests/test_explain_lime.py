"""LIME over nuclei on a synthetic model whose output depends on one nucleus only (synthetic
tile and model): that nucleus gets the top weight, and hiding it drops the prediction."""

from __future__ import annotations

import numpy as np
from test_explain_segment import NUCLEI, UM_PER_PX, synthetic_tile

from stimage_embed.explain.lime_tile import explain_tile, explanation_segments, hide_color, occlude, occlusion_deltas
from stimage_embed.explain.segment import HedSegmenter


def _one_nucleus_model(mask: np.ndarray):
    """Synthetic model: darkness (255 - mean RGB) inside one nucleus's drawn mask, as (N, 1)."""

    def fn(tiles: np.ndarray) -> np.ndarray:
        t = np.asarray(tiles, np.float64)
        return (255.0 - t[:, mask].mean(axis=(1, 2)))[:, None]

    return fn


def _label_of(labels: np.ndarray, mask: np.ndarray) -> int:
    vals, counts = np.unique(labels[mask & (labels > 0)], return_counts=True)
    return int(vals[counts.argmax()])


def test_the_one_nucleus_gets_the_top_weight_and_hiding_it_drops_the_prediction():
    tile, masks = synthetic_tile()
    labels = HedSegmenter().segment(tile, UM_PER_PX)
    target = 3  # the 6 x 4.5 µm nucleus
    model = _one_nucleus_model(masks[target])
    ex = explain_tile(tile, labels, model, num_samples=64, seed=0)
    assert ex.n_nuclei == len(NUCLEI)
    k = _label_of(labels, masks[target]) - 1  # its LIME feature
    assert int(np.argmax(ex.weights)) == k
    assert ex.weights[k] > 5 * np.delete(np.abs(ex.weights), k).max()
    assert ex.r2 > 0.9  # the surrogate is exact up to LIME's ridge penalty
    hidden = model(occlude(tile, ex.segments, [k], ex.hide_color)[None])[0, 0]
    assert hidden < ex.prediction - 50  # removing it drops the prediction (darkness of ~100+ -> background)
    deltas = occlusion_deltas(tile, ex, model, list(range(ex.n_nuclei)))
    assert int(np.argmin(deltas)) == k and np.sum(np.abs(deltas) > 1e-9) == 1


def test_reproducible_with_a_seed_and_changes_without():
    tile, masks = synthetic_tile()
    labels = HedSegmenter().segment(tile, UM_PER_PX)
    model = _one_nucleus_model(masks[0] | masks[5])
    a = explain_tile(tile, labels, model, num_samples=32, seed=3)
    b = explain_tile(tile, labels, model, num_samples=32, seed=3)
    c = explain_tile(tile, labels, model, num_samples=32, seed=4)
    assert np.array_equal(a.weights, b.weights) and a.r2 == b.r2
    assert not np.array_equal(a.weights, c.weights)


def test_segments_nuclei_first_then_background_cells():
    labels = np.zeros((8, 8), int)
    labels[0:2, 0:2] = 1
    labels[5:7, 5:7] = 2
    seg, n = explanation_segments(labels, grid=2)
    assert n == 2
    assert set(np.unique(seg)) == {0, 1, 2, 3, 4, 5}  # 2 nuclei + 4 background cells, consecutive
    assert (seg[labels == 1] == 0).all() and (seg[labels == 2] == 1).all()
    assert seg[0, 7] != seg[7, 0]


def test_no_nucleus_is_explained_over_background_regions():
    tile, _ = synthetic_tile(nuclei=[])
    labels = HedSegmenter().segment(tile, UM_PER_PX)
    left = np.zeros(tile.shape[:2], bool)
    left[:, : tile.shape[1] // 4] = True

    def model(tiles):
        return np.asarray(tiles, float)[:, left].mean(axis=(1, 2))[:, None]

    ex = explain_tile(tile, labels, model, num_samples=32, seed=0)
    assert ex.n_nuclei == 0 and len(ex.weights) == 16  # the 4 x 4 background lattice
    assert np.allclose(hide_color(tile, labels), np.median(tile.reshape(-1, 3), axis=0))
