"""The indexer on a small download tree built here: real DICOM files (pydicom), VOC XMLs, an .xlsx sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from MMCAFNetLib.cli import main as cli_main
from MMCAFNetLib.dataset import METADATA_COLUMNS, format_summary, index_download, read_cohort

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ROWS, COLS = 20, 24
ROW_SPACING, COL_SPACING = 0.8, 0.7  # DICOM PixelSpacing order: between rows, between columns
SHEET_HEADERS = [
    "No.",
    "NewPatientID",
    "Sex",
    "Age",
    "weight (kg)",
    "T-Stage",
    "N-Stage",
    "Ｍ-Stage",
    "Histopathological grading",
    "Smoking History",
]


def _write_series(folder: Path, subject: str, study_uid: str, n: int, step: float, sop_class: str, origin, orientation):
    """n slices named in REVERSE position order (the indexer must sort by position, not name)."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    uids = []
    for k in range(n):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.PatientID, ds.Modality = subject, "CT"
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * step * normal]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
        ds.SliceThickness = step
        ds.InstanceNumber = k + 1
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (np.full((ROWS, COLS), 1000 + 10 * k, dtype=np.int16)).tobytes()
        ds.save_as(folder / f"1-{n - k:02d}.dcm", enforce_file_format=True)
        uids.append(uid)
    return series_uid, uids  # uids in position order


VOC = (
    "<annotation><folder>x</folder><filename>{uid}</filename><size><width>{w}</width><height>{h}</height>"
    "<depth>3</depth></size>{objects}</annotation>"
)


