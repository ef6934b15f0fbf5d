"""Arrow schemas of the explanation and cluster tables, declared once.

Units: centroids in level-0 slide px and in µm (level-0 px x the slide's µm/px); areas in
µm²; lengths in µm; intensities in optical density (``skimage.color.rgb2hed``).
"""

from __future__ import annotations

import pyarrow as pa

#: One row per (run, slide, spot, gene, nucleus): the nucleus's morphology and its LIME
#: weight for the gene's prediction (``explain``). ``weight`` is in the units of ``value``
#: (predicted log1p(CP10k), P(high) for a classifier head, P(class) for a label model, whose
#: classes stand in ``gene``): the change of the prediction
#: LIME attributes to keeping the nucleus. ``r2``: the LIME surrogate's R² on its samples
#: (one value per explained tile, repeated on its nuclei).
NUCLEI = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("gene", pa.string(), nullable=False),
        pa.field("nucleus", pa.int32(), nullable=False),  # label within the tile, 1..N
        pa.field("centroid_x_px", pa.float64()),  # level-0 px (column)
        pa.field("centroid_y_px", pa.float64()),  # level-0 px (row)
        pa.field("centroid_x_um", pa.float64()),
        pa.field("centroid_y_um", pa.float64()),
        pa.field("area_um2", pa.float64()),
        pa.field("perimeter_um", pa.float64()),
        pa.field("eccentricity", pa.float64()),
        pa.field("solidity", pa.float64()),
        pa.field("mean_h", pa.float64()),  # mean haematoxylin optical density
        pa.field("mean_e", pa.float64()),  # mean eosin optical density
        pa.field("weight", pa.float64()),  # LIME weight (units of `value`)
        pa.field("r2", pa.float64()),  # explanation R² of the tile
        pa.field("value", pa.string()),  # mean_log1p | prob_high | prob_class: what was explained
        pa.field("prediction", pa.float64()),  # the model's value on the unperturbed tile
        pa.field("segmenter", pa.string()),
        pa.field("samples", pa.int32()),  # LIME samples
        pa.field("seed", pa.int64()),
    ]
)
NUCLEI_KEYS = ("run_id", "slide_id", "spot_id", "gene", "nucleus")

#: Leiden clusters of predicted profiles: one row per (run, slide, spot) (``cluster``, ``infer``).
CLUSTERS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("leiden", pa.string(), nullable=False),  # cluster label "0", "1", ... (largest first)
        pa.field("resolution", pa.float64()),  # Leiden resolution
        pa.field("value", pa.string()),  # mean_log1p | prob_high: the profiles clustered
    ]
)
CLUSTERS_KEYS = ("run_id", "slide_id", "spot_id")
