"""DICOM reading: pydicom's own real CT files and small synthetic series written here with pydicom."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from MMCAFNetLib.dicom_series import MAX_GAP_FACTOR, list_dicom_series, parse_age
from MMCAFNetLib.volume import Volume, VolumeError, check_ct, read_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def real_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not installed")
    return str(path)


# ---------------------------------------------------------------------------------------------
# a tiny writer of synthetic CT series


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    positions: np.ndarray | None = None,
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: tuple[float, float] = (0.7, 0.8),
    slice_spacing: float = 2.0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_uid: str | None = None,
    sop_class: str = CTImageStorage,
    description: str = "synthetic chest",
    names: list[str] | None = None,
    compress: bool = False,
    age: str = "063Y",
) -> tuple[str, list[str]]:
    """Write ``stored`` (K, rows, cols; uint16/int16 stored values) as one DICOM series; return (uid, paths).

    Default positions step along the normal of ``orientation`` by ``slice_spacing`` from (-50, -60, 70).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid, frame_uid = generate_uid(), generate_uid()
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = np.cross(row, col)
    if positions is None:
        positions = np.array([-50.0, -60.0, 70.0]) + np.arange(len(stored))[:, None] * slice_spacing * normal
    names = names or [f"{k + 1:04d}.dcm" for k in range(len(stored))]
    paths = []
    for k, plane in enumerate(stored):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.PatientID, ds.PatientName, ds.PatientSex, ds.PatientAge, ds.PatientWeight = "P1", "Test^P", "F", age, 71.5
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in positions[k]]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{slice_spacing:g}"
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1 if plane.dtype == np.int16 else 0
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        if compress:
            ds.compress(RLELossless)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return series_uid, paths


def stored_ramp(k: int = 6, rows: int = 12, cols: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2500, size=(k, rows, cols)).astype(np.uint16)


def expected_ijk_to_ras(orientation, pixel_spacing, first_position, k_step) -> np.ndarray:
    """IJK->RAS assembled from header facts, independently of the library."""
    row, col = np.array(orientation[:3], float), np.array(orientation[3:], float)
    m = np.eye(4)
    m[:3, 0] = LPS_TO_RAS @ (row * pixel_spacing[1])
    m[:3, 1] = LPS_TO_RAS @ (col * pixel_spacing[0])
    m[:3, 2] = LPS_TO_RAS @ np.asarray(k_step, float)
    m[:3, 3] = LPS_TO_RAS @ np.asarray(first_position, float)
    return m


# ---------------------------------------------------------------------------------------------
# pydicom's real files


def test_real_ct5n_series_geometry_and_hu_match_the_headers():
    folder = real_file("dicomdirtests/98892001/CT5N")
    headers = [pydicom.dcmread(os.path.join(folder, n)) for n in sorted(os.listdir(folder))]
    orientation = [float(v) for v in headers[0].ImageOrientationPatient]
    normal = np.cross(orientation[:3], orientation[3:])
    headers.sort(key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers])
    pixel_spacing = [float(v) for v in headers[0].PixelSpacing]
    k_step = (positions[-1] - positions[0]) / (len(positions) - 1)

    volume = read_volume(folder)

    assert volume.shape == (len(headers), int(headers[0].Rows), int(headers[0].Columns))
    expected = expected_ijk_to_ras(orientation, pixel_spacing, positions[0], k_step)
    np.testing.assert_allclose(volume.ijk_to_ras, expected, atol=1e-5)
    np.testing.assert_allclose(volume.spacing, [pixel_spacing[1], pixel_spacing[0], np.linalg.norm(k_step)], atol=1e-5)
    np.testing.assert_allclose(volume.origin, LPS_TO_RAS @ positions[0], atol=1e-5)
    for k, ds in enumerate(headers):
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(volume.array[k], hu)
    assert volume.meta["modality"] == "CT"
    assert volume.meta["series_uid"] == headers[0].SeriesInstanceUID
    assert volume.meta["sop_instance_uids"] == [ds.SOPInstanceUID for ds in headers]
    assert volume.meta["warnings"] == []
    assert volume.meta["patient_sex"] == headers[0].PatientSex
    assert volume.meta["patient_age"] == pytest.approx(float(str(headers[0].PatientAge)[:-1]))


