"""Overlay tiles: a run's spots drawn as disks of their true diameter (µm -> level-0 px via the
slide's µm/px) over the deep-zoom grid, coloured by one layer, transparent elsewhere (PNG).

Layers and their colour scales:

* ``predicted`` / ``measured``: log1p(CP10k), viridis, ONE shared scale per (run, slide,
  gene): the min and max over both columns' finite values, so side-by-side maps compare;
* ``epistemic``: between-member variance of the predicted mean (counts^2), magma, [0, max];
* ``prob_high``: P(high), coolwarm, [0, 1];
* ``leiden``: cluster labels, tab20 (categorical);
* label runs (:mod:`stimage_embed.viewer.label_queries`): ``prob_class``: P(class) of the
  picked class, viridis, [0, 1]; ``label`` (predicted class) and ``observed_label`` (stored
  class): tab10 (categorical), ONE colour per class shared by both, in the run's class order.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import matplotlib
import numpy as np
import polars as pl
from PIL import Image, ImageDraw

LAYERS = ("predicted", "measured", "epistemic", "prob_high", "leiden", "prob_class", "label", "observed_label")
#: layers with a continuous scale, drawn from a float column of the same name
NUMERIC = ("predicted", "measured", "epistemic", "prob_high", "prob_class")
#: categorical layers -> the frame column holding their labels
CATEGORICAL = {"leiden": "cluster", "label": "label", "observed_label": "observed_label"}
CMAPS = {
    "predicted": "viridis",
    "measured": "viridis",
    "epistemic": "magma",
    "prob_high": "coolwarm",
    "leiden": "tab20",
    "prob_class": "viridis",
    "label": "tab10",
    "observed_label": "tab10",
}
#: opacity of the drawn disks (0-255); the page sets the layer's opacity on top
ALPHA = 230


def lut(name: str) -> np.ndarray:
    """(256, 3) uint8 colours of a matplotlib colour map."""
    cmap = matplotlib.colormaps[name]
    return (np.asarray(cmap(np.linspace(0, 1, 256)))[:, :3] * 255).round().astype(np.uint8)


def palette(name: str) -> np.ndarray:
    """(n, 3) uint8 colours of a qualitative matplotlib map (tab10: 10, tab20: 20)."""
    return (np.asarray(matplotlib.colormaps[name].colors)[:, :3] * 255).round().astype(np.uint8)


def hex_colors(rgb: np.ndarray) -> list[str]:
    return ["#" + "".join(f"{int(v):02x}" for v in c) for c in rgb]


def _finite_range(*arrays: np.ndarray) -> tuple[float, float] | None:
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if vals.size == 0:
        return None
    return float(vals.min()), float(vals.max())


@dataclass
class SpotLayers:
    """A run's values for one slide and gene, ready to draw. ``x``/``y``: spot centres (level-0
    px); ``radius_px``: spot radius in level-0 px; ``scales``: layer -> (lo, hi) or, for
    ``leiden``, the sorted labels; ``colors``: layer -> (n, 4) RGBA per spot (alpha 0 = not drawn)."""

    frame: pl.DataFrame
    x: np.ndarray
    y: np.ndarray
    radius_px: float
    scales: dict[str, object] = field(default_factory=dict)
    colors: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def build(
        cls, frame: pl.DataFrame, um_per_px: float, spot_diameter_um: float, classes: list[str] | None = None
    ) -> SpotLayers:
        """From :func:`stimage_embed.viewer.queries.values` (or
        :func:`~stimage_embed.viewer.label_queries.label_values`) rows and the slide's geometry;
        ``classes``: a label run's classes (the colour order of its categorical layers)."""
        obj = cls(
            frame=frame,
            x=frame["pixel_x"].to_numpy().astype(np.float64),
            y=frame["pixel_y"].to_numpy().astype(np.float64),
            radius_px=spot_diameter_um / 2.0 / um_per_px,
        )
        col = {k: frame[k].cast(pl.Float64).fill_null(np.nan).to_numpy() for k in NUMERIC if k in frame.columns}
        shared = _finite_range(*(col[k] for k in ("predicted", "measured") if k in col)) if "predicted" in col else None
        for layer, v in col.items():
            if not np.isfinite(v).any():
                continue
            if layer in ("predicted", "measured"):
                lo, hi = shared
            elif layer == "epistemic":
                lo, hi = 0.0, float(np.nanmax(v))
            else:
                lo, hi = 0.0, 1.0
            obj.scales[layer] = (lo, hi)
            idx = np.clip(np.nan_to_num((v - lo) / ((hi - lo) or 1.0) * 255), 0, 255).round().astype(np.int64)
            rgba = np.zeros((len(v), 4), np.uint8)
            rgba[:, :3] = lut(CMAPS[layer])[idx]
            rgba[:, 3] = np.where(np.isfinite(v), ALPHA, 0)
            obj.colors[layer] = rgba
        seen = {k: frame[c].drop_nulls().unique().to_list() for k, c in CATEGORICAL.items() if c in frame.columns}
        order = list(classes or []) + sorted(
            {x for k in ("label", "observed_label") for x in seen.get(k, [])} - set(classes or [])
        )
        for layer, present in seen.items():
            if not present:
                continue
            names = sorted(present, key=lambda s: (len(s), s)) if layer == "leiden" else order
            obj._categorical(layer, frame[CATEGORICAL[layer]].to_list(), names)
        return obj

    def _categorical(self, layer: str, labels: list, names: list[str]) -> None:
        """Colour each spot by its label's position in ``names`` (palette of the layer's map)."""
        pal = palette(CMAPS[layer])
        code = {n: i for i, n in enumerate(names)}
        rgba = np.zeros((len(labels), 4), np.uint8)
        for i, lab in enumerate(labels):
            if lab is not None:
                rgba[i, :3] = pal[code[lab] % len(pal)]
                rgba[i, 3] = ALPHA
        self.scales[layer] = names
        self.colors[layer] = rgba

    def legend(self) -> dict:
        """Per available layer: its scale and colour ramp (hex), for the page's legend."""
        out = {}
        for layer, scale in self.scales.items():
            if layer in CATEGORICAL:
                pal = palette(CMAPS[layer])
                out[layer] = {"labels": scale, "colors": hex_colors(pal[[i % len(pal) for i in range(len(scale))]])}
            else:
                out[layer] = {"lo": scale[0], "hi": scale[1], "colors": hex_colors(lut(CMAPS[layer])[::8])}
        return out

    def render(self, layer: str, box: tuple[float, float, float, float, float]) -> Image.Image:
        """RGBA tile of ``layer`` for ``box`` = (x0, y0, w, h, scale) from
        :meth:`stimage_embed.viewer.deepzoom.SlideTiles.tile_box`."""
        x0, y0, w, h, scale = box
        img = Image.new("RGBA", (int(w), int(h)), (0, 0, 0, 0))
        rgba = self.colors.get(layer)
        if rgba is None:
            return img
        r = self.radius_px
        hit = (
            (self.x + r >= x0)
            & (self.x - r <= x0 + w * scale)
            & (self.y + r >= y0)
            & (self.y - r <= y0 + h * scale)
            & (rgba[:, 3] > 0)
        )
        draw = ImageDraw.Draw(img)
        rz = max(r / scale, 0.5)
        for i in np.flatnonzero(hit):
            cx, cy = (self.x[i] - x0) / scale, (self.y[i] - y0) / scale
            draw.ellipse((cx - rz, cy - rz, cx + rz, cy + rz), fill=tuple(int(c) for c in rgba[i]))
        return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()
