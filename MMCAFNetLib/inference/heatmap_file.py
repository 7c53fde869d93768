"""heatmap.nrrd and labelmap.nrrd: compact files that still overlay the CT exactly.

The heatmap (0..1 on the CT's grid) is stored as:
- **uint8**: stored value ``q = round(255 * h)``; the value is ``h = q * scale`` with
  ``scale = 1/255`` written in the header field ``MMCAFNet_heatmap_scale``. The quantisation step is
  1/255 (at most 1/510 from the computed value);
- **cropped** to the smallest block of CT voxels holding every non-zero value, on the CT's own voxel
  lattice: the same spacing and directions, the origin moved to the block's first voxel, so a viewer
  that places volumes by their geometry (Slicer, ITK) overlays it voxel for voxel; outside the block
  the heatmap is 0. ``MMCAFNet_block_start_ijk`` and ``MMCAFNet_reference_sizes`` give the block's
  place in the CT grid;
- **gzip-compressed** NRRD.

The labelmap stays on the CT's whole grid (a segmentation made from it then has the CT's extent),
uint8, gzip-compressed: zeros cost almost nothing. :func:`read_heatmap` reads a heatmap back (this
format, or a plain float NRRD from an older version) as float32 0..1 with its geometry.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from MMCAFNetLib.volume import Volume

FORMAT = "mmcafnet-heatmap-uint8-1"
SCALE = 1.0 / 255.0
#: Largest difference between a stored heatmap value and the value it was computed as.
QUANTISATION_ERROR = SCALE / 2.0
#: gzip level of both files. On a whole-volume scan's 313x512x512 heatmap level 1 took 1.1 s for
#: 15.5 MB, level 6 4.7 s for 9.5 MB (docs/performance.md); the labelmap is mostly zeros.
HEATMAP_LEVEL = 1
LABELMAP_LEVEL = 1


def quantise(values: np.ndarray) -> np.ndarray:
    """0..1 float -> uint8 steps of ``SCALE`` (values outside 0..1 are clipped)."""
    q = np.clip(values, 0.0, 1.0).astype(np.float32, copy=False)
    q *= np.float32(255.0)
    return np.rint(q, out=q).astype(np.uint8)


def nonzero_block(array: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(lo, hi) (k, j, i), hi exclusive, of the non-zero voxels; None when all are zero."""
    axes = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(array.any(axis=other))
        if hit.size == 0:
            return None
        axes.append((int(hit[0]), int(hit[-1]) + 1))
    return np.array([a for a, _ in axes]), np.array([b for _, b in axes])


def write_heatmap(heatmap: Volume, path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Write the compact heatmap file; returns the block (lo, hi) (k, j, i) it holds."""
    from MMCAFNetLib.nrrd_writer import write_nrrd

    values = heatmap.array
    block = nonzero_block(values > np.float32(QUANTISATION_ERROR))
    if block is None:  # an all-zero map: one zero voxel keeps the geometry
        block = (np.zeros(3, dtype=np.int64), np.ones(3, dtype=np.int64))
    lo, hi = block
    stored = values[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]  # a view: quantised slab by slab
    affine = heatmap.ijk_to_ras.copy()
    affine[:3, 3] = heatmap.ijk_to_ras[:3, :3] @ lo[::-1].astype(np.float64) + heatmap.ijk_to_ras[:3, 3]
    fields = {
        "MMCAFNet_format": FORMAT,
        "MMCAFNet_heatmap_scale": repr(SCALE),
        "MMCAFNet_block_start_ijk": " ".join(str(int(v)) for v in lo[::-1]),
        "MMCAFNet_reference_sizes": " ".join(str(int(v)) for v in heatmap.shape[::-1]),
    }
    for key in ("method", "predicted_class"):
        if heatmap.meta.get(key) is not None:
            fields[f"MMCAFNet_{key}"] = str(heatmap.meta[key])
    write_nrrd(path, stored, affine, fields, level=HEATMAP_LEVEL, encode=quantise, dtype=np.uint8)
    return lo, hi


def write_labelmap(labelmap: Volume, path: str | os.PathLike) -> None:
    """The labelmap on the CT's grid, uint8, gzip-compressed."""
    from MMCAFNetLib.nrrd_writer import write_nrrd

    write_nrrd(path, labelmap.array.astype(np.uint8, copy=False), labelmap.ijk_to_ras, level=LABELMAP_LEVEL)


def read_heatmap(path: str | os.PathLike, full_grid: bool = False) -> Volume:
    """A heatmap file as float32 0..1 with its geometry (IJK->RAS), as the library wrote it.

    Reads the compact format (uint8 with a scale, cropped to a block of the CT's lattice) and plain
    float heatmaps alike. With ``full_grid`` a cropped heatmap is put back on the CT's whole grid
    (zeros outside the block); by default the block is returned, which overlays the CT exactly.
    ``meta`` holds ``block_start_ijk`` and ``reference_sizes`` (I, J, K) when the file has them.
    """
    import SimpleITK as sitk

    from MMCAFNetLib.volume import VolumeError, from_sitk

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"heatmap file not found: {path}")
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        image = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"cannot read the heatmap {path}: is the file complete? ({str(exc).strip().splitlines()[-1]})") from exc
    fields = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    volume = from_sitk(image, {"source": path, "kind": "heatmap"})
    scale = fields.get("MMCAFNet_heatmap_scale")
    if scale is not None:
        array = volume.array.astype(np.float32) * np.float32(float(scale))
    else:
        array = volume.array.astype(np.float32, copy=False)
    meta = {"source": path, "kind": "heatmap", "format": fields.get("MMCAFNet_format", "float")}
    for key in ("method", "predicted_class"):
        if f"MMCAFNet_{key}" in fields:
            meta[key] = fields[f"MMCAFNet_{key}"]
    start = _ints(fields.get("MMCAFNet_block_start_ijk"))
    sizes = _ints(fields.get("MMCAFNet_reference_sizes"))
    if start is not None and sizes is not None:
        meta.update(block_start_ijk=start, reference_sizes=sizes)
    if full_grid and start is not None and sizes is not None:
        full = np.zeros(sizes[::-1], dtype=np.float32)
        k, j, i = start[::-1]
        full[k : k + array.shape[0], j : j + array.shape[1], i : i + array.shape[2]] = array
        affine = volume.ijk_to_ras.copy()
        affine[:3, 3] = volume.ijk_to_ras[:3, 3] - volume.ijk_to_ras[:3, :3] @ np.array(start, dtype=np.float64)
        return Volume(full, affine, meta)
    return Volume(array, volume.ijk_to_ras, meta)


def _ints(text: Optional[str]) -> Optional[tuple[int, int, int]]:
    if not text:
        return None
    parts = text.split()
    if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)  # type: ignore[return-value]
