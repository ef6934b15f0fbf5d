"""The tile grid of `infer` on synthetic masks, against independent brute-force references
(no embedding: fast)."""

from __future__ import annotations

import numpy as np
import pytest

from stimage_embed.errors import InputError
from stimage_embed.inference.grid import grid_axis, tissue_grid
from stimage_embed.inference.heatmaps import heatmap_figure, scale_bar_um, top_genes


def _disk_fraction_bruteforce(mask: np.ndarray, ds: float, cx: float, cy: float, r: float, n: int = 201) -> float:
    """Tissue fraction of a disk by dense sampling of level-0 points (independent of the package)."""
    t = np.linspace(-r, r, n)
    xx, yy = np.meshgrid(cx + t, cy + t)
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    jx, iy = np.floor(xx / ds).astype(int), np.floor(yy / ds).astype(int)
    ok = inside & (jx >= 0) & (jx < mask.shape[1]) & (iy >= 0) & (iy < mask.shape[0])
    hit = np.zeros_like(inside)
    hit[ok] = mask[iy[ok], jx[ok]]
    return hit[inside].mean()


def test_grid_axis_centres_inside_the_image():
    xs = grid_axis(1000.0, 100.0, 100.0)
    assert xs[0] == 50.0 and np.allclose(np.diff(xs), 100.0) and xs[-1] < 1000.0 and xs.size == 10
    assert grid_axis(1000.0, 100.0, 300.0).tolist() == [50.0, 350.0, 650.0, 950.0]
    assert grid_axis(40.0, 100.0, 100.0).size == 0  # image narrower than half a tile


def test_tissue_grid_keeps_tiles_by_disk_fraction_and_flags_qc():
    # a 400 x 600 px mask at 10 level-0 px per mask px: a disk of tissue and a rectangle
    h, w, ds = 400, 600, 10.0
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - 200) ** 2 + (xx - 200) ** 2 < 120**2) | ((xx > 420) & (xx < 560) & (yy > 50) & (yy < 150))
    um_per_px, tile_um = 0.5, 100.0  # tile = 200 level-0 px = 20 mask px
    grid = tissue_grid(
        mask, ds, w * ds, h * ds, um_per_px, tile_um, pitch_um=150.0, min_tissue=0.2, tissue_threshold=0.7
    )
    assert grid.tile_px == 200.0 and grid.pitch_px == 300.0
    # every position of the full lattice, checked with the brute-force reference
    xs, ys = grid_axis(w * ds, 200.0, 300.0), grid_axis(h * ds, 200.0, 300.0)
    assert (grid.n_rows, grid.n_cols) == (ys.size, xs.size)
    ref = {
        (r, c): _disk_fraction_bruteforce(mask, ds, xs[c], ys[r], 100.0) for r in range(ys.size) for c in range(xs.size)
    }
    kept = set(zip(grid.row.tolist(), grid.col.tolist()))
    for key, f in ref.items():
        if abs(f - 0.2) > 0.03:  # away from the threshold the decision is unambiguous
            assert (key in kept) == (f >= 0.2), (key, f)
    for r, c, f, q, x, y in zip(grid.row, grid.col, grid.tissue_fraction, grid.passes_qc, grid.x, grid.y):
        assert f == pytest.approx(ref[(r, c)], abs=0.03)
        assert q == (f >= 0.7)
        assert (x, y) == (xs[c], ys[r])
    assert set(grid.spot_ids) == {f"{c}x{r}" for r, c in kept}
    # the raster puts each tile's value at its (row, col); NaN elsewhere
    ras = grid.raster(np.arange(len(grid), dtype=np.float32))
    assert ras.shape == (grid.n_rows, grid.n_cols) and np.isnan(ras).sum() == ras.size - len(grid)
    assert ras[grid.row[3], grid.col[3]] == 3.0
    assert np.all(grid.padded_fraction(w * ds, h * ds) >= 0)


def test_region_keeps_only_tiles_centred_in_it():
    mask = np.ones((100, 100), bool)
    full = tissue_grid(mask, 10.0, 1000, 1000, 1.0, 100.0)
    part = tissue_grid(mask, 10.0, 1000, 1000, 1.0, 100.0, region=(200, 0, 600, 350))
    inside = (full.x >= 200) & (full.x < 600) & (full.y < 350)
    assert sorted(part.spot_ids) == sorted(full.spot_ids[inside]) and len(part) == 4 * 3
    with pytest.raises(InputError, match="--region"):
        tissue_grid(mask, 10.0, 1000, 1000, 1.0, 100.0, region=(600, 0, 200, 350))


def test_tissue_grid_refuses_blank_and_bad_parameters():
    blank = np.zeros((100, 100), bool)
    with pytest.raises(InputError, match="no tissue detected"):
        tissue_grid(blank, 10.0, 1000, 1000, 0.5, 100.0, source="blank.png")
    speck = blank.copy()
    speck[50, 50] = True  # one mask px = 10 x 10 level-0 px, far below 10 % of a 200 px disk
    with pytest.raises(InputError, match="no 100 µm tile holds"):
        tissue_grid(speck, 10.0, 1000, 1000, 0.5, 100.0)
    with pytest.raises(InputError, match="--pitch-um"):
        tissue_grid(~blank, 10.0, 1000, 1000, 0.5, 100.0, pitch_um=0.0)


def test_top_genes_and_scale_bar():
    v = np.array([[0, 1, 5], [0, 3, 5], [0, 5, 5.1]], np.float32)
    assert top_genes(v, ["a", "b", "c"], 2) == ["b", "c"]
    assert scale_bar_um(6400.0) == 1000.0 and scale_bar_um(400.0) == 50.0


def test_heatmap_has_colour_bar_and_scale_bar():
    mask = np.ones((50, 80), bool)
    grid = tissue_grid(mask, 10.0, 800, 500, 1.0, 100.0)
    thumb = np.full((50, 80, 3), 230, np.uint8)
    fig = heatmap_figure(thumb, 800, 500, grid, np.linspace(0, 1, len(grid)), "G", "predicted log1p(CP10k)")
    ax_main, ax_cbar = fig.axes
    assert ax_cbar.get_ylabel() == "predicted log1p(CP10k)"
    texts = [t.get_text() for a in ax_main.artists for t in a.findobj(lambda o: hasattr(o, "get_text"))]
    assert "100 µm" in texts  # 800 µm wide image: 20 % is 160 µm -> a 100 µm bar


def test_anndata_of_a_classifier_head_holds_probabilities():
    """A high/low classifier has no expression scale: X is P(high), nothing else is invented."""
    from stimage_embed.inference.anndata_out import build_anndata
    from stimage_embed.inference.predict_tiles import TilePredictions

    grid = tissue_grid(np.ones((50, 80), bool), 10.0, 800, 500, 1.0, 100.0)
    prob = np.random.default_rng(0).random((len(grid), 3)).astype(np.float32)
    pred = TilePredictions(grid.spot_ids, ["a", "b", "c"], {"prob_high": prob})
    adata = build_anndata("S", grid, pred, np.zeros((50, 80, 3), np.uint8), 10.0, {"run_id": "r", "head": "highlow"})
    assert np.array_equal(adata.X, prob) and not adata.layers and adata.uns["stimage_embed"]["X"] == "prob_high"
    assert np.array_equal(adata.obsm["spatial"], np.column_stack([grid.x, grid.y]))
    assert adata.uns["spatial"]["S"]["scalefactors"] == {"tissue_hires_scalef": 0.1, "spot_diameter_fullres": 100.0}
