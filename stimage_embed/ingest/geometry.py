"""Spot-lattice geometry: how many image pixels one array step spans, and µm per pixel.

µm/px comes from metadata when there is any; otherwise it is estimated from the spot
lattice: a least-squares fit of the pixel centres (level-0 px) on the array coordinates
gives the pixel length of one array step along each axis, and one array step is a known
physical length (the catalog's ``array_step_um``, by default the spot pitch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stimage_embed.errors import InputError


@dataclass(frozen=True)
class LatticeFit:
    px_per_step_x: float  # level-0 px per array-column step
    px_per_step_y: float  # level-0 px per array-row step
    rmse_px: float  # residual of the affine fit, level-0 px

    def um_per_px(self, array_step_um: float) -> float:
        """Isotropic estimate: the step length over the geometric mean of both axes."""
        return float(array_step_um / np.sqrt(self.px_per_step_x * self.px_per_step_y))


def fit_lattice(
    array_col: np.ndarray, array_row: np.ndarray, pixel_x: np.ndarray, pixel_y: np.ndarray
) -> LatticeFit | None:
    """Affine fit pixel ~ A @ (col, row, 1). ``None`` if the spots don't span 2-D."""
    design = np.column_stack([array_col, array_row, np.ones(len(array_col))]).astype(float)
    if len(array_col) < 3 or np.linalg.matrix_rank(design) < 3:
        return None
    target = np.column_stack([pixel_x, pixel_y]).astype(float)
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    resid = target - design @ coef
    return LatticeFit(
        px_per_step_x=float(np.hypot(coef[0, 0], coef[0, 1])),
        px_per_step_y=float(np.hypot(coef[1, 0], coef[1, 1])),
        rmse_px=float(np.sqrt((resid**2).sum(1).mean())),
    )


def resolve_um_per_px(
    from_reader: float | None,
    reader_source: str | None,
    from_image: float | None,
    fit: LatticeFit | None,
    array_step_um: float,
    catalog_file: str | Path | None,
    slide_id: str,
) -> tuple[float, str]:
    """Pick µm/px: reader/catalog value > image metadata > lattice estimate.

    Raises :class:`InputError` (field ``um_per_px``) when none is available.
    """
    if from_reader:
        return float(from_reader), reader_source or "catalog"
    if from_image:
        return float(from_image), "metadata"
    if fit is not None and fit.px_per_step_x > 0 and fit.px_per_step_y > 0:
        return fit.um_per_px(array_step_um), "estimated_from_pitch"
    raise InputError(
        catalog_file,
        f"slides[{slide_id}].um_per_px",
        "µm per pixel is missing (no catalog value, no image metadata) and cannot be estimated "
        "from the spot lattice (need >= 3 spots spanning 2-D array coordinates); set um_per_px",
    )
