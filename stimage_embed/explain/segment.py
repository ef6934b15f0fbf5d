"""Nuclei segmentation of an RGB H&E tile, with sizes in µm.

Every segmenter takes an RGB uint8 tile ``(H, W, 3)`` and its resolution (µm per tile px)
and returns an int32 label image: 0 = not a nucleus, ``1..N`` = nuclei (consecutive).

* ``hed`` (default, offline, CPU): colour deconvolution (:func:`skimage.color.rgb2hed`) to the
  haematoxylin optical density minus ``eosin_weight`` times the eosin density (purple stroma
  carries haematoxylin too under the fixed Ruifrok stain vectors; nuclei carry little eosin),
  Gaussian smoothing, a threshold (Otsu over the tile, or a
  local mean threshold) floored at an absolute haematoxylin density so that a tile of stroma
  or glass finds no nuclei, then a watershed on the distance transform (one marker per
  local maximum at least ``peak_distance_um`` apart) to split touching nuclei, and size
  limits in µm².
* ``cellpose`` / ``stardist``: adapters to those packages, run only when their model weights
  are present at an explicit local path; otherwise :class:`SegmenterUnavailable` says so in
  one line (they are not dependencies of this package and are never downloaded).

Add a segmenter with :func:`register_segmenter`: a name and a factory ``(weights_path) -> Segmenter``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_local, threshold_otsu
from skimage.morphology import remove_small_objects
from skimage.segmentation import relabel_sequential, watershed

from stimage_embed.errors import StimageError


class SegmenterUnavailable(StimageError):
    """A segmenter's package or weights are not available here (one line says which)."""


class Segmenter(Protocol):
    """Segments nuclei: ``segment(rgb uint8 (H, W, 3), um_per_px) -> int32 labels (H, W)``."""

    name: str

    def segment(self, rgb: np.ndarray, um_per_px: float) -> np.ndarray: ...


