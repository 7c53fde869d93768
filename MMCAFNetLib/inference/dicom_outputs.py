"""DICOM outputs for a DICOM input: the region as a DICOM SEG, the heatmap as a Parametric Map.

Both objects reference the source series (and the SEG each source instance its frames come from),
so a PACS or a DICOM reading workflow (Slicer's DICOM module, OHIF) files them under the patient's
study next to the CT. They are written with highdicom, which builds the multi-frame functional
groups and checks the result against the standard.

Kept lean, because they are written for every DICOM case: the SEG is bit-packed and holds only the
frames where the region has voxels; the Parametric Map holds only the block of slices, rows and
columns where the heatmap is non-zero (its frames carry their own positions on the CT's lattice),
with a real-world value mapping back to 0..1. Its stored values are heatmap.nrrd's 255 levels (the
same quantiser, so both files hold the same values) in 16-bit samples, compressed with JPEG-LS
lossless: a whole-volume scan's map (non-zero nearly everywhere) is then ~7 MB instead of ~164 MB
uncompressed, and encoding its 300 frames takes well under a second. JPEG-LS lossless is a standard
DICOM transfer syntax that PACS, DCMTK's dcmjpls, GDCM, OHIF/cornerstone and pydicom (with pyjpegls,
which highdicom itself depends on) decode. Where the encoder is missing (older
pydicom/highdicom, e.g. in Slicer 5.8) the map is written uncompressed.

The geometry comes from the ``Volume`` (one conversion RAS -> LPS, here), not from the source headers,
so the objects lie exactly on the grid heatmap.nrrd and labelmap.nrrd use.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.results import CLASS_LABELS, Classification
from MMCAFNetLib.volume import Volume, lps_from_ras

SEGMENTATION_FILE = "segmentation.dcm"
HEATMAP_FILE = "heatmap.dcm"
DICOM_FILES = (SEGMENTATION_FILE, HEATMAP_FILE)
SEG_SERIES_NUMBER = 9701
HEATMAP_SERIES_NUMBER = 9702
MANUFACTURER = "MMCAFNet contributors"
MODEL_NAME = "MMCAF-Net"
#: Levels of the stored heatmap (value = stored / HEATMAP_LEVELS): heatmap.nrrd's, see ``heatmap_file``.
HEATMAP_LEVELS = 255


class DicomOutputError(ValueError):
    """The DICOM objects cannot be made for this input; the message says why."""


def is_dicom_volume(volume: Volume) -> bool:
    """True when the volume was read from DICOM images (their instance UIDs are known)."""
    return bool(volume.meta.get("slice_k")) and bool(volume.meta.get("series_uid"))


def read_source_headers(volume: Volume) -> list[Any]:
    """Headers (no pixels) of the source instances the volume was built from, in slice order.

    The folder is read again rather than keeping every header in memory during the classification;
    only the files whose SOP Instance UID is one of the volume's slices are kept.
    """
    import pydicom

    source = Path(str(volume.meta.get("source") or ""))
    wanted: dict[str, float] = dict(volume.meta.get("slice_k") or {})
    if not wanted:
        raise DicomOutputError("the CT was not read from DICOM images; no DICOM outputs can reference it")
    paths = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else []
    found: dict[str, Any] = {}
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # not DICOM, or unreadable: the reader already reported it
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in wanted and uid not in found:
            found[uid] = _with_type2_patient_study(ds)
    if not found:
        raise DicomOutputError(
            f"the source DICOM files of the CT are no longer in {source}; the DICOM outputs need them"
        )
    return [found[uid] for uid in sorted(found, key=lambda u: wanted[u])]


#: Patient and study attributes a derived object copies and must have (type 2: present, may be empty);
#: anonymised series often drop them, which highdicom refuses.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2_patient_study(ds: Any) -> Any:
    """The header with the copied type-2 attributes present (empty when the source lacks them)."""
    for keyword in TYPE2_COPIED:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def _lps_geometry(volume: Volume) -> tuple[np.ndarray, list[float], list[float], float]:
    """(IJK->LPS matrix, ImageOrientationPatient, PixelSpacing [between rows, between columns], slice step)."""
    ijk_to_lps = lps_from_ras(np.asarray(volume.ijk_to_ras, dtype=np.float64))
    col_i, col_j, col_k = (ijk_to_lps[:3, n] for n in range(3))
    di, dj, dk = (float(np.linalg.norm(c)) for c in (col_i, col_j, col_k))
    orientation = [*(col_i / di), *(col_j / dj)]
    return ijk_to_lps, [round(float(v), 8) for v in orientation], [dj, di], dk


def _geometry_content(volume: Volume, i0: int, j0: int, ks: np.ndarray) -> tuple[Any, Any, list[Any]]:
    """highdicom pixel measures, plane orientation and one plane position per frame (slice ``ks``),
    for frames whose first pixel is voxel (i0, j0) of the volume's lattice."""
    import highdicom as hd

    ijk_to_lps, orientation, spacing, step = _lps_geometry(volume)
    measures = hd.PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=step, spacing_between_slices=step)
    plane = hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=orientation)
    positions = [
        hd.PlanePositionSequence(
            coordinate_system="PATIENT",
            image_position=[round(float(v), 6) for v in (ijk_to_lps @ np.array([i0, j0, float(k), 1.0]))[:3]],
        )
        for k in ks
    ]
    return measures, plane, positions


