"""Bad input, case by case: every entry of the table below is answered by a clear error, and nothing
half-written is left behind.

The table (``CASES``) is the specification: area, case, expected outcome. Each row's check runs as
one test (``test_bad_input[<area>/<case>]``). ``python Testing/test_bad_inputs.py`` prints the table
as Markdown. The command-line rows run ``python -m MMCAFNetLib.cli`` in a subprocess and require
exit status 2, a message on stderr naming the problem, no traceback and no output folder.
"""

from __future__ import annotations

import builtins
import importlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from MMCAFNetLib.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint
from MMCAFNetLib.ehr import ClinicalValueError, default_schema
from MMCAFNetLib.volume import Volume, VolumeError, check_ct, read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# helpers


def import_or_skip(module: str, what: str) -> Any:
    """Import a part of the library that may not have landed yet; skip naming it when absent."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("MMCAFNetLib"):
            pytest.skip(f"{what} ({exc.name}) is not available yet")
        raise


def write_ct_series(folder: Path, k: int = 4, rows: int = 8, cols: int = 8, series_uid: Optional[str] = None) -> str:
    """A small valid axial CT series written with pydicom; returns its SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study, frame = generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    for z in range(k):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series_uid, frame
        ds.Modality, ds.PatientSex, ds.PatientAge = "CT", "M", "061Y"
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.5
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = rng.integers(0, 2000, (rows, cols)).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{z:03d}.dcm", enforce_file_format=True)
    return series_uid


def small_ct(shape=(8, 10, 12), value: float = -1000.0) -> Volume:
    array = np.full(shape, value, dtype=np.float32)
    array[2:6, 3:7, 4:8] = 40.0
    return Volume.from_geometry(array, spacing=(0.8, 0.8, 2.5), origin=(-4.0, -4.0, 0.0))


def tiny_ct() -> Volume:
    """4 x 4 x 4 voxels of 1 mm with tissue in it: far smaller than one window of any model."""
    array = np.full((4, 4, 4), 40.0, dtype=np.float32)
    array[0] = -1000.0
    return Volume.from_geometry(array, spacing=(1.0, 1.0, 1.0))


