"""From predicted expression to patients: the clinical table, expression per patient,
survival (lifelines) and treatment response (sklearn RBF-SVM, nested CV).

The last stage of the data flow: it reads predictions and counts, never trains a head.
"""

from stimage_embed.downstream.analysis import SYNTHETIC_NOTE, load_cohort, run_response, run_survival
from stimage_embed.downstream.clinical_table import AddResult, add_clinical, read_clinical, read_clinical_csv
from stimage_embed.downstream.patient_expression import (
    file_expression,
    measured_expression,
    predicted_expression,
    unit_expression,
    wide_matrix,
)
from stimage_embed.downstream.response import ResponseResult, binary_labels, nested_cv_auc
from stimage_embed.downstream.survival import SurvivalResult, survival_analysis, survival_frame, univariate_cox

__all__ = [
    "SYNTHETIC_NOTE",
    "AddResult",
    "ResponseResult",
    "SurvivalResult",
    "add_clinical",
    "binary_labels",
    "file_expression",
    "load_cohort",
    "measured_expression",
    "nested_cv_auc",
    "predicted_expression",
    "read_clinical",
    "read_clinical_csv",
    "run_response",
    "run_survival",
    "survival_analysis",
    "survival_frame",
    "unit_expression",
    "univariate_cox",
    "wide_matrix",
]
