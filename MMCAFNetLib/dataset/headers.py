"""DICOM headers of one series, read without pixels, and the series geometry they imply.

Slices are ordered by position along the slice normal (row direction x column direction),
ascending: the order MMCAFNetLib.volume.read_volume uses, so slice index k means the same here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from MMCAFNetLib.dataset.report import IndexReport

_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "InstanceNumber",
    "SliceThickness",
]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class SliceHeader:
    path: str
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    position: np.ndarray  # (3,) LPS mm
    orientation: np.ndarray  # (6,) row cosines then column cosines
    pixel_spacing: np.ndarray  # (2,) row spacing, column spacing (DICOM order)
    rows: int
    columns: int
    instance_number: int
    slice_thickness: float


def read_series_headers(series_dir: str | Path, series_uid: str | None, report: IndexReport) -> list[SliceHeader]:
    """Headers of the image files in one folder (not recursive); other series and unreadable files skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(series_dir)
    headers = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError) as exc:
            report.warn("unreadable DICOM file", f"{path}: not a readable DICOM file ({exc})")
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        if series_uid is not None and uid != series_uid:
            report.count("files of another series in a series folder")
            continue
        try:
            headers.append(
                SliceHeader(
                    path=str(path),
                    sop_uid=str(ds.SOPInstanceUID),
                    series_uid=uid,
                    sop_class_uid=str(getattr(ds, "SOPClassUID", "")),
                    position=np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64),
                    orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64),
                    pixel_spacing=np.asarray([float(v) for v in ds.PixelSpacing], dtype=np.float64),
                    rows=int(ds.Rows),
                    columns=int(ds.Columns),
                    instance_number=int(getattr(ds, "InstanceNumber", 0) or 0),
                    slice_thickness=float(getattr(ds, "SliceThickness", 0) or 0),
                )
            )
        except (AttributeError, TypeError, ValueError) as exc:
            report.warn("DICOM slice without geometry", f"{path}: missing or bad geometry tags ({exc}); slice skipped")
    return headers


def slice_normal(orientation: np.ndarray) -> np.ndarray:
    row, col = orientation[:3], orientation[3:6]
    normal = np.cross(row, col)
    return normal / np.linalg.norm(normal)


def sort_slices(headers: list[SliceHeader]) -> list[SliceHeader]:
    """Ascending position along the slice normal (instance number breaks ties)."""
    if not headers:
        return []
    normal = slice_normal(headers[0].orientation)
    return sorted(headers, key=lambda h: (float(h.position @ normal), h.instance_number))


def series_problem(sorted_headers: list[SliceHeader]) -> str | None:
    """Why these slices cannot form one volume (None when they can): the reader would refuse them too."""
    first = sorted_headers[0]
    if any((h.rows, h.columns) != (first.rows, first.columns) for h in sorted_headers):
        return "slices of different sizes"
    if any(not np.allclose(h.orientation, first.orientation, atol=1e-3) for h in sorted_headers):
        return "slices with different orientations"
    dist = np.array([float(h.position @ slice_normal(first.orientation)) for h in sorted_headers])
    if len(dist) > 1 and np.min(np.diff(dist)) < 1e-3:
        return "two or more slices at the same position (several phases or duplicated files)"
    return None


def series_ijk_to_ras(sorted_headers: list[SliceHeader]) -> np.ndarray:
    """4x4 IJK->RAS of the volume these slices make (i = column, j = row, k = sorted slice index)."""
    first = sorted_headers[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:6]
    row_spacing, col_spacing = first.pixel_spacing
    if len(sorted_headers) > 1:
        k_vec = (sorted_headers[-1].position - first.position) / (len(sorted_headers) - 1)
    else:
        k_vec = slice_normal(first.orientation) * (first.slice_thickness or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # i: along a row, next column
    lps[:3, 1] = col_dir * row_spacing  # j: down a column, next row
    lps[:3, 2] = k_vec
    lps[:3, 3] = first.position
    return LPS_TO_RAS @ lps
