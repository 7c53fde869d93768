"""Turn a Lung-PET-CT-Dx download into a cohort table (one row per patient).

Inputs under ROOT: ``metadata.csv`` (NBIA), the series folders it points to, ``Annotation/`` (one
LabelImg VOC file per annotated slice) and the clinical sheet. Per patient: the class from the ID
letter, the CT Image Storage series holding most annotated slices, the lesion box as the union of
its slice boxes (voxel and RAS), the clinical record. Every skipped item gives one warning line
and is counted by reason in the report; nothing stops the run except an unusable ROOT.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from MMCAFNetLib.dataset.annotations import SliceBox, annotation_folders, read_patient_annotations
from MMCAFNetLib.dataset.cohort import BOX_IJK_COLUMNS, BOX_RAS_COLUMNS, cohort_columns
from MMCAFNetLib.dataset.headers import read_series_headers, series_ijk_to_ras, series_problem, sort_slices
from MMCAFNetLib.dataset.metadata import class_of_subject, read_metadata, short_id
from MMCAFNetLib.dataset.report import IndexReport
from MMCAFNetLib.dataset.splits import assign_splits
from MMCAFNetLib.ehr import ClinicalSchema, default_schema, read_clinical_sheet
from MMCAFNetLib.results import CLASS_LABELS


@dataclass
class IndexResult:
    cohort: pd.DataFrame
    report: IndexReport
    metadata: pd.DataFrame
    clinical: pd.DataFrame


def find_clinical_sheet(root: str | Path) -> Path:
    """The clinical sheet at ROOT (``*clinical*.xlsx`` first, else the only .xlsx)."""
    root = Path(root)
    candidates = sorted(root.glob("*[Cc]linical*.xlsx")) or sorted(root.glob("*.xlsx"))
    candidates = [c for c in candidates if not c.name.startswith("~$")]  # Excel lock files
    if not candidates:
        raise FileNotFoundError(
            f"no clinical sheet (.xlsx) in {root}; put statistics-clinical-*.xlsx there or pass --clinical PATH"
        )
    if len(candidates) > 1:
        raise ValueError(f"several clinical sheets in {root}: {[c.name for c in candidates]}; choose one with --clinical PATH")
    return candidates[0]


def match_clinical_ids(subject_ids: Sequence[str], sheet_ids: Sequence[str], report: IndexReport) -> set[str]:
    """Warn for every ID present on one side only; returns the subjects that have a clinical row."""
    sheet = set(sheet_ids)
    by_short = {short_id(s): s for s in subject_ids}
    for sid in sorted(sheet - set(by_short)):
        report.warn("clinical row without images", f"clinical sheet: patient {sid} has no series in metadata.csv (ID mismatch)")
    for short in sorted(set(by_short) - sheet):
        report.warn("patient without a clinical row", f"{by_short[short]}: no row in the clinical sheet (ID mismatch); patient skipped")
    return {s for s in subject_ids if short_id(s) in sheet}


def read_sheet_into_report(path: Path, schema: ClinicalSchema, report: IndexReport) -> pd.DataFrame:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = read_clinical_sheet(path, schema, strict=False)
    for w in caught:
        report.warn("invalid clinical value", str(w.message))
    return df


def lesion_box(
    boxes: dict[str, list[SliceBox]], slice_index: dict[str, int], rows: int, columns: int, ijk_to_ras: np.ndarray, patient: str, report: IndexReport
) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Union of the slice boxes as inclusive voxel indices (i, j, k) min/max and RAS min/max."""
    lo = np.array([np.inf] * 3)
    hi = np.array([-np.inf] * 3)
    used = 0
    for uid, slice_boxes in boxes.items():
        k = slice_index.get(uid)
        if k is None:
            continue
        for box in slice_boxes:
            x0, x1 = max(box.xmin, 0), min(box.xmax, columns - 1)
            y0, y1 = max(box.ymin, 0), min(box.ymax, rows - 1)
            if x0 > x1 or y0 > y1:
                report.warn("box outside the image", f"{box.path}: box lies outside the {columns}x{rows} image; box skipped")
                continue
            lo = np.minimum(lo, [x0, y0, k])
            hi = np.maximum(hi, [x1, y1, k])
            used += 1
    if not used:
        return None
    lo_i, hi_i = lo.astype(int), hi.astype(int)
    corners = np.array([[a, b, c, 1.0] for a in (lo_i[0], hi_i[0]) for b in (lo_i[1], hi_i[1]) for c in (lo_i[2], hi_i[2])])
    ras = (corners @ ijk_to_ras.T)[:, :3]
    return np.concatenate([lo_i, hi_i]), np.concatenate([ras.min(0), ras.max(0)]), used


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="patient")