def _software_version() -> str:
    from MMCAFNetLib import __version__

    return f"mmcafnet {__version__}"


def algorithm_identification(result: Classification) -> Any:
    """The model and its checkpoint's sha256, as DICOM Algorithm Identification."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    model = result.model
    parameters = {
        "checkpoint_sha256": str(model.get("sha256") or "unknown"),
        "model_id": str(model.get("model_id") or ""),
        "heatmap": str(model.get("heatmap") or ""),
        "heatmap_threshold": f"{float(result.threshold):g}",
    }
    return hd.AlgorithmIdentificationSequence(
        name=f"{MODEL_NAME} {model.get('model_name') or 'model'}"[:64],
        family=Code("123110", "DCM", "Artificial Intelligence"),
        version=_software_version()[:64],
        parameters=parameters,
    )


def _accepts(cls: Any, keyword: str) -> bool:
    """Whether this highdicom's ``cls`` takes ``keyword`` (newer releases add options; Slicer may hold
    an older one, which must pair with its own pydicom)."""
    import inspect

    return keyword in inspect.signature(cls.__init__).parameters


def _window(hd: Any) -> dict[str, Any]:
    """The display window 0..1 (all levels): VOI LUT transformations where supported, else the older
    window centre/width arguments."""
    if _accepts(hd.pm.ParametricMap, "voi_lut_transformations") and hasattr(hd, "VOILUTTransformation"):
        return {"voi_lut_transformations": [
            hd.VOILUTTransformation(window_center=HEATMAP_LEVELS / 2, window_width=HEATMAP_LEVELS)
        ]}
    return {"window_center": HEATMAP_LEVELS / 2, "window_width": HEATMAP_LEVELS}


def _class_rgb(result: Classification) -> tuple[float, float, float]:
    return next((c for v, _, c in CLASS_LABELS.values() if v == result.label_value), (0.6, 0.6, 0.6))


def _sources_for(volume: Volume, sources: list[Any], ks: np.ndarray) -> list[Any]:
    """The source instances of slices ``ks`` when slices and instances match one to one (the usual
    case), else all of them (a series resampled onto a regular grid has no instance per slice).

    Passing only these keeps highdicom's per-source checks (the bulk of its time) to what the
    object references: the instances its frames were derived from, all of the one source series.
    """
    if _one_to_one(volume, sources):
        return [sources[int(k)] for k in ks]
    return sources


def _one_to_one(volume: Volume, sources: list[Any]) -> bool:
    """True when slice k of the volume is source instance k (not a series resampled onto a grid)."""
    uids = volume.meta.get("sop_instance_uids")
    return bool(uids) and len(uids) == len(sources) == volume.shape[0]


def build_segmentation(result: Classification, volume: Volume, sources: list[Any]) -> Any:
    """A binary DICOM SEG of the labelmap: one segment named by the predicted class."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    if result.labelmap is None:
        raise DicomOutputError("no labelmap to store (the classification ran without a heatmap)")
    mask = np.asarray(result.labelmap.array) != 0
    ks = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    empty = ks.size == 0
    if empty:  # nothing above the threshold: one empty frame keeps the segment (and says so)
        ks = np.array([mask.shape[0] // 2])
    if _one_to_one(volume, sources):  # each frame lies on its source instance: highdicom takes the
        geometry = {}  # geometry from there and links each frame to its instance (every release does)
    else:
        measures, plane, positions = _geometry_content(volume, 0, 0, ks)
        geometry = {"pixel_measures": measures, "plane_orientation": plane, "plane_positions": positions}
    r, g, b = (round(255 * c) for c in _class_rgb(result))
    colour = {"display_color": hd.color.CIELabColor.from_rgb(r, g, b)} if _accepts(
        hd.seg.SegmentDescription, "display_color") and hasattr(hd.color.CIELabColor, "from_rgb") else {}
    segment = hd.seg.SegmentDescription(
        **colour,
        segment_number=1,
        segment_label=result.predicted_label[:64],
        segmented_property_category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=Code("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(result),
    )
    seg = hd.seg.Segmentation(
        source_images=_sources_for(volume, sources, ks),
        pixel_array=mask[ks].astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        **_new_instance(hd, SEG_SERIES_NUMBER),
        content_label="MMCAFNET",
        content_description=f"Region driving the prediction: {result.predicted_label}"[:64],
        **geometry,
        omit_empty_frames=not empty,
    )
    seg.SeriesDescription = f"MMCAF-Net region: {result.predicted_label}"[:64]
    return seg


def _new_instance(hd: Any, series_number: int) -> dict[str, Any]:
    """A new series and instance, and the equipment that made it: the same for the SEG and the map."""
    return {
        "series_instance_uid": hd.UID(),
        "series_number": series_number,
        "sop_instance_uid": hd.UID(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "manufacturer_model_name": MODEL_NAME,
        "software_versions": _software_version(),
        "device_serial_number": "none",
    }


def heatmap_transfer_syntax() -> str:
    """JPEG-LS lossless when this pydicom can encode it (pydicom 3 with pyjpegls or pylibjpeg-libjpeg...),
    else Explicit VR Little Endian (uncompressed)."""
    from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

    try:
        from pydicom.pixels.encoders import JPEGLSLosslessEncoder
    except ImportError:  # pydicom 2: no JPEG-LS encoder
        return ExplicitVRLittleEndian
    return JPEGLSLossless if JPEGLSLosslessEncoder.is_available else ExplicitVRLittleEndian


def _stored_heatmap(heat: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The block's values as heatmap.nrrd stores them (``heatmap_file.quantise``), in 16-bit samples;
    quantised slab by slab, so there is no float copy of the block."""
    from MMCAFNetLib.inference.heatmap_file import quantise

    out = np.empty(tuple(int(v) for v in hi - lo), dtype=np.uint16)
    for n, k in enumerate(range(int(lo[0]), int(hi[0]))):
        slab = heat[k, lo[1] : hi[1], lo[2] : hi[2]]
        out[n] = quantise(np.nan_to_num(slab, nan=0.0) if not np.isfinite(slab).all() else slab)
    return out


def build_parametric_map(result: Classification, volume: Volume, sources: list[Any],
                         transfer_syntax: Optional[str] = None) -> Any:
    """A DICOM Parametric Map of the heatmap, cropped to its non-zero block on the CT's lattice.

    ``transfer_syntax`` defaults to ``heatmap_transfer_syntax()`` (JPEG-LS lossless where available).
    """
    import highdicom as hd
    from pydicom.sr.coding import Code

    from MMCAFNetLib.inference.heatmap_file import QUANTISATION_ERROR, nonzero_block

    if result.heatmap is None:
        raise DicomOutputError("no heatmap to store (the classification ran with --heatmap none)")
    heat = np.asarray(result.heatmap.array)
    block = nonzero_block(heat > np.float32(QUANTISATION_ERROR))  # what is stored as level >= 1
    if block is None:  # an all-zero map: one zero slice keeps the geometry
        lo, hi = np.array([heat.shape[0] // 2, 0, 0]), np.array([heat.shape[0] // 2 + 1, *heat.shape[1:]])
    else:
        lo, hi = block
    k0, j0, i0 = (int(v) for v in lo)
    ks = np.arange(k0, int(hi[0]))
    measures, plane, positions = _geometry_content(volume, i0, j0, ks)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="HEATMAP",
        lut_explanation=f"{result.model.get('heatmap') or 'attention'} heatmap 0..1",
        unit=Code("1", "UCUM", "no units"),
        value_range=(0, HEATMAP_LEVELS),
        slope=1.0 / HEATMAP_LEVELS,
        intercept=0.0,
    )
    arguments = dict(
        source_images=_sources_for(volume, sources, ks),
        pixel_array=_stored_heatmap(heat, lo, hi),
        **_new_instance(hd, HEATMAP_SERIES_NUMBER),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        **_window(hd),
        content_label="HEATMAP",
        content_description=f"MMCAF-Net heatmap, predicted {result.predicted_label}"[:64],
        pixel_measures=measures,
        plane_orientation=plane,
        plane_positions=positions,
    )
    syntax = transfer_syntax or heatmap_transfer_syntax()
    try:
        pm = hd.pm.ParametricMap(**arguments, transfer_syntax_uid=syntax)
    except (ValueError, RuntimeError, NotImplementedError):
        from pydicom.uid import ExplicitVRLittleEndian

        if syntax == ExplicitVRLittleEndian:
            raise
        # an older highdicom that does not take JPEG-LS for a map, or an encoder that failed
        pm = hd.pm.ParametricMap(**arguments, transfer_syntax_uid=ExplicitVRLittleEndian)
    pm.SeriesDescription = f"MMCAF-Net heatmap: {result.predicted_label}"[:64]
    return pm


def write_dicom_outputs(
    result: Classification, volume: Volume, folder: str | os.PathLike, sources: Optional[list[Any]] = None
) -> list[str]:
    """Write segmentation.dcm (with a labelmap) and heatmap.dcm (with a heatmap) into ``folder``.

    Returns the names written. Raises ImportError without highdicom and DicomOutputError when the
    source series cannot be referenced.
    """
    import highdicom  # noqa: F401  (fail early and clearly when it is missing)

    if result.heatmap is None and result.labelmap is None:
        return []
    sources = sources if sources is not None else read_source_headers(volume)
    with warnings.catch_warnings():  # e.g. a one-part PatientName ("Lung_Dx-A0001"): valid, just unusual
        warnings.filterwarnings("ignore", category=UserWarning, module="highdicom")
        return _write_both(result, volume, sources, Path(folder))


def _write_both(result: Classification, volume: Volume, sources: list[Any], folder: Path) -> list[str]:
    written: list[str] = []
    try:
        if result.labelmap is not None:
            build_segmentation(result, volume, sources).save_as(folder / SEGMENTATION_FILE)
            written.append(SEGMENTATION_FILE)
        if result.heatmap is not None:
            build_parametric_map(result, volume, sources).save_as(folder / HEATMAP_FILE)
            written.append(HEATMAP_FILE)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        if isinstance(exc, DicomOutputError):
            raise
        raise DicomOutputError(f"the source series' headers do not allow a DICOM object: {exc}") from exc
    return written