def test_real_ct2_series_with_a_gap_is_refused_naming_the_gap():
    folder = real_file("dicomdirtests/77654033/CT2")
    z = sorted(float(pydicom.dcmread(os.path.join(folder, n)).ImagePositionPatient[2]) for n in os.listdir(folder))
    intervals = np.diff(z)
    assert intervals.max() > MAX_GAP_FACTOR * np.median(intervals)  # the premise: a real gap

    with pytest.raises(VolumeError) as info:
        read_volume(folder)
    message = str(info.value)
    assert "gap" in message
    assert f"{intervals.max():.2f} mm" in message
    assert folder in message  # the files around the gap are named by path


def test_real_single_ct_file_reads_as_one_slice_in_hu():
    path = real_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (1, ds.Rows, ds.Columns)
    np.testing.assert_array_equal(volume.array[0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    np.testing.assert_allclose(volume.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    np.testing.assert_allclose(volume.origin, LPS_TO_RAS @ np.array(ds.ImagePositionPatient, float), atol=1e-5)
    assert any("single" in w for w in volume.meta["warnings"])
    assert any("single slice" in w for w in check_ct(volume))


def test_rle_compressed_real_file_is_decoded():
    path = real_file("MR_small_RLE.dcm")
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array[0], pydicom.dcmread(path).pixel_array)


#: pydicom's real compressed files, by transfer syntax; which of them lack a decoder depends on the
#: plugins installed (highdicom brings pyjpegls, so JPEG-LS decodes where it is installed).
COMPRESSED_FILES = ("MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jp2klossless.dcm")


def test_undecodable_transfer_syntax_is_refused_naming_it_and_the_fix():
    try:
        from pydicom.pixels import get_decoder
    except ImportError:
        pytest.skip("pydicom < 3 has no decoder registry to tell whether a file can be decoded")
    for name in COMPRESSED_FILES:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if not get_decoder(ts).is_available:
            break
    else:
        pytest.skip(f"every one of pydicom's files {COMPRESSED_FILES} can be decoded here; no refusal to exercise")
    with pytest.raises(VolumeError, match="cannot decode") as info:
        read_volume(str(path))
    message = str(info.value)
    assert ts.name in message and "pip install" in message


# ---------------------------------------------------------------------------------------------
# synthetic series


def test_synthetic_oblique_series_geometry_and_hu(tmp_path):
    row = np.array([np.cos(0.3), np.sin(0.3), 0.0])
    col = np.array([0.0, np.cos(0.2), np.sin(0.2)])
    col -= np.dot(col, row) * row  # Gram-Schmidt: an orthonormal oblique plane
    col /= np.linalg.norm(col)
    orientation = (*row, *col)
    stored = stored_ramp()
    write_series(tmp_path, stored, orientation=orientation, slope=2.0, intercept=-1000.0)
    volume = read_volume(tmp_path)
    normal = np.cross(row, col)
    positions = np.array([-50.0, -60.0, 70.0]) + np.arange(len(stored))[:, None] * 2.0 * normal
    expected = expected_ijk_to_ras(orientation, (0.7, 0.8), positions[0], 2.0 * normal)
    np.testing.assert_allclose(volume.ijk_to_ras, expected, atol=1e-3)
    np.testing.assert_allclose(volume.array, stored * 2.0 - 1000.0)
    assert volume.array.dtype == np.float32  # slope 2 keeps HU exact in float32
    assert volume.meta["patient_age"] == 63.0
    assert volume.meta["patient_weight"] == pytest.approx(71.5)
    assert volume.meta["series_description"] == "synthetic chest"


def test_hu_stored_as_int16_when_exact(tmp_path):
    stored = stored_ramp()
    write_series(tmp_path, stored)
    volume = read_volume(tmp_path)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, stored.astype(np.int32) - 1024)


def test_slices_are_ordered_by_position_not_by_file_name(tmp_path):
    stored = stored_ramp(k=7)
    reverse_names = [f"{7 - k:04d}.dcm" for k in range(7)]  # first slice in space is the last file name
    write_series(tmp_path, stored, names=reverse_names)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, stored.astype(np.int32) - 1024)
    np.testing.assert_allclose(volume.origin, LPS_TO_RAS @ np.array([-50.0, -60.0, 70.0]), atol=1e-4)
    assert volume.ijk_to_ras[2, 2] > 0  # k runs along +S, as the positions do


