"""Writing a whole cohort in the real Lung-PET-CT-Dx layout: folders, metadata.csv, annotations,
clinical sheet."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from MMCAFNetLib.dataset.metadata import METADATA_COLUMNS
from MMCAFNetLib.synthetic.composition import class_counts, parse_classes
from MMCAFNetLib.synthetic.design import (
    CLASS_LETTERS,
    COLLECTION,
    CT_IMAGE_STORAGE,
    DATA_DESCRIPTION_URI,
    DEFAULT_EVIDENCE,
    DEFAULT_SMALL_LESION_SHARE,
    PET_IMAGE_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    SHEET_FILE,
    SHEET_HEADERS,
    SHEET_NAME,
    SOP_CLASS_NAMES,
    EvidenceDesign,
    PatientPlan,
    SyntheticCohort,
    SyntheticPatient,
)
from MMCAFNetLib.synthetic.dicom_files import (
    _file_size_text,
    _folder_date,
    _timestamp_text,
    _uid,
    _write_ct_series,
    _write_pet,
    _write_secondary_capture,
)
from MMCAFNetLib.synthetic.draw import draw_patient
from MMCAFNetLib.synthetic.render import _box_from_mask, _box_ras, plan_ijk_to_ras, render_patient


def _annotation_xml(patient_folder: str, uid: str, size: int, label: str, box) -> str:
    (xmin, ymin), (xmax, ymax) = box
    return (
        "<annotation>\n"
        f"\t<folder>{patient_folder}</folder>\n"
        f"\t<filename>{uid}.jpg</filename>\n"
        f"\t<path>{patient_folder}/{uid}.jpg</path>\n"
        "\t<source>\n\t\t<database>Unknown</database>\n\t</source>\n"
        "\t<size>\n"
        f"\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n\t\t<depth>3</depth>\n"
        "\t</size>\n"
        "\t<segmented>0</segmented>\n"
        "\t<object>\n"
        f"\t\t<name>{label}</name>\n"
        "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
        "\t\t<bndbox>\n"
        f"\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
        f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n"
        "\t\t</bndbox>\n"
        "\t</object>\n"
        "</annotation>\n"
    )


def _write_sheet(path: Path, patients: list[PatientPlan]) -> None:
    try:
        import openpyxl
        from openpyxl.styles import Font
    except ImportError as exc:  # pragma: no cover - openpyxl ships with the [train] extra
        raise ImportError("writing the clinical sheet needs openpyxl: pip install 'mmcafnet[train]'") from exc
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = SHEET_NAME
    font = Font(name="Trebuchet MS", size=11)
    ws.append(list(SHEET_HEADERS))
    for no, plan in enumerate(patients, start=1):
        row = plan.sheet_row
        ws.append([no, plan.patient_id.split("-", 1)[1], *(row[h] for h in SHEET_HEADERS[2:])])
    for row_cells in ws.iter_rows(min_row=1, max_row=ws.max_row, max_col=len(SHEET_HEADERS)):
        for cell in row_cells:
            cell.font = font
    ws.freeze_panes = "A2"
    tmp = path.with_name(path.name + ".part")
    wb.save(tmp)
    os.replace(tmp, path)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def write_cohort(
    out: str | os.PathLike,
    patients: int,
    seed: int,
    size: int = 512,
    *,
    small_lesion_share: float = DEFAULT_SMALL_LESION_SHARE,
    classes: str | dict[str, float] | Sequence[str] | None = None,
    evidence: EvidenceDesign = DEFAULT_EVIDENCE,
    extra_series: bool = True,
    nbia_manifest_folder: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SyntheticCohort:
    """Write a synthetic cohort in the Lung-PET-CT-Dx layout under ``out``; return what was written.

    ``out`` must be empty or absent. The cohort is built in a temporary folder beside it and moved
    into place at the end, so an interrupted run leaves nothing half-written. With
    ``nbia_manifest_folder`` the NBIA part sits in ``out/manifest-<13 digits>/`` as the NBIA Data
    Retriever writes it, with the annotations and the sheet beside metadata.csv. ``extra_series``
    adds, for some patients, the things a real download holds and an indexer must skip: a second
    unannotated CT reconstruction, a "Smart Prep" series of a few images, a Secondary Capture
    "Range" series and, in a second study, a PET series.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder")
    proportions = parse_classes(classes)
    counts = class_counts(int(patients), proportions)
    plans = [
        draw_patient(letter, seed, number, size, small_lesion_share, evidence)
        for letter in CLASS_LETTERS
        for number in range(1, counts.get(letter, 0) + 1)
    ]
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        root_rel = Path(f"manifest-{1600000000000 + (int(seed) % 99999) * 1000:013d}") if nbia_manifest_folder else Path()
        cohort = _write_cohort_files(staging, root_rel, plans, seed, size, extra_series, progress)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final_root = out.resolve() / root_rel
    for p in cohort.patients:
        p.series_path = str(final_root / p.series_path)
    cohort.root = final_root
    return cohort


