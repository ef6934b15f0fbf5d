"""Overlay PNG of one explained tile: the H&E with each nucleus filled by its LIME weight on a
diverging colour map (red: keeping the nucleus raises the prediction, blue: lowers it), the
nuclei outlined, a colour bar in the prediction's units, and the tile's prediction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from skimage.segmentation import find_boundaries

from stimage_embed.explain.lime_tile import TileExplanation

CMAP = "RdBu_r"


def write_overlay(
    path: Path, tile: np.ndarray, labels: np.ndarray, ex: TileExplanation, title: str, value_label: str
) -> Path:
    """Write the overlay of ``ex`` on ``tile`` (``labels``: nuclei 1..N) to ``path`` (PNG)."""
    w = ex.nucleus_weights
    lim = float(np.abs(w).max()) if len(w) and np.abs(w).max() > 0 else 1e-6
    fill = np.full(labels.shape, np.nan)
    inside = labels > 0
    fill[inside] = w[labels[inside] - 1]
    fig = Figure(figsize=(9.5, 4.6))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.12]})
    axes[0].imshow(tile)
    axes[0].set_title("H&E tile")
    axes[1].imshow(tile)
    im = axes[1].imshow(
        np.ma.masked_invalid(fill), cmap=CMAP, norm=TwoSlopeNorm(0.0, -lim, lim), alpha=0.85, interpolation="nearest"
    )
    edge = find_boundaries(labels, mode="inner")
    axes[1].imshow(np.ma.masked_where(~edge, np.ones(labels.shape)), cmap="Greys", vmin=0, vmax=1, alpha=0.6)
    note = "" if ex.n_nuclei else " (no nucleus found: background regions only)"
    axes[1].set_title(f"LIME weight per nucleus ({ex.n_nuclei} nuclei){note}", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    bar = fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.03)
    bar.set_label(f"LIME weight ({value_label})")
    fig.suptitle(f"{title}\nprediction {ex.prediction:.3f} {value_label}; explanation R² {ex.r2:.2f}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
