"""Arrow schemas of the label head's tables, declared once.

* ``label_predictions``: class probabilities of a ``label`` run, LONG: one row per
  (run, slide, spot, class), written by ``compare`` (held-out slides), ``predict`` and
  ``infer`` (image-only tiles). ``label`` is the spot's predicted class (the most probable,
  the same on all its rows); ``prob`` is P(class | the spot's image vector), summing to 1
  over a spot's rows; ``observed`` the spot's stored label of the run's label set (NULL when
  unknown, e.g. an image-only slide).
* ``label_metrics``: scores of a ``label`` run per held-out slide, LONG: one row per
  (run, slide, metric[, class]). Metrics: ``macro_f1``, ``balanced_accuracy``,
  ``accuracy``, ``chance`` (1 / classes present in the slide's truth), ``n_spots``, and
  ``f1`` per class (``class`` set; NULL for the slide-level metrics).

Rows of a run count only once its ``runs`` row is committed (written last).
"""

from __future__ import annotations

import pyarrow as pa

LABEL_PREDICTIONS_TABLE = "label_predictions"
LABEL_METRICS_TABLE = "label_metrics"

LABEL_PREDICTIONS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("slide_id", pa.string(), nullable=False),
        pa.field("spot_id", pa.string(), nullable=False),
        pa.field("class", pa.string(), nullable=False),
        pa.field("prob", pa.float32()),  # P(class | image vector), 0..1
        pa.field("label", pa.string()),  # the spot's predicted class (argmax of prob)
        pa.field("observed", pa.string()),  # the spot's stored label, NULL when unknown
    ]
)
LABEL_PREDICTION_KEYS = ("run_id", "slide_id", "spot_id", "class")

LABEL_METRICS = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string()),
        pa.field("backbone", pa.string()),
        pa.field("head", pa.string()),
        pa.field("fold", pa.string()),
        pa.field("control", pa.string()),  # none | shuffled (training labels permuted within slides)
        pa.field("label_set", pa.string()),
        pa.field("slide_id", pa.string()),  # the held-out slide
        pa.field("metric", pa.string()),  # macro_f1 | balanced_accuracy | accuracy | chance | n_spots | f1
        pa.field("class", pa.string()),  # f1: the class; NULL otherwise
        pa.field("value", pa.float64()),
    ]
)
