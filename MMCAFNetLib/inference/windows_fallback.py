"""A minimal stand-in for ``MMCAFNetLib.windows``, used only while that module is absent.

Same four functions, same meaning (see the windows module): the CT is prepared on the preset's
grid, windows are cut padded with air, lesion windows cover the lesion's whole extent and sliding
windows tile the volume. The Predictor prefers the real module whenever it is importable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from MMCAFNetLib.preset import Preset
from MMCAFNetLib.volume import Volume, resample_to_grid

AIR_HU = -1000.0


@dataclass
class Window:
    array: np.ndarray  # float32 [D, H, W], normalised
    ijk_to_ras: np.ndarray
    start_kji: tuple[int, int, int]


def prepare_volume(volume: Volume, preset: Preset) -> Volume:
    """HU float32 on the preset's grid (physical spacing, or native slices resized in-plane)."""
    shape = np.array(volume.shape, dtype=float)  # K, J, I
    spacing_kji = volume.spacing[::-1]
    if preset.spacing is None:
        new_shape = np.array([shape[0], preset.window[1], preset.window[2]])
    else:
        new_shape = np.maximum(np.round(shape * spacing_kji / np.array(preset.spacing)), 1)
    new_spacing_kji = spacing_kji * shape / new_shape
    affine = volume.ijk_to_ras.copy()
    scale_ijk = (new_spacing_kji / spacing_kji)[::-1]
    affine[:3, :3] = volume.ijk_to_ras[:3, :3] * scale_ijk[None, :]
    # Keep the field of view: the outer voxel edges stay where they were.
    affine[:3, 3] = volume.ijk_to_ras_points([(scale_ijk - 1.0) / 2.0])[0]
    out = resample_to_grid(volume, affine, tuple(int(v) for v in new_shape), "linear", default=AIR_HU)
    return Volume(out.array.astype(np.float32, copy=False), affine, dict(volume.meta))


def cut_window(prepared: Volume, center_kji: Sequence[int], preset: Preset) -> Window:
    size = np.array(preset.window)
    start = np.round(np.asarray(center_kji, dtype=float)).astype(int) - size // 2
    arr = np.full(tuple(size), AIR_HU, dtype=np.float32)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, prepared.shape)
    if np.all(hi > lo):
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
        arr[dst] = prepared.array[src]
    shift = np.eye(4)
    shift[:3, 3] = start[::-1]
    return Window(preset.normalise(arr).astype(np.float32), prepared.ijk_to_ras @ shift, tuple(int(v) for v in start))


def _axis_centers(lo: float, hi: float, size: int, n_axis: int) -> list[int]:
    extent = hi - lo + 1
    if size >= n_axis:
        return [n_axis // 2]
    if extent <= size:
        return [round((lo + hi) / 2)]
    count = math.ceil(extent / size)
    first, last = lo + size / 2 - 0.5, hi - size / 2 + 0.5
    return sorted({round(first + (last - first) * i / (count - 1)) for i in range(count)})


def window_centers_for_box(prepared: Volume, box_kji_min, box_kji_max, preset: Preset) -> list[tuple[int, int, int]]:
    per_axis = [
        _axis_centers(float(a), float(b), int(s), int(n))
        for a, b, s, n in zip(box_kji_min, box_kji_max, preset.window, prepared.shape)
    ]
    return [(k, j, i) for k in per_axis[0] for j in per_axis[1] for i in per_axis[2]]


def sliding_window_centers(prepared: Volume, preset: Preset, overlap: float = 0.25) -> list[tuple[int, int, int]]:
    per_axis = []
    for size, n in zip(preset.window, prepared.shape):
        if size >= n:
            per_axis.append([n // 2])
            continue
        step = max(1, int(size * (1.0 - overlap)))
        centers = list(range(size // 2, n - size // 2 + 1, step))
        if centers[-1] < n - size // 2 - 1 + (size % 2):
            centers.append(n - (size - size // 2))
        per_axis.append(sorted(set(centers)))
    return [(k, j, i) for k in per_axis[0] for j in per_axis[1] for i in per_axis[2]]