def test_descending_positions_still_give_a_right_handed_k_axis(tmp_path):
    stored = stored_ramp(k=5)
    positions = np.array([[0.0, 0.0, 40.0 - 3.0 * k] for k in range(5)])
    write_series(tmp_path, stored, positions=positions)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, stored[::-1].astype(np.int32) - 1024)
    assert volume.origin[2] == pytest.approx(28.0)
    assert np.linalg.det(volume.ijk_to_ras[:3, :3]) > 0  # RAS flip of L and P, then +S: positive


def test_two_series_need_a_choice_then_series_uid_selects(tmp_path):
    uid_a, _ = write_series(tmp_path, stored_ramp(k=4, seed=1), description="lung", names=[f"a{k}.dcm" for k in range(4)])
    uid_b, _ = write_series(tmp_path, stored_ramp(k=5, seed=2), description="mediastinum", names=[f"b{k}.dcm" for k in range(5)])
    with pytest.raises(VolumeError) as info:
        read_volume(tmp_path)
    message = str(info.value)
    assert uid_a in message and uid_b in message
    assert "lung" in message and "mediastinum" in message and "series_uid" in message

    volume = read_volume(tmp_path, series_uid=uid_b)
    assert volume.meta["series_uid"] == uid_b
    np.testing.assert_array_equal(volume.array, stored_ramp(k=5, seed=2).astype(np.int32) - 1024)
    infos = list_dicom_series(tmp_path)
    assert {i.series_uid for i in infos} == {uid_a, uid_b}
    with pytest.raises(VolumeError, match="not in"):
        read_volume(tmp_path, series_uid="1.2.3.4")


def test_the_only_ct_volume_is_chosen_among_other_series(tmp_path):
    ct_uid, _ = write_series(tmp_path, stored_ramp(k=4), names=[f"ct{k}.dcm" for k in range(4)])
    write_series(tmp_path, stored_ramp(k=3, seed=5), sop_class=SECONDARY_CAPTURE, names=[f"sc{k}.dcm" for k in range(3)])
    volume = read_volume(tmp_path)
    assert volume.meta["series_uid"] == ct_uid
    assert any("chose" in w for w in volume.meta["warnings"])


def test_corrupt_file_inside_a_series_is_reported_by_path_and_the_series_loads(tmp_path):
    stored = stored_ramp(k=6)
    _, paths = write_series(tmp_path, stored)
    broken = paths[2]
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: len(data) - stored[0].nbytes // 2])  # pixel data cut in half

    volume = read_volume(tmp_path)
    assert any(broken in w for w in volume.meta["warnings"])
    assert volume.shape == stored.shape  # the missing slice is interpolated back onto the regular grid
    hu = stored.astype(np.float32) - 1024
    np.testing.assert_allclose(volume.array[[0, 1, 3, 4, 5]], hu[[0, 1, 3, 4, 5]])
    np.testing.assert_allclose(volume.array[2], (hu[1] + hu[3]) / 2, atol=1e-3)


def test_garbage_after_the_dicom_magic_is_reported_by_path(tmp_path):
    stored = stored_ramp(k=5)
    write_series(tmp_path, stored)
    garbage = tmp_path / "0009.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff\xfe\x00\x01" * 20)
    volume = read_volume(tmp_path)
    assert volume.shape == stored.shape
    assert any(str(garbage) in w for w in volume.meta["warnings"])


def test_one_missing_slice_is_interpolated_with_a_warning(tmp_path):
    stored = stored_ramp(k=6)
    keep = [0, 1, 2, 4, 5]
    positions = np.array([[0.0, 0.0, 2.5 * k] for k in keep])
    write_series(tmp_path, stored[keep], positions=positions)
    volume = read_volume(tmp_path)
    assert volume.shape[0] == 6
    assert volume.spacing[2] == pytest.approx(2.5)
    assert any("uneven slice spacing" in w and "missing" in w for w in volume.meta["warnings"])
    hu = stored.astype(np.float32) - 1024
    np.testing.assert_allclose(volume.array[3], (hu[2] + hu[4]) / 2, atol=1e-3)
    assert list(volume.meta["slice_k"].values()) == [0.0, 1.0, 2.0, 4.0, 5.0]  # source slices on the new grid


