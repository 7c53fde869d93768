"""The files a classification leaves behind: prediction.json, heatmap.nrrd, labelmap.nrrd, its colour
table, segmentation.seg.nrrd, the heatmap's candidate places (candidates.mrk.json), preview.png, and
for a DICOM input segmentation.dcm and heatmap.dcm.

Everything is written into a temporary folder next to the destination and swapped in only when
every file is complete (``atomic.publish_folder``), so a failure (bad input, full disk, Ctrl-C, a
kill) leaves nothing half-written: the folder holds the earlier run's whole set or the new whole set,
never a mix; leftovers of killed runs are removed by the next run.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

from MMCAFNetLib.inference import slicer_files
from MMCAFNetLib.inference.heatmap_file import read_heatmap, write_heatmap, write_labelmap
from MMCAFNetLib.inference.slicer_files import CANDIDATES_FILE, COLOR_TABLE_FILE, SEGMENTATION_NRRD
from MMCAFNetLib.plain import to_plain
from MMCAFNetLib.results import Classification
from MMCAFNetLib.volume import Volume

#: What every classification with a heatmap writes (whatever the input).
OUTPUT_FILES = (
    "prediction.json", "heatmap.nrrd", "labelmap.nrrd", COLOR_TABLE_FILE, SEGMENTATION_NRRD, CANDIDATES_FILE,
    "preview.png",
)
#: Written besides for a DICOM input (``dicom=True``): a DICOM SEG and a Parametric Map.
DICOM_OUTPUT_FILES = ("segmentation.dcm", "heatmap.dcm")

__all__ = ["OUTPUT_FILES", "prediction_dict", "read_heatmap", "write_outputs"]

DEMO_NOTE = (
    "DEMO MODEL: trained on synthetic phantoms only. Its output says nothing about real patients; "
    "not for clinical use."
)
CT_FILE = "ct.nrrd"
RESEARCH_NOTE = "Research software: not a medical device, not for clinical use."


def prediction_dict(
    result: Classification,
    *,
    input_path: Optional[str] = None,
    case_id: Optional[str] = None,
    record: Optional[dict[str, Any]] = None,
    record_from_header: Optional[dict[str, Any]] = None,
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
        "heatmap_candidates": [
            {"rank": n, "ras": [round(float(v), 3) for v in c.ras], "value": round(float(c.value), 6)}
            for n, c in enumerate(result.candidates, 1)
        ],
        "clinical_record": _json_plain(record) if record is not None else None,
        "clinical_from_header": _json_plain(record_from_header or {}),  # values the DICOM header filled in
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
    record_from_header: Optional[dict[str, Any]] = None,
    dicom: bool = True,
    write_ct: bool = False,
) -> dict[str, Path]:
    """Write the files for one case into ``out_dir``; returns {file name: final path}.

    heatmap.nrrd, labelmap.nrrd and segmentation.seg.nrrd carry the input CT's exact geometry;
    without a heatmap they are not written (and neither is an older copy left behind in
    ``out_dir``). With ``dicom`` and a CT read from a DICOM series, segmentation.dcm and heatmap.dcm
    reference that series (when they cannot be made, a warning says why and the rest is written).
    ``write_ct`` adds the CT itself as ct.nrrd (the demo's folder is then self-contained).
    ``preview_box_ras`` draws another box than the lesion guidance on the preview (the demo draws
    the true lesion).
    """
    from MMCAFNetLib.atomic import make_staging_folder
    from MMCAFNetLib.preview import render_preview
    from MMCAFNetLib.strict_json import dumps as strict_dumps
    from MMCAFNetLib.volume import write_volume

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a folder for the results")
    tmp = make_staging_folder(out_dir)
    volume_writes: list = []
    try:
        # The volumes are compressed on a thread (zlib releases the GIL) while the rest is written.
        volume_writes = _start_volume_writes(result, tmp)
        if dicom:
            _write_dicom(result, ct, tmp)
        if write_ct:
            write_volume(ct, tmp / CT_FILE)
        info = prediction_dict(result, input_path=input_path, case_id=case_id, record=record,
                               record_from_header=record_from_header)
        (tmp / "prediction.json").write_text(strict_dumps(info, indent=2) + "\n", encoding="utf-8")
        if result.labelmap is not None:
            _write_slicer_files(result, tmp)
        if result.heatmap is not None:
            markups = slicer_files.candidates_markups(result.candidates)
            (tmp / CANDIDATES_FILE).write_text(strict_dumps(markups, indent=2) + "\n", encoding="utf-8")
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
            render_preview(ct, tmp / "preview.png", heatmap=result.heatmap, lesion_box_ras=box, title=title,
                           candidates_ras=[c.ras for c in result.candidates])
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
    """Swap the finished folder in as one set; files of the output set that this run did not write
    (an older run's heatmap) do not survive, files the user put there do."""
    from MMCAFNetLib.atomic import publish_folder

    publish_folder(tmp, out_dir, managed=set(OUTPUT_FILES) | set(DICOM_OUTPUT_FILES) | set(names))
    return {name: out_dir / name for name in names}


def _write_slicer_files(result: Classification, folder: Path) -> None:
    """segmentation.seg.nrrd and the colour table naming the labelmap's values."""
    segment = slicer_files.segment_for(result)
    slicer_files.write_segmentation_nrrd(result.labelmap, folder / SEGMENTATION_NRRD, [segment])
    entries = slicer_files.class_color_entries([(result.label_value, result.predicted_label)])
    (folder / COLOR_TABLE_FILE).write_text(slicer_files.color_table_text(entries), encoding="utf-8")


def _write_dicom(result: Classification, ct: Volume, folder: Path) -> None:
    """segmentation.dcm and heatmap.dcm for a CT read from DICOM; a warning in the result when not."""
    from MMCAFNetLib.inference import dicom_outputs

    if not dicom_outputs.is_dicom_volume(ct) or (result.heatmap is None and result.labelmap is None):
        return
    try:
        dicom_outputs.write_dicom_outputs(result, ct, folder)
    except ImportError:
        reason = "they need highdicom (pip install highdicom)"
    except dicom_outputs.DicomOutputError as exc:
        reason = str(exc)
    else:
        return
    for name in DICOM_OUTPUT_FILES:
        (folder / name).unlink(missing_ok=True)
    result.warnings.append(f"segmentation.dcm and heatmap.dcm were not written: {reason}")


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
