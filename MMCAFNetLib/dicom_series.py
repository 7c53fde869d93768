"""Reading DICOM CT series into a Volume: series selection, slice ordering, spacing checks, HU.

Headers are parsed once per file with large elements deferred (pydicom's ``defer_size``), so the pixel
data of the chosen series is read afterwards without re-parsing, and the pixels of series that are not
chosen are never read. Geometry is assembled in LPS (DICOM's patient space) and handed to
``volume.ras_from_lps``, the one place where LPS becomes RAS.

Slice-spacing policy (documented because it decides what loads):
- intervals along the slice normal within ``SPACING_TOLERANCE`` (2 % of the median interval, at
  least 0.01 mm) of the median: a regular grid, loaded as is;
- larger deviations whose largest interval is at most ``MAX_GAP_FACTOR`` (3) times the median
  (at most two consecutive missing slices): resampled onto a regular grid at the median interval
  by linear interpolation between neighbouring slices, with a warning naming the gaps;
- a larger gap, or two slices at one position (a multi-phase series or duplicated files): refused,
  because no regular grid represents it without inventing anatomy.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from MMCAFNetLib.grid import Volume, VolumeError, ras_from_lps

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SPACING_TOLERANCE = 0.02
SPACING_TOLERANCE_MIN_MM = 0.01
MAX_GAP_FACTOR = 3.0
ORIENTATION_TOLERANCE = 1e-3
DEFER_SIZE = 4096
_FORCE_SUFFIXES = {"", ".dcm", ".dicom", ".ima"}

DECODE_FIX = (
    "install a decoder plugin for pydicom (`pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "pyjpegls`, or `pip install python-gdcm`), or decompress the files first (e.g. `gdcmconv --raw IN OUT` "
    "or `dcmdjpeg IN OUT`), or load the series in 3D Slicer and save it as NRRD"
)


@dataclass
class DicomSlice:
    """Header facts of one image file (pixel data not yet read)."""

    path: str
    dataset: Any
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    rows: int
    columns: int
    position: Optional[np.ndarray]
    orientation: Optional[np.ndarray]
    pixel_spacing: Optional[tuple[float, float]]
    slope: float
    intercept: float
    number_of_frames: int
    is_localizer: bool


@dataclass
class DicomSeriesInfo:
    """One series found in a folder: what a user needs to choose it."""

    series_uid: str
    modality: str
    sop_class_uid: str
    description: str
    num_files: int
    paths: list[str] = field(default_factory=list)

    @property
    def sop_class_name(self) -> str:
        return _uid_name(self.sop_class_uid)

    @property
    def is_ct_volume(self) -> bool:
        return self.sop_class_uid == CT_IMAGE_STORAGE and self.num_files > 1

    def describe(self) -> str:
        return (
            f"{self.series_uid} ({self.modality or '?'}, {self.sop_class_name}, {self.num_files} file(s), "
            f"description {self.description!r})"
        )


# ---------------------------------------------------------------------------------------------
# header pass


def _uid_name(uid: str) -> str:
    try:
        return pydicom.uid.UID(uid).name
    except Exception:  # pragma: no cover - a malformed UID string
        return str(uid)


def _floats(value: Any, count: int) -> Optional[np.ndarray]:
    if value is None:
        return None
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        return None
    return arr


def _float_or(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _looks_like_dicom(path: str) -> bool:
    """True when the file carries the DICM magic after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_slice_header(path: str) -> DicomSlice:
    """Parse one file's header (pixel data deferred). Raises InvalidDicomError for non-DICOM files."""
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        if Path(path).suffix.lower() not in _FORCE_SUFFIXES:
            raise
        # Old files without the preamble: accept only if they parse to an image header.
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE, force=True)
        if "SOPClassUID" not in ds or "Rows" not in ds:
            raise InvalidDicomError(f"{path} is not a DICOM file") from None
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    spacing = _floats(ds.get("PixelSpacing"), 2)
    raw_slope = ds.get("RescaleSlope")
    if raw_slope is not None and str(raw_slope).strip() != "":
        slope_value = _float_or(raw_slope, float("nan"))
        if not np.isfinite(slope_value) or slope_value == 0:
            # A damaged slope cannot be guessed: 1 would silently give wrong HU.
            raise ValueError(f"RescaleSlope {raw_slope!r} is not a usable number, so HU cannot be computed")
    return DicomSlice(
        path=path,
        dataset=ds,
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        slope=_float_or(ds.get("RescaleSlope", 1.0), 1.0),
        intercept=_float_or(ds.get("RescaleIntercept", 0.0), 0.0),
        number_of_frames=int(_float_or(ds.get("NumberOfFrames", 1), 1.0)),
        is_localizer="LOCALIZER" in image_type,
    )


