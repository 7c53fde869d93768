"""The Volume type: one array in (K, J, I) order plus a 4x4 IJK->RAS matrix (Slicer's convention),
its error type, and the one LPS <-> RAS conversion.

Kept apart from the readers (``volume``, ``dicom_series``) so that both can use it without importing
each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


class VolumeError(ValueError):
    """A volume cannot be read, written or resampled; the message names the problem and the fix."""


def ras_from_lps(ijk_to_lps: np.ndarray) -> np.ndarray:
    """IJK->LPS (DICOM, ITK) to IJK->RAS (Slicer, this library). The only place the axes flip."""
    return LPS_TO_RAS @ np.asarray(ijk_to_lps, dtype=np.float64)


def lps_from_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    """IJK->RAS to IJK->LPS (the flip is its own inverse)."""
    return ras_from_lps(ijk_to_ras)
