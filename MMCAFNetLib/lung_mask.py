"""Which windows of a whole-volume scan can hold a lung lesion: a cheap body and lung mask from HU.

Why: without a lesion mark the Predictor tiles the whole CT with windows, and most of a chest CT's
windows hold air around the patient, the shoulders, the abdomen or the table. Lung cancer lies in
the lungs or against them (pleura, mediastinum, hilum), so only windows that reach the lungs are
worth a forward pass. The mask is made on the prepared grid (already resampled to the preset's
coarse spacing), in a fraction of a second:

1. body: voxels above ``BODY_HU`` (-500 HU: soft tissue, bone, solid lesions; lung and air are below);
2. lungs: the air that the body encloses. The body mask, closed at the first and last slice (a scan
   cut through the trachea or the lung apices stays closed), has its holes filled
   (``SimpleITK.BinaryFillhole``); the filled voxels that are not body are the lungs, the airways and
   any gas inside the body. Air outside the patient touches the in-plane border and is not filled;
3. the lungs grown by ``MARGIN_MM`` (SimpleITK's binary dilation with a box of that size), so a
   lesion against the chest wall, the mediastinum or the diaphragm is inside the mask.

A window is kept when its **core** reaches the grown mask. The core is the part of the window that
no neighbour holds better centred: along each axis it runs from the midpoint between its centre
and the previous window's to the midpoint with the next one's (half the overlap is trimmed on each
side), and to the volume's border for the first and last window. The cores tile the volume, one
window per voxel, so every voxel of the grown lungs, a lesion's included, lies in the core of a
kept window, at least half an overlap from that window's edge (or at the CT's border). Windows
whose lung content is only a sliver along their edge, which a neighbour holds better centred, are
dropped: on a chest-only field of view (the lungs fill most of it and the windows are 144-192 mm
wide) the rule "any voxel of the window" dropped none. ``reach="extent"`` gives that older rule.
Max aggregation over the kept windows is unchanged for every window kept
(``Testing/test_lung_mask.py`` checks it on synthetic chest CTs). Where no enclosed air is found
(not a chest CT, or a body cut by the field of view) the windows whose core holds body are kept
instead, with a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from MMCAFNetLib.preset import Preset
from MMCAFNetLib.volume import Volume

#: HU above which a voxel is body tissue (lung parenchyma is about -850, air -1000, fat -100).
BODY_HU = -500.0
#: How far beyond the air-filled lung a lesion may sit and still be scanned (chest wall, mediastinum).
MARGIN_MM = 15.0
#: The mask is computed on voxels of at least this size (a strided view of a finer grid).
MASK_VOXEL_MM = 2.0
#: Lungs smaller than this volume (ml) are taken as gas pockets, not lungs (the fallback applies).
MIN_LUNG_ML = 20.0
#: HU above which a voxel counts as body for the fallback (any tissue, as the sliding scan used).
FALLBACK_BODY_HU = -900.0


@dataclass
class WindowSelection:
    """The windows of a scan to evaluate, and why the others were dropped."""

    kept: list[tuple[int, int, int]]
    dropped: list[tuple[int, int, int]]
    method: str  # "lung mask" or "body" (fallback)
    lung_ml: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _strides(prepared: Volume) -> tuple[int, int, int]:
    spacing_kji = prepared.spacing[::-1]
    return tuple(max(1, int(MASK_VOXEL_MM // float(s))) for s in spacing_kji)  # type: ignore[return-value]


def body_and_lung_masks(
    prepared: Volume, margin_mm: float = MARGIN_MM
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """(body, lungs, grown lungs, strides): boolean masks on the prepared grid taken every ``strides`` voxels.

    ``prepared`` holds HU (``windows.prepare_volume`` or a block of it).
    """
    import SimpleITK as sitk

    strides = _strides(prepared)
    arr = prepared.array[:: strides[0], :: strides[1], :: strides[2]]
    body = arr > BODY_HU
    if body.shape[0] < 1 or not body.any():
        return body, np.zeros_like(body), np.zeros_like(body), strides
    closed = np.concatenate([np.ones_like(body[:1]), body, np.ones_like(body[:1])], axis=0).astype(np.uint8)
    filled = sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(closed), False, 1))[1:-1]
    lungs = (filled > 0) & ~body
    spacing_kji = prepared.spacing[::-1] * np.array(strides)
    grown = lungs
    if lungs.any() and margin_mm > 0:
        radius = [int(np.ceil(margin_mm / float(s))) for s in spacing_kji[::-1]]  # SimpleITK: (i, j, k)
        image = sitk.GetImageFromArray(lungs.astype(np.uint8))
        grown = sitk.GetArrayFromImage(sitk.BinaryDilate(image, radius, sitk.sitkBox, 0, 1)) > 0
    return body, lungs, grown, strides


def _box_counts(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero border: the count of any box is 8 lookups."""
    table = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64)
    table[1:, 1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    return table


def _count_in(table: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> int:
    """Voxels set in [lo, hi) (k, j, i) of the mask behind ``table``."""
    (a0, a1, a2), (b0, b1, b2) = lo, hi
    return int(
        table[b0, b1, b2] - table[a0, b1, b2] - table[b0, a1, b2] - table[b0, b1, a2]
        + table[a0, a1, b2] + table[a0, b1, a2] + table[b0, a1, a2] - table[a0, a1, a2]
    )


def _window_ranges(center: Sequence[int], preset: Preset, strides: Sequence[int], shape: Sequence[int]):
    size = np.array(preset.window, dtype=np.int64)
    start = np.rint(np.asarray(center, dtype=np.float64)).astype(np.int64) - size // 2
    st = np.array(strides, dtype=np.int64)
    lo = np.clip(-(-start // st), 0, np.array(shape))  # first strided voxel at or after start
    hi = np.clip(-(-(start + size) // st), 0, np.array(shape))
    return lo, hi


def window_cores(
    centers: Sequence[Sequence[int]], shape: Sequence[int]
) -> dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]:
    """{centre: (lo, hi)} (k, j, i, hi exclusive, on the grid of ``shape``): each window's core.

    Along each axis the distinct centres split the axis at the midpoints between neighbours
    (rounded up); the first core starts at 0 and the last ends at the axis' size. The cores of a
    sliding-window tiling therefore cover every voxel exactly once.
    """
    bounds = []
    for axis, n in enumerate(shape):
        cs = sorted({int(c[axis]) for c in centers})
        cuts = [0] + [-(-(a + b) // 2) for a, b in zip(cs, cs[1:])] + [int(n)]
        bounds.append({c: (cuts[m], cuts[m + 1]) for m, c in enumerate(cs)})
    cores = {}
    for c in centers:
        key = tuple(int(v) for v in c)
        spans = [bounds[axis][key[axis]] for axis in range(3)]
        cores[key] = (np.array([a for a, _ in spans], dtype=np.int64), np.array([b for _, b in spans], dtype=np.int64))
    return cores  # type: ignore[return-value]


def _strided(lo: np.ndarray, hi: np.ndarray, strides: Sequence[int], shape: Sequence[int]):
    """The strided voxels (index m stands for m * stride) lying in [lo, hi) of the full grid."""
    st = np.array(strides, dtype=np.int64)
    return np.clip(-(-lo // st), 0, np.array(shape)), np.clip(-(-hi // st), 0, np.array(shape))


def select_scan_windows(
    prepared: Volume, preset: Preset, centers: Sequence[Sequence[int]], margin_mm: float = MARGIN_MM,
    reach: str = "core",
) -> WindowSelection:
    """Split sliding-window centres (k, j, i on ``prepared``) into those that reach the lungs and the rest.

    ``reach="core"`` (default): a window is kept when its core (``window_cores``) reaches the mask;
    ``"extent"``: when any voxel of the window does.
    """
    if reach not in ("core", "extent"):
        raise ValueError(f"reach must be 'core' or 'extent', got {reach!r}")
    _, lungs, grown, strides = body_and_lung_masks(prepared, margin_mm)
    voxel_ml = float(np.prod(prepared.spacing * np.array(strides[::-1]))) / 1000.0
    core_ml = float(np.count_nonzero(lungs)) * voxel_ml  # the air-filled part decides whether lungs were found
    centers = [tuple(int(v) for v in c) for c in centers]
    if core_ml >= MIN_LUNG_ML:
        mask, method, warnings = grown, "lung mask", []
    else:
        arr = prepared.array[:: strides[0], :: strides[1], :: strides[2]]
        mask, method = arr > FALLBACK_BODY_HU, "body"
        warnings = [
            "no lungs were found in the CT (no air enclosed by the body); every window holding body tissue "
            "was evaluated. Mark the lesion for a faster, lesion-centred result"
        ]
    table = _box_counts(mask)
    cores = window_cores(centers, prepared.shape) if reach == "core" else {}
    kept, dropped = [], []
    for c in centers:
        if reach == "core":
            lo, hi = _strided(*cores[c], strides, mask.shape)
        else:
            lo, hi = _window_ranges(c, preset, strides, mask.shape)
        inside = np.all(hi > lo) and _count_in(table, lo, hi) > 0
        (kept if inside else dropped).append(c)  # type: ignore[arg-type]
    return WindowSelection(kept, dropped, method, core_ml, warnings)
