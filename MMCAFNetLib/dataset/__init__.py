"""Lung-PET-CT-Dx data: metadata.csv, bounding-box annotations, the indexer and the cohort table."""

from __future__ import annotations

from MMCAFNetLib.dataset.annotations import (
    AnnotationError,
    SliceBox,
    parse_annotation_file,
    read_patient_annotations,
)
from MMCAFNetLib.dataset.cohort import cohort_columns, read_cohort, write_cohort
from MMCAFNetLib.dataset.indexer import (
    IndexResult,
    find_clinical_sheet,
    format_summary,
    index_download,
    match_clinical_ids,
)
from MMCAFNetLib.dataset.metadata import (
    METADATA_COLUMNS,
    class_of_subject,
    parse_file_size,
    read_metadata,
    short_id,
)
from MMCAFNetLib.dataset.report import IndexReport
from MMCAFNetLib.dataset.splits import assign_splits

__all__ = [
    "METADATA_COLUMNS",
    "AnnotationError",
    "IndexReport",
    "IndexResult",
    "SliceBox",
    "assign_splits",
    "class_of_subject",
    "cohort_columns",
    "find_clinical_sheet",
    "format_summary",
    "index_download",
    "match_clinical_ids",
    "parse_annotation_file",
    "parse_file_size",
    "read_cohort",
    "read_metadata",
    "read_patient_annotations",
    "short_id",
    "write_cohort",
]
