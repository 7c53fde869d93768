"""Network input windows: a CT prepared on a preset's grid, cut into fixed-size windows.

Why this module: training, evaluation and inference must cut windows identically, or a model sees
at inference something it was never trained on. Everything here follows the preset stored in the
checkpoint (``MMCAFNetLib.preset``):

- ``prepare_volume`` turns any CT into HU float32 on the preset's grid. The axes are first put in
  the DICOM axial order (i towards patient left, j posterior, k superior) by exact permutation and
  flips, so a NIfTI in RAS order and a DICOM series give the same windows. Spacing presets then
  resample in physical space (``volume.resample_to_spacing``); the paper preset keeps native
  slices and resizes each whole slice to the window's H x W (``volume.resample_to_grid``).
- ``cut_window`` cuts a [D, H, W] window around a voxel, padding with air (-1000 HU) outside the
  volume, normalised with ``preset.normalise``; ``Window.ijk_to_ras`` is the window's own grid.
- ``window_centers_for_box`` gives the windows covering a lesion's whole extent (evaluation; a
  patient's score is the max over them, as the paper); ``sliding_window_centers`` tiles a volume.
- Training: ``augment`` is the reference's horizontal flip (p 0.5) and in-plane rotation by a
  random integer angle in [-15, 15] degrees filled with air, vectorised with torch, plus optional
  zoom and mirroring along the other axes (the training dataset, ``train.data``, jitters the
  lesion-covering centres itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from MMCAFNetLib.preset import Preset
from MMCAFNetLib.volume import Volume, resample_to_grid, resample_to_spacing

AIR_HU = -1000.0
#: RAS directions of the canonical (DICOM axial) axes i, j, k: patient left, posterior, superior.
CANONICAL_DIRECTIONS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class Window:
    """One network input: ``array`` float32 [D, H, W] normalised; ``ijk_to_ras`` of the window's
    voxel grid (voxel (0, 0, 0) is the prepared volume's voxel ``start_kji``)."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    start_kji: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def center_kji(self) -> tuple[int, int, int]:
        """The prepared-volume voxel the window was centred on."""
        return tuple(int(s + n // 2) for s, n in zip(self.start_kji, self.array.shape))  # type: ignore[return-value]

    @property
    def center_ras(self) -> tuple[float, float, float]:
        d, h, w = self.array.shape
        p = self.ijk_to_ras @ np.array([w // 2, h // 2, d // 2, 1.0])
        return tuple(float(v) for v in p[:3])  # type: ignore[return-value]

    def box_ras(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(min corner, max corner) in RAS of the window's outer voxel edges."""
        d, h, w = self.array.shape
        corners = np.array([[i, j, k, 1.0] for i in (-0.5, w - 0.5) for j in (-0.5, h - 0.5) for k in (-0.5, d - 0.5)])
        ras = (corners @ self.ijk_to_ras.T)[:, :3]
        lo, hi = ras.min(axis=0), ras.max(axis=0)
        return tuple(float(v) for v in lo), tuple(float(v) for v in hi)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Preparing a volume


def canonical_orientation(volume: Volume, contiguous: bool = True) -> Volume:
    """The same voxels with axes permuted and flipped so i, j, k point (as nearly as the grid
    allows) to patient left, posterior and superior. Exact: no interpolation. With
    ``contiguous=False`` the array is a view of the input (nothing copied)."""
    directions = volume.directions  # columns: RAS direction of i, j, k
    # source axis (0=i, 1=j, 2=k) best aligned with each canonical axis
    score = np.abs(CANONICAL_DIRECTIONS.T @ directions)  # [target axis, source axis]
    order = [-1, -1, -1]
    for _ in range(3):
        t, s = np.unravel_index(np.argmax(score), score.shape)
        order[int(t)] = int(s)
        score[t, :] = -1.0
        score[:, s] = -1.0
    signs = [float(np.sign(CANONICAL_DIRECTIONS[:, t] @ directions[:, order[t]]) or 1.0) for t in range(3)]
    if order == [0, 1, 2] and signs == [1.0, 1.0, 1.0]:
        return volume
    # array axes are (k, j, i) = source axes (2, 1, 0)
    arr = volume.array
    src_axis_of_array = {0: 2, 1: 1, 2: 0}  # source ijk axis -> array axis
    perm = [src_axis_of_array[order[t]] for t in (2, 1, 0)]  # new array axes (k, j, i)
    arr = np.transpose(arr, perm)
    m = volume.ijk_to_ras
    new = np.eye(4)
    shape_ijk = volume.shape[::-1]
    origin = m[:3, 3].copy()
    for t in range(3):
        col = m[:3, order[t]] * signs[t]
        new[:3, t] = col
        if signs[t] < 0:
            origin = origin + m[:3, order[t]] * (shape_ijk[order[t]] - 1)
            arr = np.flip(arr, axis=2 - t)
    new[:3, 3] = origin
    return Volume(np.ascontiguousarray(arr) if contiguous else arr, new, dict(volume.meta))


def _finite_hu(volume: Volume) -> Volume:
    """NaN and infinities as air. Integer CTs are returned as they are (always finite; resampling
    writes float32 from them directly, with no full-size float copy of the CT)."""
    arr = volume.array
    if arr.dtype.kind in "iub":
        return volume
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr)):
        arr = np.nan_to_num(arr, nan=AIR_HU, posinf=AIR_HU, neginf=AIR_HU)
    if arr is volume.array:
        return volume
    return Volume(arr, volume.ijk_to_ras, dict(volume.meta))


def prepared_grid(volume: Volume, preset: Preset) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(ijk_to_ras, shape_kji) that ``prepare_volume`` produces for a canonically oriented volume.

    Spacing presets: exactly the preset's spacing, the outer corner of voxel (0, 0, 0) kept and the
    extent rounded to whole voxels (``volume.resample_to_spacing``'s rule). Paper preset: native
    slices, each whole slice resized to H x W with its outer edges kept.
    """
    shape_ijk = np.array(volume.shape[::-1], dtype=np.float64)
    old = volume.spacing
    if preset.spacing is None:
        new_size = np.array([preset.window[2], preset.window[1], shape_ijk[2]], dtype=np.float64)
        new = old * shape_ijk / new_size
    else:
        new = np.asarray(preset.spacing, dtype=np.float64)[::-1]
        new_size = np.maximum(1.0, np.round(shape_ijk * old / new))
    directions = volume.directions
    corner = volume.origin - directions @ (old / 2.0)
    affine = np.eye(4)
    affine[:3, :3] = directions * new[None, :]
    affine[:3, 3] = corner + directions @ (new / 2.0)
    return affine, tuple(int(v) for v in new_size[::-1])  # type: ignore[return-value]


def prepare_volume(volume: Volume, preset: Preset) -> Volume:
    """HU float32 on the preset's grid (see the module docstring). The input is never modified."""
    if not isinstance(preset, Preset):
        raise TypeError(f"preset must be a Preset (MMCAFNetLib.preset.get_preset), got {type(preset).__name__}")
    vol = _finite_hu(canonical_orientation(volume))
    affine, shape = prepared_grid(vol, preset)
    meta = {**vol.meta, "preset": preset.name}
    if shape == vol.shape and np.allclose(affine, vol.ijk_to_ras, atol=1e-6):
        return Volume(vol.array.astype(np.float32, copy=False), vol.ijk_to_ras.copy(), meta)
    if preset.spacing is not None:
        out = resample_to_spacing(vol, tuple(float(s) for s in preset.spacing[::-1]), "linear", default=AIR_HU)
        if out.shape != shape:  # the two grid rules agree by construction; fall back to the explicit grid
            out = resample_to_grid(vol, affine, shape, "linear", default=AIR_HU)
    else:
        out = resample_to_grid(vol, affine, shape, "linear", default=AIR_HU)
    return Volume(out.array.astype(np.float32, copy=False), out.ijk_to_ras, meta)


# --------------------------------------------------------------------------------------------------
# Cutting windows


def air_value(preset: Preset) -> float:
    """The normalised value of air (-1000 HU): the fill for padding and rotation."""
    return float(preset.normalise(np.float32(AIR_HU)))


def cut_window(prepared: Volume, center_kji: Sequence[float], preset: Preset) -> Window:
    """The [D, H, W] window whose voxel (D//2, H//2, W//2) is ``center_kji`` (rounded), air outside."""
    size = np.array(preset.window, dtype=np.int64)
    center = np.asarray(center_kji, dtype=np.float64).reshape(-1)
    if center.shape != (3,) or not np.all(np.isfinite(center)):
        raise ValueError(f"center_kji must be three finite voxel indices (k, j, i), got {center_kji}")
    start = np.rint(center).astype(np.int64) - size // 2
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, np.array(prepared.shape))
    src = prepared.array
    if np.all(lo == start) and np.all(hi == start + size):
        raw = src[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        array = preset.normalise(raw.astype(np.float32, copy=False))
    else:
        raw = np.full(tuple(size), AIR_HU, dtype=np.float32)
        if np.all(hi > lo):
            raw[lo[0] - start[0] : hi[0] - start[0], lo[1] - start[1] : hi[1] - start[1], lo[2] - start[2] : hi[2] - start[2]] = src[
                lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]
            ]
        array = preset.normalise(raw)
    shift = np.eye(4)
    shift[:3, 3] = start[::-1]
    return Window(
        np.ascontiguousarray(array, dtype=np.float32),
        prepared.ijk_to_ras @ shift,
        tuple(int(v) for v in start),  # type: ignore[arg-type]
    )


def ras_to_kji(prepared: Volume, point_ras: Sequence[float]) -> tuple[int, int, int]:
    """Nearest prepared-voxel (k, j, i) of a RAS point (may lie outside the volume)."""
    ijk = prepared.ras_to_ijk_points(np.asarray(point_ras, dtype=np.float64))[0]
    return tuple(int(v) for v in np.rint(ijk[::-1]))  # type: ignore[return-value]


def box_ras_to_kji(
    prepared: Volume, box_ras_min: Sequence[float], box_ras_max: Sequence[float]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Inclusive (k, j, i) index ranges of the voxel centres that enclose a RAS box, clipped.

    Rounded outwards (a corner within 1e-6 of a voxel centre counts as on it), so the lesion is
    never cut: training windows and inference windows both take the box through here.
    """
    lo, hi = np.asarray(box_ras_min, dtype=np.float64), np.asarray(box_ras_max, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    kji = prepared.ras_to_ijk_points(corners)[:, ::-1]
    upper = np.array(prepared.shape) - 1
    kmin = np.clip(np.floor(kji.min(axis=0) + 1e-6), 0, upper).astype(int)
    kmax = np.clip(np.ceil(kji.max(axis=0) - 1e-6), 0, upper).astype(int)
    kmax = np.maximum(kmax, kmin)
    return tuple(int(v) for v in kmin), tuple(int(v) for v in kmax)  # type: ignore[return-value]


def _axis_centers(lo: float, hi: float, size: int) -> list[int]:
    """Centres along one axis so that windows of ``size`` cover [lo, hi] (inclusive).

    A window centred on c spans [c - size // 2, c - size // 2 + size - 1].
    """
    before, after = size // 2, size - 1 - size // 2
    extent = hi - lo + 1
    if extent <= size:
        return [math.floor((lo + hi + before - after) / 2.0 + 0.5)]
    first, last = lo + before, hi - after
    count = math.ceil(extent / size)
    return sorted({math.floor(first + (last - first) * i / (count - 1) + 0.5) for i in range(count)})


def window_centers_for_box(
    prepared: Volume, box_kji_min: Sequence[int], box_kji_max: Sequence[int], preset: Preset
) -> list[tuple[int, int, int]]:
    """Window centres (k, j, i) whose windows together cover the inclusive box: one window for a
    lesion smaller than a window, evenly spaced overlapping windows for a larger one."""
    lo = np.asarray(box_kji_min, dtype=np.float64)
    hi = np.asarray(box_kji_max, dtype=np.float64)
    if lo.shape != (3,) or hi.shape != (3,):
        raise ValueError("box_kji_min and box_kji_max must each be three voxel indices (k, j, i)")
    if np.any(hi < lo):
        raise ValueError(f"box max {tuple(hi)} is below box min {tuple(lo)}; pass (min corner, max corner)")
    per_axis = [
        _axis_centers(float(a), float(b), int(s)) for a, b, s in zip(lo, hi, preset.window)
    ]
    return [(k, j, i) for k in per_axis[0] for j in per_axis[1] for i in per_axis[2]]


#: The largest window overlap a whole-volume scan accepts: 0.75 already evaluates about 27 times
#: the windows of 0.25.
MAX_SCAN_OVERLAP = 0.75


def is_scan_overlap(value: object) -> bool:
    """Whether ``value`` is a usable whole-volume scan overlap: a number (not a bool) in
    [0, MAX_SCAN_OVERLAP] (NaN is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= MAX_SCAN_OVERLAP


def sliding_window_centers(prepared: Volume, preset: Preset, overlap: float = 0.25) -> list[tuple[int, int, int]]:
    """Centres of windows tiling the whole prepared volume with the given fractional overlap."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    per_axis = []
    for size, n in zip(preset.window, prepared.shape):
        if size >= n:
            per_axis.append([n // 2])
            continue
        step = max(1, int(size * (1.0 - overlap)))
        first, last = size // 2, n - size + size // 2  # windows flush with both ends
        centers = list(range(first, last + 1, step))
        if centers[-1] != last:
            centers.append(last)
        per_axis.append(centers)
    return [(k, j, i) for k in per_axis[0] for j in per_axis[1] for i in per_axis[2]]


# --------------------------------------------------------------------------------------------------
# Training-time augmentation


def augment(
    window_array: np.ndarray,
    rng: np.random.Generator,
    preset: Optional[Preset] = None,
    *,
    rotate_degrees: int = 15,
    flip_probability: float = 0.5,
    scale_range: float = 0.0,
    mirror_all_axes: bool = False,
    fill: Optional[float] = None,
) -> np.ndarray:
    """Augment one window [D, H, W]; same shape and dtype.

    The reference's augmentation: an in-plane rotation by a random integer angle in
    [-rotate_degrees, rotate_degrees] about the slice centre and a left-right flip with
    ``flip_probability``. Optional, off by default (nnU-Net's practice): an isotropic zoom about the
    window centre by a factor drawn from [1 - scale_range, 1 + scale_range] (the same in mm along
    every axis), and mirroring front-back and head-foot, each with probability 0.5. Outside is
    filled with air (the preset's normalised -1000 HU; without a preset, the window's minimum).
    Random numbers are drawn only for the operations that are on, so adding an option leaves the
    draws of runs without it unchanged.
    """
    import torch

    arr = np.asarray(window_array, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"augment expects one window [D, H, W], got shape {arr.shape}")
    if not 0.0 <= scale_range < 1.0:
        raise ValueError(f"scale_range must be in [0, 1), got {scale_range}")
    if fill is None:
        fill = air_value(preset) if preset is not None else float(arr.min())
    angle = int(rng.integers(-int(rotate_degrees), int(rotate_degrees) + 1)) if rotate_degrees else 0
    flip = flip_probability > 0 and bool(rng.random() < flip_probability)  # no draw when off
    factor = float(rng.uniform(1.0 - scale_range, 1.0 + scale_range)) if scale_range else 1.0
    mirrors = [int(axis) for axis in (1, 0) if rng.random() < 0.5] if mirror_all_axes else []
    out = arr
    if angle or factor != 1.0:
        d, h, w = arr.shape
        a = math.radians(angle)
        # output -> input sampling coordinates (x = W, y = H), normalised to [-1, 1]; the rotation
        # is in pixel units so non-square slices stay undistorted
        rotation = [[math.cos(a), -math.sin(a) * h / w], [math.sin(a) * w / h, math.cos(a)]]
        x = torch.from_numpy(np.ascontiguousarray(arr) - np.float32(fill))  # air -> 0: zero padding is air
        if factor != 1.0:  # one trilinear resampling in 3-D; factor > 1 samples more, i.e. shrinks
            theta = torch.tensor(
                [[factor * v for v in rotation[0]] + [0.0, 0.0], [factor * v for v in rotation[1]] + [0.0, 0.0],
                 [0.0, 0.0, factor, 0.0]], dtype=torch.float32)
            grid = torch.nn.functional.affine_grid(theta[None], [1, 1, d, h, w], align_corners=False)
            y = torch.nn.functional.grid_sample(x[None, None], grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=False)[0, 0]
        else:  # rotation only, slice by slice: exactly no mixing between slices
            theta = torch.tensor([rotation[0] + [0.0], rotation[1] + [0.0]], dtype=torch.float32)
            grid = torch.nn.functional.affine_grid(theta.expand(d, 2, 3), [d, 1, h, w], align_corners=False)
            y = torch.nn.functional.grid_sample(x.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                                                align_corners=False).squeeze(1)
        out = y.numpy() + np.float32(fill)
    if flip:
        out = out[:, :, ::-1]
    for axis in mirrors:
        out = np.flip(out, axis=axis)
    return np.ascontiguousarray(out, dtype=np.float32)