def write_header_bomb(path: Path, size: tuple[int, int, int] = (60000, 60000, 60000)) -> None:
    """A compressed image of a few bytes whose header declares ``size`` voxels (1.7 PB of int16)."""
    import gzip
    import struct

    if path.name.endswith(".nrrd"):
        header = (
            "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
            f"sizes: {size[0]} {size[1]} {size[2]}\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
            "kinds: domain domain domain\nendian: little\nencoding: gzip\nspace origin: (0,0,0)\n\n"
        )
        path.write_bytes(header.encode("ascii") + gzip.compress(b"\0" * 4096))
        return
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *[min(n, 32767) for n in size], 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 4, 16)  # int16
    struct.pack_into("<8f", hdr, 76, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform, sform
    struct.pack_into("<4f", hdr, 280, 1.0, 0.0, 0.0, 0.0)
    struct.pack_into("<4f", hdr, 296, 0.0, 1.0, 0.0, 0.0)
    struct.pack_into("<4f", hdr, 312, 0.0, 0.0, 1.0, 0.0)
    hdr[344:348] = b"n+1\0"
    path.write_bytes(gzip.compress(bytes(hdr) + b"\0" * 4 + b"\0" * 4096))


def checkpoint_payload(**changes: Any) -> dict[str, Any]:
    """A complete checkpoint of an untrained lite model (real weights, fitted default schema)."""
    import torch

    models = import_or_skip("MMCAFNetLib.models", "the model registry")
    from MMCAFNetLib.preset import DEFAULT

    torch.manual_seed(0)
    model = models.create_model("mmcafnet-lite", num_classes=1, num_clinical=7)
    rows = [
        {"sex": "M", "age": 60, "weight": 70, "t_stage": "2", "n_stage": "0", "m_stage": "0", "smoking": "1"},
        {"sex": "F", "age": 70, "weight": 60, "t_stage": "1a", "n_stage": "1", "m_stage": "0", "smoking": "0"},
    ]
    payload = {
        "format_version": FORMAT_VERSION,
        "model_name": "mmcafnet-lite",
        "model_config": {"num_classes": 1, "num_clinical": 7},
        "class_names": ["A", "G"],
        "task": "AG",
        "state_dict": model.state_dict(),
        "schema": default_schema().fit(rows).to_dict(),
        "preset": DEFAULT.to_dict(),
        "threshold": 0.5,
        "provenance": {"seed": 0, "library_version": "test"},
        "metrics": {},
        "demo": True,
    }
    payload.update(changes)
    return payload


class _CreatesFile:
    """Unpickling this object calls ``open(marker, "w")``: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def write_pickled_callable(path: Path, marker: Path) -> None:
    import torch

    torch.save({"format_version": 1, "state_dict": {}, "payload": _CreatesFile(marker)}, path)
    assert not marker.exists()


def expect(exc_type: type, *fragments: str) -> Callable[[Callable[[], Any]], BaseException]:
    """Run ``fn`` and check it raises ``exc_type`` whose message names every fragment (case-insensitive)."""

    def run(fn: Callable[[], Any]) -> BaseException:
        with pytest.raises(exc_type) as info:
            fn()
        message = str(info.value).lower()
        for fragment in fragments:
            assert fragment.lower() in message, f"message {str(info.value)!r} does not name {fragment!r}"
        return info.value

    return run


# ---------------------------------------------------------------------------------------------
# CT files


def ct_missing_path(tmp: Path) -> None:
    err = expect(FileNotFoundError, "no such file")(lambda: read_volume(tmp / "nowhere"))
    assert "nowhere" in str(err)


def ct_empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    expect(VolumeError, "empty")(lambda: read_volume(tmp / "empty"))


def ct_non_dicom_files(tmp: Path) -> None:
    folder = tmp / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not an image")
    (folder / "scan.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    expect(VolumeError, "none is a dicom image")(lambda: read_volume(folder))


def ct_2d_image(tmp: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(tmp / "slice.nrrd"))
    expect(VolumeError, "2D")(lambda: read_volume(tmp / "slice.nrrd"))


def ct_4d_image(tmp: Path) -> None:
    import SimpleITK as sitk

    frame = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    sitk.WriteImage(sitk.JoinSeries([frame, frame, frame]), str(tmp / "series.nrrd"))
    expect(VolumeError, "4D")(lambda: read_volume(tmp / "series.nrrd"))


def ct_nan_voxels(tmp: Path) -> None:
    ct = small_ct()
    ct.array[0, 0, :3] = np.nan
    write_volume(ct, tmp / "nan.nrrd")
    expect(VolumeError, "nan.nrrd", "3 of 960 voxel(s) are not numbers")(lambda: read_volume(tmp / "nan.nrrd"))
    inference = import_or_skip("MMCAFNetLib.inference", "the Predictor")
    expect(ValueError, "3 NaN")(lambda: inference.validate_ct(ct))  # a volume from memory (Slicer)


def ct_nan_voxels_nifti(tmp: Path) -> None:
    # ITK's NIfTI reader turns NaN into 0 without a word: the reader must find them in the raw data
    ct = small_ct()
    ct.array[0, 0, :2] = np.nan
    for name in ("nan.nii", "nan.nii.gz"):
        write_volume(ct, tmp / name)
        expect(VolumeError, name, "2 of 960 voxel(s) are not numbers")(lambda name=name: read_volume(tmp / name))


def ct_declared_size_beyond_memory(tmp: Path) -> None:
    for name in ("huge.nrrd", "huge.nii.gz"):
        write_header_bomb(tmp / name)
        assert (tmp / name).stat().st_size < 4096
        expect(ValueError, name, "declares", "memory")(lambda name=name: read_volume(tmp / name))


def ct_too_small_for_a_window(tmp: Path) -> None:
    inference = import_or_skip("MMCAFNetLib.inference", "the Predictor")
    save_checkpoint(checkpoint_payload(), tmp / "ok.pt")
    predictor = inference.Predictor.load(tmp / "ok.pt", device="cpu")
    tiny = tiny_ct()
    record = {"sex": "M", "age": 60}
    for lesion in (None, np.array([1.0, 1.0, 1.0])):  # with and without a lesion: the size is named
        expect(ValueError, "too small", "4 x 4 x 4 voxels", "12 x 192 x 192")(
            lambda lesion=lesion: predictor.classify(tiny, record, lesion=lesion, heatmap=None)
        )


def ct_all_nan(tmp: Path) -> None:
    ct = small_ct()
    ct.array[:] = np.nan
    expect(VolumeError, "every voxel is NaN")(lambda: check_ct(ct))


def ct_truncated_nrrd(tmp: Path) -> None:
    write_volume(small_ct(), tmp / "full.nrrd", compress=False)
    data = (tmp / "full.nrrd").read_bytes()
    (tmp / "cut.nrrd").write_bytes(data[: len(data) - 200])
    expect(VolumeError, "cut.nrrd")(lambda: read_volume(tmp / "cut.nrrd"))


def ct_wrong_extension(tmp: Path) -> None:
    write_volume(small_ct(), tmp / "ct.nrrd")
    os.replace(tmp / "ct.nrrd", tmp / "ct.png")
    expect(VolumeError, "unsupported file type", ".png")(lambda: read_volume(tmp / "ct.png"))


def ct_nrrd_named_dcm(tmp: Path) -> None:
    write_volume(small_ct(), tmp / "ct.nrrd")
    os.replace(tmp / "ct.nrrd", tmp / "ct.dcm")
    expect(VolumeError, "not a dicom file")(lambda: read_volume(tmp / "ct.dcm"))


def ct_two_series(tmp: Path) -> None:
    folder = tmp / "mixed"
    a = write_ct_series(folder / "a")
    b = write_ct_series(folder / "b")
    for sub in ("a", "b"):
        for f in (folder / sub).iterdir():
            os.replace(f, folder / f"{sub}{f.name}")
    err = expect(VolumeError, "series_uid", a, b)(lambda: read_volume(folder))
    assert "2 image series" in str(err)
    assert read_volume(folder, series_uid=b).meta["series_uid"] == b


def ct_subfolders_only(tmp: Path) -> None:
    write_ct_series(tmp / "patient" / "study" / "series")
    expect(VolumeError, "sub-folder")(lambda: read_volume(tmp / "patient"))


# ---------------------------------------------------------------------------------------------
# clinical records

SCHEMA = default_schema()


def clinical(record: dict[str, Any], *fragments: str) -> Callable[[Path], None]:
    def check(tmp: Path) -> None:
        expect(ClinicalValueError, *fragments)(lambda: SCHEMA.validate_record(record))

    return check


def clinical_unicode_accepted(tmp: Path) -> None:
    # full-width letters and digits (as in the real sheet's header) are read as their ASCII forms
    out = SCHEMA.validate_record({"sex": "Ｍ", "age": "６３", "t_stage": " T1a "})
    assert out["sex"] == "M" and out["age"] == 63.0 and out["t_stage"] == "1a"


def clinical_not_a_dict(tmp: Path) -> None:
    for record in (["M", 63], "M", 63, None, 1.5, [[{"age": 1}]]):
        expect(ClinicalValueError, "JSON object")(lambda record=record: SCHEMA.validate_record(record))


def clinical_misspelt_key(tmp: Path) -> None:
    # a misspelt key must not be dropped silently (a DICOM header age would take its place)
    expect(ClinicalValueError, "agee", "did you mean 'age'")(lambda: SCHEMA.validate_record({"agee": 63}))
    expect(ClinicalValueError, "smokng", "'smoking'")(lambda: SCHEMA.validate_record({"smokng": "1"}))


def clinical_other_keys_noted(tmp: Path) -> None:
    notes: list[str] = []
    out = SCHEMA.validate_record({"Age": 63, "PatientSex": "F", "favourite_colour": "blue", "case_id": "x"}, notes)
    assert out["age"] == 63.0 and out["sex"] == "F"  # aliases of the fields are read as the fields
    assert any("favourite_colour" in n for n in notes) and not any("case_id" in n for n in notes), notes
    expect(ClinicalValueError, "twice")(lambda: SCHEMA.validate_record({"age": 63, "Age": 70}))


def clinical_sex_other_than_m_or_f_is_unknown(tmp: Path) -> None:
    for value in ("X", "O", "U", "other", "\u202eM\x00\ufffd", 7, ["M"]):
        notes: list[str] = []
        assert SCHEMA.validate_record({"sex": value}, notes)["sex"] is None, value
        assert any("Sex" in n and "unknown" in n for n in notes), (value, notes)


# ---------------------------------------------------------------------------------------------
# lesion inputs (Predictor geometry helpers)


def _lesion_box():
    return import_or_skip("MMCAFNetLib.inference", "the Predictor").lesion_box_ras


def lesion_point_outside(tmp: Path) -> None:
    box = _lesion_box()
    expect(ValueError, "outside the CT", "RAS or LPS")(lambda: box(small_ct(), np.array([500.0, 0.0, 10.0])))


def lesion_point_nan(tmp: Path) -> None:
    expect(ValueError, "not finite")(lambda: _lesion_box()(small_ct(), np.array([np.nan, 0.0, 0.0])))


def lesion_inverted_box(tmp: Path) -> None:
    box = _lesion_box()
    ct = small_ct()
    ordered = np.array([[-6.0, -6.0, 2.0], [-2.0, -2.0, 8.0]])
    lo, hi = box(ct, ordered[::-1].copy())
    np.testing.assert_allclose(lo, ordered[0])
    np.testing.assert_allclose(hi, ordered[1])


def lesion_box_outside(tmp: Path) -> None:
    box = _lesion_box()
    expect(ValueError, "outside the CT")(lambda: box(small_ct(), np.array([[100.0, 100, 100], [120.0, 120, 120]])))


def lesion_wrong_shape(tmp: Path) -> None:
    expect(ValueError, "RAS point")(lambda: _lesion_box()(small_ct(), np.zeros(4)))


def lesion_empty_mask(tmp: Path) -> None:
    ct = small_ct()
    mask = ct.with_array(np.zeros(ct.shape, np.uint8))
    expect(ValueError, "mask is empty")(lambda: _lesion_box()(ct, mask))


# ---------------------------------------------------------------------------------------------
# checkpoints


def ckpt_pickled_callable(tmp: Path) -> None:
    marker = tmp / "payload-ran.txt"
    write_pickled_callable(tmp / "evil.pt", marker)
    expect(CheckpointError, "cannot be loaded safely", "could run code")(lambda: load_checkpoint(tmp / "evil.pt"))
    assert not marker.exists(), "loading the checkpoint ran the pickled callable"
    inference = import_or_skip("MMCAFNetLib.inference", "the Predictor")
    expect(CheckpointError, "cannot be loaded safely")(lambda: inference.Predictor.load(tmp / "evil.pt", device="cpu"))
    assert not marker.exists()


def ckpt_newer_format(tmp: Path) -> None:
    import torch

    torch.save({"format_version": FORMAT_VERSION + 1, "state_dict": {}}, tmp / "new.pt")
    expect(CheckpointError, f"version {FORMAT_VERSION + 1}", f"up to {FORMAT_VERSION}", "update")(
        lambda: load_checkpoint(tmp / "new.pt")
    )


def ckpt_truncated(tmp: Path) -> None:
    save_checkpoint(checkpoint_payload(), tmp / "full.pt")
    data = (tmp / "full.pt").read_bytes()
    (tmp / "cut.pt").write_bytes(data[: len(data) // 2])
    expect(CheckpointError, "cut.pt", "cannot be loaded")(lambda: load_checkpoint(tmp / "cut.pt"))


def ckpt_text_file(tmp: Path) -> None:
    (tmp / "model.pt").write_text("this is a README, not a checkpoint\n")
    expect(CheckpointError, "model.pt", "cannot be loaded")(lambda: load_checkpoint(tmp / "model.pt"))


def ckpt_missing_or_folder(tmp: Path) -> None:
    expect(CheckpointError, "not found")(lambda: load_checkpoint(tmp / "none.pt"))
    (tmp / "dir.pt").mkdir()
    expect(CheckpointError, "not found")(lambda: load_checkpoint(tmp / "dir.pt"))


def ckpt_raw_state_dict(tmp: Path) -> None:
    import torch

    torch.save({"conv.weight": torch.zeros(2, 2)}, tmp / "raw.pt")
    expect(CheckpointError, "not an MMCAF-Net checkpoint", "from_reference_state_dict")(
        lambda: load_checkpoint(tmp / "raw.pt")
    )


def ckpt_wrong_weights(tmp: Path) -> None:
    import torch

    payload = checkpoint_payload()
    payload["state_dict"] = {k: torch.zeros(1) for k in list(payload["state_dict"])[:3]}
    save_checkpoint(payload, tmp / "wrong.pt")
    inference = import_or_skip("MMCAFNetLib.inference", "the Predictor")
    expect(CheckpointError, "weights do not fit")(lambda: inference.Predictor.load(tmp / "wrong.pt", device="cpu"))


def ckpt_classes_do_not_fit_head(tmp: Path) -> None:
    inference = import_or_skip("MMCAFNetLib.inference", "the Predictor")
    save_checkpoint(checkpoint_payload(class_names=["A", "B", "G"]), tmp / "three.pt")
    expect(CheckpointError, "head", "1 output", "3 classes")(
        lambda: inference.Predictor.load(tmp / "three.pt", device="cpu")
    )
    save_checkpoint(checkpoint_payload(class_names=["A", "A"]), tmp / "twice.pt")
    expect(CheckpointError, "repeat")(lambda: inference.Predictor.load(tmp / "twice.pt", device="cpu"))


ABSURD_CONFIGS = (
    {"num_classes": 1, "num_clinical": 7, "stem_channels": 10**9},
    {"num_classes": 1, "num_clinical": 7, "stem_channels": -4},
    {"num_classes": 1, "num_clinical": 7, "stage_channels": "wide"},
    {"num_classes": 1, "num_clinical": 7, "warp_factor": 9},
    {"num_classes": "one", "num_clinical": 7},
    {"num_classes": 1, "num_clinical": 10**12},
    ["not", "a", "dict"],
)


def ckpt_absurd_model_config(tmp: Path) -> None:
    inference = import_or_skip("MMCAFNetLib.inference", "the Predictor")
    for n, config in enumerate(ABSURD_CONFIGS):
        save_checkpoint(checkpoint_payload(model_config=config), tmp / f"absurd{n}.pt")
        expect(CheckpointError, f"absurd{n}.pt")(
            lambda n=n: inference.Predictor.load(tmp / f"absurd{n}.pt", device="cpu")
        )


# ---------------------------------------------------------------------------------------------
# command line
#
# Interpreter start-up with torch dominates (several seconds per process on a busy 2-core machine), so
# a few cases run as ``python -m MMCAFNetLib.cli ...`` each (``own_process``) and the rest run in one
# driver subprocess that calls ``MMCAFNetLib.cli.main(argv)`` once per case, capturing stderr and
# turning an uncaught exception into exit status 1 with its traceback, as the interpreter would.


@dataclass
class CliCase:
    """``args`` may hold {tmp}, {ckpt} (a valid checkpoint), {evil}, {text}; ``out`` must not appear."""

    args: list[str]
    names: tuple[str, ...]
    out: Optional[str] = None
    needs: tuple[str, ...] = ()  # library files (under MMCAFNetLib/) the command needs
    own_process: bool = False


def _missing_parts(case: CliCase) -> list[str]:
    return [n for n in case.needs if not (REPO / "MMCAFNetLib" / n).exists()]


PREDICT = ("commands/predict.py", "inference")
CLI_CASES: dict[str, CliCase] = {
    "predict-missing-checkpoint": CliCase(
        ["predict", "--checkpoint", "{tmp}/none.pt", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p1"],
        ("none.pt",), "p1", PREDICT, own_process=True,
    ),
    "predict-missing-input": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/no-ct.nrrd", "--out", "{tmp}/p2"],
        ("no-ct.nrrd",), "p2", PREDICT,
    ),
    "predict-age-out-of-range": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p3", "--age", "420"],
        ("age", "420"), "p3", PREDICT,
    ),
    "predict-point-outside": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p4",
         "--point", "900", "0", "3"],
        ("outside",), "p4", PREDICT,
    ),
    "predict-point-not-a-number": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p5", "--point", "1", "x", "3"],
        ("--point",), "p5", PREDICT,
    ),
    "predict-pickled-checkpoint": CliCase(
        ["predict", "--checkpoint", "{evil}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p6"],
        ("evil.pt",), "p6", PREDICT,
    ),
    "predict-clinical-misspelt-key": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p7", "--clinical",
         "{tmp}/agee.json"], ("agee", "did you mean 'age'"), "p7", PREDICT,
    ),
    "predict-clinical-json-list-of-numbers": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p8", "--clinical",
         "{tmp}/numbers.json"], ("numbers.json", "JSON objects"), "p8", PREDICT,
    ),
    "predict-clinical-json-string": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p9", "--clinical",
         "{tmp}/string.json"], ("string.json", "JSON object"), "p9", PREDICT,
    ),
    "predict-clinical-json-nested-deeply": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p10", "--clinical",
         "{tmp}/deep.json"], ("deep.json",), "p10", PREDICT,
    ),
    "predict-tiny-image": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/tiny.nrrd", "--out", "{tmp}/p11", "--point", "1", "1",
         "1"], ("too small", "4 x 4 x 4"), "p11", PREDICT,
    ),
    "predict-header-bomb": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/huge.nrrd", "--out", "{tmp}/p12"],
        ("huge.nrrd", "declares", "memory"), "p12", PREDICT,
    ),
    "predict-nan-nifti": CliCase(
        ["predict", "--checkpoint", "{ckpt}", "--input", "{tmp}/nan.nii.gz", "--out", "{tmp}/p13"],
        ("nan.nii.gz", "not numbers"), "p13", PREDICT,
    ),
    "predict-classes-do-not-fit-head": CliCase(
        ["predict", "--checkpoint", "{tmp}/three.pt", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p14"],
        ("three.pt", "head"), "p14", PREDICT,
    ),
    "predict-absurd-model-config": CliCase(
        ["predict", "--checkpoint", "{tmp}/absurd.pt", "--input", "{tmp}/ct.nrrd", "--out", "{tmp}/p15"],
        ("absurd.pt", "model_config"), "p15", PREDICT,
    ),
    "info-missing": CliCase(["info", "{tmp}/none.pt"], ("none.pt",), None, ("commands/info.py",)),
    "info-text-file": CliCase(["info", "{text}"], ("readme.pt",), None, ("commands/info.py",)),
    "info-pickled-callable": CliCase(["info", "{evil}"], ("evil.pt", "code"), None, ("commands/info.py",)),
    "index-missing-root": CliCase(
        ["index", "{tmp}/no-root", "--out", "{tmp}/i1/cohort.csv"], ("no-root",), "i1", own_process=True
    ),
    "index-bad-fraction": CliCase(
        ["index", "{tmp}/root", "--out", "{tmp}/i2/cohort.csv", "--test-fraction", "1.5"], ("test-fraction", "1.5"), "i2"
    ),
    "index-bad-folds": CliCase(["index", "{tmp}/root", "--out", "{tmp}/i3/cohort.csv", "--folds", "0"], ("folds",), "i3"),
    "train-missing-cohort": CliCase(
        ["train", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/t1"], ("none.csv",), "t1", ("commands/train.py",)
    ),
    "train-negative-epochs": CliCase(
        ["train", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/t2", "--epochs", "-3"], ("epochs",), "t2",
        ("commands/train.py",),
    ),
    "train-epochs-not-a-number": CliCase(
        ["train", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/t3", "--epochs", "many"], ("--epochs", "many"), "t3",
        ("commands/train.py",),
    ),
    "train-resume-without-run": CliCase(
        ["train", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/t4", "--resume"], ("--resume", "config.json"), "t4",
        ("commands/train.py",),
    ),
    "evaluate-missing-checkpoint": CliCase(
        ["evaluate", "--checkpoint", "{tmp}/none.pt", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/e1"],
        ("none.pt",), "e1", ("commands/evaluate.py",),
    ),
    "evaluate-pickled-checkpoint": CliCase(
        ["evaluate", "--checkpoint", "{evil}", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/e2"],
        ("evil.pt",), "e2", ("commands/evaluate.py",),
    ),
    "evaluate-missing-cohort": CliCase(
        ["evaluate", "--checkpoint", "{ckpt}", "--cohort", "{tmp}/none.csv", "--out", "{tmp}/e3"],
        ("none.csv",), "e3", ("commands/evaluate.py",),
    ),
    "unknown-command": CliCase(["classify", "x"], ("invalid choice",), None),
}

_DRIVER = r"""
import contextlib, io, json, sys, traceback
from MMCAFNetLib import cli
results = {}
for name, argv in json.loads(sys.stdin.read()).items():
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    results[name] = {"returncode": rc, "stderr": err.getvalue(), "stdout": out.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory) -> dict[str, Any]:
    """Run every CLI case whose parts exist; results by case name."""
    tmp = tmp_path_factory.mktemp("cli")
    write_volume(small_ct(), tmp / "ct.nrrd")
    (tmp / "root").mkdir()
    (tmp / "root" / "metadata.csv").write_text("Series UID,Subject ID\n")
    marker = tmp / "payload-ran.txt"
    write_pickled_callable(tmp / "evil.pt", marker)
    (tmp / "readme.pt").write_text("plain text\n")
    (tmp / "agee.json").write_text(json.dumps({"sex": "M", "agee": 63}))
    (tmp / "numbers.json").write_text("[1, 2, 3]")
    (tmp / "string.json").write_text('"M, 63"')
    (tmp / "deep.json").write_text("[" * 100000 + "]" * 100000)
    write_volume(tiny_ct(), tmp / "tiny.nrrd")
    write_header_bomb(tmp / "huge.nrrd")
    nan_ct = small_ct()
    nan_ct.array[0, 0, 0] = np.nan
    write_volume(nan_ct, tmp / "nan.nii.gz")
    subs = {"tmp": str(tmp), "evil": str(tmp / "evil.pt"), "text": str(tmp / "readme.pt"), "ckpt": ""}
    runnable = {n: c for n, c in CLI_CASES.items() if not _missing_parts(c)}
    if any("{ckpt}" in a for c in runnable.values() for a in c.args):
        try:
            save_checkpoint(checkpoint_payload(), tmp / "ok.pt")
            save_checkpoint(checkpoint_payload(class_names=["A", "B", "G"]), tmp / "three.pt")
            save_checkpoint(checkpoint_payload(model_config={"num_classes": 1, "num_clinical": 7,
                                                             "stem_channels": 10**9}), tmp / "absurd.pt")
            subs["ckpt"] = str(tmp / "ok.pt")
        except pytest.skip.Exception:
            runnable = {n: c for n, c in runnable.items() if not any("{ckpt}" in a for a in c.args)}
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MMCAFNET_MODELS_DIR": str(tmp / "models")}
    argvs = {n: [a.format(**subs) for a in c.args] for n, c in runnable.items()}

    def own(name: str) -> dict[str, Any]:
        proc = subprocess.run([sys.executable, "-m", "MMCAFNetLib.cli", *argvs[name]], capture_output=True,
                              text=True, cwd=tmp, env=env, timeout=300)
        return {"returncode": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout}

    def batch() -> dict[str, Any]:
        names = {n: argvs[n] for n, c in runnable.items() if not c.own_process}
        proc = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(names), capture_output=True,
                              text=True, cwd=tmp, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    solo = [n for n, c in runnable.items() if c.own_process]
    with ThreadPoolExecutor(max_workers=1 + len(solo)) as pool:
        batched = pool.submit(batch)
        singles = dict(zip(solo, pool.map(own, solo)))
        results = {**batched.result(), **singles}
    return {"tmp": tmp, "results": results, "marker": marker}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input(name: str, cli_results: dict[str, Any]) -> None:
    case = CLI_CASES[name]
    missing = _missing_parts(case)
    if missing:
        pytest.skip(f"mmcafnet {case.args[0]} needs MMCAFNetLib/{', MMCAFNetLib/'.join(missing)}, not landed yet")
    if name not in cli_results["results"]:
        pytest.skip("needs a valid checkpoint, and the model registry is not available")
    proc = cli_results["results"][name]
    stderr = proc["stderr"]
    assert proc["returncode"] == 2, f"exit status {proc['returncode']}; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    for fragment in case.names:
        assert fragment.lower() in stderr.lower(), f"stderr does not name {fragment!r}: {stderr[-1000:]}"
    if case.out:
        assert not (cli_results["tmp"] / case.out).exists(), f"{case.out} was created by a refused command"
    assert not cli_results["marker"].exists(), "a pickled payload ran"


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class Case:
    area: str
    case: str
    expected: str
    check: Callable[[Path], None]


CASES: list[Case] = [
    Case("ct", "missing path", "FileNotFoundError naming the path", ct_missing_path),
    Case("ct", "empty folder", "VolumeError: folder is empty", ct_empty_folder),
    Case("ct", "folder of non-DICOM files", "VolumeError: none is a DICOM image, names a file", ct_non_dicom_files),
    Case("ct", "2D image", "VolumeError: 2D, pass the whole series", ct_2d_image),
    Case("ct", "4D image", "VolumeError: 4D, save one time point", ct_4d_image),
    Case("ct", "NaN voxels", "VolumeError from the reader naming the file and the count; the Predictor refuses "
         "a volume from memory", ct_nan_voxels),
    Case("ct", "NaN voxels in NIfTI (ITK reads them as 0)", "VolumeError naming the file and the count",
         ct_nan_voxels_nifti),
    Case("ct", "compressed file declaring 60000^3 voxels", "refused against the memory guard before reading",
         ct_declared_size_beyond_memory),
    Case("ct", "4 x 4 x 4 voxels, with and without a lesion", "ValueError: too small, names both sizes",
         ct_too_small_for_a_window),
    Case("ct", "all voxels NaN", "VolumeError: holds no data", ct_all_nan),
    Case("ct", "truncated NRRD", "VolumeError naming the file", ct_truncated_nrrd),
    Case("ct", "wrong extension (.png)", "VolumeError: unsupported type, lists the supported ones", ct_wrong_extension),
    Case("ct", "NRRD renamed .dcm", "VolumeError: not a DICOM file", ct_nrrd_named_dcm),
    Case("ct", "folder of two series", "VolumeError listing both UIDs and series_uid=; series_uid picks one", ct_two_series),
    Case("ct", "patient folder (series in sub-folders)", "VolumeError: point to the series folder", ct_subfolders_only),
    Case("clinical", "age 150", "ClinicalValueError naming age and 0..120", clinical({"age": 150}, "age", "120")),
    Case("clinical", "age -1", "ClinicalValueError naming age", clinical({"age": -1}, "age", "plausible range")),
    Case("clinical", "age infinite", "ClinicalValueError naming age", clinical({"age": float("inf")}, "age")),
    Case("clinical", "age 10**400 (int too large for float)", "ClinicalValueError naming age", clinical({"age": 10**400}, "age")),
    Case("clinical", "weight 5 kg", "ClinicalValueError naming weight and 20..300", clinical({"weight": 5}, "weight", "300")),
    Case("clinical", "sex 'X', 'O', 'other', garbage (not M or F)", "read as unknown with a note, not an error",
         clinical_sex_other_than_m_or_f_is_unknown),
    Case("clinical", "T stage '5'", "ClinicalValueError listing the T stages", clinical({"t_stage": "5"}, "t stage", "'1a'")),
    Case("clinical", "age 'sixty' (wrong type)", "ClinicalValueError: not a number", clinical({"age": "sixty"}, "age", "not a number")),
    Case("clinical", "age [63] (list)", "ClinicalValueError: not a number", clinical({"age": [63]}, "age", "not a number")),
    Case("clinical", "smoking 0.5", "ClinicalValueError naming smoking", clinical({"smoking": 0.5}, "smoking")),
    Case("clinical", "emoji in N stage", "ClinicalValueError naming N stage", clinical({"n_stage": "N\U0001f600"}, "n stage")),
    Case("clinical", "full-width 'Ｍ', '６３', ' T1a '", "accepted as M, 63, 1a (NFKC)", clinical_unicode_accepted),
    Case("clinical", "record is a list, a string, a number, null", "ClinicalValueError: a JSON object of field values",
         clinical_not_a_dict),
    Case("clinical", "misspelt key 'agee', 'smokng'", "ClinicalValueError: did you mean 'age'", clinical_misspelt_key),
    Case("clinical", "aliases ('Age', 'PatientSex') and other keys", "aliases read; other keys noted; a field given "
         "twice differently refused", clinical_other_keys_noted),
    Case("lesion", "point outside the volume", "ValueError naming the CT's RAS extent, RAS vs LPS hint", lesion_point_outside),
    Case("lesion", "point with NaN", "ValueError: not finite", lesion_point_nan),
    Case("lesion", "inverted box (max, min)", "accepted: corners sorted into the same box", lesion_inverted_box),
    Case("lesion", "box outside the volume", "ValueError: outside the CT", lesion_box_outside),
    Case("lesion", "4 numbers", "ValueError: a point, a box or a mask", lesion_wrong_shape),
    Case("lesion", "empty mask", "ValueError: the mask is empty", lesion_empty_mask),
    Case("checkpoint", "pickled callable (would create a file)", "CheckpointError; the file is not created", ckpt_pickled_callable),
    Case("checkpoint", "newer format version", "CheckpointError naming both versions and 'update'", ckpt_newer_format),
    Case("checkpoint", "truncated file", "CheckpointError naming the file", ckpt_truncated),
    Case("checkpoint", "text file", "CheckpointError naming the file", ckpt_text_file),
    Case("checkpoint", "missing file / a folder", "CheckpointError: not found", ckpt_missing_or_folder),
    Case("checkpoint", "raw state dict", "CheckpointError pointing to from_reference_state_dict", ckpt_raw_state_dict),
    Case("checkpoint", "weights of another model", "CheckpointError: weights do not fit", ckpt_wrong_weights),
    Case("checkpoint", "three class names on a one-logit head", "CheckpointError naming the head and the classes",
         ckpt_classes_do_not_fit_head),
    Case("checkpoint", "absurd model_config (huge, negative, wrong types)", "CheckpointError, nothing allocated",
         ckpt_absurd_model_config),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}/{c.case}" for c in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    case.check(tmp_path)


def markdown_table() -> str:
    lines = ["| area | case | expected outcome |", "|---|---|---|"]
    lines += [f"| {c.area} | {c.case} | {c.expected} |" for c in CASES]
    lines += [f"| cli | {n}: `mmcafnet {' '.join(c.args)}` | exit 2, stderr names {', '.join(c.names)}; no traceback"
              + (f"; no {c.out}/" if c.out else "") + " |" for n, c in CLI_CASES.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
