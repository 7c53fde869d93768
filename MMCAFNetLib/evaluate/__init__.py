"""Evaluation: metrics, patient-level aggregation, the Markdown report with its plots."""

from __future__ import annotations

from MMCAFNetLib.evaluate.aggregation import AGGREGATIONS, aggregate_by_patient
from MMCAFNetLib.evaluate.metrics import (
    THRESHOLD_METHODS,
    binary_metrics,
    bootstrap_ci,
    calibration_curve,
    confusion_matrix,
    expected_calibration_error,
    macro_auroc,
    multiclass_metrics,
    one_vs_rest_auroc,
    roc_auc,
    roc_curve,
    select_threshold,
)

__all__ = [
    "AGGREGATIONS",
    "THRESHOLD_METHODS",
    "aggregate_by_patient",
    "binary_metrics",
    "bootstrap_ci",
    "calibration_curve",
    "confusion_matrix",
    "expected_calibration_error",
    "macro_auroc",
    "multiclass_metrics",
    "one_vs_rest_auroc",
    "roc_auc",
    "roc_curve",
    "select_threshold",
]
