"""CT volumes: reading and writing (DICOM, NRRD, NIfTI, MetaImage), resampling, plausibility.

The Volume type itself (array in (K, J, I) order plus a 4x4 IJK->RAS matrix, the convention Slicer
uses) and the one LPS <-> RAS conversion live in :mod:`MMCAFNetLib.grid` and are re-exported here.

Every reader refuses, before the pixels are read, an image whose header declares more voxels than
memory can hold (:func:`MMCAFNetLib.memory_guard.check_image_allocation`), and refuses after
reading an image holding NaN or infinite voxels (:func:`refuse_nonfinite`): no reader converts
them silently.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

# re-exported: the public home of these names stays MMCAFNetLib.volume
from MMCAFNetLib.grid import LPS_TO_RAS as LPS_TO_RAS
from MMCAFNetLib.grid import Volume as Volume
from MMCAFNetLib.grid import VolumeError as VolumeError
from MMCAFNetLib.grid import grid_corners_ras as grid_corners_ras
from MMCAFNetLib.grid import lps_from_ras as lps_from_ras
from MMCAFNetLib.grid import make_ijk_to_ras as make_ijk_to_ras
from MMCAFNetLib.grid import ras_from_lps as ras_from_lps

# ---------------------------------------------------------------------------------------------
# SimpleITK bridge


IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
_INTERPOLATORS = ("linear", "nearest")


def _suffix(path: str | os.PathLike) -> str:
    name = os.fspath(path).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _empty_meta(source: str) -> dict[str, Any]:
    return {
        "modality": None,
        "series_uid": None,
        "series_description": None,
        "patient_sex": None,
        "patient_age": None,
        "patient_weight": None,
        "source": source,
        "warnings": [],
    }


def to_sitk(volume: Volume) -> Any:
    """A SimpleITK image with the volume's geometry (LPS, as ITK expects)."""
    import SimpleITK as sitk

    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    ijk_to_lps = lps_from_ras(volume.ijk_to_ras)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    image.SetDirection([float(v) for v in (ijk_to_lps[:3, :3] / spacing).ravel()])
    return image


def _components_problem(components: int) -> str:
    """Why an image with ``components`` values per voxel is not a CT, and the fix."""
    return (f"the image has {components} components per voxel (colour or vector data); a CT volume has one. "
            "Save a single scalar channel.")


