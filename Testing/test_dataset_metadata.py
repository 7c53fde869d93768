"""metadata.csv, annotation XMLs, splits and the cohort table reader (no DICOM needed)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from MMCAFNetLib.dataset import (
    METADATA_COLUMNS,
    AnnotationError,
    IndexReport,
    assign_splits,
    class_of_subject,
    cohort_columns,
    match_clinical_ids,
    parse_annotation_file,
    parse_file_size,
    read_cohort,
    read_metadata,
    read_patient_annotations,
    write_cohort,
)
from MMCAFNetLib.ehr import ClinicalDataWarning, read_clinical_sheet


def _shared_data() -> Path:
    root = Path(os.environ.get("MMCAFNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return root / "data" / "lung-pet-ct-dx"


DATA = _shared_data()
needs_real = pytest.mark.skipif(
    not (DATA / "metadata.csv").is_file() or not (DATA / "statistics-clinical-20201221.xlsx").is_file(),
    reason="the real Lung-PET-CT-Dx index files are not available (set MMCAFNET_SHARED)",
)


def test_file_size_text_with_units():
    assert parse_file_size("33.75 MB") == pytest.approx(33.75e6)
    assert parse_file_size("14,24 MB") == pytest.approx(14.24e6)
    assert parse_file_size("512 KB") == pytest.approx(512e3)
    assert np.isnan(parse_file_size("lots"))


@needs_real
def test_real_metadata_counts():
    meta = read_metadata(DATA / "metadata.csv")
    assert list(meta.columns[:17]) == list(METADATA_COLUMNS)
    assert len(meta) == 1295
    subjects = meta["Subject ID"].unique()
    assert len(subjects) == 355
    per_class = pd.Series([class_of_subject(s) for s in subjects]).value_counts().to_dict()
    assert per_class == {"A": 251, "B": 38, "E": 5, "G": 61}
    ct = meta[meta["is_ct_image"]]
    assert len(ct) == 881
    assert set(meta.loc[~meta["is_ct_image"], "SOP Class Name"]) == {
        "Secondary Capture Image Storage",
        "Positron Emission Tomography Image Storage",
    }
    assert ct["Subject ID"].nunique() == 355  # every subject has a CT
    assert (meta["file_size_bytes"] > 0).all()
    first = meta.iloc[0]
    assert Path(first["series_dir"]).is_absolute() and "./" not in first["series_dir"]
    assert Path(first["series_dir"]).relative_to(DATA.resolve()).parts[0] == "Lung-PET-CT-Dx"


@needs_real
def test_real_id_mismatch_is_reported():
    meta = read_metadata(DATA / "metadata.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClinicalDataWarning)
        sheet = read_clinical_sheet(DATA / "statistics-clinical-20201221.xlsx")
    lines: list[str] = []
    report = IndexReport(sink=lines.append)
    kept = match_clinical_ids(sorted(meta["Subject ID"].unique()), sheet["patient_id"].tolist(), report)
    assert len(kept) == 354 and "Lung_Dx-A0251" not in kept
    assert report.skipped == {"clinical row without images": 1, "patient without a clinical row": 1}
    assert len(lines) == 2
    assert any("A0266" in line for line in lines) and any("Lung_Dx-A0251" in line for line in lines)


def test_metadata_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata\.csv"):
        read_metadata(tmp_path)
    (tmp_path / "metadata.csv").write_text("Series UID,Subject ID\n1.2,Lung_Dx-A0001\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing column"):
        read_metadata(tmp_path / "metadata.csv")


VOC = """<annotation>
  <folder>A0001</folder><filename>{uid}</filename>
  <size><width>512</width><height>512</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJ = "<object><name>{name}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"


