"""CT volumes: one array in (K, J, I) order plus a 4x4 IJK->RAS matrix, the convention Slicer uses.

Conversion to and from LPS (SimpleITK, DICOM) happens only in this module.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A scalar 3D image.

    ``array`` has shape (K, J, I) (slices, rows, columns); ``ijk_to_ras`` maps homogeneous voxel
    indices (i, j, k, 1) to RAS millimetres. ``meta`` carries plain data read from the source
    (modality, series UID, patient sex/age/weight, warnings), never pixel data.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {self.ijk_to_ras.shape}")
        if not np.all(np.isfinite(self.ijk_to_ras)):
            raise ValueError("ijk_to_ras contains NaN or infinite values")
        if np.any(self.spacing <= 0):
            raise ValueError(f"voxel spacing must be positive, got {tuple(self.spacing)}")
        if self.array.ndim != 3:
            raise ValueError(
                f"a volume must be 3D (K, J, I); got an array of shape {self.array.shape}. "
                "Pass a single 3D image (not a 2D slice or a 4D series)."
            )

    @classmethod
    def from_geometry(
        cls,
        array: np.ndarray,
        spacing: tuple[float, float, float],
        origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
        directions: np.ndarray | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Volume:
        """Build from (I, J, K) spacing, RAS origin and 3x3 RAS direction columns (i, j, k axes)."""
        return cls(array, make_ijk_to_ras(spacing, origin, directions), dict(meta or {}))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along I, J, K in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """RAS position of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def directions(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the I, J, K axes."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def ras_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_ras)

    def ras_to_ijk_points(self, points_ras: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) continuous (i, j, k) indices."""
        pts = np.atleast_2d(np.asarray(points_ras, dtype=np.float64))
        homo = np.c_[pts, np.ones(len(pts))]
        return (homo @ self.ras_to_ijk.T)[:, :3]

    def ijk_to_ras_points(self, points_ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous (i, j, k) indices -> (N, 3) RAS mm."""
        pts = np.atleast_2d(np.asarray(points_ijk, dtype=np.float64))
        homo = np.c_[pts, np.ones(len(pts))]
        return (homo @ self.ijk_to_ras.T)[:, :3]

    def contains_ras(self, point_ras: np.ndarray) -> bool:
        ijk = self.ras_to_ijk_points(point_ras)[0]
        upper = np.array(self.shape[::-1]) - 0.5
        return bool(np.all(ijk >= -0.5) and np.all(ijk <= upper))

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A volume on the same grid holding another array (heatmaps, labelmaps)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Volume(array, self.ijk_to_ras.copy(), {**self.meta, **meta})

    def same_geometry(self, other: Volume, atol: float = 1e-4) -> bool:
        return self.shape == other.shape and np.allclose(self.ijk_to_ras, other.ijk_to_ras, atol=atol)


def make_ijk_to_ras(
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    directions: np.ndarray | None = None,
) -> np.ndarray:
    directions = np.eye(3) if directions is None else np.asarray(directions, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = directions * np.asarray(spacing, dtype=np.float64)[None, :]
    m[:3, 3] = origin
    return m



def grid_corners_ras(ijk_to_ras: np.ndarray, shape_kji: Sequence[int]) -> np.ndarray:
    """(8, 3) RAS mm: the outer corners of a voxel grid (voxel edges, half a voxel beyond the
    first and last voxel centres), for its physical extent on another grid."""
    n = np.array(shape_kji[::-1], dtype=np.float64) - 0.5
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, n[0]) for j in (-0.5, n[1]) for k in (-0.5, n[2])])
    return (corners @ np.asarray(ijk_to_ras, dtype=np.float64).T)[:, :3]

# ---------------------------------------------------------------------------------------------
# Errors, the one LPS <-> RAS conversion, SimpleITK bridge


class VolumeError(ValueError):
    """A volume cannot be read, written or resampled; the message names the problem and the fix."""


IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
WRITE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha")
_INTERPOLATORS = ("linear", "nearest")


def ras_from_lps(ijk_to_lps: np.ndarray) -> np.ndarray:
    """IJK->LPS (DICOM, ITK) to IJK->RAS (Slicer, this library). The only place the axes flip."""
    return LPS_TO_RAS @ np.asarray(ijk_to_lps, dtype=np.float64)


def lps_from_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    """IJK->RAS to IJK->LPS (the flip is its own inverse)."""
    return ras_from_lps(ijk_to_ras)


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


def from_sitk(image: Any, meta: dict[str, Any] | None = None) -> Volume:
    """A Volume from a 3D scalar SimpleITK image (geometry converted from LPS)."""
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(
            f"the image has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour or vector "
            "data); a CT volume has one. Save a single scalar channel."
        )
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
        return dicom_series.read_dicom_series(path, series_uid)
    suffix = _suffix(path)
    if suffix in IMAGE_SUFFIXES:
        return _read_itk_file(path)
    if series_uid is not None:
        raise VolumeError(f"series_uid applies to a DICOM folder; {path} is a single file")
    if suffix in (".dcm", ".dicom", ".ima", "") or dicom_series._looks_like_dicom(path):
        return dicom_series.read_dicom_file(path)
    raise VolumeError(
        f"{path}: unsupported file type {suffix!r}. Supported: a DICOM series folder, a DICOM file, "
        + ", ".join(IMAGE_SUFFIXES)
        + "."
    )


def _read_itk_file(path: str) -> Volume:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Description" in line or "ERROR" in line.upper()), first[-1] if first else "")
        raise VolumeError(f"cannot read {path}: {detail.strip().rstrip('.:')}. Is the file complete and a valid image?") from exc
    meta = _empty_meta(path)
    volume = from_sitk(image, meta)
    if volume.array.dtype == np.float64:
        volume.array = volume.array.astype(np.float32)
    return volume


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
    image = to_sitk(volume)
    base = os.path.basename(path)
    tmp = os.path.join(parent, f".{base[: len(base) - len(suffix)]}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        sitk.WriteImage(image, tmp, useCompression=bool(compress) or suffix == ".nii.gz")
        os.replace(tmp, path)
    except RuntimeError as exc:
        raise VolumeError(f"cannot write {path}: {str(exc).strip().splitlines()[-1]}") from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
