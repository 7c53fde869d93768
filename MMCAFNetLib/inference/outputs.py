"""The files a classification leaves behind: prediction.json, heatmap.nrrd, labelmap.nrrd, preview.png.

Everything is written into a temporary folder next to the destination and moved into place only
when every file is complete, so a failure (bad input, full disk, Ctrl-C) leaves nothing
half-written: a new folder appears whole or not at all; in an existing folder the finished files
replace the old ones one by one (each ``os.replace`` is atomic).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

from MMCAFNetLib.inference.heatmap_file import read_heatmap, write_heatmap, write_labelmap
from MMCAFNetLib.plain import to_plain
from MMCAFNetLib.results import Classification
from MMCAFNetLib.volume import Volume

OUTPUT_FILES = ("prediction.json", "heatmap.nrrd", "labelmap.nrrd", "preview.png")

__all__ = ["OUTPUT_FILES", "prediction_dict", "read_heatmap", "write_outputs"]

DEMO_NOTE = (
    "DEMO MODEL: trained on synthetic phantoms only. Its output says nothing about real patients; "
    "not for clinical use."
)
RESEARCH_NOTE = "Research software: not a medical device, not for clinical use."


def prediction_dict(
    result: Classification,
    *,
    input_path: Optional[str] = None,
    case_id: Optional[str] = None,
    record: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """The JSON-ready summary of one classification (what prediction.json holds)."""
    from MMCAFNetLib import __version__

    demo = bool(result.model.get("demo"))
    return {
        "case_id": case_id,
        "input": input_path,
        "predicted_class": result.predicted_class,
        "predicted_label": result.predicted_label,
        "probability": round(result.probability, 6),
        "probabilities": {c: round(float(p), 6) for c, p in zip(result.class_names, result.probabilities)},
        "class_names": list(result.class_names),
        "class_labels": list(result.class_labels),
        "decision_threshold": result.model.get("decision_threshold"),
        "heatmap_method": result.model.get("heatmap"),
        "heatmap_threshold": float(result.threshold),
        "label_value": int(result.label_value),
        "lesion_box_ras": result.model.get("lesion_box_ras"),
        "clinical_record": _json_plain(record) if record is not None else None,
        "windows": [
            {
                "center_ras": [round(float(v), 3) for v in w.center_ras],
                "box_ras": [[round(float(v), 3) for v in corner] for corner in w.box_ras],
                "probabilities": [round(float(p), 6) for p in w.probabilities],
            }
            for w in result.windows
        ],
        "timings": {k: round(float(v), 4) for k, v in result.timings.items()},
        "model": _json_plain(result.model),
        "warnings": list(result.warnings),
        "note": DEMO_NOTE if demo else RESEARCH_NOTE,
        "library_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def write_outputs(
    result: Classification,
    ct: Volume,
    out_dir: str | os.PathLike,
    *,
    input_path: Optional[str] = None,
    case_id: Optional[str] = None,
    record: Optional[dict[str, Any]] = None,
    preview: bool = True,
    preview_box_ras: Optional[Any] = None,
) -> dict[str, Path]:
    """Write the four files for one case into ``out_dir``; returns {file name: final path}.

    heatmap.nrrd and labelmap.nrrd carry the input CT's exact geometry; without a heatmap they are
    not written (and neither is an older copy left behind in ``out_dir``). ``preview_box_ras``
    draws another box than the lesion guidance on the preview (the demo draws the true lesion).
    """
    from MMCAFNetLib.preview import render_preview

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a folder for the results")
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    volume_writes: list = []
    try:
        info = prediction_dict(result, input_path=input_path, case_id=case_id, record=record)
        with open(tmp / "prediction.json", "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=2)
            fh.write("\n")
        # The volumes are compressed on a thread (zlib releases the GIL) while the preview renders.
        volume_writes = _start_volume_writes(result, tmp)
        if preview and not _has_matplotlib():
            warnings.warn(
                "preview.png was not written: it needs matplotlib (pip install matplotlib, or the "
                "package's [train] extra); the prediction, heatmap and labelmap are complete",
                stacklevel=2,
            )
        elif preview:
            title = result.decision_text()
            if result.model.get("demo"):
                title += "   DEMO model, synthetic data, not for clinical use"
            box = preview_box_ras if preview_box_ras is not None else result.model.get("lesion_box_ras")
            render_preview(ct, tmp / "preview.png", heatmap=result.heatmap, lesion_box_ras=box, title=title)
        for future in volume_writes:
            future.result()  # re-raises a failed write
        written = sorted(p.name for p in tmp.iterdir())
        return _publish(tmp, out_dir, written)
    finally:
        if volume_writes:  # never remove the folder under a write still running
            from concurrent.futures import wait

            wait(volume_writes)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _start_volume_writes(result: Classification, folder: Path) -> list:
    """Write heatmap.nrrd (compact: uint8, cropped, see ``heatmap_file``) and labelmap.nrrd on a
    worker thread; returns the futures (empty when there is no heatmap)."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = []
    if result.heatmap is not None:
        jobs.append((write_heatmap, result.heatmap, folder / "heatmap.nrrd"))
    if result.labelmap is not None:
        jobs.append((write_labelmap, result.labelmap, folder / "labelmap.nrrd"))
    if not jobs:
        return []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmcafnet-write")
    futures = [pool.submit(fn, volume, path) for fn, volume, path in jobs]
    pool.shutdown(wait=False)  # the submitted writes run on; the caller waits on the futures
    return futures


def _publish(tmp: Path, out_dir: Path, names: list[str]) -> dict[str, Path]:
    """Move the finished files into place: a whole-folder rename when ``out_dir`` is new or empty."""
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if not out_dir.exists():
        os.replace(tmp, out_dir)
    else:
        for name in names:
            os.replace(tmp / name, out_dir / name)
        for stale in OUTPUT_FILES:  # an older run's heatmap must not outlive a run without one
            if stale not in names and (out_dir / stale).is_file():
                (out_dir / stale).unlink()
    return {name: out_dir / name for name in names}


def _json_plain(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    return to_plain(value, nonfinite_as_none=True)


def _has_matplotlib() -> bool:
    """preview.png needs matplotlib, which is not a run-time dependency (Slicer users need no PNG)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
