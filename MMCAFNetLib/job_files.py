"""The on-disk form of one classification job, shared by Slicer's side and the worker process.

A job is a folder. The caller writes the inputs (``ct.npy``, an optional ``lesion_mask.npy`` and
``inputs.json``: geometry, clinical record, lesion, options), then ``request.json`` last, by an
atomic rename, so the worker never sees a half-written job. The worker writes ``heatmap.npy`` and
``labelmap.npy`` (the block of the CT grid that holds their non-zero voxels) and ``result.json``
(last, atomically). Plain ``.npy`` and JSON: nothing in a job
folder can run code when read (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.results import Candidate, Classification, WindowResult
from MMCAFNetLib.strict_json import dumps as strict_dumps
from MMCAFNetLib.volume import Volume

REQUEST_FILE = "request.json"
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel"


class JobFileError(ValueError):
    """A job folder is incomplete or malformed."""


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so that a reader sees either nothing or the whole file (rename is atomic)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(strict_dumps(data, default=_plain), encoding="utf-8")
    os.replace(partial, path)


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> Python numbers and lists for JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot be written to a job file")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise JobFileError(f"{path} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise JobFileError(f"{path} does not hold a JSON object")
    return data


def _finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """NaN is not JSON: a NaN value is an unknown one."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}


# ----------------------------------------------------------------------------------------------
# Inputs (written by the caller, read by the worker)
# ----------------------------------------------------------------------------------------------