def scan_folder(folder: str | os.PathLike) -> tuple[dict[str, list[DicomSlice]], list[str], list[str]]:
    """Headers of every image file directly in ``folder`` grouped by SeriesInstanceUID.

    Returns (series -> slices, warnings about corrupt DICOM files, paths of non-DICOM files).
    Files that are DICOM but carry no image (DICOMDIR, structured reports) are skipped silently.
    """
    folder = os.fspath(folder)
    series: dict[str, list[DicomSlice]] = {}
    problems: list[str] = []
    not_dicom: list[str] = []
    names = sorted(os.listdir(folder))
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sl = read_slice_header(path)
        except InvalidDicomError:
            if _looks_like_dicom(path):
                problems.append(f"corrupt DICOM file skipped: {path} (the header cannot be parsed)")
            else:
                not_dicom.append(path)
            continue
        except Exception as exc:  # truncated or damaged file: report it by path, keep the rest
            problems.append(f"corrupt DICOM file skipped: {path} ({type(exc).__name__}: {exc})")
            continue
        if "PixelData" not in sl.dataset and "FloatPixelData" not in sl.dataset:
            if not sl.sop_class_uid:  # neither an image nor a known non-image object
                problems.append(f"corrupt DICOM file skipped: {path} (no SOP Class and no pixel data)")
            elif sl.sop_class_uid == CT_IMAGE_STORAGE or sl.rows > 0:  # an image header whose pixels are gone
                problems.append(f"corrupt DICOM file skipped: {path} (an image header without pixel data)")
            continue
        if sl.rows <= 0 or sl.columns <= 0:
            problems.append(f"DICOM file without image size skipped: {path}")
            continue
        series.setdefault(sl.series_uid, []).append(sl)
    return series, problems, not_dicom


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """The image series in a folder (headers only), largest first. For choosing ``series_uid``."""
    groups, _, _ = scan_folder(folder)
    return _series_infos(groups)


def _series_infos(groups: dict[str, list[DicomSlice]]) -> list[DicomSeriesInfo]:
    infos = []
    for uid, slices in groups.items():
        ds = slices[0].dataset
        infos.append(
            DicomSeriesInfo(
                series_uid=uid,
                modality=str(ds.get("Modality", "") or ""),
                sop_class_uid=slices[0].sop_class_uid,
                description=str(ds.get("SeriesDescription", "") or ""),
                num_files=len(slices),
                paths=[s.path for s in slices],
            )
        )
    infos.sort(key=lambda i: (-i.num_files, i.series_uid))
    return infos


def choose_series(groups: dict[str, list[DicomSlice]], series_uid: Optional[str], folder: str) -> str:
    """The SeriesInstanceUID to read: the one asked for, the only one, or the only CT volume."""
    infos = _series_infos(groups)
    listing = "\n  ".join(i.describe() for i in infos)
    if series_uid is not None:
        if series_uid in groups:
            return series_uid
        raise VolumeError(
            f"series_uid {series_uid!r} is not in {folder}. The folder holds:\n  {listing}\n"
            "Pass one of these SeriesInstanceUIDs."
        )
    if len(infos) == 1:
        return infos[0].series_uid
    ct = [i for i in infos if i.is_ct_volume]
    if len(ct) == 1:
        return ct[0].series_uid
    reason = "several CT Image Storage series" if ct else "no single CT Image Storage series with >1 slice"
    raise VolumeError(
        f"{folder} holds {len(infos)} image series ({reason}), so the CT cannot be chosen "
        f"automatically:\n  {listing}\nPass series_uid=<one of these SeriesInstanceUIDs> "
        "(e.g. read_volume(folder, series_uid=...))."
    )


