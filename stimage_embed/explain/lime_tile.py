"""LIME over the nuclei and background regions of one tile (``lime.lime_image``).

The interpretable features are the tile's segments: every nucleus (features ``0..N-1``, in
label order) and the non-nucleus pixels cut into a ``grid x grid`` lattice of background
regions (features ``N..``; empty cells dropped). A perturbed tile keeps a random subset of the
segments and paints the others with the *hide colour*: the median RGB of the tile's
background pixels, so a hidden nucleus becomes the tissue around it (LIME's default, the mean
colour of the segment itself, would leave a nucleus-coloured blob in place).

LIME fits a weighted ridge regression of the model's output (log1p(CP10k) or P(high)) on the
kept/hidden indicators: a feature's weight is the change of the prediction it explains, in
the output's units; ``r2`` is the fit's R² on the perturbed samples. Reproducible for a fixed
``seed`` (LIME's sampler and its segmentation seed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from lime.lime_image import LimeImageExplainer

#: LIME's default neighbourhood size (``explain_instance(num_samples=1000)``)
DEFAULT_SAMPLES = 1000
#: background lattice (cells per side)
BACKGROUND_GRID = 4


@dataclass
class TileExplanation:
    """``segments``: int (H, W) feature index per pixel; ``n_nuclei``: features ``0..n-1`` are
    nuclei; ``weights``: (n_features,) LIME weights (model-output units); ``prediction``: the
    model on the unperturbed tile; ``local_pred``/``intercept``/``r2``: the surrogate's."""

    segments: np.ndarray
    n_nuclei: int
    weights: np.ndarray
    intercept: float
    r2: float
    local_pred: float
    prediction: float
    hide_color: tuple[float, float, float]

    @property
    def nucleus_weights(self) -> np.ndarray:
        return self.weights[: self.n_nuclei]


def explanation_segments(labels: np.ndarray, grid: int = BACKGROUND_GRID) -> tuple[np.ndarray, int]:
    """(segments, n_nuclei): nucleus label ``k`` -> feature ``k-1``; background pixels -> one
    feature per non-empty cell of a ``grid x grid`` lattice, numbered after the nuclei."""
    h, w = labels.shape
    n = int(labels.max())
    rows = np.minimum(np.arange(h) * grid // h, grid - 1)
    cols = np.minimum(np.arange(w) * grid // w, grid - 1)
    cell = rows[:, None] * grid + cols[None, :]
    bg = labels == 0
    used = np.unique(cell[bg])
    remap = np.full(grid * grid, -1, np.int64)
    remap[used] = n + np.arange(len(used))
    segments = np.where(bg, remap[cell], labels.astype(np.int64) - 1)
    return segments.astype(np.int64), n


def hide_color(tile: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """Median RGB of the non-nucleus pixels (all pixels when every pixel is a nucleus)."""
    px = tile[labels == 0] if (labels == 0).any() else tile.reshape(-1, 3)
    return tuple(float(v) for v in np.median(px.reshape(-1, 3), axis=0))


def explain_tile(
    tile: np.ndarray,
    labels: np.ndarray,
    classifier: Callable[[np.ndarray], np.ndarray],
    num_samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 32,
) -> TileExplanation:
    """LIME of ``classifier`` (``tiles -> (N, 1)``) on ``tile`` (RGB uint8) over the nuclei of
    ``labels`` (int, 0 = not a nucleus) and background regions (see the module docstring)."""
    segments, n_nuclei = explanation_segments(labels)
    n_features = int(segments.max()) + 1
    hide = hide_color(tile, labels)
    explainer = LimeImageExplainer(random_state=seed)
    exp = explainer.explain_instance(
        tile,
        classifier,
        labels=(0,),
        hide_color=hide,
        top_labels=None,
        num_features=n_features,
        num_samples=num_samples,
        batch_size=batch_size,
        segmentation_fn=lambda _img: segments,
        random_seed=seed,
    )
    weights = np.zeros(n_features)
    for feature, value in exp.local_exp[0]:
        weights[feature] = value
    prediction = float(np.asarray(classifier(tile[None]))[0, 0])
    return TileExplanation(
        segments=segments,
        n_nuclei=n_nuclei,
        weights=weights,
        intercept=float(exp.intercept[0]),
        r2=float(exp.score),
        local_pred=float(np.ravel(exp.local_pred)[0]),
        prediction=prediction,
        hide_color=hide,
    )


def occlude(tile: np.ndarray, segments: np.ndarray, features: list[int], color: tuple[float, ...]) -> np.ndarray:
    """``tile`` with the pixels of ``features`` painted ``color`` (as LIME hides them)."""
    out = tile.copy()
    out[np.isin(segments, features)] = np.asarray(color)  # cast as LIME casts its hide colour
    return out


def occlusion_deltas(
    tile: np.ndarray,
    ex: TileExplanation,
    classifier: Callable[[np.ndarray], np.ndarray],
    features: list[int],
) -> np.ndarray:
    """Prediction with each feature hidden alone minus the unperturbed prediction (one batch)."""
    batch = np.stack([occlude(tile, ex.segments, [f], ex.hide_color) for f in features])
    return np.asarray(classifier(batch))[:, 0] - ex.prediction
