"""Maps print their dynamic range, and can share one colour scale (issue 25: a flat
prediction drawn on its own colour scale looked patterned)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.collections import EllipseCollection

from stimage_embed.evaluation import plot_maps
from stimage_embed.inference.grid import tissue_grid
from stimage_embed.inference.heatmaps import heatmap_figure, shared_scale_of, write_heatmaps


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


@pytest.fixture()
def captured(monkeypatch):
    """The figures ``spatial_maps`` draws, kept instead of freed."""
    figs = []

    def keep(fig, path):
        figs.append(fig)
        return path

    monkeypatch.setattr(plot_maps, "save_figure", keep)
    return figs


def _xy(n: int = 36) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(6) * 100.0, np.arange(6) * 100.0), -1).reshape(-1, 2)[:n]


def test_spatial_maps_print_each_range_and_share_one_scale(tmp_path, captured):
    rng = np.random.default_rng(0)
    measured = rng.uniform(0.0, 3.0, 36)
    flat = 1.0 + 0.01 * rng.uniform(size=36)  # a flat prediction
    plot_maps.spatial_maps(tmp_path / "a.png", _xy(), measured, flat, {}, title="G")
    plot_maps.spatial_maps(tmp_path / "b.png", _xy(), measured, flat, {}, title="G", shared_scale=True)
    own, shared = captured
    for fig in (own, shared):
        assert f"range {np.ptp(measured):.3g}" in _texts(fig.axes[0])
        assert f"range {np.ptp(flat):.3g}" in _texts(fig.axes[2])  # axes: map, colour bar, map, colour bar
    own_norms = [c.norm for c in own.axes[0].collections + own.axes[2].collections if isinstance(c, EllipseCollection)]
    assert own_norms[1].vmax - own_norms[1].vmin < 0.02  # its own scale stretches the flat map
    norms = [c.norm for c in shared.axes[0].collections + shared.axes[2].collections]
    assert (norms[0].vmin, norms[0].vmax) == (norms[1].vmin, norms[1].vmax)
    lo, hi = np.percentile(np.r_[measured, flat], [1, 99])
    assert norms[1].vmin == pytest.approx(lo) and norms[1].vmax == pytest.approx(hi)


def test_heatmaps_print_the_range_and_take_a_shared_scale(tmp_path):
    grid = tissue_grid(np.ones((50, 80), bool), 10.0, 800, 500, 1.0, 100.0)
    thumb = np.full((50, 80, 3), 230, np.uint8)
    values = np.linspace(0.2, 0.28, len(grid))
    fig = heatmap_figure(thumb, 800, 500, grid, values, "G", "log1p", scale=(0.0, 3.0))
    ax = fig.axes[0]
    assert "range 0.08" in _texts(ax)
    assert ax.images[-1].get_clim() == (0.0, 3.0)
    two = np.c_[values, values * 10]
    assert shared_scale_of([two[:, 0], two[:, 1]]) == tuple(np.percentile(two.ravel(), [2, 98]))
    paths = write_heatmaps(tmp_path, thumb, 800, 500, grid, two, ["a", "b"], ["a", "b"], "S", "m", "x", True)
    assert sorted(p.name for p in paths.values()) == ["a.png", "b.png"]