def from_sitk(image: Any, meta: dict[str, Any] | None = None) -> Volume:
    """A Volume from a 3D scalar SimpleITK image (geometry converted from LPS)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(_components_problem(image.GetNumberOfComponentsPerPixel()))
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, 0])
        dim = 3
    if dim != 3:
        raise VolumeError(
            f"the image is {dim}D with size {tuple(image.GetSize())}; a volume must be 3D. "
            + (
                "Save a single 3D image (one time point or channel) instead of a 4D series."
                if dim > 3
                else "A 2D image (one slice) cannot be used: pass the whole 3D series."
            )
        )
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)[None, :]
    ijk_to_lps[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayFromImage(image)
    return Volume(array, ras_from_lps(ijk_to_lps), dict(meta) if meta is not None else _empty_meta(""))


# ---------------------------------------------------------------------------------------------
# Reading and writing


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read a CT: a DICOM series folder, one DICOM file, NRRD, NIfTI (.nii, .nii.gz) or MetaImage.

    ``series_uid`` picks one series when a DICOM folder holds several (the error lists them).
    DICOM values are in HU (RescaleSlope/Intercept applied); ``meta["warnings"]`` lists what was
    repaired or left out (uneven spacing, corrupt files).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}. Check the path to the CT series or image file.")
    from MMCAFNetLib import dicom_series

    if os.path.isdir(path):
        volume = dicom_series.read_dicom_series(path, series_uid)
    else:
        suffix = _suffix(path)
        if suffix in IMAGE_SUFFIXES:
            volume = _read_itk_file(path)
        elif series_uid is not None:
            raise VolumeError(f"series_uid applies to a DICOM folder; {path} is a single file")
        elif suffix in (".dcm", ".dicom", ".ima", "") or dicom_series._looks_like_dicom(path):
            volume = dicom_series.read_dicom_file(path)
        else:
            raise VolumeError(
                f"{path}: unsupported file type {suffix!r}. Supported: a DICOM series folder, a DICOM file, "
                + ", ".join(IMAGE_SUFFIXES)
                + "."
            )
    refuse_nonfinite(volume.array, path)
    return volume


def refuse_nonfinite(array: np.ndarray, source: str) -> None:
    """Raise VolumeError when a float image holds NaN or infinite voxels (every reader calls this).

    A CT has a number in every voxel; NaN or infinity means a damaged export or an overflowing
    rescale, and a model fed with it (or with a silent replacement) gives a meaningless answer.
    """
    if array.dtype.kind not in "fc":
        return
    finite = np.isfinite(array)
    n_bad = int(array.size - np.count_nonzero(finite))
    if n_bad:
        n_nan = int(np.count_nonzero(np.isnan(array)))
        raise VolumeError(
            f"{source}: {n_bad} of {array.size} voxel(s) are not numbers ({n_nan} NaN, {n_bad - n_nan} infinite). "
            + _NONFINITE_FIX
        )


_NONFINITE_FIX = (
    "A CT needs a value in every voxel: re-export the image, or fill those voxels (e.g. with -1000 HU, air) "
    "before use."
)


def _read_itk_file(path: str) -> Volume:
    import SimpleITK as sitk

    from MMCAFNetLib.memory_guard import check_image_allocation

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()  # the header only: sizes are checked before any pixel is read
    except RuntimeError as exc:
        raise VolumeError(f"cannot read {path}: {_itk_detail(exc)}. Is the file complete and a valid image?") from exc
    size = tuple(int(n) for n in reader.GetSize())
    if any(n <= 0 for n in size):
        raise VolumeError(f"cannot read {path}: its header declares the size {size}; every size must be positive")
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    component = int(bits.group(1)) // 8 if bits else 8
    components = int(reader.GetNumberOfComponents() or 1)
    if components != 1:  # refused before the pixels are read: ITK's NIfTI reader can crash on some RGB files
        raise VolumeError(f"cannot read {path}: {_components_problem(components)}")
    declared = declared_text_header_sizes(path)
    if declared is not None and math.prod(declared) != math.prod(size):
        # ITK reports a wrapped or clamped size for a huge one (4294967297 reads as 1), then reads the
        # real one: the memory check below would pass a header that asks for gigabytes
        raise VolumeError(
            f"cannot read {path}: its header declares the sizes {' x '.join(map(str, declared))}, but the image "
            f"reader sees {' x '.join(map(str, size))}; a size that large cannot be read. The header is damaged "
            "or the image is far larger than a CT; check the file."
        )
    # the image, its float32 copy for the model (float64 images: also the float32 conversion)
    check_image_allocation(size[::-1], component + 4, path)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"cannot read {path}: {_itk_detail(exc)}. Is the file complete and a valid image?") from exc
    meta = _empty_meta(path)
    volume = from_sitk(image, meta)
    if _suffix(path) in (".nii", ".nii.gz"):
        hidden = nifti_nonfinite_count(path)  # ITK's NIfTI reader turns NaN into 0 without a word
        if hidden:
            raise VolumeError(
                f"{path}: {hidden} of {volume.array.size} voxel(s) are not numbers (stored as NaN or infinity, "
                "which the NIfTI reader would silently turn into 0). " + _NONFINITE_FIX
            )
    if volume.array.dtype == np.float64:
        with np.errstate(over="ignore", invalid="ignore"):
            volume.array = volume.array.astype(np.float32)  # beyond the float32 range: inf, refused by the caller
    return volume


def declared_text_header_sizes(path: str, limit: int = 1 << 16) -> tuple[int, ...] | None:
    """The sizes a NRRD (``sizes:``) or MetaImage (``DimSize =``) header declares, as written; None
    for other formats or a header this cannot parse (the image reader then decides)."""
    suffix = _suffix(path)
    if suffix not in (".nrrd", ".nhdr", ".mha", ".mhd"):
        return None
    try:
        with open(path, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return None
    key, sep = ("sizes", ":") if suffix in (".nrrd", ".nhdr") else ("DimSize", "=")
    for raw in head.split(b"\n"):
        line = raw.decode("latin-1").strip()
        if suffix in (".nrrd", ".nhdr") and not line:
            break  # the blank line ends a NRRD header
        name, found, value = line.partition(sep)
        if found and name.strip() == key:
            try:
                return tuple(int(v) for v in value.split())
            except ValueError:
                return None
        if suffix in (".mha", ".mhd") and name.strip() == "ElementDataFile":
            break  # the last MetaImage header field
    return None


_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8", 32: "c8", 1792: "c16"}  # NIfTI datatype code -> numpy kind


def nifti_nonfinite_count(path: str, chunk_bytes: int = 1 << 24) -> int:
    """Voxels stored as NaN or infinity in a float NIfTI file (.nii or .nii.gz; NIfTI-1 or -2),
    counted by streaming the raw data (integer files: 0 without reading the data)."""
    import gzip

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
        if len(head) < 348:
            return 0
        for order in ("<", ">"):
            size = int(np.frombuffer(head, f"{order}i4", 1, 0)[0])
            if size in (348, 540):
                break
        else:
            return 0
        if size == 348:
            dims = np.frombuffer(head, f"{order}i2", 8, 40).astype(np.int64)
            datatype = int(np.frombuffer(head, f"{order}i2", 1, 70)[0])
            offset_value = float(np.frombuffer(head, f"{order}f4", 1, 108)[0])
            if not math.isfinite(offset_value) or offset_value < 0:
                return 0  # a reader that got this far did not use the offset
            offset = int(offset_value)
        else:
            if len(head) < 540:
                return 0
            datatype = int(np.frombuffer(head, f"{order}i2", 1, 12)[0])
            dims = np.frombuffer(head, f"{order}i8", 8, 16)
            offset = int(np.frombuffer(head, f"{order}i8", 1, 168)[0])
        kind = _NIFTI_FLOAT_TYPES.get(datatype)
        if kind is None:
            return 0
        ndim = int(dims[0])
        if not 1 <= ndim <= 7:
            return 0
        dtype = np.dtype(order + kind)
        remaining = math.prod(max(int(n), 1) for n in dims[1 : ndim + 1])
        fh.seek(max(offset, size + 4 if size == 348 else size))
        bad = 0
        step = max(1, chunk_bytes // dtype.itemsize)
        while remaining > 0:
            data = fh.read(min(remaining, step) * dtype.itemsize)
            n = len(data) // dtype.itemsize
            if n == 0:
                break
            values = np.frombuffer(data[: n * dtype.itemsize], dtype)
            bad += int(n - np.count_nonzero(np.isfinite(values)))
            remaining -= n
        return bad


def _itk_detail(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    detail = next((line for line in lines if "Description" in line or "ERROR" in line.upper()), lines[-1] if lines else "")
    return detail.strip().rstrip(".:")


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> None:
    """Write NRRD, NIfTI (.nii, .nii.gz) or MetaImage (.mha) with the volume's exact geometry.

    Written to a temporary file next to the target and moved into place, so a failed write never
    leaves a half-written file behind.
    """
    import SimpleITK as sitk

    path = os.fspath(path)
    suffix = _suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise VolumeError(
            f"cannot write {path}: use one of {', '.join(WRITE_SUFFIXES)} "
            "(.mhd writes two files and cannot be replaced atomically; use .mha)."
        )
    if suffix in (".nii", ".nii.gz"):
        d = volume.directions
        if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
            raise VolumeError(
                f"cannot write {path}: NIfTI stores only orthogonal grids and this volume is sheared "
                "(e.g. gantry tilt). Save it as .nrrd, or resample it first (resample_to_spacing)."
            )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path}: the folder {parent} does not exist")
    from MMCAFNetLib.atomic import atomic_output, raise_if_no_space

    image = to_sitk(volume)
    with atomic_output(path, suffix=f".tmp{suffix}") as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=bool(compress) or suffix == ".nii.gz")
        except RuntimeError as exc:
            raise_if_no_space(exc, tmp, path)  # a full disk is a runtime failure (OSError), not bad input
            raise VolumeError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc


# ---------------------------------------------------------------------------------------------
# Resampling in physical space (SimpleITK): the one place the library resamples volumes


def _sitk_interpolator(name: str) -> Any:
    import SimpleITK as sitk

    if name not in _INTERPOLATORS:
        raise VolumeError(f"interpolator must be one of {_INTERPOLATORS}, got {name!r}")
    return sitk.sitkLinear if name == "linear" else sitk.sitkNearestNeighbor


def resample_to_grid(
    volume: Volume,
    ijk_to_ras: np.ndarray,
    shape_kji: tuple[int, int, int],
    interpolator: str = "linear",
    default: float = 0.0,
) -> Volume:
    """Resample onto another grid (4x4 IJK->RAS, shape K,J,I) in physical space.

    "linear" for images (output float32), "nearest" for labels (dtype kept). Points outside the
    source get ``default``.
    """
    import SimpleITK as sitk

    interp = _sitk_interpolator(interpolator)
    shape = tuple(int(s) for s in shape_kji)
    if len(shape) != 3 or min(shape) < 1:
        raise VolumeError(f"shape_kji must be three positive sizes (K, J, I), got {shape_kji}")
    target = Volume(np.zeros((1, 1, 1), dtype=np.uint8), ijk_to_ras)  # validates the matrix
    ijk_to_lps = lps_from_ras(target.ijk_to_ras)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    source = to_sitk(volume)
    # "linear" writes float32 straight from the source's own type (ITK interpolates in double): an
    # int16 CT is never copied to a full-size float32 image first.
    out_type = sitk.sitkFloat32 if interpolator == "linear" else source.GetPixelID()
    image = sitk.Resample(
        source,
        [shape[2], shape[1], shape[0]],
        sitk.Transform(),
        interp,
        [float(v) for v in ijk_to_lps[:3, 3]],
        [float(s) for s in spacing],
        [float(v) for v in (ijk_to_lps[:3, :3] / spacing).ravel()],
        float(default),
        out_type,
    )
    array = sitk.GetArrayFromImage(image)
    return Volume(array, target.ijk_to_ras.copy(), dict(volume.meta))


def resample_to_spacing(
    volume: Volume,
    spacing_ijk: tuple[float, float, float],
    interpolator: str = "linear",
    default: float | None = None,
) -> Volume:
    """Resample to a new voxel size along I, J, K, keeping the directions and the covered box.

    The grid keeps the outer corner of voxel (0, 0, 0) and covers the same physical extent
    (rounded to whole voxels). ``default`` fills outside points: None means -1000 (air, HU) for
    "linear" and 0 for "nearest" (labels).
    """
    _sitk_interpolator(interpolator)
    new_spacing = np.asarray(spacing_ijk, dtype=np.float64).reshape(-1)
    if new_spacing.shape != (3,) or not np.all(np.isfinite(new_spacing)) or np.any(new_spacing <= 0):
        raise VolumeError(f"spacing_ijk must be three positive sizes in mm (I, J, K), got {spacing_ijk}")
    if default is None:
        default = -1000.0 if interpolator == "linear" else 0.0
    old_spacing = volume.spacing
    size_ijk = np.array(volume.shape[::-1], dtype=np.float64)
    new_size = np.maximum(1, np.round(size_ijk * old_spacing / new_spacing)).astype(int)
    directions = volume.directions
    corner = volume.origin - directions @ (old_spacing / 2.0)
    new_origin = corner + directions @ (new_spacing / 2.0)
    matrix = make_ijk_to_ras(tuple(new_spacing), tuple(new_origin), directions)
    return resample_to_grid(volume, matrix, tuple(int(s) for s in new_size[::-1]), interpolator, default)


# ---------------------------------------------------------------------------------------------
# Plausibility


def check_ct(volume: Volume) -> list[str]:
    """Warnings about a CT that loads but may be wrong (NaN voxels, values not in HU, odd spacing).

    Raises VolumeError when nothing usable is left (every voxel NaN or infinite).
    """
    array = volume.array
    warnings_out: list[str] = []
    if array.size == 0:
        raise VolumeError("the volume has no voxels")
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        n_bad = int(array.size - np.count_nonzero(finite))
        if n_bad == array.size:
            raise VolumeError("every voxel is NaN or infinite: the image holds no data. Re-export the CT.")
        if n_bad:
            warnings_out.append(
                f"{n_bad} voxel(s) ({100.0 * n_bad / array.size:.2f} %) are NaN or infinite; "
                "they are treated as missing (fill them, e.g. with -1000 HU, before use)"
            )
        values = array[finite] if n_bad else array
    else:
        values = array
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        warnings_out.append(f"every voxel has the value {lo:g}: the image is blank")
    elif lo > -500.0:
        warnings_out.append(
            f"the lowest value is {lo:g}, but a chest CT in HU contains air near -1000: the values may be "
            "stored values without the rescale to HU, or not a CT"
        )
    elif hi > 40000 or lo < -10000:
        warnings_out.append(f"values range from {lo:g} to {hi:g}, far outside the HU range of CT")
    modality = volume.meta.get("modality")
    if modality not in (None, "CT"):
        warnings_out.append(f"the modality is {modality}, not CT")
    spacing = volume.spacing
    if np.any(spacing > 10.0):
        warnings_out.append(f"voxel spacing {tuple(np.round(spacing, 3))} mm: a slice spacing above 10 mm is unusual for CT")
    if min(volume.shape) < 2:
        warnings_out.append(f"the volume has shape {volume.shape}: a single slice is not a 3D CT")
    return warnings_out