def _xml(folder: Path, uid: str, boxes, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    objects = "".join(
        f"<object><name>{name}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax><ymax>{d}</ymax></bndbox></object>"
        for a, b, c, d in boxes
    )
    (folder / f"{uid}.xml").write_text(VOC.format(uid=uid, w=COLS, h=ROWS, objects=objects), encoding="utf-8")


AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
OBLIQUE = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # coronal-like rows, to test the orientation handling


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A download with 5 subjects and the faults the real collection has (plus a multi-phase series)."""
    root = tmp_path_factory.mktemp("download")
    meta_rows, truth = [], {}

    def add_series(subject, n, step, sop_class=CT_STORAGE, origin=(-10.0, 20.0, -50.0), orientation=AXIAL, number=2):
        study_uid = generate_uid()
        rel = f"./Lung-PET-CT-Dx/{subject}/01-01-2000-NA-Chest-{study_uid[-5:]}/{number}.000000-desc  x-{number:05d}"
        series_uid, uids = _write_series(root / rel[2:], subject, study_uid, n, step, sop_class, origin, orientation)
        name = "CT Image Storage" if sop_class == CT_STORAGE else "Secondary Capture Image Storage"
        meta_rows.append(
            [series_uid, "Lung-PET-CT-Dx", "null", "https://doi.org", subject, study_uid, "Chest", "01-01-2000", "desc  x",
             "SIEMENS", "CT", name, sop_class, n, "14,24 MB", rel, "2023-04-02T14:13:46.026"]
        )
        return series_uid, uids, root / rel[2:]

    ann = root / "Annotation"
    # A0001: two CT series (the 6-slice one has more annotated slices) and a Secondary Capture series
    s1, u1, d1 = add_series("Lung_Dx-A0001", 6, 2.5)
    _s2, u2, _ = add_series("Lung_Dx-A0001", 4, 5.0, number=3)
    _sc, usc, _ = add_series("Lung_Dx-A0001", 2, 5.0, sop_class=SC_STORAGE, number=4)
    _xml(ann / "A0001", u1[1], [(3, 4, 10, 12)], "A")
    _xml(ann / "A0001", u1[2], [(5, 2, 14, 9), (20, 15, 30, 30)], "A")  # second box clipped to the image
    _xml(ann / "A0001", u1[3], [(6, 6, 8, 8)], "A")
    _xml(ann / "A0001", u2[0], [(1, 1, 2, 2)], "A")  # annotated slice in the other CT series
    _xml(ann / "A0001", usc[0], [(1, 1, 2, 2)], "A")  # a Secondary Capture image: no CT image
    truth["Lung_Dx-A0001"] = dict(series=s1, dir=d1, ijk=(3, 2, 1, 23, 19, 3), origin=(-10.0, 20.0, -50.0), step=2.5, orient=AXIAL)
    # G0002: oblique orientation; faulty XMLs
    s3, u3, d3 = add_series("Lung_Dx-G0002", 5, 3.0, origin=(5.0, -7.0, 12.0), orientation=OBLIQUE)
    _xml(ann / "G0002", u3[0], [(2, 3, 4, 5)], "G")
    _xml(ann / "G0002", u3[4], [(7, 8, 9, 10)], "G")
    _xml(ann / "G0002", u3[2], [(0, 0, 1, 1)], "Q")
    _xml(ann / "G0002", u3[3], [(0, 0, 1, 1)], "")
    _xml(ann / "G0002", u3[1], [(0, 0, 1, 1)], "G0002")
    (ann / "G0002" / f"{generate_uid()}.xml").write_text("<annotation><object>", encoding="utf-8")
    _xml(ann / "G0002", generate_uid(), [(1, 1, 2, 2)], "G")  # UID with no image
    truth["Lung_Dx-G0002"] = dict(series=s3, dir=d3, ijk=(2, 3, 0, 9, 10, 4), origin=(5.0, -7.0, 12.0), step=3.0, orient=OBLIQUE)
    # B0003: no clinical row; E0005: no annotation folder; annotation folder A0099: no subject
    _, u4, _ = add_series("Lung_Dx-B0003", 3, 2.0)
    _xml(ann / "B0003", u4[0], [(1, 1, 2, 2)], "B")
    add_series("Lung_Dx-E0005", 3, 2.0)
    # G0006: its only CT series has all slices at one position (the reader would refuse it)
    _, u6, _ = add_series("Lung_Dx-G0006", 3, 0.0)
    _xml(ann / "G0006", u6[1], [(1, 1, 2, 2)], "G")
    _xml(ann / "A0099", generate_uid(), [(1, 1, 2, 2)], "A")

    pd.DataFrame(meta_rows, columns=list(METADATA_COLUMNS)).to_csv(root / "metadata.csv", index=False)
    sheet = pd.DataFrame(
        [
            [1, "A0001", "M", 58, 65, "2b", 3, 3, " G3", 1],  # invalid M stage 3 -> unknown
            [2, "G0002", "F", None, 55.5, 1, 0, "1a", None, 0],
            [3, "E0005", "M", 70, 80, "is", 2, 0, None, 1],
            [4, "A0266", "F", 60, 60, 3, 1, 0, None, 0],  # no images
            [5, "G0006", "M", 66, 70, 4, 1, 0, None, 1],
        ],
        columns=SHEET_HEADERS,
    )
    sheet.to_excel(root / "statistics-clinical-20201221.xlsx", sheet_name="Clinical Data", index=False)
    return root, truth


@pytest.fixture(scope="module")
def indexed(tree):
    root, truth = tree
    lines: list[str] = []
    result = index_download(root, seed=1, test_fraction=0.0, val_fraction=0.0, folds=2, sink=lines.append)
    return result, lines, truth


def _expected_ras(truth, ijk):
    orient = np.array(truth["orient"])
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    lps = np.array(truth["origin"]) + ijk[0] * COL_SPACING * row_dir + ijk[1] * ROW_SPACING * col_dir + ijk[2] * truth["step"] * normal
    return lps * np.array([-1.0, -1.0, 1.0])


def test_patients_classes_and_series(indexed):
    result, _, truth = indexed
    cohort = result.cohort.set_index("patient_id")
    assert sorted(cohort.index) == ["Lung_Dx-A0001", "Lung_Dx-G0002"]
    assert cohort.loc["Lung_Dx-A0001", "label"] == "A" and cohort.loc["Lung_Dx-G0002", "label"] == "G"
    for pid, t in truth.items():
        assert cohort.loc[pid, "series_uid"] == t["series"]
        assert Path(cohort.loc[pid, "series_path"]) == t["dir"].resolve()
    assert cohort.loc["Lung_Dx-A0001", "num_slices"] == 6 and cohort.loc["Lung_Dx-A0001", "annotated_slices"] == 3


def test_boxes_in_voxel_and_ras(indexed):
    result, _, truth = indexed
    cohort = result.cohort.set_index("patient_id")
    for pid, t in truth.items():
        row = cohort.loc[pid]
        ijk = [int(row[f"box_ijk_{m}_{a}"]) for m in ("min", "max") for a in "ijk"]
        assert tuple(ijk) == t["ijk"], pid
        corners = np.array([_expected_ras(t, (a, b, c)) for a in (ijk[0], ijk[3]) for b in (ijk[1], ijk[4]) for c in (ijk[2], ijk[5])])
        got_min = [row[f"box_ras_min_{a}"] for a in "ras"]
        got_max = [row[f"box_ras_max_{a}"] for a in "ras"]
        np.testing.assert_allclose(got_min, corners.min(0), atol=1e-3)
        np.testing.assert_allclose(got_max, corners.max(0), atol=1e-3)


def test_box_agrees_with_read_volume(indexed):
    """The voxel box indexes the array read_volume returns (same k order, same geometry)."""
    volume_mod = pytest.importorskip("MMCAFNetLib.volume")
    if not hasattr(volume_mod, "read_volume"):
        pytest.skip("MMCAFNetLib.volume.read_volume is not available")
    result = indexed[0]
    for _, row in result.cohort.iterrows():
        vol = volume_mod.read_volume(row["series_path"])
        assert vol.shape == (row["num_slices"], ROWS, COLS)
        # slice k holds 1000 + 10 * (its position index) stored, -1024 intercept
        assert float(vol.array[row["box_ijk_min_k"], 0, 0]) == pytest.approx(1000 + 10 * row["box_ijk_min_k"] - 1024)
        lo = vol.ijk_to_ras_points([[row["box_ijk_min_i"], row["box_ijk_min_j"], row["box_ijk_min_k"]],
                                    [row["box_ijk_max_i"], row["box_ijk_max_j"], row["box_ijk_max_k"]]])
        np.testing.assert_allclose(lo.min(0), [row[f"box_ras_min_{a}"] for a in "ras"], atol=1e-3)
        np.testing.assert_allclose(lo.max(0), [row[f"box_ras_max_{a}"] for a in "ras"], atol=1e-3)


def test_clinical_values_joined(indexed):
    result, _, _ = indexed
    cohort = result.cohort.set_index("patient_id")
    a, g = cohort.loc["Lung_Dx-A0001"], cohort.loc["Lung_Dx-G0002"]
    assert (a["sex"], a["age"], a["weight"], a["t_stage"], a["n_stage"], a["smoking"]) == ("M", 58.0, 65.0, "2b", "3", "1")
    assert pd.isna(a["m_stage"])  # the invalid 3
    assert g["m_stage"] == "1a" and g["t_stage"] == "1" and np.isnan(g["age"]) and g["weight"] == 55.5
    assert "histopathological_grading" not in result.cohort.columns


def test_every_skipped_item_warned_once_and_counted(indexed):
    result, lines, _ = indexed
    skipped = result.report.skipped
    assert skipped == {
        "invalid clinical value": 1,
        "clinical row without images": 1,  # A0266
        "patient without a clinical row": 1,  # B0003
        "annotation folder without patient": 1,  # A0099
        "patient without annotation": 1,  # E0005
        "bad annotation label": 3,  # Q, empty, patient ID
        "unparsable annotation": 1,
        "UID with no image": 2,  # G0002's stray UID and A0001's Secondary Capture slice
        "unusable CT series": 1,  # G0006's slices share one position
        "patient without CT": 1,  # G0006 then has no usable CT
    }
    assert len(lines) == sum(skipped.values())
    assert result.report.counts["series not CT Image Storage (ignored)"] == 1
    assert result.report.counts["annotated slices in another CT series (ignored)"] == 1
    summary = format_summary(result)
    assert "A Adenocarcinoma: 1" in summary and "G Squamous cell carcinoma: 1" in summary
    assert "UID with no image: 2" in summary and "CT Image Storage series: 6" in summary


def test_index_command_writes_a_readable_cohort(tree, tmp_path, capsys):
    root, _ = tree
    out = tmp_path / "cohort.csv"
    assert cli_main(["index", str(root), "--out", str(out), "--seed", "2", "--folds", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "indexed 2 patient(s) of 5" in captured.out and "skipped items: 13" in captured.out
    skipped = [line for line in captured.err.splitlines() if line.startswith("warning: ") and " split holds only " not in line]
    assert len(skipped) == 13  # one line per skipped item
    assert "warning: the train split holds only" in captured.err  # 2 patients: every split is too small
    cohort = read_cohort(out)
    assert len(cohort) == 2 and set(cohort["split"]) <= {"train", "val", "test"}
    assert cohort.set_index("patient_id").loc["Lung_Dx-A0001", "t_stage"] == "2b"
    assert cli_main(["index", str(tmp_path), "--out", str(out)]) == 2  # no metadata.csv: usage error
