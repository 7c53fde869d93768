"""Inference: the Predictor (CT + clinical record -> Classification) and the files it writes.

``Predictor.load(path, device="auto")`` then ``predictor.classify(volume, record, lesion=...)``;
``write_outputs`` turns a Classification into prediction.json, heatmap.nrrd, labelmap.nrrd with its
colour table, segmentation.seg.nrrd and preview.png (and, for a DICOM series, segmentation.dcm and
heatmap.dcm), atomically; ``read_heatmap`` reads heatmap.nrrd back as float 0..1 with its geometry and
``result_folder.read_result_folder`` a whole result folder.
"""

from __future__ import annotations

from .outputs import DICOM_OUTPUT_FILES, OUTPUT_FILES, prediction_dict, read_heatmap, write_outputs
from .predictor import (
    HEATMAP_METHODS,
    InputError,
    Predictor,
    class_label,
    class_label_value,
    lesion_box_ras,
    resolve_device,
    validate_ct,
)

__all__ = [
    "DICOM_OUTPUT_FILES",
    "HEATMAP_METHODS",
    "OUTPUT_FILES",
    "InputError",
    "Predictor",
    "class_label",
    "class_label_value",
    "lesion_box_ras",
    "prediction_dict",
    "read_heatmap",
    "resolve_device",
    "validate_ct",
    "write_outputs",
]