def _write_voc(folder: Path, uid: str, objects: list[tuple[str, int, int, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    body = "".join(OBJ.format(name=n, x0=a, y0=b, x1=c, y1=d) for n, a, b, c, d in objects)
    path = folder / f"{uid}.xml"
    path.write_text(VOC.format(uid=uid, objects=body), encoding="utf-8")
    return path


def test_parse_good_annotation(tmp_path):
    path = _write_voc(tmp_path, "1.2.3.4", [("A", 10, 20, 30, 40), ("A", 5, 6, 7, 8)])
    boxes = parse_annotation_file(path)
    assert [(b.xmin, b.ymin, b.xmax, b.ymax) for b in boxes] == [(10, 20, 30, 40), (5, 6, 7, 8)]
    assert all(b.sop_uid == "1.2.3.4" and b.name == "A" for b in boxes)


def test_faulty_annotations_are_skipped_with_one_warning_each(tmp_path):
    folder = tmp_path / "A0001"
    _write_voc(folder, "1.2.3.1", [("A", 10, 20, 30, 40)])  # good
    _write_voc(folder, "1.2.3.2", [("Q", 1, 1, 2, 2)])  # label Q
    _write_voc(folder, "1.2.3.3", [("", 1, 1, 2, 2)])  # empty label
    _write_voc(folder, "1.2.3.4", [("A0001", 1, 1, 2, 2), ("A", 3, 3, 4, 4)])  # patient ID as label + a good box
    _write_voc(folder, "1.2.3.5", [("G", 1, 1, 2, 2)])  # disagrees with the ID: kept, warned
    (folder / "1.2.3.6.xml").write_text("<annotation><object><name>A</name>", encoding="utf-8")  # truncated
    (folder / "1.2.3.7.xml").write_text(
        "<annotation><object><name>A</name><bndbox><xmin>a</xmin><ymin>1</ymin><xmax>2</xmax><ymax>3</ymax></bndbox></object></annotation>",
        encoding="utf-8",
    )
    lines: list[str] = []
    report = IndexReport(sink=lines.append)
    boxes = read_patient_annotations(folder, "A0001", report)
    assert sorted(boxes) == ["1.2.3.1", "1.2.3.4", "1.2.3.5"]
    assert len(boxes["1.2.3.4"]) == 1 and boxes["1.2.3.4"][0].xmin == 3
    assert report.skipped == {"bad annotation label": 3, "unparsable annotation": 2, "label differs from ID": 1}
    assert len(lines) == 6 and all(line.startswith("warning: ") for line in lines)
    assert any("1.2.3.6.xml" in line for line in lines)
    with pytest.raises(AnnotationError, match="unparsable"):
        parse_annotation_file(folder / "1.2.3.6.xml")


def test_splits_are_patient_level_stratified_and_seeded():
    labels = ["A"] * 60 + ["B"] * 20 + ["E"] * 5 + ["G"] * 15
    split, fold = assign_splits(labels, seed=3, test_fraction=0.2, val_fraction=0.1, folds=5)
    assert assign_splits(labels, seed=3, test_fraction=0.2, val_fraction=0.1, folds=5) == (split, fold)
    assert assign_splits(labels, seed=4, test_fraction=0.2, val_fraction=0.1, folds=5)[0] != split
    df = pd.DataFrame({"label": labels, "split": split, "fold": fold})
    assert (df["split"] == "test").sum() == 20 and (df["split"] == "val").sum() == 10
    test_share = df[df["split"] == "test"]["label"].value_counts()
    assert test_share["A"] == 12 and test_share["B"] == 4 and test_share["G"] == 3 and test_share.get("E", 0) == 1
    assert (df.loc[df["split"] == "test", "fold"] == -1).all()
    trainval = df[df["split"] != "test"]
    assert sorted(trainval["fold"].unique()) == [0, 1, 2, 3, 4]
    sizes = trainval["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    per_fold_a = trainval[trainval["label"] == "A"]["fold"].value_counts()
    assert per_fold_a.max() - per_fold_a.min() <= 1
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(labels, test_fraction=0.6, val_fraction=0.5)


def _cohort_frame(series_dir: Path) -> pd.DataFrame:
    row = {c: 0 for c in cohort_columns()}
    row.update(patient_id="Lung_Dx-A0001", label="A", series_path=str(series_dir), series_uid="1.2.3", num_slices=4)
    row.update(box_ijk_max_i=3, box_ras_max_r=2.5, sex="M", age=60.0, weight=70.0, t_stage="1a", n_stage="0", m_stage="0", smoking="1")
    row.update(split="train", fold=0)
    return pd.DataFrame([row])


def test_cohort_round_trip_and_checks(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    path = write_cohort(_cohort_frame(series), tmp_path / "cohort.csv")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cohort")]  # no temporary file left
    df = read_cohort(path)
    assert df.loc[0, "t_stage"] == "1a" and df.loc[0, "n_stage"] == "0" and df.loc[0, "age"] == 60.0
    assert list(df.columns) == cohort_columns()
    series.rmdir()
    with pytest.raises(FileNotFoundError, match="series folder"):
        read_cohort(path)
    assert len(read_cohort(path, check_paths=False)) == 1
    broken = _cohort_frame(tmp_path).drop(columns=["box_ijk_min_k"])
    write_cohort(broken, tmp_path / "broken.csv")
    with pytest.raises(ValueError, match="box_ijk_min_k"):
        read_cohort(tmp_path / "broken.csv")
    bad = _cohort_frame(tmp_path)
    bad.loc[0, "box_ijk_min_i"] = 9
    write_cohort(bad, tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="box_ijk_min_i > box_ijk_max_i"):
        read_cohort(tmp_path / "bad.csv")
