"""Property-based fuzzing of DICOM series headers: read_volume gives a Volume or a clean error.

A small valid CT series is written with pydicom, then hypothesis damages its headers the way real
exports do (zero, negative or NaN spacing; missing or duplicated ImagePositionPatient; orientation
that differs between slices or is degenerate; wrong BitsAllocated; truncated pixel data; missing or
absurd rescale; odd transfer syntax). Whatever the damage, ``read_volume`` must either return a
usable Volume or raise a ValueError (VolumeError) with a message -- never another exception, and
never hang (each example runs under an alarm).
"""

from __future__ import annotations

import math
import signal
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config as dicom_config
from pydicom.datadict import dictionary_VR, keyword_dict
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from MMCAFNetLib.volume import Volume, check_ct, read_volume

NUM_SLICES, ROWS, COLS = 4, 6, 5
SECONDS_PER_EXAMPLE = 20


def base_series() -> list[Dataset]:
    """Datasets of a valid axial series (uint16 stored values, intercept -1024)."""
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(1)
    out = []
    for z in range(NUM_SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta, ds.preamble = meta, b"\0" * 128
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientSex, ds.PatientAge, ds.PatientWeight = "CT", "F", "055Y", 66
        ds.ImagePositionPatient = ["-10", "-20", str(30 + 2.5 * z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = ["0.7", "0.7"]
        ds.SliceThickness = "2.5"
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLS
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4000, (ROWS, COLS)).astype(np.uint16).tobytes()
        out.append(ds)
    return out


# ---------------------------------------------------------------------------------------------
# mutations: each takes (dataset, drawn value) and damages it in place

DS_NUMBERS = st.sampled_from(["0", "-1", "-0.7", "nan", "NaN", "inf", "-inf", "1e308", "1e-300", "abc", "", "0.7"])
Mutation = Callable[[Dataset, Any], None]


def _set(keyword: str) -> Mutation:
    """Text values are stored as raw bytes, unparsed, exactly as a broken exporter would write them."""

    def apply(ds: Dataset, value: Any) -> None:
        if isinstance(value, (str, list)):
            text = "\\".join(value) if isinstance(value, list) else value
            data = text.encode("latin-1")
            data += b" " * (len(data) % 2)
            tag = Tag(keyword_dict[keyword])
            ds[tag] = RawDataElement(tag, dictionary_VR(tag), len(data), data, 0, False, True)
        else:
            setattr(ds, keyword, value)

    return apply


def _delete(keyword: str) -> Mutation:
    def apply(ds: Dataset, _value: Any) -> None:
        if keyword in ds:
            delattr(ds, keyword)

    return apply


def _truncate_pixels(ds: Dataset, keep: float) -> None:
    data = ds.PixelData
    ds.PixelData = data[: int(len(data) * keep)]


def _transfer_syntax(ds: Dataset, uid: str) -> None:
    ds.file_meta.TransferSyntaxUID = uid


MUTATIONS: dict[str, tuple[Mutation, st.SearchStrategy]] = {
    "PixelSpacing": (_set("PixelSpacing"), st.lists(DS_NUMBERS, min_size=1, max_size=3)),
    "PixelSpacing-missing": (_delete("PixelSpacing"), st.none()),
    "ImagePositionPatient": (_set("ImagePositionPatient"), st.lists(DS_NUMBERS, min_size=2, max_size=4)),
    "ImagePositionPatient-missing": (_delete("ImagePositionPatient"), st.none()),
    "ImagePositionPatient-duplicate": (_set("ImagePositionPatient"), st.just(["-10", "-20", "30"])),
    "ImageOrientationPatient": (
        _set("ImageOrientationPatient"),
        st.one_of(
            st.lists(DS_NUMBERS, min_size=5, max_size=7),
            st.sampled_from([["0", "1", "0", "1", "0", "0"], ["1", "0", "0", "1", "0", "0"], ["0"] * 6,
                             ["1", "0", "0", "0", "0.7071", "0.7071"], ["2", "0", "0", "0", "3", "0"]]),
        ),
    ),
    "ImageOrientationPatient-missing": (_delete("ImageOrientationPatient"), st.none()),
    "BitsAllocated": (_set("BitsAllocated"), st.sampled_from([0, 1, 7, 8, 12, 24, 32, 64])),
    "BitsStored": (_set("BitsStored"), st.sampled_from([0, 1, 8, 16, 17, 40])),
    "PixelRepresentation": (_set("PixelRepresentation"), st.sampled_from([1, 2])),
    "PixelData-truncated": (_truncate_pixels, st.floats(0.0, 0.99)),
    "PixelData-missing": (_delete("PixelData"), st.none()),
    "Rows": (_set("Rows"), st.sampled_from([0, 1, ROWS + 1, 65535])),
    "Columns": (_set("Columns"), st.sampled_from([0, 1, COLS - 1, 65535])),
    "RescaleSlope": (_set("RescaleSlope"), DS_NUMBERS),
    "RescaleIntercept": (_set("RescaleIntercept"), DS_NUMBERS),
    "RescaleSlope-missing": (_delete("RescaleSlope"), st.none()),
    "RescaleIntercept-missing": (_delete("RescaleIntercept"), st.none()),
    "SamplesPerPixel": (_set("SamplesPerPixel"), st.sampled_from([0, 3])),
    "NumberOfFrames": (_set("NumberOfFrames"), st.sampled_from(["0", "-1", "2", "abc"])),
    "SliceThickness": (_set("SliceThickness"), DS_NUMBERS),
    "SeriesInstanceUID": (_set("SeriesInstanceUID"), st.sampled_from(["1.2.3", ""])),
    "SOPClassUID-missing": (_delete("SOPClassUID"), st.none()),
    "PatientAge": (_set("PatientAge"), st.sampled_from(["", "abcY", "-5Y", "999D", "1e400Y", "nanY"])),
    "TransferSyntax": (
        _transfer_syntax,
        st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.3.4"]),
    ),
}


@st.composite
def damage(draw) -> list[tuple[str, str, Any]]:
    """1-3 mutations, each on one slice or on all slices: (name, slice index or "all", value)."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(MUTATIONS)))
        where = draw(st.sampled_from(["all", *range(NUM_SLICES)]))
        out.append((name, where, draw(MUTATIONS[name][1])))
    return out


@contextmanager
def alarm(seconds: int):
    """Fail instead of hanging: SIGALRM raises inside the example after ``seconds``."""

    def handler(signum, frame):
        raise TimeoutError(f"read_volume did not return within {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_damaged(folder: Path, mutations: list[tuple[str, str, Any]]) -> None:
    datasets = base_series()
    # write what real broken exporters write: no validation of the damaged values
    old = dicom_config.settings.writing_validation_mode
    dicom_config.settings.writing_validation_mode = dicom_config.IGNORE
    try:
        for name, where, value in mutations:
            apply = MUTATIONS[name][0]
            for k, ds in enumerate(datasets):
                if where == "all" or where == k:
                    apply(ds, value)
        for k, ds in enumerate(datasets):
            ts = UID(str(ds.file_meta.TransferSyntaxUID))
            encoding = {} if ts.is_transfer_syntax else {"implicit_vr": False, "little_endian": True}
            if ts.is_transfer_syntax and ts.is_compressed and "PixelData" in ds:
                ds.PixelData = encapsulate([bytes(ds.PixelData) or b"\0\0"])  # raw bytes posing as JPEG
                ds["PixelData"].VR = "OB"
            ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=False, **encoding)
    finally:
        dicom_config.settings.writing_validation_mode = old


def assert_usable(volume: Volume) -> None:
    assert volume.array.ndim == 3 and min(volume.shape) >= 1
    assert np.all(np.isfinite(volume.ijk_to_ras)) and np.all(volume.spacing > 0)
    assert abs(np.linalg.det(volume.ijk_to_ras[:3, :3])) > 0, "degenerate grid"
    assert isinstance(volume.meta.get("warnings"), list)
    with suppress(ValueError):
        check_ct(volume)


FUZZ_SETTINGS = settings(
    max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


def test_the_undamaged_series_reads() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_damaged(Path(tmp), [])
        volume = read_volume(tmp)
    assert volume.shape == (NUM_SLICES, ROWS, COLS)
    np.testing.assert_allclose(volume.spacing, [0.7, 0.7, 2.5])
    assert volume.array.min() >= -1024 and volume.array.max() < 4096 - 1024


@FUZZ_SETTINGS
@given(damage())
def test_damaged_headers_give_a_volume_or_a_clean_error(mutations) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_damaged(Path(tmp), mutations)
        with alarm(SECONDS_PER_EXAMPLE):
            try:
                volume = read_volume(tmp)
            except ValueError as exc:  # VolumeError and friends: the message must say something
                assert str(exc).strip(), f"empty message from {type(exc).__name__}"
                return
        assert_usable(volume)


@pytest.mark.parametrize(
    "mutations",
    [
        [("PixelSpacing", "all", ["0", "0"])],
        [("PixelSpacing", "all", ["nan", "0.7"])],
        [("PixelSpacing", "all", ["-0.7", "-0.7"])],
        [("ImagePositionPatient-missing", 2, None)],
        [("ImageOrientationPatient", 1, ["0", "1", "0", "1", "0", "0"])],
        [("ImageOrientationPatient", "all", ["1", "0", "0", "1", "0", "0"])],
        [("BitsAllocated", "all", 12)],
        [("PixelData-truncated", "all", 0.5)],
        [("Rows", "all", 65535)],
        [("RescaleSlope", "all", "1e308")],
        [("TransferSyntax", "all", "1.2.3.4")],
    ],
    ids=lambda m: "+".join(f"{n}@{w}={v}" for n, w, v in m),
)
def test_named_damage(mutations, tmp_path: Path) -> None:
    """The damage the issue names, each once, so a regression shows by name."""
    write_damaged(tmp_path, mutations)
    try:
        volume = read_volume(tmp_path)
    except ValueError as exc:
        assert str(exc).strip()
        return
    assert_usable(volume)
    if mutations[0][0] == "RescaleSlope":
        assert math.isfinite(float(np.max(np.abs(volume.array)))) or volume.meta["warnings"]


def test_a_slice_without_pixel_data_is_reported_not_dropped_silently(tmp_path: Path) -> None:
    """Found by fuzzing: an end slice whose pixel data is gone used to vanish without a word."""
    write_damaged(tmp_path, [("PixelData-missing", NUM_SLICES - 1, None)])
    volume = read_volume(tmp_path)
    assert volume.shape[0] == NUM_SLICES - 1
    assert any(f"{NUM_SLICES - 1:03d}.dcm" in w and "without pixel data" in w for w in volume.meta["warnings"])


def test_a_non_transfer_syntax_uid_is_named(tmp_path: Path) -> None:
    """Found by fuzzing: pydicom's bare "UID is not a transfer syntax" named neither file nor UID."""
    write_damaged(tmp_path, [("TransferSyntax", 1, "1.2.3.4")])
    with pytest.raises(ValueError, match=r"001\.dcm declares the transfer syntax '1\.2\.3\.4'"):
        read_volume(tmp_path)


def test_a_rescale_beyond_float32_is_refused(tmp_path: Path) -> None:
    """Found by fuzzing: RescaleSlope 1e308 used to give a volume of infinities without a warning."""
    write_damaged(tmp_path, [("RescaleSlope", 2, "1e308")])
    with pytest.raises(ValueError, match=r"002\.dcm: RescaleSlope 1e\+308"):
        read_volume(tmp_path)


def test_a_nan_rescale_slope_is_reported_never_replaced_by_one() -> None:
    """A damaged slope on one slice: that file is named as unusable; no slice gets a guessed slope."""
    with tempfile.TemporaryDirectory() as tmp:
        write_damaged(Path(tmp), [("RescaleSlope", 2, "nan")])
        try:
            volume = read_volume(tmp)
        except ValueError as exc:
            assert "002.dcm" in str(exc) or "RescaleSlope" in str(exc)
            return
        assert any("002.dcm" in w and "RescaleSlope" in w for w in volume.meta["warnings"]), volume.meta["warnings"]


def test_a_yes_no_value_is_not_an_age() -> None:
    from MMCAFNetLib.ehr import ClinicalValueError, default_schema

    with pytest.raises(ClinicalValueError, match="age"):
        default_schema().validate_record({"age": True})
