"""Neighbour graphs and Moran's I vs libpysal/esda on real HER2ST B4; spatial IoU on
hand-made grids and against an independent direct-sum implementation."""

from __future__ import annotations

import warnings

import esda
import numpy as np
import pandas as pd
import pytest
from libpysal.weights import KNN, DistanceBand

from stimage_embed.errors import InputError
from stimage_embed.evaluation import (
    bivariate_morans_i,
    grid_weights,
    knn_weights,
    morans_i,
    normalise_log1p,
    radius_weights,
    spatial_iou,
    spot_raster_index,
)


@pytest.fixture(scope="module")
def b4(real_data_root) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HER2ST B4: (array_row, array_col, log1p-normalised values of the 100 most
    expressed genes) read straight from the counts file."""
    df = pd.read_csv(real_data_root / "her2st" / "counts" / "B4.tsv.gz", sep="\t", index_col=0)
    xy = np.array([s.split("x") for s in df.index], dtype=int)  # spot id "{x}x{y}"
    counts = df.to_numpy(dtype=np.float64)
    lib = counts.sum(axis=1)
    top = np.argsort(-counts.sum(axis=0), kind="stable")[:100]
    vals = normalise_log1p(counts[:, top], lib)
    return xy[:, 1], xy[:, 0], vals


def _libpysal_w(points: np.ndarray, threshold: float):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # islands / disconnected components
        w = DistanceBand(points, threshold=threshold, binary=True, silence_warnings=True)
    w.transform = "r"
    return w


@pytest.mark.parametrize(("layout", "threshold"), [("square4", 1.0), ("square8", 1.5)])
def test_grid_graph_and_moran_match_libpysal_esda_on_b4(b4, layout, threshold):
    rows, cols, vals = b4
    w_ours = grid_weights(rows, cols, layout)
    w_ref = _libpysal_w(np.column_stack([cols, rows]).astype(float), threshold)
    assert abs(w_ours - w_ref.sparse).max() < 1e-15
    rs = np.asarray(w_ours.sum(axis=1)).ravel()
    assert np.allclose(rs[rs > 0], 1.0)
    x, y = vals[:, :50], vals[:, 50:]
    got_i = morans_i(x, w_ours)
    got_bv = bivariate_morans_i(x, y, w_ours)
    for j in range(50):
        assert got_i[j] == pytest.approx(esda.Moran(x[:, j], w_ref, permutations=0).I, abs=1e-8)
        assert got_bv[j] == pytest.approx(esda.Moran_BV(x[:, j], y[:, j], w_ref, permutations=0).I, abs=1e-8)
    assert np.nanmax(got_i) > 0.2  # real expression is spatially autocorrelated
    # x/y order matters for row-standardised weights (and we follow esda's)
    assert not np.allclose(bivariate_morans_i(y, x, w_ours), got_bv)


def test_constant_columns_are_nan_without_warnings(b4):
    rows, cols, vals = b4
    w = grid_weights(rows, cols)
    v = vals[:, :3].copy()
    v[:, 1] = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        i = morans_i(v, w)
        bv = bivariate_morans_i(v, vals[:, 3:6], w)
    assert np.isnan(i[1]) and np.isnan(bv[1]) and np.isfinite(i[[0, 2]]).all()
    with pytest.raises(InputError, match="spots but the weights"):
        morans_i(v[:10], w)


def test_hex_grid_matches_distance_band_on_visium_positions():
    # Visium-style doubled columns: row r holds columns of parity r % 2
    rr, cc = np.meshgrid(np.arange(8), np.arange(12), indexing="ij")
    keep = (cc % 2) == (rr % 2)
    rows, cols = rr[keep], cc[keep]
    drop = np.random.default_rng(0).random(rows.size) < 0.15  # some holes
    rows, cols = rows[~drop], cols[~drop]
    w_ours = grid_weights(rows, cols, "hex6")
    pos = np.column_stack([cols * 0.5, rows * np.sqrt(3) / 2])  # unit spot pitch
    w_ref = _libpysal_w(pos, 1.0 + 1e-9)
    assert abs(w_ours - w_ref.sparse).max() < 1e-15
    assert (w_ours > 0).sum(axis=1).max() == 6


def test_knn_and_radius_weights_match_libpysal():
    pts = np.random.default_rng(1).random((60, 2)) * 1000  # pixels
    w = KNN(pts, k=5)
    w.transform = "r"
    assert abs(knn_weights(pts, 5) - w.sparse).max() < 1e-15
    r = _libpysal_w(pts, 150.0)
    assert abs(radius_weights(pts, 150.0) - r.sparse).max() < 1e-15
    with pytest.raises(InputError, match="k="):
        knn_weights(pts, 60)


# ----------------------------------------------------------------------------- IoU
def _rect(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return rr.ravel(), cc.ravel()


def test_iou_identical_and_disjoint_halves():
    rows, cols = _rect(6, 8)
    left = (cols < 4).astype(float)
    res = spatial_iou(left, left, rows, cols)
    assert res.iou[0] == 1.0
    res = spatial_iou(left, 1.0 - left, rows, cols)
    assert res.iou[0] == 0.0
    assert res.true_high.shape == (1, 6, 8) and res.mask.all()
    assert np.array_equal(res.true_high[0], left.reshape(6, 8) > 0)  # halves survive smoothing


def test_iou_hand_computed_strip():
    # 1 x 5 strip; Gaussian weights g(d) = exp(-d^2/2): g0=1, g1=.6065, g2=.1353, g3=.0111, g4=.0003
    # truth [1,1,1,0,1] -> high {0,1,2,4}; smoothing lifts spot 3: (g3+g2+2 g1)/(... + g0) = .576 > .5
    #   -> truth high region {0,1,2,3,4}
    # pred [2,2,2,0,0] -> high {0,1,2}; spot 2: 1.7418/2.4837 = .701; spot 3: .7529/2.3594 = .319
    #   -> pred high region {0,1,2}
    # IoU = 3/5 (without smoothing it would be 3/4)
    rows, cols = np.zeros(5, int), np.arange(5)
    res = spatial_iou(np.array([1, 1, 1, 0, 1.0]), np.array([2, 2, 2, 0, 0.0]), rows, cols)
    assert res.iou[0] == pytest.approx(0.6)
    g = np.exp(-(np.arange(5) ** 2) / 2)
    assert res.true_smooth[0, 0, 3] == pytest.approx(
        (g[3] + g[2] + 2 * g[1]) / (g[3] + g[2] + 2 * g[1] + g[0]), rel=1e-6
    )
    assert res.pred_high[0, 0].tolist() == [True, True, True, False, False]


def _direct_iou(t: np.ndarray, p: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[float, np.ndarray]:
    """Independent reference: Gaussian-weighted fraction of high spots within the
    4-sigma square window (scipy's truncation), over spots only."""

    def region(v: np.ndarray) -> np.ndarray:
        high = (v - v.mean()) / v.std() > 0
        out = np.zeros(v.size)
        for i in range(v.size):
            dr, dc = rows - rows[i], cols - cols[i]
            near = (np.abs(dr) <= 4) & (np.abs(dc) <= 4)
            wgt = np.exp(-(dr[near] ** 2 + dc[near] ** 2) / 2)
            out[i] = (wgt * high[near]).sum() / wgt.sum()
        return out

    rt, rp = region(t), region(p)
    a, b = rt > 0.5, rp > 0.5
    return (a & b).sum() / (a | b).sum(), rt


def test_iou_matches_direct_normalised_convolution_on_real_b4(b4):
    rows, cols, vals = b4  # irregular tissue outline with empty grid cells
    rng = np.random.default_rng(2)
    t = vals[:, :20]
    p = t + rng.normal(0, 0.4, size=t.shape)
    res = spatial_iou(t, p, rows, cols)
    r, c, shape = spot_raster_index(rows, cols)
    assert res.mask.sum() == rows.size and res.true_smooth.shape == (20, *shape)
    assert np.isnan(res.true_smooth[:, ~res.mask]).all()
    for j in range(20):
        iou, smooth = _direct_iou(t[:, j], p[:, j], rows, cols)
        assert res.iou[j] == pytest.approx(iou, abs=1e-12)
        np.testing.assert_allclose(res.true_smooth[j, r, c], smooth, rtol=1e-5, atol=1e-6)
    assert 0.3 < np.nanmean(res.iou) < 1.0


def test_iou_constant_gene_and_bad_input():
    rows, cols = _rect(4, 4)
    t = np.column_stack([np.arange(16.0), np.ones(16)])
    res = spatial_iou(t, t, rows, cols)
    assert res.iou[0] == 1.0 and np.isnan(res.iou[1])
    with pytest.raises(InputError, match="same array coordinates"):
        spatial_iou(t, t, np.zeros(16, int), cols)
    with pytest.raises(InputError, match="y_pred"):
        spatial_iou(t, t[:, :1], rows, cols)
    # hex layout: doubled columns collapse to one raster step per spot pitch
    r, c, shape = spot_raster_index(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 3]), layout="hex")
    assert shape == (2, 2) and c.tolist() == [0, 1, 0, 1]