@dataclass(frozen=True)
class HedSegmenter:
    """Haematoxylin threshold + distance-transform watershed (see the module docstring).

    Sizes in µm / µm²; ``min_h``: the least nuclear score (haematoxylin - ``eosin_weight`` x
    eosin optical density, ``rgb2hed`` units) a nucleus pixel may have whatever the threshold;
    ``threshold``: ``otsu`` | ``local``.
    """

    min_area_um2: float = 12.0
    max_area_um2: float = 400.0
    smooth_um: float = 0.6
    peak_distance_um: float = 3.0
    min_h: float = 0.05
    eosin_weight: float = 2.0
    threshold: str = "otsu"
    local_block_um: float = 25.0
    name: str = "hed"

    def foreground(self, rgb: np.ndarray, um_per_px: float) -> np.ndarray:
        """Boolean nuclei mask before splitting: smoothed haematoxylin above the threshold."""
        hed = rgb2hed(rgb)
        h = gaussian(hed[..., 0] - self.eosin_weight * hed[..., 1], sigma=max(self.smooth_um / um_per_px, 0.1))
        if self.threshold == "local":
            block = max(3, int(round(self.local_block_um / um_per_px)) | 1)
            cut = threshold_local(h, block_size=block, method="mean")
        elif self.threshold == "otsu":
            cut = threshold_otsu(h) if np.ptp(h) > 0 else np.inf
        else:
            raise ValueError(f"threshold must be otsu or local, got {self.threshold!r}")
        mask = (h > cut) & (h > self.min_h)
        mask = ndi.binary_opening(mask, iterations=1)
        return ndi.binary_fill_holes(mask)

    def segment(self, rgb: np.ndarray, um_per_px: float) -> np.ndarray:
        """Label image of the nuclei of ``rgb`` (µm per px ``um_per_px``)."""
        check_tile(rgb, um_per_px)
        px_area = um_per_px**2
        mask = remove_small_objects(self.foreground(rgb, um_per_px), max_size=int(self.min_area_um2 / px_area) - 1)
        if not mask.any():
            return np.zeros(rgb.shape[:2], np.int32)
        dist = ndi.distance_transform_edt(mask)
        comps, _ = ndi.label(mask)
        peaks = peak_local_max(
            dist, min_distance=max(1, int(round(self.peak_distance_um / um_per_px))), labels=comps, exclude_border=False
        )
        markers = np.zeros(mask.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        labels = watershed(-dist, markers, mask=mask)
        areas = np.bincount(labels.ravel()) * px_area
        bad = (areas < self.min_area_um2) | (areas > self.max_area_um2)
        bad[0] = False
        labels[bad[labels]] = 0
        return relabel_sequential(labels)[0].astype(np.int32)


def check_tile(rgb: np.ndarray, um_per_px: float) -> None:
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 tile (H, W, 3), got {rgb.dtype} {rgb.shape}")
    if not (np.isfinite(um_per_px) and um_per_px > 0):
        raise ValueError(f"um_per_px must be a positive number, got {um_per_px}")


def _weights_file(name: str, weights: str | Path | None) -> Path:
    if weights is None:
        raise SegmenterUnavailable(f"segmenter {name!r}: no weights given; pass --segmenter-weights PATH (local file)")
    path = Path(weights).expanduser()
    if not path.exists():
        raise SegmenterUnavailable(f"{path}: segmenter {name!r}: weights not found at this path")
    if importlib.util.find_spec(name) is None:
        raise SegmenterUnavailable(f"segmenter {name!r}: the {name} package is not installed (pip install {name})")
    return path


@dataclass(frozen=True)
class CellposeSegmenter:
    """Cellpose with a local pretrained model file; the nucleus diameter is given in µm."""

    weights: Path
    diameter_um: float = 8.0
    name: str = "cellpose"

    def segment(self, rgb: np.ndarray, um_per_px: float) -> np.ndarray:
        check_tile(rgb, um_per_px)
        from cellpose import models  # optional package, checked by _weights_file

        model = models.CellposeModel(pretrained_model=str(self.weights), gpu=False)
        masks = model.eval(rgb, diameter=self.diameter_um / um_per_px)[0]
        return relabel_sequential(np.asarray(masks, np.int32))[0].astype(np.int32)


@dataclass(frozen=True)
class StardistSegmenter:
    """StarDist 2D from a local model folder (``config.json`` + weights)."""

    weights: Path
    name: str = "stardist"

    def segment(self, rgb: np.ndarray, um_per_px: float) -> np.ndarray:
        check_tile(rgb, um_per_px)
        from csbdeep.utils import normalize  # optional packages, checked by _weights_file
        from stardist.models import StarDist2D

        model = StarDist2D(None, name=self.weights.name, basedir=str(self.weights.parent))
        labels = model.predict_instances(normalize(rgb, 1, 99.8, axis=(0, 1)))[0]
        return relabel_sequential(np.asarray(labels, np.int32))[0].astype(np.int32)


def _hed(weights: str | Path | None) -> Segmenter:
    return HedSegmenter()


def _cellpose(weights: str | Path | None) -> Segmenter:
    return CellposeSegmenter(_weights_file("cellpose", weights))


def _stardist(weights: str | Path | None) -> Segmenter:
    return StardistSegmenter(_weights_file("stardist", weights))


@dataclass
class SegmenterRegistry:
    """Segmenter name -> factory ``(weights path or None) -> Segmenter``."""

    factories: dict[str, Callable[[str | Path | None], Segmenter]]

    def register(self, name: str, factory: Callable[[str | Path | None], Segmenter]) -> None:
        if name in self.factories:
            raise ValueError(f"segmenter {name!r} is already registered")
        self.factories[name] = factory

    def create(self, name: str, weights: str | Path | None = None) -> Segmenter:
        """The segmenter ``name``; :class:`SegmenterUnavailable` when it cannot run here."""
        if name not in self.factories:
            raise SegmenterUnavailable(f"unknown segmenter {name!r}; known: {', '.join(sorted(self.factories))}")
        return self.factories[name](weights)


#: the registered segmenters (``hed`` is the default)
SEGMENTERS = SegmenterRegistry({"hed": _hed, "cellpose": _cellpose, "stardist": _stardist})
DEFAULT_SEGMENTER = "hed"


def register_segmenter(name: str, factory: Callable[[str | Path | None], Segmenter]) -> None:
    """Add a segmenter under ``name`` (see :class:`SegmenterRegistry`)."""
    SEGMENTERS.register(name, factory)


def get_segmenter(name: str = DEFAULT_SEGMENTER, weights: str | Path | None = None) -> Segmenter:
    """A registered segmenter by name (``weights``: local weights path for cellpose/stardist)."""
    return SEGMENTERS.create(name, weights)
