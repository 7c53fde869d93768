"""A small, streaming NRRD writer for the classification's outputs (heatmap and labelmap).

Why not SimpleITK's writer: it compresses at one fixed level while holding Python's GIL, so the
output files cannot be written side by side, and it cannot say how a quantised heatmap maps back to
0..1. This writer compresses slab by slab with ``zlib`` (which releases the GIL, so files written on
threads overlap), never copies the whole volume, and adds ``key:=value`` fields that NRRD readers
(Slicer/teem, ITK/SimpleITK) keep as metadata. Geometry: the library's IJK->RAS matrix written in
LPS (``space: left-posterior-superior``), through ``volume.lps_from_ras``, so Slicer and SimpleITK
place the voxels where the library does.
"""

from __future__ import annotations

import os
import uuid
import zlib
from typing import Any, Callable, Mapping, Optional

import numpy as np

from MMCAFNetLib.volume import lps_from_ras

_NRRD_TYPES = {
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int16): "int16",
    np.dtype(np.float32): "float",
}
#: Bytes compressed at a time: small enough to stream, large enough for zlib to work well.
_SLAB_BYTES = 4 << 20


def _vector(values) -> str:
    return "(" + ",".join(repr(float(v)) for v in values) + ")"


def nrrd_header(shape_kji, dtype: np.dtype, ijk_to_ras: np.ndarray, fields: Optional[Mapping[str, str]] = None,
                encoding: str = "gzip") -> bytes:
    """The text header of a 3D NRRD volume (ends with the blank line before the data)."""
    dtype = np.dtype(dtype)
    if dtype not in _NRRD_TYPES:
        raise ValueError(f"NRRD writer: unsupported voxel type {dtype}")
    lps = lps_from_ras(np.asarray(ijk_to_ras, dtype=np.float64))
    k, j, i = (int(n) for n in shape_kji)
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPES[dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {i} {j} {k}",
        "space directions: " + " ".join(_vector(lps[:3, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        f"encoding: {encoding}",
        "space origin: " + _vector(lps[:3, 3]),
    ]
    for key, value in (fields or {}).items():
        if any(ch in f"{key}{value}" for ch in "\n\r") or ":=" in key:
            raise ValueError(f"NRRD field {key!r} holds a line break or ':='")
        lines.append(f"{key}:={value}")
    return ("\n".join(lines) + "\n\n").encode("ascii")


def write_nrrd(path: str | os.PathLike, array: np.ndarray, ijk_to_ras: np.ndarray,
               fields: Optional[Mapping[str, str]] = None, level: int = 1,
               encode: Optional[Callable[[np.ndarray], np.ndarray]] = None, dtype: Any = None) -> None:
    """Write ``array`` (K, J, I) as a gzip-compressed NRRD, atomically (temporary file, then rename).

    ``encode`` (with the ``dtype`` it returns) converts each slab of slices as it is written, so a
    quantised copy of the whole volume never exists.
    """
    path = os.fspath(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"NRRD writer: a 3D array is needed, got shape {array.shape}")
    if encode is None:
        encode, dtype = (lambda slab: slab), array.dtype
    little = np.dtype(dtype).newbyteorder("<")
    header = nrrd_header(array.shape, little, ijk_to_ras, fields)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    slab = max(1, _SLAB_BYTES // max(1, array[0].nbytes))
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            packer = zlib.compressobj(int(level), zlib.DEFLATED, 31)  # wbits 31: a gzip stream
            for k0 in range(0, array.shape[0], slab):
                block = np.ascontiguousarray(encode(array[k0 : k0 + slab]), dtype=little)
                fh.write(packer.compress(memoryview(block).cast("B")))
            fh.write(packer.flush())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
