"""The synthetic cohort: real layout, real DICOM, the real sheet's headers, determinism, class design."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest

from MMCAFNetLib import synthetic
from MMCAFNetLib.cli import main as cli_main
from MMCAFNetLib.synthetic import (
    CT_IMAGE_STORAGE,
    METADATA_COLUMNS,
    SHEET_HEADERS,
    class_counts,
    draw_patient,
    make_case,
    parse_classes,
    write_cohort,
)


def _shared_dir() -> Path | None:
    env = os.environ.get("MMCAFNET_SHARED")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    candidates += [here.parents[1] / "shared", here.parents[2] / "shared"]
    for c in candidates:
        if (c / "data" / "lung-pet-ct-dx" / "metadata.csv").is_file():
            return c / "data" / "lung-pet-ct-dx"
    return None


REAL = _shared_dir()
needs_real = pytest.mark.skipif(REAL is None, reason="the real Lung-PET-CT-Dx index files (shared/data) are absent")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return write_cohort(out, 6, seed=3, size=64, classes="A,G,B")


def _ct_files(series_path: str) -> list[Path]:
    return sorted(Path(series_path).glob("*.dcm"))


def test_layout_and_metadata_columns(cohort):
    root = cohort.root
    assert (root / "metadata.csv").is_file()
    assert (root / "statistics-clinical-20201221.xlsx").is_file()
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == METADATA_COLUMNS
    assert len(rows[0]) == 17
    body = [dict(zip(rows[0], r)) for r in rows[1:]]
    subjects = {r["Subject ID"] for r in body}
    assert subjects == {p.patient_id for p in cohort.patients}
    for r in body:
        folder = root / r["File Location"]
        assert r["File Location"].startswith("./Lung-PET-CT-Dx/")
        assert folder.is_dir(), folder
        assert int(r["Number of Images"]) == len(list(folder.glob("*.dcm")))
        assert re.fullmatch(r"\d+\.\d\d (MB|KB)", r["File Size"])
        assert re.fullmatch(r"\d\d-\d\d-\d{4}", r["Study Date"])
        study_dir, series_dir = folder.parent.name, folder.name
        assert re.fullmatch(r"\d\d-\d\d-\d{4}-NA-.+-\d{5}", study_dir)
        assert series_dir.endswith("-" + r["Series UID"][-5:])
        assert re.fullmatch(r"\d+\.000000-.+-\d{5}", series_dir)
        assert r["Collection"] == "Lung-PET-CT-Dx"
    ct_rows = [r for r in body if r["SOP Class UID"] == CT_IMAGE_STORAGE]
    assert {r["Series UID"] for r in ct_rows} >= {p.series_uid for p in cohort.patients}
    with open(root / "metadata.csv", "rb") as fh:
        assert fh.readline().endswith(b"\r\n")  # the NBIA retriever's line ends


@needs_real
def test_metadata_and_sheet_match_the_real_files(cohort):
    import openpyxl

    with open(REAL / "metadata.csv", newline="", encoding="utf-8") as fh:
        real_rows = list(csv.reader(fh))
    with open(cohort.root / "metadata.csv", newline="", encoding="utf-8") as fh:
        ours = list(csv.reader(fh))
    assert ours[0] == real_rows[0]
    # every value of ours follows the format of the same column in the real file
    real = [dict(zip(real_rows[0], r)) for r in real_rows[1:]]
    for col in ("Collection", "Data Description URI", "SOP Class Name", "SOP Class UID", "Modality", "3rd Party Analysis"):
        allowed = {r[col] for r in real}
        assert {dict(zip(ours[0], r))[col] for r in ours[1:]} <= allowed, col
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,3})?")
    assert all(stamp.fullmatch(r["Download Timestamp"]) for r in real)
    assert all(stamp.fullmatch(dict(zip(ours[0], r))["Download Timestamp"]) for r in ours[1:])

    real_ws = openpyxl.load_workbook(REAL / "statistics-clinical-20201221.xlsx", read_only=True)["Clinical Data"]
    real_headers = [c for c in next(real_ws.iter_rows(min_row=1, max_row=1, values_only=True)) if c is not None]
    ws = openpyxl.load_workbook(cohort.root / "statistics-clinical-20201221.xlsx", read_only=True)["Clinical Data"]
    headers = list(next(ws.iter_rows(min_row=1, max_row=1, values_only=True)))
    assert headers == real_headers
    assert "\uff2d-Stage" in headers and "M-Stage" not in headers


def test_sheet_rows_match_the_truth_and_dicom_tags(cohort):
    import openpyxl

    ws = openpyxl.load_workbook(cohort.root / "statistics-clinical-20201221.xlsx")["Clinical Data"]
    rows = list(ws.iter_rows(values_only=True))
    assert tuple(rows[0]) == SHEET_HEADERS
    by_id = {r[1]: dict(zip(SHEET_HEADERS, r)) for r in rows[1:]}
    assert [r[0] for r in rows[1:]] == list(range(1, len(rows)))
    for p in cohort.patients:
        row = by_id[p.patient_id.split("-", 1)[1]]
        assert row["Sex"] == p.record["sex"]
        assert row["Age"] == p.record["age"]
        assert str(row["T-Stage"]) == p.record["t_stage"]
        assert str(row["\uff2d-Stage"]) == p.record["m_stage"]
        assert isinstance(row["N-Stage"], int) and isinstance(row["Smoking History"], int)
        ds = pydicom.dcmread(_ct_files(p.series_path)[0], stop_before_pixels=True)
        assert ds.PatientID == p.patient_id
        assert ds.PatientSex == row["Sex"]
        if row["Age"] is not None:
            assert ds.PatientAge == f"{row['Age']:03d}Y"
        if row["weight (kg)"] is not None:
            assert float(ds.PatientWeight) == pytest.approx(float(row["weight (kg)"]))


def test_ct_series_are_valid_dicom_with_consistent_geometry(cohort):
    all_uids: list[str] = []
    for p in cohort.patients:
        files = _ct_files(p.series_path)
        assert len(files) == p.num_slices
        datasets = [pydicom.dcmread(f) for f in files]
        for ds in datasets:
            assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
            assert ds.SOPClassUID == CT_IMAGE_STORAGE
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.SeriesInstanceUID == p.series_uid
            assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
            assert ds.pixel_array.dtype in (np.int16, np.uint16)
            assert ds.pixel_array.shape == (64, 64)
            for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID):
                assert re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid) and len(uid) <= 64
        all_uids += [ds.SOPInstanceUID for ds in datasets]
        pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        order = np.argsort(pos[:, 2])
        steps = np.diff(pos[order, 2])
        thickness = float(datasets[0].SliceThickness)
        np.testing.assert_allclose(steps, thickness, atol=1e-3)
        np.testing.assert_allclose(pos[:, :2], pos[:1, :2].repeat(len(pos), 0), atol=1e-6)
        assert [float(v) for v in datasets[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        spacing = float(datasets[0].PixelSpacing[0])
        assert 310 <= spacing * 64 <= 461  # a realistic chest field of view
        # HU: air outside the body, lung inside
        hu = np.stack([ds.pixel_array.astype(np.int32) * 1 - 1024 for ds in datasets])
        centre_k = hu[len(hu) // 2]
        assert np.median(centre_k[:, :3]) <= -950
        assert (hu < -700).mean() > 0.2 and (hu > -200).mean() > 0.1
    assert len(all_uids) == len(set(all_uids))


def test_annotations_are_labelimg_files_keyed_by_sop_uid(cohort):
    for p in cohort.patients:
        files = _ct_files(p.series_path)
        z_by_uid = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            z_by_uid[ds.SOPInstanceUID] = float(ds.ImagePositionPatient[2])
        zs = sorted(z_by_uid.values())
        ann_dir = cohort.root / "Annotation" / p.patient_id.split("-", 1)[1]
        xmls = sorted(ann_dir.glob("*.xml"))
        assert len(xmls) == p.annotated_slices > 0
        boxes, ks = [], []
        for x in xmls:
            uid = x.stem
            assert uid in z_by_uid, "annotation keyed by a UID that is not in the CT series"
            root = ET.parse(x).getroot()
            assert root.tag == "annotation"
            assert int(root.findtext("size/width")) == 64
            obj = root.find("object")
            assert obj.findtext("name") == p.label
            b = [int(obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax")]
            assert 0 <= b[0] <= b[2] < 64 and 0 <= b[1] <= b[3] < 64
            boxes.append(b)
            ks.append(zs.index(z_by_uid[uid]))
        boxes = np.array(boxes)
        (i0, j0, k0), (i1, j1, k1) = p.lesion_box_ijk
        assert (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max()) == (i0, j0, i1, j1)
        assert (min(ks), max(ks)) == (k0, k1)


def test_extra_series_are_present_and_not_ct_image_storage_or_unannotated(tmp_path):
    c = write_cohort(tmp_path / "c", 12, seed=1, size=32, classes="A,G")
    with open(c.root / "metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    annotated = {p.series_uid for p in c.patients}
    others = [r for r in rows if r["Series UID"] not in annotated]
    assert others, "expected some PET / secondary capture / second reconstruction series"
    assert {r["SOP Class Name"] for r in rows} >= {"CT Image Storage"}
    for r in others:
        f = next((c.root / r["File Location"]).glob("*.dcm"))
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.SOPClassUID == r["SOP Class UID"]


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes() if f.suffix != ".xlsx" else b"")
    return h.hexdigest()


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    a = write_cohort(tmp_path / "a", 3, seed=7, size=32)
    b = write_cohort(tmp_path / "b", 3, seed=7, size=32)
    c = write_cohort(tmp_path / "c", 3, seed=8, size=32)
    assert _tree_digest(a.root) == _tree_digest(b.root)
    assert _tree_digest(a.root) != _tree_digest(c.root)
    assert [p.record for p in a.patients] == [p.record for p in b.patients]


def test_write_cohort_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        write_cohort(tmp_path / "x", 2, seed=0, size=32)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_make_case_volume_record_and_lesion():
    case = make_case("G", seed=5, size=64)
    again = make_case("G", seed=5, size=64)
    other = make_case("G", seed=6, size=64)
    np.testing.assert_array_equal(case.volume.array, again.volume.array)
    assert not np.array_equal(case.volume.array, other.volume.array) or case.record != other.record
    v = case.volume
    assert v.array.shape[1:] == (64, 64)
    assert v.array.dtype == np.int16
    assert set(case.record) == set(synthetic.RECORD_FIELDS)
    # the lesion box (RAS) holds the lesion centre and maps back to the voxel box
    lo, hi = np.array(case.lesion_box_ras[0]), np.array(case.lesion_box_ras[1])
    centre = np.array(case.lesion_center_ras)
    tol = v.spacing.max()
    assert np.all(centre >= lo - tol) and np.all(centre <= hi + tol)
    ijk = v.ras_to_ijk_points(np.array([lo, hi]))
    got = np.sort(np.rint(ijk), axis=0)
    np.testing.assert_array_equal(got[0], case.lesion_box_ijk[0])
    np.testing.assert_array_equal(got[1], case.lesion_box_ijk[1])
    assert case.lesion_mask.shape == v.array.shape and case.lesion_mask.any()
    # the lesion is denser than the lung around it
    assert v.array[case.lesion_mask].mean() > -500 or case.lesion_kind == "A"


def test_small_lesion_share_and_class_dependent_position():
    small = [draw_patient("A", seed=s, size=64, small_lesion_share=1.0).lesion for s in range(20)]
    assert all(lesion.diameter_mm <= 10.0 for lesion in small)
    big = [draw_patient("G", seed=s, size=64, small_lesion_share=0.0).lesion for s in range(20)]
    assert all(lesion.diameter_mm > 10.0 for lesion in big)
    typical_a = [lp for lp in (draw_patient("A", seed=s, size=64).lesion for s in range(60)) if lp.kind == "A"]
    typical_g = [lp for lp in (draw_patient("G", seed=s, size=64).lesion for s in range(60)) if lp.kind == "G"]
    assert typical_a and typical_g
    assert {lp.position for lp in typical_a} == {"peripheral"}
    assert {lp.position for lp in typical_g} == {"central"}
    assert all(lp.shell_hu is not None for lp in typical_a)  # ground-glass component


def test_fusion_beats_either_modality_on_the_generating_factors():
    """On the factors the generator draws (what a perfect feature extractor would see), a classifier
    of image factors alone and of record factors alone each fall clearly short of both together."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    plans = [draw_patient(lbl, seed=s, number=s + 1, size=64) for s in range(200) for lbl in ("A", "G")]
    y = np.array([p.label == "G" for p in plans], dtype=int)
    kinds = ["A", "G", "B", "E", "indeterminate"]
    img = np.array(
        [[p.lesion.kind == k for k in kinds] + [p.lesion.position == "central", p.lesion.diameter_mm / 50] for p in plans],
        dtype=float,
    )
    rec = np.array(
        [
            [p.record["sex"] == "M", (p.record["age"] or 61) / 80, p.record["smoking"] == "1",
             int(p.record["n_stage"]) / 3, p.record["m_stage"] != "0"]
            for p in plans
        ],
        dtype=float,
    )
    # interactions let the model learn "trust the record when the image is indeterminate"
    both = np.hstack([img, rec, rec * img[:, [4]]])

    def acc(x):
        return cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean()

    a_img, a_rec, a_both = acc(img), acc(rec), acc(both)
    assert 0.6 < a_img < 0.85
    assert 0.6 < a_rec < 0.85
    assert a_both > max(a_img, a_rec) + 0.07