def index_download(
    root: str | Path,
    clinical: str | Path | None = None,
    schema: ClinicalSchema | None = None,
    seed: int = 0,
    test_fraction: float = 0.15,
    val_fraction: float = 0.15,
    folds: int = 5,
    progress: bool = False,
    sink: Callable[[str], None] | None = None,
) -> IndexResult:
    """Index the download at ROOT; see the module docstring. ``sink`` receives each warning line."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"download folder not found: {root}")
    schema = schema or default_schema()
    report = IndexReport(sink=sink)
    meta = read_metadata(root / "metadata.csv")
    for problem in meta.attrs.get("warnings", []):
        report.warn("series folder outside the download", problem)
    meta = meta[meta["location_ok"]]
    sheet_path = Path(clinical) if clinical is not None else find_clinical_sheet(root)
    sheet = read_sheet_into_report(sheet_path, schema, report)
    sheet_by_id = {row["patient_id"]: row for row in sheet.to_dict(orient="records")}

    subjects = sorted(meta["Subject ID"].unique())
    report.count("subjects in metadata.csv", len(subjects))
    report.count("series in metadata.csv", len(meta))
    report.count("CT Image Storage series", int(meta["is_ct_image"].sum()))
    report.count("series not CT Image Storage (ignored)", int((~meta["is_ct_image"]).sum()))
    with_row = match_clinical_ids(subjects, list(sheet_by_id), report)

    folders = annotation_folders(root / "Annotation")
    known_short = {short_id(s) for s in subjects}
    for short in sorted(set(folders) - known_short):
        report.warn("annotation folder without patient", f"{folders[short]}: matches no subject in metadata.csv; skipped")

    ct = meta[meta["is_ct_image"]]
    rows = []
    for subject in _progress(subjects, progress, "indexing"):
        label = class_of_subject(subject)
        if label not in CLASS_LABELS:
            report.warn("unknown class letter", f"{subject}: ID letter {label!r} is not a class (A, B, E, G); patient skipped")
            continue
        if subject not in with_row:
            continue  # already reported by match_clinical_ids
        series = ct[ct["Subject ID"] == subject]
        if series.empty:
            report.warn("patient without CT", f"{subject}: no CT Image Storage series; patient skipped")
            continue
        folder = folders.get(short_id(subject))
        if folder is None:
            report.warn("patient without annotation", f"{subject}: no folder in Annotation/; patient skipped")
            continue
        boxes = read_patient_annotations(folder, short_id(subject), report)
        if not boxes:
            report.warn("patient without annotation", f"{subject}: no usable annotation box; patient skipped")
            continue
        best = None
        all_uids: set[str] = set()
        for _, s in series.iterrows():
            series_dir = Path(s["series_dir"])
            if not series_dir.is_dir():
                report.warn("series folder missing", f"{subject}: series folder {series_dir} does not exist; series skipped")
                continue
            headers = read_series_headers(series_dir, s["Series UID"], report)
            headers = [h for h in headers if h.sop_class_uid in ("", "1.2.840.10008.5.1.4.1.1.2")]
            if not headers:
                report.warn("series without CT images", f"{subject}: {series_dir} holds no readable CT image of series {s['Series UID']}")
                continue
            uids = {h.sop_uid for h in headers}
            all_uids |= uids
            hits = len(uids & set(boxes))
            ordered = sort_slices(headers)
            problem = series_problem(ordered)
            if problem is not None:
                if hits:
                    report.warn("unusable CT series", f"{subject}: {series_dir}: {problem}; series skipped")
                continue
            key = (hits, len(headers))
            if best is None or key > best[0]:
                best = (key, s, ordered)
        if best is None:
            report.warn("patient without CT", f"{subject}: no readable CT series; patient skipped")
            continue
        for uid in sorted(set(boxes) - all_uids):
            report.warn("UID with no image", f"{subject}: annotated SOPInstanceUID {uid} matches no CT image; skipped")
        (hits, _), s, sorted_headers = best
        if hits == 0:
            report.warn("patient without annotation", f"{subject}: no annotated slice in any CT series; patient skipped")
            continue
        report.count("annotated slices in another CT series (ignored)", len((set(boxes) & all_uids) - {h.sop_uid for h in sorted_headers}))
        first = sorted_headers[0]
        ijk_to_ras = series_ijk_to_ras(sorted_headers)
        slice_index = {h.sop_uid: k for k, h in enumerate(sorted_headers)}
        box = lesion_box(boxes, slice_index, first.rows, first.columns, ijk_to_ras, subject, report)
        if box is None:
            report.warn("patient without annotation", f"{subject}: no usable box in the chosen series; patient skipped")
            continue
        box_ijk, box_ras, _used = box
        record = sheet_by_id[short_id(subject)]
        row = {
            "patient_id": subject,
            "label": label,
            "series_path": str(Path(s["series_dir"]).resolve()),
            "series_uid": s["Series UID"],
            "num_slices": len(sorted_headers),
            **{c: int(v) for c, v in zip(BOX_IJK_COLUMNS, box_ijk)},
            **{c: round(float(v), 4) for c, v in zip(BOX_RAS_COLUMNS, box_ras)},
            **{f: record.get(f) for f in schema.field_names},
            "annotated_slices": hits,
            "study_uid": s["Study UID"],
        }
        rows.append(row)
        report.count("patients indexed")

    columns = cohort_columns(schema.field_names)
    cohort = pd.DataFrame(rows, columns=[*columns, "annotated_slices", "study_uid"])
    if len(cohort):
        split, fold = assign_splits(cohort["label"].tolist(), seed, test_fraction, val_fraction, folds)
        cohort["split"], cohort["fold"] = split, fold
        trainval = cohort[cohort["split"] != "test"]["label"].value_counts()
        if folds > 1 and len(trainval) and int(trainval.min()) < folds:
            report.count(f"classes with fewer train+val patients than {folds} folds", int((trainval < folds).sum()))
    cohort["fold"] = cohort["fold"].astype("int64")
    return IndexResult(cohort=cohort, report=report, metadata=meta, clinical=sheet)


def format_summary(result: IndexResult) -> str:
    """Plain-text summary: patients per class and split, series, skipped items by reason."""
    cohort, report = result.cohort, result.report
    lines = [f"indexed {len(cohort)} patient(s) of {report.counts['subjects in metadata.csv']} in metadata.csv"]
    for letter, (_, name, _) in CLASS_LABELS.items():
        n = int((cohort["label"] == letter).sum()) if len(cohort) else 0
        lines.append(f"  {letter} {name}: {n}")
    if len(cohort):
        per_split = cohort["split"].value_counts()
        lines.append("  split: " + ", ".join(f"{s} {int(per_split.get(s, 0))}" for s in ("train", "val", "test")))
    lines.append("series:")
    for key in ("series in metadata.csv", "CT Image Storage series", "series not CT Image Storage (ignored)"):
        lines.append(f"  {key}: {report.counts[key]}")
    for key, value in sorted(report.counts.items()):
        if key.startswith(("annotated slices", "files of another", "classes with")):
            lines.append(f"  {key}: {value}")
    skipped = report.skipped
    lines.append(f"skipped items: {sum(skipped.values())}")
    for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])):
        lines.append(f"  {reason}: {n}")
    return "\n".join(lines)