def test_a_gap_too_wide_to_interpolate_is_refused(tmp_path):
    positions = np.array([[0.0, 0.0, z] for z in (0.0, 2.0, 4.0, 20.0, 22.0)])
    write_series(tmp_path, stored_ramp(k=5), positions=positions)
    with pytest.raises(VolumeError, match=r"gap of 16\.00 mm"):
        read_volume(tmp_path)


def test_two_slices_at_one_position_are_refused(tmp_path):
    positions = np.array([[0.0, 0.0, z] for z in (0.0, 2.0, 2.0, 4.0)])
    write_series(tmp_path, stored_ramp(k=4), positions=positions)
    with pytest.raises(VolumeError, match="share one position"):
        read_volume(tmp_path)


def test_rle_compressed_series_reads_like_the_uncompressed_one(tmp_path):
    stored = stored_ramp(k=4)
    write_series(tmp_path / "raw", stored)
    write_series(tmp_path / "rle", stored, compress=True)
    assert pydicom.dcmread(next((tmp_path / "rle").iterdir())).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_volume(tmp_path / "rle").array, read_volume(tmp_path / "raw").array)


def test_missing_path_empty_folder_and_non_dicom_folder_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_volume(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeError, match="empty"):
        read_volume(empty)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("not an image")
    (texts / "scan.dcm").write_bytes(b"definitely not DICOM" * 10)
    with pytest.raises(VolumeError, match="none is a DICOM image"):
        read_volume(texts)
    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(texts / "notes.txt")
    with pytest.raises(VolumeError, match="sub-folder"):
        read_volume(tmp_path)  # a patient folder above the series folders


def test_corrupt_files_leaving_a_wide_gap_are_named_in_the_refusal(tmp_path):
    _, paths = write_series(tmp_path, stored_ramp(k=8))
    for path in paths[2:6]:
        Path(path).write_bytes(Path(path).read_bytes()[:-100])
    with pytest.raises(VolumeError, match="gap") as info:
        read_volume(tmp_path)
    assert all(path in str(info.value) for path in paths[2:6])


@pytest.mark.parametrize(
    ("text", "years"),
    [("063Y", 63.0), ("006M", 0.5), ("052W", 52 * 7 / 365.25), ("010D", 10 / 365.25), ("", None), ("abc", None)],
)
def test_patient_age_strings(text, years):
    result = parse_age(text)
    assert result == (pytest.approx(years) if years is not None else None)


@pytest.mark.slow
def test_a_300_slice_512_series_reads_in_seconds(tmp_path):
    """Speed: a full-size series (300 x 512 x 512) read from disk. Prints the time; bound is loose for CI."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 3000, size=(300, 512, 512)).astype(np.uint16)
    write_series(tmp_path, stored, pixel_spacing=(0.7, 0.7), slice_spacing=1.25)
    start = time.perf_counter()
    volume = read_volume(tmp_path)
    seconds = time.perf_counter() - start
    print(f"read 300x512x512 DICOM series: {seconds:.2f} s")
    assert volume.shape == stored.shape and volume.array.dtype == np.int16
    assert int(volume.array[123, 45, 67]) == int(stored[123, 45, 67]) - 1024
    assert seconds < 20.0
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_volume_rejects_2d_arrays():
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((4, 4)), np.eye(4))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "MR_small_RLE.dcm"])
def test_real_files_in_other_encodings_match_pydicoms_own_decoding(name):
    """Big endian, deflated and RLE files: the fast path agrees with pydicom's pixel_array plus rescale."""
    path = real_file(name)
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(read_volume(path).array[0], expected)


def test_bits_stored_below_bits_allocated_are_masked_and_sign_extended(tmp_path):
    stored = stored_ramp(k=3) | np.uint16(0xF000)  # garbage in the 4 unused high bits
    _, paths = write_series(tmp_path, stored)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 1
        ds.save_as(path)
    expected = [pydicom.dcmread(p).pixel_array.astype(np.int32) - 1024 for p in paths]
    assert any((e < -1024).any() for e in expected)  # some values are negative in 12-bit two's complement
    np.testing.assert_array_equal(read_volume(tmp_path).array, np.stack(expected))


def test_multi_frame_and_colour_files_are_refused_clearly():
    with pytest.raises(VolumeError, match="multi-frame"):
        read_volume(real_file("rtdose_rle.dcm"))
    with pytest.raises(VolumeError, match="colour"):
        read_volume(real_file("SC_rgb_rle.dcm"))