def test_class_mix_and_classes_option():
    assert class_counts(40, parse_classes(None)) == {"A": 22, "B": 4, "E": 2, "G": 12}
    assert sum(class_counts(7, parse_classes(None)).values()) == 7
    assert set(class_counts(4, parse_classes(None))) == {"A", "B", "E", "G"}
    assert class_counts(10, parse_classes("A,G")) == {"A": 6, "G": 4}
    assert class_counts(10, parse_classes("A=1,G=1")) == {"A": 5, "G": 5}
    with pytest.raises(ValueError, match="unknown class"):
        parse_classes("A,X")
    with pytest.raises(ValueError, match="not a number"):
        parse_classes("A=lots")
    with pytest.raises(ValueError, match="must be at least 1"):
        class_counts(0, parse_classes(None))


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "cli"
    truth = tmp_path / "truth.csv"
    rc = cli_main(["synth", str(out), "--patients", "2", "--seed", "4", "--size", "32", "--classes", "A,G",
                   "--no-progress", "--truth", str(truth), "--small-lesion-share", "0"])
    assert rc == 0
    assert (out / "metadata.csv").is_file()
    with open(truth, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["label"] for r in rows) == ["A", "G"]
    assert all(float(r["lesion_diameter_mm"]) > 10 for r in rows)
    assert "wrote 2 patients" in capsys.readouterr().out
    assert cli_main(["synth", str(out), "--patients", "2", "--no-progress"]) == 2  # not empty
    assert cli_main(["synth", str(tmp_path / "n"), "--patients", "0", "--no-progress"]) == 2
    assert "--patients" in capsys.readouterr().err