def write_request(folder: Path, volume: Volume, record: dict[str, Any], lesion: Any, options: dict[str, Any]) -> None:
    """Write one job's inputs into ``folder`` (which must exist), ``request.json`` last."""
    folder = Path(folder)
    np.save(folder / "ct.npy", np.ascontiguousarray(volume.array), allow_pickle=False)
    lesion_spec: dict[str, Any]
    if lesion is None:
        lesion_spec = {"kind": "none"}
    elif isinstance(lesion, Volume):
        np.save(folder / "lesion_mask.npy", np.ascontiguousarray(lesion.array), allow_pickle=False)
        lesion_spec = {"kind": "mask", "ijk_to_ras": lesion.ijk_to_ras}
    else:
        values = np.asarray(lesion, dtype=np.float64)
        if values.shape not in ((3,), (2, 3)):
            raise JobFileError(f"a lesion must be a RAS point (3,) or box (2, 3); got shape {values.shape}")
        lesion_spec = {"kind": "point" if values.shape == (3,) else "box", "ras": values}
    inputs = {
        "ijk_to_ras": volume.ijk_to_ras,
        "meta": {k: v for k, v in volume.meta.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "record": _finite_record(record),
        "lesion": lesion_spec,
        "options": options,
    }
    _write_json(folder / "inputs.json", inputs)
    _write_json(folder / REQUEST_FILE, {"job": folder.name})


def write_load_request(folder: Path, options: dict[str, Any]) -> None:
    """A job that only loads the model named in ``options`` (so that the first Apply finds it loaded)."""
    _write_json(Path(folder) / "inputs.json", {"options": options, "load_only": True})
    _write_json(Path(folder) / REQUEST_FILE, {"job": Path(folder).name})


def read_inputs(folder: Path) -> dict[str, Any]:
    """The job's ``inputs.json``: ``load_only`` says whether it is a :func:`write_load_request` job."""
    return _read_json(Path(folder) / "inputs.json")


def read_request(folder: Path, inputs: Optional[dict[str, Any]] = None) -> tuple[Volume, dict[str, Any], Any, dict[str, Any]]:
    """(volume, record, lesion, options) of a job written by :func:`write_request` (``inputs``: its
    :func:`read_inputs`, when already read)."""
    folder = Path(folder)
    inputs = read_inputs(folder) if inputs is None else inputs
    array = np.load(folder / "ct.npy", allow_pickle=False)
    volume = Volume(array, np.asarray(inputs["ijk_to_ras"], dtype=np.float64), dict(inputs.get("meta") or {}))
    spec = inputs.get("lesion") or {"kind": "none"}
    kind = spec.get("kind")
    if kind == "none":
        lesion = None
    elif kind == "mask":
        lesion = Volume(np.load(folder / "lesion_mask.npy", allow_pickle=False), np.asarray(spec["ijk_to_ras"]))
    elif kind in ("point", "box"):
        lesion = np.asarray(spec["ras"], dtype=np.float64)
    else:
        raise JobFileError(f"{folder}: unknown lesion kind {kind!r}")
    return volume, dict(inputs.get("record") or {}), lesion, dict(inputs.get("options") or {})


# ----------------------------------------------------------------------------------------------
# Result (written by the worker, read by the caller)
# ----------------------------------------------------------------------------------------------


def nonzero_block(array: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest (K, J, I) block holding every non-zero voxel (an empty block for an all-zero array).

    A lesion-guided heatmap is zero outside its windows, so on a 512x512x300 CT the block is a
    small part of the grid: only it goes through the files.
    """
    nonzero = array != 0
    block = []
    for axis in range(3):
        present = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        block.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, 0))
    return tuple(block)  # type: ignore[return-value]


def write_result(folder: Path, result: Classification) -> None:
    """Write a Classification: the maps' non-zero blocks as ``.npy``, the rest as JSON, JSON last."""
    folder = Path(folder)
    maps: dict[str, Any] = {}
    for name in ("heatmap", "labelmap"):
        volume: Optional[Volume] = getattr(result, name)
        if volume is not None:
            block = nonzero_block(volume.array)
            np.save(folder / f"{name}.npy", np.ascontiguousarray(volume.array[block]), allow_pickle=False)
            maps[name] = {
                "ijk_to_ras": volume.ijk_to_ras, "shape": list(volume.shape),
                "block": [[sl.start, sl.stop] for sl in block],
            }
    data = {
        "class_names": list(result.class_names),
        "class_labels": list(result.class_labels),
        "probabilities": np.asarray(result.probabilities, dtype=np.float64),
        "predicted_index": int(result.predicted_index),
        "threshold": float(result.threshold),
        "windows": [
            {"center_ras": list(w.center_ras), "box_ras": [list(c) for c in w.box_ras], "probabilities": list(w.probabilities)}
            for w in result.windows
        ],
        "label_value": int(result.label_value),
        "timings": dict(result.timings),
        "model": dict(result.model),
        "warnings": list(result.warnings),
        "candidates": [{"ras": list(c.ras), "value": float(c.value)} for c in result.candidates],
        "maps": maps,
    }
    _write_json(folder / RESULT_FILE, data)


def read_result(folder: Path) -> Classification:
    """The Classification written by :func:`write_result`."""
    folder = Path(folder)
    data = _read_json(folder / RESULT_FILE)
    maps = {}
    for name, spec in (data.get("maps") or {}).items():
        block = np.load(folder / f"{name}.npy", allow_pickle=False)
        array = np.zeros(tuple(spec["shape"]), dtype=block.dtype)
        array[tuple(slice(a, b) for a, b in spec["block"])] = block
        maps[name] = Volume(array, np.asarray(spec["ijk_to_ras"], dtype=np.float64))
    windows = [
        WindowResult(
            center_ras=tuple(w["center_ras"]),
            box_ras=(tuple(w["box_ras"][0]), tuple(w["box_ras"][1])),
            probabilities=list(w["probabilities"]),
        )
        for w in data.get("windows", [])
    ]
    return Classification(
        class_names=list(data["class_names"]),
        class_labels=list(data["class_labels"]),
        probabilities=np.asarray(data["probabilities"], dtype=np.float64),
        predicted_index=int(data["predicted_index"]),
        threshold=float(data["threshold"]),
        windows=windows,
        heatmap=maps.get("heatmap"),
        labelmap=maps.get("labelmap"),
        label_value=int(data["label_value"]),
        timings=dict(data.get("timings") or {}),
        model=dict(data.get("model") or {}),
        warnings=list(data.get("warnings") or []),
        candidates=[Candidate.from_plain(c) for c in data.get("candidates") or []],
    )
