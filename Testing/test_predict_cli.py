"""`mmcafnet predict`, `demo` and `info`, run through the real console entry point (cli.main)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest
from test_inference_support import write_untrained_checkpoint

from MMCAFNetLib.cli import main
from MMCAFNetLib.inference import OUTPUT_FILES, read_heatmap
from MMCAFNetLib.synthetic import make_case
from MMCAFNetLib.volume import read_volume, write_volume

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "untrained.pt")


@pytest.fixture(scope="module")
def case():
    return make_case("G", 5, 96)


@pytest.fixture(scope="module")
def ct_file(case, tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "case.nrrd"
    write_volume(case.volume, path)
    return path


def same_geometry(a, b) -> bool:
    return a.shape == b.shape and np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=1e-4)


def point_args(point) -> list[str]:
    return [f"{v:.4f}" for v in point]


def test_predict_writes_four_files_on_the_input_geometry(ckpt, ct_file, case, tmp_path, capsys) -> None:
    out = tmp_path / "result"
    code = main(["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--out", str(out),
                 "--point", *point_args(case.lesion_center_ras), "--sex", "M", "--age", "63", "--smoking", "1"])
    assert code == 0
    assert sorted(os.listdir(out)) == sorted(OUTPUT_FILES)
    ct = read_volume(ct_file)
    heat, labels = read_heatmap(out / "heatmap.nrrd", full_grid=True), read_volume(out / "labelmap.nrrd")
    assert same_geometry(heat, ct) and same_geometry(labels, ct)
    assert heat.array.dtype == np.float32 and labels.array.dtype == np.uint8
    assert read_volume(out / "heatmap.nrrd").array.dtype == np.uint8  # stored compactly (heatmap_file)
    info = json.loads((out / "prediction.json").read_text())
    assert set(info["probabilities"]) == {"A", "G"}
    assert sum(info["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert info["predicted_class"] in ("A", "G") and info["windows"]
    # The heatmap's highest places, highest first and at least 20 mm apart; the first is the peak.
    places = info["heatmap_candidates"]
    assert places and [c["rank"] for c in places] == list(range(1, len(places) + 1))
    assert places[0]["value"] == pytest.approx(1.0) and all(a["value"] >= b["value"] for a, b in zip(places, places[1:]))
    at = np.rint(heat.ras_to_ijk_points([places[0]["ras"]])[0][::-1]).astype(int)
    assert heat.array[tuple(at)] >= 0.99
    for n, a in enumerate(places):
        assert all(np.linalg.norm(np.subtract(a["ras"], b["ras"])) >= 20.0 - 0.01 for b in places[n + 1:])
    assert info["clinical_record"]["sex"] == "M" and info["clinical_record"]["smoking"] is not None
    assert info["model"]["model_name"] == "mmcafnet-lite" and "sha256" in info["model"]
    assert info["heatmap_threshold"] == 0.5 and info["decision_threshold"] == 0.5
    assert "not for clinical use" in info["note"]
    assert {"prepare_s", "inference_s", "total_s"} <= set(info["timings"])
    np.testing.assert_array_equal(np.unique(labels.array), np.unique(labels.array[labels.array <= 4]))
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = capsys.readouterr().out
    assert "predicted:" in stdout and str(out) in stdout
    line = next(x for x in stdout.splitlines() if x.startswith("heatmap places to look at (RAS mm, map value): 1 ("))
    first = [float(v) for v in line.split("1 (", 1)[1].split(")", 1)[0].split(",")]
    np.testing.assert_allclose(first, places[0]["ras"], atol=0.051)
    # No temporary folder left next to the result.
    assert [p.name for p in tmp_path.iterdir()] == ["result"]


def test_lps_point_and_box_mean_the_same_place(ckpt, ct_file, case, tmp_path) -> None:
    ras = np.asarray(case.lesion_center_ras)
    lps = ras * np.array([-1.0, -1.0, 1.0])
    a, b = tmp_path / "ras", tmp_path / "lps"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--out", str(a), "--heatmap", "none",
                 "--no-preview", "--point", *point_args(ras)]) == 0
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--out", str(b), "--heatmap", "none",
                 "--no-preview", "--lps", "--point", *point_args(lps)]) == 0
    ja, jb = (json.loads((d / "prediction.json").read_text()) for d in (a, b))
    assert ja["windows"] == jb["windows"]
    np.testing.assert_allclose(ja["lesion_box_ras"][0], ras, atol=1e-3)
    assert sorted(os.listdir(a)) == ["prediction.json"]  # no heatmap asked, none written
    box = np.asarray(case.lesion_box_ras) * np.array([-1.0, -1.0, 1.0])
    c = tmp_path / "box"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--out", str(c), "--lps",
                 "--box", *[f"{v:.4f}" for v in box.ravel()], "--heatmap", "gradcam"]) == 0
    jc = json.loads((c / "prediction.json").read_text())
    np.testing.assert_allclose(jc["lesion_box_ras"], np.asarray(case.lesion_box_ras), atol=1e-3)
    assert jc["heatmap_method"] == "gradcam"


def test_clinical_values_from_json_and_csv_rows(ckpt, ct_file, case, tmp_path) -> None:
    record = {"sex": "F", "age": 70, "weight": 58, "t_stage": "2", "n_stage": "1", "m_stage": "0", "smoking": "0"}
    js = tmp_path / "record.json"
    js.write_text(json.dumps(record))
    csv = tmp_path / "records.csv"
    pd.DataFrame([{"patient_id": "X1", **record}, {"patient_id": "X2", **record, "sex": "M"}]).to_csv(csv, index=False)
    common = ["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--heatmap", "none", "--no-preview",
              "--point", *point_args(case.lesion_center_ras)]
    assert main([*common, "--out", str(tmp_path / "j"), "--clinical", str(js)]) == 0
    assert json.loads((tmp_path / "j" / "prediction.json").read_text())["clinical_record"]["sex"] == "F"
    assert main([*common, "--out", str(tmp_path / "c"), "--clinical", str(csv), "--row", "X2"]) == 0
    assert json.loads((tmp_path / "c" / "prediction.json").read_text())["clinical_record"]["sex"] == "M"
    # Flags override the file.
    assert main([*common, "--out", str(tmp_path / "o"), "--clinical", str(js), "--sex", "M"]) == 0
    assert json.loads((tmp_path / "o" / "prediction.json").read_text())["clinical_record"]["sex"] == "M"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--point", "9999", "0", "0"], "outside the CT"),
        (["--t-stage", "banana"], "T stage"),
        (["--threshold", "2"], "threshold"),
        (["--scan-overlap", "0.9"], "scan overlap"),
        (["--scan-overlap", "nan"], "scan overlap"),
        (["--clinical", "{tmp}/missing.json"], "not found"),
        (["--clinical", "{tmp}/two.csv"], "--row"),
        (["--input-override", "{tmp}/no-such-ct.nrrd"], "no-such-ct"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(ckpt, ct_file, tmp_path, capsys, extra, message) -> None:
    pd.DataFrame([{"patient_id": "1", "sex": "M"}, {"patient_id": "2", "sex": "F"}]).to_csv(tmp_path / "two.csv", index=False)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    ct = str(ct_file)
    if extra[0] == "--input-override":
        ct, extra = extra[1], []
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(ckpt), "--input", ct, "--out", str(out), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "error" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_failed_rerun_keeps_the_previous_result(ckpt, ct_file, case, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--out", str(out), "--no-preview",
            "--point", *point_args(case.lesion_center_ras)]
    assert main(args) == 0
    before = (out / "prediction.json").read_bytes()
    assert main([*args[:-3], "9999", "0", "0"]) == 2
    assert (out / "prediction.json").read_bytes() == before
    assert sorted(os.listdir(out)) == sorted(set(OUTPUT_FILES) - {"preview.png"})


def test_batch_over_a_folder_and_a_csv(ckpt, case, tmp_path, capsys) -> None:
    cases = tmp_path / "cts"
    cases.mkdir()
    other = make_case("A", 8, 96)
    write_volume(case.volume, cases / "first.nrrd")
    write_volume(other.volume, cases / "second.nii.gz")
    (cases / "notes.txt").write_text("not a CT")
    out = tmp_path / "batch"
    assert main(["predict", "--checkpoint", str(ckpt), "--batch", str(cases), "--out", str(out), "--no-preview",
                 "--heatmap", "none", "--age", "60"]) == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["case_id"]) == ["first", "second"] and set(summary["status"]) == {"ok"}
    assert (out / "first" / "prediction.json").is_file() and (out / "second" / "prediction.json").is_file()
    # A CSV with lesion boxes (the cohort-table columns) and one broken row.
    rows = []
    for name, c in (("p1", case), ("p2", other)):
        lo, hi = c.lesion_box_ras
        rows.append({"patient_id": name, "label": c.label,
                     "series_path": str(cases / ("first.nrrd" if name == "p1" else "second.nii.gz")),
                     "box_ras_min_r": lo[0], "box_ras_min_a": lo[1], "box_ras_min_s": lo[2],
                     "box_ras_max_r": hi[0], "box_ras_max_a": hi[1], "box_ras_max_s": hi[2], **c.record})
    rows.append({"patient_id": "p3", "label": "B", "series_path": str(tmp_path / "missing.nrrd")})
    rows.append({"patient_id": "p4", "label": "E", "series_path": str(cases / "first.nrrd")})
    table = tmp_path / "cases.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    out2 = tmp_path / "batch2"
    assert main(["predict", "--checkpoint", str(ckpt), "--batch", str(table), "--out", str(out2), "--no-preview"]) == 1
    summary = pd.read_csv(out2 / "summary.csv").set_index("case_id")
    assert summary.loc["p1", "status"] == "ok" and summary.loc["p2", "status"] == "ok"
    assert summary.loc["p3", "status"] == "error" and "missing.nrrd" in summary.loc["p3", "error"]
    assert not (out2 / "p3").exists()
    j1 = json.loads((out2 / "p1" / "prediction.json").read_text())
    np.testing.assert_allclose(j1["lesion_box_ras"], np.asarray(case.lesion_box_ras), atol=1e-3)
    assert summary.loc["p1", "probability"] == pytest.approx(j1["probability"], abs=1e-5)
    peak = [summary.loc["p1", f"peak_{axis}"] for axis in "ras"]  # the heatmap's peak, where to look first
    np.testing.assert_allclose(peak, j1["heatmap_candidates"][0]["ras"], atol=0.01)
    # The decision threshold and the true class are in the summary; an A-vs-G model warns about B and E.
    assert summary.loc["p1", "decision_threshold"] == pytest.approx(j1["decision_threshold"]) == 0.5
    assert summary.loc["p1", "true_label"] == case.label == "G" and summary.loc["p2", "true_label"] == "A"
    for name in ("p1", "p2"):
        expected = summary.loc[name, "predicted_class"] == summary.loc[name, "true_label"]
        assert str(summary.loc[name, "correct"]).lower() == str(bool(expected)).lower()
    assert summary.loc["p4", "status"] == "ok" and pd.isna(summary.loc["p4", "correct"])  # E: never right
    err = capsys.readouterr().err
    assert "not trained on (1 of class B, 1 of class E)" in err and "knows only A, G" in err


def test_predict_on_a_dicom_series_written_by_synth(ckpt, tmp_path) -> None:
    from MMCAFNetLib.synthetic import write_cohort

    cohort = write_cohort(tmp_path / "cohort", patients=1, seed=4, size=96, extra_series=False)
    patient = cohort.patients[0]
    out = tmp_path / "dicom-result"
    assert main(["predict", "--checkpoint", str(ckpt), "--input", patient.series_path, "--out", str(out),
                 "--point", *point_args(patient.lesion_center_ras)]) == 0
    ct = read_volume(patient.series_path)
    assert same_geometry(read_heatmap(out / "heatmap.nrrd", full_grid=True), ct)
    assert same_geometry(read_volume(out / "labelmap.nrrd"), ct)
    info = json.loads((out / "prediction.json").read_text())
    # Sex, age and weight came from the DICOM header.
    assert info["clinical_record"]["sex"] in ("M", "F") and info["clinical_record"]["age"] is not None
    # ... and the output says so, with the values it took.
    announced = [w for w in info["warnings"] if "taken from the DICOM header" in w]
    assert announced and f"sex {info['clinical_record']['sex']}" in announced[0] and "--sex/--age" in announced[0]


def test_info_shows_what_the_checkpoint_holds(ckpt, capsys) -> None:
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "mmcafnet-lite" in text and "Adenocarcinoma" in text and "test-small" in text and "demo model:      no" in text
    assert main(["info", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["class_names"] == ["A", "G"] and data["demo"] is False
    assert data["clinical_fields"] == ["sex", "age", "weight", "t_stage", "n_stage", "m_stage", "smoking"]
    assert data["parameters"] > 1000 and data["preset"]["window"] == [8, 32, 32]
    assert data["scan"] == {"overlap": 0.25, "attention_levels": "all", "lesion_attention_levels": "all"}


def test_scan_overrides_reach_the_whole_volume_scan(ckpt, ct_file, tmp_path) -> None:
    """--scan-overlap and --scan-levels replace the checkpoint's scan settings; prediction.json says
    which overlap was used."""
    runs = {}
    for overlap in ("0.25", "0.5"):
        out = tmp_path / f"o{overlap}"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", str(ct_file), "--out", str(out), "--no-preview",
                     "--no-dicom", "--scan-overlap", overlap, "--scan-levels", "finest"]) == 0
        runs[overlap] = json.loads((out / "prediction.json").read_text())["model"]["scan"]
    assert runs["0.25"]["overlap"] == 0.25 and runs["0.5"]["overlap"] == 0.5
    assert runs["0.5"]["windows_tiled"] > runs["0.25"]["windows_tiled"]


def test_demo_writes_the_files_and_names_the_true_class(tmp_path, capsys) -> None:
    demo_ckpt = write_untrained_checkpoint(tmp_path / "demo.pt", demo=True)
    out = tmp_path / "demo-out"
    assert main(["demo", "--out", str(out), "--checkpoint", str(demo_ckpt), "--size", "96", "--label", "G"]) == 0
    assert sorted(os.listdir(out)) == sorted([*OUTPUT_FILES, "ct.nrrd"])  # the CT too: a self-contained folder
    ct = read_volume(out / "ct.nrrd")
    assert same_geometry(ct, read_heatmap(out / "heatmap.nrrd", full_grid=True)) and ct.array.min() < -500 < ct.array.max()
    np.testing.assert_array_equal(ct.array, make_case("G", 2025, 96).volume.array)
    text = capsys.readouterr().out
    assert "true class G" in text and "predicted:" in text and str(out) in text
    info = json.loads((out / "prediction.json").read_text())
    assert info["model"]["demo"] is True and "DEMO" in info["note"]


def test_demo_without_the_bundled_model_says_so(tmp_path, monkeypatch, capsys) -> None:
    empty = tmp_path / "Resources"
    (empty / "Models").mkdir(parents=True)
    (empty / "Models.json").write_text("{}")
    monkeypatch.setenv("MMCAFNET_RESOURCES", str(empty))
    assert main(["demo", "--out", str(tmp_path / "o")]) == 2
    assert "demo model is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_the_preview_is_skipped_with_a_message(tmp_path) -> None:
    """matplotlib is not a run-time dependency: demo still writes the other files."""
    import subprocess
    import sys

    out = tmp_path / "demo"
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from MMCAFNetLib.cli import main\n"
        f"raise SystemExit(main(['demo', '--out', {str(out)!r}]))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted({*OUTPUT_FILES, "ct.nrrd"} - {"preview.png"})
    assert "preview.png was not written" in run.stderr and "matplotlib" in run.stderr


def _write_dicom_series(volume, folder, sex: str, age: str, weight: str) -> None:
    """The case's voxels as an axial CT series (int16 HU) with the given patient header values."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    sx, sy, sz = (float(s) for s in volume.spacing)
    for k, plane in enumerate(np.asarray(volume.array)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientSex, ds.PatientAge, ds.PatientWeight = "CT", sex, age, weight
        ds.ImagePositionPatient = [0.0, 0.0, k * sz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sy, sx]
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.clip(plane, -32768, 32767).astype("<i2").tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


def test_values_filled_from_the_dicom_header_are_announced_and_filtered_as_in_slicer(ckpt, case, tmp_path,
                                                                                     capsys) -> None:
    from MMCAFNetLib.ehr import fill_from_header
    from MMCAFNetLib.scene import record_from_dicom_values

    headers = {"plain": ("M", "061Y", "72.5"), "odd": ("O", "150Y", "0"), "months": ("F", "018M", "")}
    for name, (sex, age, weight) in headers.items():
        folder = tmp_path / name
        _write_dicom_series(case.volume, folder, sex, age, weight)
        out = tmp_path / f"out-{name}"
        code = main(["predict", "--checkpoint", str(ckpt), "--input", str(folder), "--out", str(out), "--heatmap",
                     "none", "--no-preview", "--smoking", "1"])
        assert code == 0
        captured = capsys.readouterr()
        info = json.loads((out / "prediction.json").read_text())
        slicer_record = record_from_dicom_values(sex, age, weight)  # what the Slicer form is filled with
        assert info["clinical_from_header"] == slicer_record, name
        _, taken, _ = fill_from_header({}, read_volume(folder).meta)
        assert taken == slicer_record
        if slicer_record:
            shown = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in slicer_record.items())
            assert f"warning: clinical values taken from the DICOM header: {shown}" in captured.out
            assert any(f"taken from the DICOM header: {shown}" in w for w in info["warnings"])
            for key, value in slicer_record.items():
                assert info["clinical_record"][key] == value
        else:
            assert "from the DICOM header" not in captured.err
    odd = json.loads((tmp_path / "out-odd" / "prediction.json").read_text())
    assert odd["clinical_record"]["sex"] is None and odd["clinical_record"]["age"] is None
    assert any("PatientSex" in w and "unknown" in w for w in odd["warnings"]), odd["warnings"]
    assert any("PatientAge" in w and "150" in w for w in odd["warnings"]), odd["warnings"]
    plain = json.loads((tmp_path / "out-plain" / "prediction.json").read_text())
    assert plain["clinical_from_header"] == {"sex": "M", "age": 61.0, "weight": 72.5}
    # a value the user typed wins over the header, and is not announced as filled
    code = main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "plain"), "--out",
                 str(tmp_path / "typed"), "--heatmap", "none", "--no-preview", "--age", "70"])
    assert code == 0
    typed = json.loads((tmp_path / "typed" / "prediction.json").read_text())
    assert typed["clinical_record"]["age"] == 70.0 and "age" not in typed["clinical_from_header"]