def _write_cohort_files(staging: Path, root_rel: Path, plans: list[PatientPlan], seed: int, size: int,
                        extra_series: bool, progress) -> SyntheticCohort:
    root = staging / root_rel
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    written: list[SyntheticPatient] = []
    stamp = _dt.datetime(2023, 4, 2, 14, 13, 46, 26000)
    for n_done, plan in enumerate(plans):
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, ord(plan.label), plan.number, 11]))
        hu, mask = render_patient(plan)
        affine = plan_ijk_to_ras(plan)
        sc = plan.scanner
        study_uid = _uid(seed, plan.patient_id, "study", 1)
        frame_uid = _uid(seed, plan.patient_id, "frame", 1)
        study_time = f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
        study_folder = f"{_folder_date(plan.study_date)}-NA-{sc.study_description}-{study_uid[-5:]}"
        patient_rel = Path("Lung-PET-CT-Dx") / plan.patient_id
        series_number = 2
        series_list: list[tuple[str, str, str, str, int, Path]] = []  # uid, desc, modality, sop, n, rel folder
        extras: list[str] = []

        def series_folder(number: int, desc: str, uid: str, _study: Path = patient_rel / study_folder) -> Path:
            return _study / f"{number}.000000-{desc}-{uid[-5:]}"

        if extra_series and rng.random() < 0.1:  # scout-like "Smart Prep Series": a few images, to be dropped
            uid = _uid(seed, plan.patient_id, "series", "prep")
            rel = series_folder(series_number - 1, "Smart Prep Series", uid)
            k_mid = hu.shape[0] // 2
            few = hu[max(0, k_mid - 1) : k_mid + 2]
            _write_ct_series(_with_slices(plan, few.shape[0], max(0, k_mid - 1)), few, root / rel, study_uid, uid, frame_uid,
                             series_number - 1, "Smart Prep Series", study_time, "prep")
            series_list.append((uid, "Smart Prep Series", "CT", CT_IMAGE_STORAGE, few.shape[0], rel))
            extras.append("Smart Prep Series")
        series_uid = _uid(seed, plan.patient_id, "series", "ct")
        rel = series_folder(series_number, sc.series_description, series_uid)
        sop_uids = _write_ct_series(plan, hu, root / rel, study_uid, series_uid, frame_uid, series_number,
                                    sc.series_description, study_time, "ct")
        series_list.append((series_uid, sc.series_description, "CT", CT_IMAGE_STORAGE, hu.shape[0], rel))
        ct_rel = rel
        if extra_series and rng.random() < 0.2:  # a second, unannotated reconstruction (thicker slices)
            series_number += 1
            step = 2 if sc.slice_thickness <= 2.5 else 1
            thick = hu[::step]
            desc2 = {"SIEMENS": "ThoraxRoutine  5.0.0  B31f", "GE MEDICAL SYSTEMS": "Recon 3 5mm"}.get(sc.manufacturer, "iDose 2")
            uid = _uid(seed, plan.patient_id, "series", "ct2")
            rel = series_folder(series_number, desc2, uid)
            _write_ct_series(_with_slices(plan, thick.shape[0], 0, step), thick, root / rel, study_uid, uid,
                             frame_uid, series_number, desc2, study_time, "ct2")
            series_list.append((uid, desc2, "CT", CT_IMAGE_STORAGE, thick.shape[0], rel))
            extras.append(desc2)
        if extra_series and rng.random() < 0.25:
            series_number += 1
            uid = _uid(seed, plan.patient_id, "series", "sc")
            rel = series_folder(series_number, "ALPHA Range", uid)
            n_sc = _write_secondary_capture(plan, hu, root / rel, study_uid, uid, frame_uid, series_number,
                                            "ALPHA Range", study_time)
            series_list.append((uid, "ALPHA Range", "CT", SECONDARY_CAPTURE_STORAGE, n_sc, rel))
            extras.append("ALPHA Range")
        pet_study: Optional[tuple[str, str, Path]] = None
        if extra_series and rng.random() < 0.15:  # a later PET/CT study
            pet_study_uid = _uid(seed, plan.patient_id, "study", 2)
            pet_date = plan.study_date + _dt.timedelta(days=int(rng.integers(3, 40)))
            pet_study_folder = f"{_folder_date(pet_date)}-NA-PET03WholebodyFirstHead Adult-{pet_study_uid[-5:]}"
            uid = _uid(seed, plan.patient_id, "series", "pet")
            rel = patient_rel / pet_study_folder / f"3.000000-PET WB Corrected-{uid[-5:]}"
            pet_plan = _with_study(plan, pet_date, "PET03WholebodyFirstHead Adult")
            n_pet = _write_pet(pet_plan, hu, mask, root / rel, pet_study_uid, uid,
                               _uid(seed, plan.patient_id, "frame", 2), 3, study_time)
            series_list.append((uid, "PET WB Corrected", "PT", PET_IMAGE_STORAGE, n_pet, rel))
            pet_study = (pet_study_uid, pet_study_folder, rel)
            extras.append("PET WB Corrected")

        # annotations: one LabelImg file per slice carrying the lesion
        ann_dir = root / "Annotation" / plan.patient_id.split("-", 1)[1]
        ann_dir.mkdir(parents=True, exist_ok=True)
        annotated = 0
        for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
            sl = mask[k]
            rows_idx = np.nonzero(sl.any(axis=1))[0]
            cols_idx = np.nonzero(sl.any(axis=0))[0]
            box = ((int(cols_idx[0]), int(rows_idx[0])), (int(cols_idx[-1]), int(rows_idx[-1])))
            xml = _annotation_xml(ann_dir.name, sop_uids[int(k)], sc.size, plan.label, box)
            (ann_dir / f"{sop_uids[int(k)]}.xml").write_text(xml, encoding="utf-8")
            annotated += 1

        for uid, desc, modality, sop, n_images, rel in series_list:
            is_pet = sop == PET_IMAGE_STORAGE
            stamp += _dt.timedelta(seconds=float(rng.uniform(3.0, 12.0)))
            if pet_study is not None and rel == pet_study[2]:
                st_uid, st_desc, st_date = pet_study[0], "PET03WholebodyFirstHead Adult", pet_date
            else:
                st_uid, st_desc, st_date = study_uid, sc.study_description, plan.study_date
            rows.append(
                {
                    "Series UID": uid,
                    "Collection": COLLECTION,
                    "3rd Party Analysis": "NO" if is_pet else "null",
                    "Data Description URI": DATA_DESCRIPTION_URI,
                    "Subject ID": plan.patient_id,
                    "Study UID": st_uid,
                    "Study Description": st_desc,
                    "Study Date": _folder_date(st_date),
                    "Series Description": desc,
                    "Manufacturer": sc.manufacturer,
                    "Modality": modality,
                    "SOP Class Name": SOP_CLASS_NAMES[sop],
                    "SOP Class UID": sop,
                    "Number of Images": n_images,
                    "File Size": _file_size_text(_folder_bytes(root / rel)),
                    "File Location": "./" + rel.as_posix(),
                    "Download Timestamp": _timestamp_text(stamp),
                }
            )
        box_ijk = _box_from_mask(mask)
        written.append(
            SyntheticPatient(
                patient_id=plan.patient_id,
                label=plan.label,
                series_uid=series_uid,
                series_path=ct_rel.as_posix(),
                study_uid=study_uid,
                num_slices=int(hu.shape[0]),
                lesion_box_ijk=box_ijk,
                lesion_box_ras=_box_ras(affine, box_ijk),
                lesion_center_ras=tuple(float(v) for v in plan.lesion.center + np.array([0.0, 0.0, plan.anatomy.body_z0])),  # type: ignore[arg-type]
                lesion_diameter_mm=plan.lesion.diameter_mm,
                lesion_kind=plan.lesion.kind,
                annotated_slices=annotated,
                record=dict(plan.record),
                sheet_row=dict(plan.sheet_row),
                evidence={"image_typical": plan.image_typical, "record_typical": plan.record_typical},
                extra_series=extras,
            )
        )
        if progress is not None:
            progress(n_done + 1, len(plans))

    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(METADATA_COLUMNS), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    _write_sheet(root / SHEET_FILE, plans)
    return SyntheticCohort(root=root, patients=written, seed=int(seed), size=int(size))


def _with_slices(plan: PatientPlan, n: int, k_first: int, step: int = 1) -> PatientPlan:
    """A copy of ``plan`` describing a sub-series: ``n`` slices from ``k_first`` every ``step``."""
    import copy

    p = copy.copy(plan)
    sc = copy.copy(plan.scanner)
    sc.first_slice_s = plan.scanner.first_slice_s + k_first * plan.scanner.slice_thickness
    sc.slice_thickness = plan.scanner.slice_thickness * step
    sc.num_slices = n
    p.scanner = sc
    return p


def _with_study(plan: PatientPlan, date: _dt.date, description: str) -> PatientPlan:
    import copy

    p = copy.copy(plan)
    sc = copy.copy(plan.scanner)
    sc.study_description = description
    p.scanner = sc
    p.study_date = date
    return p