# ---------------------------------------------------------------------------------------------
# geometry


def _check_uniform_plane(slices: list[DicomSlice]) -> list[str]:
    """Every slice must share size, orientation and pixel spacing; returns warnings."""
    first = slices[0]
    problems = []
    for sl in slices[1:]:
        if (sl.rows, sl.columns) != (first.rows, first.columns):
            problems.append(f"{sl.path} is {sl.rows}x{sl.columns}, {first.path} is {first.rows}x{first.columns}")
        elif (
            sl.orientation is not None
            and first.orientation is not None
            and np.max(np.abs(sl.orientation - first.orientation)) > ORIENTATION_TOLERANCE
        ):
            problems.append(f"{sl.path} has another ImageOrientationPatient than {first.path}")
        elif (
            sl.pixel_spacing is not None
            and first.pixel_spacing is not None
            and not np.allclose(sl.pixel_spacing, first.pixel_spacing, rtol=1e-3, atol=1e-4)
        ):
            problems.append(f"{sl.path} has another PixelSpacing than {first.path}")
        if len(problems) >= 5:
            break
    if problems:
        raise VolumeError(
            "the slices of this series do not share one plane geometry, so they do not form one volume: "
            + "; ".join(problems)
            + ". Choose another series (series_uid=...) or remove the odd files."
        )
    return []


