"""Reading a result folder back: what ``mmcafnet predict`` / ``demo`` wrote, as a Classification.

Used to load a server's batch results into Slicer for review (``slicer_logic.load_results``). Every
problem is a :class:`ResultFolderError` naming the file and what to do; nothing is half-read.
Heat maps are read through :func:`read_heatmap` alone, so a change of the heatmap file's encoding
is one change here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.results import Candidate, Classification, WindowResult
from MMCAFNetLib.volume import Volume

PREDICTION_FILE = "prediction.json"
HEATMAP_FILE = "heatmap.nrrd"
LABELMAP_FILE = "labelmap.nrrd"
CT_FILE = "ct.nrrd"
SUMMARY_FILE = "summary.csv"
REQUIRED_KEYS = ("class_names", "probabilities", "predicted_class")


class ResultFolderError(ValueError):
    """A folder that is not a readable result folder; the message says which file and why."""


@dataclass
class ResultFolder:
    """One case's results: the Classification, prediction.json as written, and where its CT is."""

    folder: Path
    prediction: dict[str, Any]
    result: Classification
    ct_path: Optional[Path]  # None when the CT named in prediction.json cannot be found


def read_heatmap(path: str | os.PathLike) -> Volume:
    """A heatmap file as float32 values 0..1 on the CT's whole grid (compact or float files alike)."""
    from MMCAFNetLib.inference.heatmap_file import read_heatmap as read_heatmap_file

    return read_heatmap_file(path, full_grid=True)


def _strict_json(path: Path) -> dict[str, Any]:
    from MMCAFNetLib.strict_json import loads_strict

    try:
        data = loads_strict(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ResultFolderError(f"{path} is not valid JSON ({exc}); write the results again with mmcafnet predict") from None
    if not isinstance(data, dict):
        raise ResultFolderError(f"{path} must hold a JSON object (a prediction), not {type(data).__name__}")
    return data


def case_folders(folder: str | os.PathLike) -> list[Path]:
    """The case folders of a batch result folder (those holding a prediction.json), sorted."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_dir() and (p / PREDICTION_FILE).is_file())


def is_batch_folder(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return not (folder / PREDICTION_FILE).is_file() and (
        (folder / SUMMARY_FILE).is_file() or bool(case_folders(folder))
    )


def read_result_folder(folder: str | os.PathLike) -> ResultFolder:
    """One case folder (prediction.json and, when a heatmap was made, heatmap.nrrd and labelmap.nrrd)."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"result folder not found: {folder}")
    if not folder.is_dir():
        raise ResultFolderError(f"{folder} is a file; give the folder mmcafnet predict wrote (it holds {PREDICTION_FILE})")
    path = folder / PREDICTION_FILE
    if not path.is_file():
        hint = (
            f"it is a batch folder: load it whole, or one of its cases (e.g. {case_folders(folder)[0].name})"
            if is_batch_folder(folder) and case_folders(folder) else
            "give the folder mmcafnet predict or mmcafnet demo wrote"
        )
        raise ResultFolderError(f"{folder} holds no {PREDICTION_FILE}; {hint}")
    prediction = _strict_json(path)
    missing = [k for k in REQUIRED_KEYS if k not in prediction]
    if missing:
        raise ResultFolderError(f"{path} lacks {', '.join(missing)}: it was not written by mmcafnet predict")
    result = _classification(prediction, path)
    maps: dict[str, Volume] = {}
    for name, reader in ((HEATMAP_FILE, read_heatmap), (LABELMAP_FILE, None)):
        if (folder / name).is_file():
            try:
                maps[name] = reader(folder / name) if reader else _read_labelmap(folder / name)
            except (OSError, ValueError, RuntimeError) as exc:
                raise ResultFolderError(f"{folder / name} cannot be read ({exc}); write the results again") from None
    if len(maps) == 2:
        heat, labels = maps[HEATMAP_FILE], maps[LABELMAP_FILE]
        if heat.shape != labels.shape or not np.allclose(heat.ijk_to_ras, labels.ijk_to_ras, atol=1e-4):
            raise ResultFolderError(
                f"{folder}: {HEATMAP_FILE} and {LABELMAP_FILE} lie on different grids; they come from different runs"
            )
    result.heatmap, result.labelmap = maps.get(HEATMAP_FILE), maps.get(LABELMAP_FILE)
    return ResultFolder(folder, prediction, result, _ct_path(folder, prediction))


def _read_labelmap(path: Path) -> Volume:
    from MMCAFNetLib.volume import read_volume

    volume = read_volume(path)
    if not np.issubdtype(volume.array.dtype, np.integer):
        raise ValueError(f"a labelmap holds integer labels, this one {volume.array.dtype}")
    return volume


def _classification(p: dict[str, Any], path: Path) -> Classification:
    try:
        names = [str(c) for c in p["class_names"]]
        labels = [str(c) for c in p.get("class_labels") or names]
        probabilities = np.array([float(p["probabilities"][c]) for c in names], dtype=np.float64)
        index = names.index(str(p["predicted_class"]))
        windows = [
            WindowResult(
                center_ras=tuple(float(v) for v in w["center_ras"]),  # type: ignore[arg-type]
                box_ras=tuple(tuple(float(v) for v in c) for c in w["box_ras"]),  # type: ignore[arg-type]
                probabilities=[float(v) for v in w["probabilities"]],
            )
            for w in p.get("windows") or []
        ]
        threshold = p.get("heatmap_threshold")
        return Classification(
            class_names=names, class_labels=labels, probabilities=probabilities, predicted_index=index,
            threshold=0.5 if threshold is None else float(threshold), windows=windows, heatmap=None, labelmap=None,
            label_value=int(p.get("label_value") or 0), timings=dict(p.get("timings") or {}),
            model=dict(p.get("model") or {}), warnings=[str(w) for w in p.get("warnings") or []],
            candidates=[Candidate.from_plain(c) for c in p.get("heatmap_candidates") or []],
        )
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ResultFolderError(f"{path} is inconsistent ({type(exc).__name__}: {exc}); write the results again") from None


def _ct_path(folder: Path, prediction: dict[str, Any]) -> Optional[Path]:
    """The CT: ct.nrrd beside the results (demo), else the input prediction.json names."""
    if (folder / CT_FILE).is_file():
        return folder / CT_FILE
    given = prediction.get("input")
    if not isinstance(given, str) or not given:
        return None
    path = Path(given)
    candidates = [path] if path.is_absolute() else [path, folder / path, folder.parent / path]
    return next((c for c in candidates if c.exists()), None)
