"""The one internal form every reader produces: a slide, its spots, its raw counts.

Units
-----
* ``pixel_x`` / ``pixel_y``: spot centre in **full-resolution image pixels** (level 0),
  x = column, y = row.
* ``um_per_px``: micrometres per full-resolution pixel.
* ``counts``: **raw integer UMI counts** (never normalised), spots x genes, CSR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp


@dataclass
class SlideData:
    """One section as read from disk, before any QC.

    Attributes
    ----------
    slide_id : unique id of the section within its dataset (e.g. ``"B4"``).
    patient : patient / individual id (for grouped splits).
    image_path : path of the H&E image (JPEG, TIFF, pyramidal TIFF, SVS ...).
    spot_ids : (n_spots,) str, unique per slide.
    array_row, array_col : (n_spots,) int, array (grid) coordinates.
    pixel_x, pixel_y : (n_spots,) float, spot centres in full-resolution pixels.
    counts : (n_spots, n_genes) ``scipy.sparse.csr_matrix`` of raw integer counts.
    genes : (n_genes,) unique gene symbols (the vocabulary).
    gene_ids : optional (n_genes,) stable ids (e.g. Ensembl) aligned with ``genes``.
    um_per_px : micrometres per full-resolution pixel, or ``None`` if the reader has no
        metadata for it (the catalog layer then estimates it from the spot pitch).
    um_per_px_source : ``"metadata"``, ``"catalog"`` or ``"estimated_from_pitch"``.
    skipped_spots : spot ids dropped by the reader, with a reason (reported, not fatal).
    source_files : the files the slide was read from, for error messages and provenance.
    """

    slide_id: str
    patient: str
    image_path: Path
    spot_ids: np.ndarray
    array_row: np.ndarray
    array_col: np.ndarray
    pixel_x: np.ndarray
    pixel_y: np.ndarray
    counts: sp.csr_matrix
    genes: np.ndarray
    gene_ids: np.ndarray | None = None
    um_per_px: float | None = None
    um_per_px_source: str | None = None
    skipped_spots: dict[str, str] = field(default_factory=dict)
    source_files: dict[str, str] = field(default_factory=dict)
    #: optional (n_spots,) area of each spot in µm² (a Xenium cell, a Visium HD bin)
    area_um2: np.ndarray | None = None

    @property
    def n_spots(self) -> int:
        return int(len(self.spot_ids))

    @property
    def n_genes(self) -> int:
        return int(len(self.genes))