def _orientation(first: DicomSlice, warn: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit row (i), column (j) and normal directions in LPS."""
    if first.orientation is None:
        warn.append("ImageOrientationPatient missing: axial orientation assumed")
        row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    else:
        row, col = first.orientation[:3], first.orientation[3:]
        nr, nc = np.linalg.norm(row), np.linalg.norm(col)
        if nr < 1e-6 or nc < 1e-6:
            raise VolumeError(f"ImageOrientationPatient of {first.path} has a zero vector: {first.orientation}")
        row, col = row / nr, col / nc
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise VolumeError(f"ImageOrientationPatient of {first.path} has parallel row and column vectors")
    return row, col, normal / norm


def _plane_spacing(first: DicomSlice, warn: list[str]) -> tuple[float, float]:
    """(column spacing along i, row spacing along j) in mm."""
    if first.pixel_spacing is None:
        warn.append("PixelSpacing missing: 1 mm pixels assumed")
        return 1.0, 1.0
    row_spacing, col_spacing = first.pixel_spacing
    if row_spacing <= 0 or col_spacing <= 0:
        raise VolumeError(f"PixelSpacing of {first.path} is not positive: {first.pixel_spacing}")
    return col_spacing, row_spacing


def _single_slice_thickness(ds: Any, warn: list[str]) -> float:
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        value = _float_or(ds.get(key), 0.0)
        if value > 0:
            return value
    warn.append("a single slice without SliceThickness: 1 mm assumed along the slice normal")
    return 1.0


def _order_along_normal(slices: list[DicomSlice], normal: np.ndarray) -> tuple[list[DicomSlice], np.ndarray]:
    """Slices sorted by ImagePositionPatient projected on the slice normal (never by file name)."""
    if any(s.position is None for s in slices):
        missing = [s.path for s in slices if s.position is None][:3]
        raise VolumeError(
            f"ImagePositionPatient is missing in {missing}, so the slices cannot be ordered in space. "
            "This is not a volume series (a secondary capture or a scout?); choose another series."
        )
    dist = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(dist, kind="stable")
    return [slices[i] for i in order], dist[order]


def _regular_targets(slices: list[DicomSlice], dist: np.ndarray, warn: list[str]) -> Optional[np.ndarray]:
    """None for evenly spaced slices; the regular target distances when resampling is acceptable."""
    intervals = np.diff(dist)
    nominal = float(np.median(intervals))
    tolerance = max(SPACING_TOLERANCE * nominal, SPACING_TOLERANCE_MIN_MM)
    duplicates = np.flatnonzero(intervals < tolerance) if nominal > 0 else np.arange(len(intervals))
    if nominal <= SPACING_TOLERANCE_MIN_MM or len(duplicates):
        pairs = [(slices[i].path, slices[i + 1].path) for i in duplicates[:3]]
        raise VolumeError(
            f"{len(duplicates)} pair(s) of slices share one position along the slice normal, e.g. {pairs}: "
            "the series holds several phases or time points, or duplicated files. Remove the duplicates or "
            "split the series (e.g. by AcquisitionNumber / TemporalPositionIdentifier) before loading."
        )
    deviation = np.abs(intervals - nominal)
    if float(deviation.max()) <= tolerance:
        return None
    largest = int(np.argmax(intervals))
    described = []
    for i in np.flatnonzero(deviation > tolerance)[:5]:
        missing = round(float(intervals[i] / nominal)) - 1
        described.append(
            f"{intervals[i]:.3f} mm between {os.path.basename(slices[i].path)} (at {dist[i]:.2f} mm) and "
            f"{os.path.basename(slices[i + 1].path)} (at {dist[i + 1]:.2f} mm)"
            + (f", about {missing} missing slice(s)" if missing > 0 else "")
        )
    more = "" if (deviation > tolerance).sum() <= 5 else f" and {(deviation > tolerance).sum() - 5} more"
    if intervals[largest] > MAX_GAP_FACTOR * nominal:
        raise VolumeError(
            f"the series has a gap of {intervals[largest]:.2f} mm between slices (at {dist[largest]:.2f} and "
            f"{dist[largest + 1]:.2f} mm along the slice normal, files {slices[largest].path} and "
            f"{slices[largest + 1].path}) where the usual interval is {nominal:.3f} mm; gaps over "
            f"{MAX_GAP_FACTOR:g} intervals are not filled by interpolation. Uneven intervals: "
            + "; ".join(described)
            + more
            + ". Re-download or re-export the complete series, or choose another series."
        )
    count = round(float((dist[-1] - dist[0]) / nominal)) + 1
    targets = np.linspace(dist[0], dist[-1], count)
    warn.append(
        f"uneven slice spacing (usual interval {nominal:.3f} mm): "
        + "; ".join(described)
        + more
        + f". Resampled onto a regular grid of {count} slices at {targets[1] - targets[0]:.3f} mm by linear "
        "interpolation between neighbouring slices."
    )
    return targets


# ---------------------------------------------------------------------------------------------
# pixels


def _decoder_available(transfer_syntax: str) -> bool:
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pragma: no cover - pydicom 2.x: find out by decoding
        return True
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except NotImplementedError:
        return False


def _check_transfer_syntax(sl: DicomSlice) -> None:
    meta = getattr(sl.dataset, "file_meta", None)
    ts = pydicom.uid.UID(str(meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian)) if meta else "1.2.840.10008.1.2")
    if not ts.is_transfer_syntax:
        raise VolumeError(
            f"{sl.path} declares the transfer syntax {str(ts)!r}, which is not a DICOM transfer syntax, so its "
            "pixel data cannot be interpreted. Re-export the series (or convert it, e.g. with gdcmconv --raw)."
        )
    if not ts.is_compressed:
        return
    if not _decoder_available(ts):
        raise VolumeError(
            f"{sl.path} is compressed with {ts.name} ({ts}), which the installed pydicom cannot decode. "
            f"Fix: {DECODE_FIX}."
        )


def _raw_dtype(ds: Any, little_endian: bool) -> np.dtype:
    bits = int(ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16, 32):
        raise VolumeError(f"BitsAllocated {bits} is not supported for CT pixel data")
    kind = "i" if signed else "u"
    order = "<" if little_endian else ">"
    return np.dtype(f"{order}{kind}{bits // 8}")


def _decode_pixels(sl: DicomSlice) -> np.ndarray:
    """The stored values of one single-frame slice as a (rows, columns) array (no rescale)."""
    ds = sl.dataset
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise VolumeError(
            f"{sl.path} is a colour image (SamplesPerPixel {ds.get('SamplesPerPixel')}), not a CT slice"
        )
    meta = getattr(ds, "file_meta", None)
    ts = pydicom.uid.UID(str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if meta else "1.2.840.10008.1.2")
    expected = sl.rows * sl.columns
    if not ts.is_compressed and "PixelData" in ds:
        dtype = _raw_dtype(ds, ts.is_little_endian)
        data = ds.PixelData
        if len(data) < expected * dtype.itemsize:
            raise VolumeError(
                f"truncated pixel data: {len(data)} bytes where {expected * dtype.itemsize} are needed"
            )
        arr = np.frombuffer(data, dtype=dtype, count=expected).reshape(sl.rows, sl.columns)
        bits_stored = int(ds.get("BitsStored", dtype.itemsize * 8))
        if bits_stored < dtype.itemsize * 8:
            arr = _mask_bits(arr, bits_stored, dtype.kind == "i")
        return arr
    arr = ds.pixel_array  # compressed (a decoder is available) or float pixel data
    if arr.shape != (sl.rows, sl.columns):
        raise VolumeError(f"decoded pixel data has shape {arr.shape}, expected {(sl.rows, sl.columns)}")
    return arr


def _mask_bits(arr: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Keep the low BitsStored bits (and their sign), as the standard asks."""
    width = arr.dtype.itemsize * 8
    native = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    if signed:
        shift = width - bits_stored
        return (native << shift) >> shift
    return native & np.array((1 << bits_stored) - 1, dtype=native.dtype)


def _stack_hu(slices: list[DicomSlice], warn: list[str]) -> tuple[np.ndarray, list[DicomSlice]]:
    """Decode every slice and apply the rescale; unreadable slices are dropped and reported."""
    raw: list[Optional[np.ndarray]] = []
    kept: list[DicomSlice] = []
    for sl in slices:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = _decode_pixels(sl)
        except VolumeError as exc:
            if "colour image" in str(exc) or "not supported" in str(exc):
                raise
            warn.append(f"corrupt DICOM file skipped: {sl.path} ({exc})")
            continue
        except Exception as exc:
            warn.append(f"corrupt DICOM file skipped: {sl.path} ({type(exc).__name__}: {exc})")
            continue
        raw.append(arr)
        kept.append(sl)
    if not kept:
        raise VolumeError("no slice of the series could be decoded: " + "; ".join(warn[-3:]))
    slopes = np.array([s.slope for s in kept])
    intercepts = np.array([s.intercept for s in kept])
    first = raw[0]
    integral = (
        first.dtype.kind in "iu"
        and np.all(slopes == 1.0)
        and np.all(intercepts == intercepts[0])
        and float(intercepts[0]).is_integer()
    )
    if integral and all(r.dtype == first.dtype for r in raw):
        offset = int(intercepts[0])
        lo = min(int(r.min()) for r in raw) + offset
        hi = max(int(r.max()) for r in raw) + offset
        if lo >= -32768 and hi <= 32767:  # exact HU in int16: one pass per slice, no float copy
            out = np.empty((len(raw), first.shape[0], first.shape[1]), dtype=np.int16)
            for k, arr in enumerate(raw):
                np.add(arr, np.int32(offset), out=out[k], dtype=np.int32, casting="unsafe")
            return out, kept
    out = np.empty((len(raw), first.shape[0], first.shape[1]), dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for k, arr in enumerate(raw):
            np.multiply(arr, np.float32(slopes[k]), out=out[k], casting="unsafe")
            out[k] += np.float32(intercepts[k])
            if np.count_nonzero(~np.isfinite(out[k])) > np.count_nonzero(~np.isfinite(arr)):
                raise VolumeError(
                    f"{kept[k].path}: RescaleSlope {slopes[k]:g} and RescaleIntercept {intercepts[k]:g} turn the "
                    "stored values into numbers beyond the float32 range: the header is damaged. Correct the "
                    "rescale values or re-export the series."
                )
    return out, kept


def _interpolate_slices(array: np.ndarray, dist: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Linear interpolation along the slice axis from positions ``dist`` onto ``targets``."""
    out = np.empty((len(targets), *array.shape[1:]), dtype=np.float32)
    upper = np.clip(np.searchsorted(dist, targets, side="left"), 1, len(dist) - 1)
    for m, t in enumerate(targets):
        hi = int(upper[m])
        lo = hi - 1
        w = float((t - dist[lo]) / (dist[hi] - dist[lo]))
        w = min(max(w, 0.0), 1.0)
        if w <= 1e-6:
            out[m] = array[lo]
        elif w >= 1 - 1e-6:
            out[m] = array[hi]
        else:
            out[m] = array[lo] * np.float32(1 - w) + array[hi] * np.float32(w)
    return out


# ---------------------------------------------------------------------------------------------
# patient facts


def parse_age(value: Any) -> Optional[float]:
    """Years as float from a DICOM AS string ("063Y", "006M", "012W", "010D"); None if absent/invalid."""
    if value is None:
        return None
    text = str(value).strip().upper()
    if not text:
        return None
    unit = text[-1]
    number = text[:-1] if unit.isalpha() else text
    try:
        n = float(number)
    except ValueError:
        return None
    if not np.isfinite(n) or n < 0:
        return None
    factor = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}.get(unit if unit.isalpha() else "Y")
    return None if factor is None else n * factor


def patient_meta(ds: Any) -> dict[str, Any]:
    """Plain-data facts from one header: modality, UIDs, patient sex, age (years), weight (kg)."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper() or None
    weight = _float_or(ds.get("PatientWeight"), 0.0)
    return {
        "modality": str(ds.get("Modality", "") or "") or None,
        "series_uid": str(ds.get("SeriesInstanceUID", "") or "") or None,
        "series_description": str(ds.get("SeriesDescription", "") or "") or None,
        "study_uid": str(ds.get("StudyInstanceUID", "") or "") or None,
        "patient_id": str(ds.get("PatientID", "") or "") or None,
        "patient_sex": sex,
        "patient_age": parse_age(ds.get("PatientAge")),
        "patient_weight": weight if weight > 0 else None,
        "sop_class_uid": str(ds.get("SOPClassUID", "") or "") or None,
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "") or "") or None,
    }


# ---------------------------------------------------------------------------------------------
# assembling


def _check_declared_size(slices: list[DicomSlice]) -> None:
    """Refuse sizes no CT has, and sizes memory cannot hold, before any pixel is decoded."""
    from MMCAFNetLib.memory_guard import check_image_allocation

    first = slices[0]
    if first.rows <= 0 or first.columns <= 0:
        raise VolumeError(
            f"{first.path} declares an image of {first.rows} x {first.columns} pixels (Rows x Columns); "
            "both must be positive. The header is damaged: re-export the series."
        )
    bits = int(_float_or(first.dataset.get("BitsAllocated", 16), 16.0))
    raw_bytes = max(1, bits // 8) if bits > 0 else 2
    # every slice's stored values plus the float32 volume (and one more float32 copy when gaps are filled)
    check_image_allocation((len(slices), first.rows, first.columns), raw_bytes + 8, first.path)


def build_volume(slices: list[DicomSlice], source: str, warn: list[str]) -> Volume:
    """One Volume from the image slices of one series (header-parsed, pixels deferred)."""
    multi = [s.path for s in slices if s.number_of_frames > 1]
    if multi:
        raise VolumeError(
            f"{multi[0]} is a multi-frame (enhanced) DICOM object with {slices[0].number_of_frames} frames; "
            "only single-frame series are read. Convert it to NRRD or NIfTI first (3D Slicer, dcm2niix)."
        )
    localizers = [s for s in slices if s.is_localizer]
    if localizers and len(localizers) < len(slices):
        warn.append(f"{len(localizers)} localizer (scout) image(s) left out of the volume")
        slices = [s for s in slices if not s.is_localizer]
    for sl in slices:
        _check_transfer_syntax(sl)
    _check_uniform_plane(slices)
    first = slices[0]
    _check_declared_size(slices)
    row, col, normal = _orientation(first, warn)
    col_spacing, row_spacing = _plane_spacing(first, warn)

    if len(slices) > 1:
        slices, _ = _order_along_normal(slices, normal)
    num_files = len(slices)
    array, slices = _stack_hu(slices, warn)  # corrupt slices dropped (and reported) here

    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, 0] = row * col_spacing
    ijk_to_lps[:3, 1] = col * row_spacing
    targets: Optional[np.ndarray] = None
    dist = np.zeros(1)
    if len(slices) == 1:
        if slices[0].position is None:
            warn.append("ImagePositionPatient missing: origin at (0, 0, 0)")
        origin = slices[0].position if slices[0].position is not None else np.zeros(3)
        ijk_to_lps[:3, 2] = normal * _single_slice_thickness(slices[0].dataset, warn)
        warn.append("a single DICOM slice: the volume has one slice (pass the series folder for the whole series)")
    else:
        slices, dist = _order_along_normal(slices, normal)
        try:
            targets = _regular_targets(slices, dist, warn)
        except VolumeError as exc:
            if len(slices) == num_files:
                raise
            corrupt = [w for w in warn if w.startswith("corrupt")]
            raise VolumeError(f"{exc} The gap comes from unreadable files: {'; '.join(corrupt)}") from exc
        origin = slices[0].position
        steps = (len(targets) - 1) if targets is not None else (len(slices) - 1)
        step = (slices[-1].position - slices[0].position) / steps
        ijk_to_lps[:3, 2] = step
        tilt = float(np.degrees(np.arccos(min(1.0, abs(np.dot(step, normal)) / np.linalg.norm(step)))))
        if tilt > 0.05:
            warn.append(
                f"slices are offset in-plane along the series (gantry tilt of {tilt:.2f} degrees): the volume "
                "grid is sheared (exact geometry kept); resample_to_grid onto an orthogonal grid straightens it"
            )
        if targets is not None:
            array = _interpolate_slices(array, dist, targets)
    ijk_to_lps[:3, 3] = origin

    meta = patient_meta(first.dataset)
    meta.update(
        {
            "source": source,
            "warnings": warn,
            "num_files": len(slices),
            "resampled_slices": targets is not None,
        }
    )
    if targets is None:
        meta["sop_instance_uids"] = [s.sop_instance_uid for s in slices]
        meta["slice_k"] = {s.sop_instance_uid: float(k) for k, s in enumerate(slices)}
    else:
        step_len = (targets[-1] - targets[0]) / max(len(targets) - 1, 1)
        meta["sop_instance_uids"] = None
        meta["slice_k"] = {s.sop_instance_uid: float((d - targets[0]) / step_len) for s, d in zip(slices, dist)}
    return Volume(array, ras_from_lps(ijk_to_lps), meta)


def read_dicom_series(folder: str | os.PathLike, series_uid: Optional[str] = None) -> Volume:
    """Read the CT series in ``folder`` (see the module docstring for the policy)."""
    folder = os.fspath(folder)
    groups, problems, not_dicom = scan_folder(folder)
    if not groups:
        if problems:
            raise VolumeError(f"no readable DICOM image in {folder}: " + "; ".join(problems[:5]))
        if not_dicom:
            raise VolumeError(
                f"{folder} holds {len(not_dicom)} file(s) but none is a DICOM image "
                f"(e.g. {os.path.basename(not_dicom[0])}). Point to a DICOM series folder or to an image file "
                "(.nrrd, .nii, .nii.gz, .mha, .mhd)."
            )
        subfolders = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if subfolders:
            raise VolumeError(
                f"{folder} holds no DICOM files, only {len(subfolders)} sub-folder(s) (e.g. {subfolders[0]!r}). "
                "Point to the folder of one CT series itself; series are not searched for in sub-folders."
            )
        files = [e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")]
        if files:
            raise VolumeError(
                f"{folder} holds {len(files)} DICOM file(s) but none carries image data (e.g. {files[0]!r}: a "
                "DICOMDIR, report or presentation state?). Point to the folder of one CT image series."
            )
        raise VolumeError(f"{folder} is empty: no DICOM files found. Point to the folder of one CT series.")
    uid = choose_series(groups, series_uid, folder)
    warn = list(problems)
    if len(groups) > 1 and series_uid is None:
        others = len(groups) - 1
        warn.append(f"chose the CT series {uid} automatically; {others} other series in the folder were left out")
    return build_volume(groups[uid], folder, warn)


def read_dicom_file(path: str | os.PathLike) -> Volume:
    """Read one DICOM image file as a one-slice volume."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sl = read_slice_header(path)
    except InvalidDicomError:
        raise VolumeError(f"{path} is not a DICOM file") from None
    except Exception as exc:
        raise VolumeError(f"{path} is a corrupt DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in sl.dataset and "FloatPixelData" not in sl.dataset:
        raise VolumeError(f"{path} is a DICOM file without an image ({_uid_name(sl.sop_class_uid)})")
    return build_volume([sl], path, [])
