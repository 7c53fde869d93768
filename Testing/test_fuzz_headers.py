"""Property-based fuzzing, round 2: anything but the library's own input errors is a finding.

- Clinical records of any JSON shape (nested lists and objects, any scalar, any key), through the
  command line's clinical-file reader, the schema and the DICOM-header filling.
- DICOM headers whose sizes are zero, huge or negative (Rows, Columns, NumberOfFrames, BitsAllocated,
  written raw as a broken exporter would, negative ones with a signed VR).
- NRRD and NIfTI headers: dimensions, sizes, types, encodings, spacing, orientation, offsets, scaling.

Each example must end in a Volume (or a validated record) or in one of the library's input errors:
VolumeError, MemoryGuardError, ClinicalValueError, the command line's UsageError, TableFileError.
The memory guard is capped at 256 MiB here (``MMCAFNET_AVAILABLE_MEMORY``), so a header that declares
more is refused before anything is read. ``MMCAFNET_FUZZ_EXAMPLES`` scales the number of examples
(CI runs the defaults, a few tens of seconds in all).
"""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from test_fuzz_dicom import MUTATIONS, alarm, assert_usable, write_damaged

from MMCAFNetLib.cli import UsageError
from MMCAFNetLib.commands.predict import read_clinical_file
from MMCAFNetLib.ehr import ClinicalValueError, default_schema, fill_from_header, values_from_header
from MMCAFNetLib.memory_guard import AVAILABLE_MEMORY_ENV, MemoryGuardError
from MMCAFNetLib.table_files import TableFileError
from MMCAFNetLib.volume import VolumeError, read_volume

SCHEMA = default_schema()
INPUT_ERRORS = (VolumeError, MemoryGuardError, ClinicalValueError, UsageError, TableFileError)
SCALE = float(os.environ.get("MMCAFNET_FUZZ_EXAMPLES", "1"))


def fuzz_settings(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=SCALE == 1,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                                          HealthCheck.data_too_large])


@pytest.fixture(autouse=True)
def small_memory(monkeypatch):
    monkeypatch.setenv(AVAILABLE_MEMORY_ENV, str(256 << 20))


def own_error(exc: BaseException) -> None:
    """The example ended in an error: it must be one of the library's input errors, with a message."""
    if not isinstance(exc, INPUT_ERRORS):
        raise AssertionError(f"finding: {type(exc).__name__}: {exc}") from exc
    assert str(exc).strip(), f"empty message from {type(exc).__name__}"
    assert len(str(exc)) < 5000, "the message must stay readable"


# ---------------------------------------------------------------------------------------------
# clinical records of any JSON shape

KEYS = st.one_of(st.sampled_from([*SCHEMA.field_names, "Age", "PatientSex", "agee", "sexx", "case_id", "note"]),
                 st.text(max_size=8))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10),
    st.sampled_from(["M", "F", "O", "63", "063Y", "1a", "T2", "N0", "M1c", "", "unknown", "1e999", "-0"]),
)
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(KEYS, inner, max_size=6)), max_leaves=20)
JSON_TOP = st.one_of(JSON_VALUES, st.dictionaries(KEYS, JSON_VALUES, max_size=9),
                     st.lists(st.dictionaries(KEYS, SCALARS, max_size=9), max_size=3))


@fuzz_settings(80)
@given(JSON_TOP, st.one_of(st.none(), st.sampled_from(["0", "1", "A0001", "x"])))
def test_a_clinical_file_of_any_json_shape_is_read_or_refused_cleanly(data: Any, row: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clinical.json"
        path.write_text(json.dumps(data), encoding="utf-8")
        notes: list[str] = []
        try:
            record = read_clinical_file(path, row)
            validated = SCHEMA.validate_record(record, notes)
        except Exception as exc:
            own_error(exc)
            return
    assert list(validated) == SCHEMA.field_names
    for f in SCHEMA.fields:
        value = validated[f.name]
        assert value is None or (f.kind == "continuous" and isinstance(value, float) and math.isfinite(value)) \
            or value in f.values, (f.name, value)


@fuzz_settings(80)
@given(st.one_of(SCALARS, st.binary(max_size=6)), st.one_of(SCALARS, st.binary(max_size=6)),
       st.one_of(SCALARS, st.floats()), st.dictionaries(KEYS, SCALARS, max_size=5))
def test_header_values_fill_a_record_by_one_rule(sex: Any, age: Any, weight: Any, record: dict) -> None:
    """What the DICOM header fills in is always a value the schema accepts; a bad record key is refused."""
    values, _ = values_from_header(sex, age, weight, SCHEMA)
    for name, value in values.items():
        assert SCHEMA.field(name).canonical(value) is not None
    try:
        filled, taken, _ = fill_from_header(record, {"patient_sex": sex, "patient_age": age, "patient_weight": weight},
                                            SCHEMA)
        SCHEMA.validate_record(filled)
    except Exception as exc:
        own_error(exc)
        return
    assert set(taken) <= set(values)


# ---------------------------------------------------------------------------------------------
# DICOM headers with zero, huge and negative sizes


def _raw(keyword_tag: int, vr: str, value: int) -> Any:
    fmt = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i"}[vr]
    data = struct.pack(fmt, value)
    tag = Tag(keyword_tag)
    return lambda ds, _v: ds.__setitem__(tag, RawDataElement(tag, vr, len(data), data, 0, False, True))


SIZE_MUTATIONS = {
    "Rows": (0x00280010, [0, 1, 2, 65535]),
    "Columns": (0x00280011, [0, 1, 3, 65535]),
    "BitsAllocated": (0x00280100, [0, 1, 16, 65535]),
}
NEGATIVE = [-1, -32768, -2]


@st.composite
def size_damage(draw) -> list[tuple[Any, Any, Any]]:
    """1-3 size mutations, each on one slice or on all: raw US values, negative SS values, text counts."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["size", "negative", "frames", "other"]))
        where = draw(st.sampled_from(["all", 0, 1, 2, 3]))
        if kind == "other":
            name = draw(st.sampled_from(["PixelData-truncated", "PixelSpacing", "NumberOfFrames", "Rows", "Columns"]))
            out.append((MUTATIONS[name][0], where, draw(MUTATIONS[name][1])))
            continue
        if kind == "frames":
            text = draw(st.sampled_from(["0", "-1", "-2147483648", "99999999", "1e9", "2", "", "1.5"]))
            out.append((MUTATIONS["NumberOfFrames"][0], where, text))
            continue
        name = draw(st.sampled_from(sorted(SIZE_MUTATIONS)))
        tag, values = SIZE_MUTATIONS[name]
        if kind == "size":
            out.append((_raw(tag, "US", draw(st.sampled_from(values))), where, None))
        else:
            out.append((_raw(tag, "SS", draw(st.sampled_from(NEGATIVE))), where, None))
    return out


def _write_sized(folder: Path, mutations: list[tuple[Any, Any, Any]]) -> None:
    saved = dict(MUTATIONS)
    try:
        named = []
        for n, (apply, where, value) in enumerate(mutations):
            MUTATIONS[f"fuzz{n}"] = (apply, st.none())
            named.append((f"fuzz{n}", where, value))
        write_damaged(folder, named)
    finally:
        MUTATIONS.clear()
        MUTATIONS.update(saved)


@fuzz_settings(60)
@given(size_damage(), st.booleans())
def test_dicom_headers_with_zero_huge_or_negative_sizes(mutations, single_file: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _write_sized(Path(tmp), mutations)
        target = str(Path(tmp) / "001.dcm") if single_file else tmp
        with alarm(30), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                volume = read_volume(target)
            except Exception as exc:
                own_error(exc)
                return
        assert_usable(volume)


def test_a_dicom_series_declaring_more_pixels_than_memory_is_refused_before_decoding(tmp_path: Path) -> None:
    """65535 x 65535 pixels a slice (4 slices): refused by the memory guard, naming the sizes."""
    _write_sized(tmp_path, [(_raw(0x00280010, "US", 65535), "all", None), (_raw(0x00280011, "US", 65535), "all", None)])
    with pytest.raises(MemoryGuardError, match="4 x 65535 x 65535"):
        read_volume(tmp_path)


# ---------------------------------------------------------------------------------------------
# NRRD headers

NRRD_TYPES = ["short", "int16", "unsigned char", "uchar", "float", "double", "int", "uint64", "block", "banana", ""]
NRRD_NUMBERS = st.sampled_from(["0", "1", "2", "3", "-1", "-5", "65536", "4294967297", "99999999999", "1e3", "x", ""])


@st.composite
def nrrd_file(draw) -> bytes:
    dimension = draw(st.sampled_from(["3", "3", "3", "2", "4", "0", "-1", "17", "x"]))
    dims = 3 if dimension not in ("2", "4") else int(dimension)
    sizes = " ".join(draw(st.lists(st.one_of(st.sampled_from(["2", "3", "4"]), NRRD_NUMBERS),
                                   min_size=max(1, dims - 1), max_size=dims + 1)))
    direction = st.sampled_from(["(1,0,0)", "(0,1,0)", "(0,0,1)", "(0,0,0)", "(nan,0,0)", "(1e308,0,0)", "(-2,0,0)",
                                 "none", "(1,0)", "(inf,inf,inf)"])
    fields = {
        "type": draw(st.sampled_from(NRRD_TYPES)),
        "dimension": dimension,
        "space": draw(st.sampled_from(["left-posterior-superior", "RAS", "3D-right-handed", "banana"])),
        "sizes": sizes,
        "space directions": " ".join(draw(st.lists(direction, min_size=dims - 1, max_size=dims + 1))),
        "encoding": draw(st.sampled_from(["raw", "gzip", "gz", "ascii", "bzip2", "hex", "banana"])),
        "endian": draw(st.sampled_from(["little", "big", "middle"])),
        "space origin": draw(st.sampled_from(["(0,0,0)", "(nan,0,0)", "(1,2)", "x"])),
        "byte skip": draw(st.sampled_from(["0", "-1", "5", "999999999"])),
    }
    dropped = draw(st.sets(st.sampled_from(sorted(fields)), max_size=2))
    header = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items() if k not in dropped) + "\n"
    payload_size = draw(st.sampled_from([0, 1, 7, 64, 128, 512]))
    payload = draw(st.binary(min_size=payload_size, max_size=payload_size))
    if fields["encoding"] in ("gzip", "gz") and draw(st.booleans()):
        payload = gzip.compress(payload)
    return header.encode("latin-1") + payload


@fuzz_settings(120)
@given(nrrd_file())
def test_nrrd_headers_give_a_volume_or_an_input_error(data: bytes) -> None:
    read_or_refuse("fuzz.nrrd", data)


#: hostile values for one field of an otherwise valid small NRRD
NRRD_DAMAGE = {
    "type": ["block", "banana", "", "uint64", "double", "unsigned char"],
    "dimension": ["0", "-1", "17", "x", "2", "4", "99999999999"],
    "sizes": ["4 5", "4 5 6 7", "0 5 6", "-1 5 6", "65536 65536 65536", "4294967297 1 1", "1 4294967296 1",
              "x 5 6", "4 5 999999"],
    "space directions": ["(0,0,0) (0,1,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)", "(1e308,0,0) (0,1e308,0) (0,0,1e308)",
                         "(1,0) (0,1) (0,0)", "none (0,1,0) (0,0,1)", "(1,0,0) (1,0,0) (0,0,1)"],
    "encoding": ["ascii", "bzip2", "hex", "banana", "gzip"],
    "endian": ["big", "middle"],
    "space origin": ["(nan,0,0)", "(1,2)", "x", "(1e308,1e308,1e308)"],
    "byte skip": ["-1", "5", "999999999", "x"],
    "line skip": ["3", "-1", "999999"],
    "data file": ["missing.raw", "LIST"],
    "kinds": ["RGB-color domain domain", "banana"],
}


@st.composite
def damaged_valid_nrrd(draw) -> bytes:
    """A valid 4 x 5 x 6 short NRRD with up to three fields damaged and the data perhaps cut short:
    close enough to a real file that the reader gets past the header, where the hostile strategy
    above rarely does."""
    fields = {"type": "short", "dimension": "3", "space": "left-posterior-superior", "sizes": "4 5 6",
              "space directions": "(1,0,0) (0,1,0) (0,0,2.5)", "kinds": "domain domain domain",
              "endian": "little", "encoding": "raw", "space origin": "(0,0,0)"}
    for key in draw(st.lists(st.sampled_from(sorted(NRRD_DAMAGE)), max_size=3, unique=True)):
        fields[key] = draw(st.sampled_from(NRRD_DAMAGE[key]))
    payload = np.arange(120, dtype="<i2").tobytes()
    payload = payload[: draw(st.sampled_from([len(payload), len(payload), 0, 7, 100]))]
    if fields["encoding"] == "gzip":
        payload = gzip.compress(payload)
    header = "NRRD0004\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n"
    return header.encode("latin-1") + payload


@fuzz_settings(150)
@given(damaged_valid_nrrd())
def test_nearly_valid_nrrd_files_give_a_volume_or_an_input_error(data: bytes) -> None:
    read_or_refuse("fuzz.nrrd", data)


@pytest.mark.parametrize("name, header", [
    ("huge.nrrd", "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 4294967297 1 1\n"
                  "space directions: (1,0,0) (0,1,0) (0,0,2.5)\nkinds: domain domain domain\nendian: little\n"
                  "encoding: raw\nspace origin: (0,0,0)\n\n"),
    ("huge.mha", "ObjectType = Image\nNDims = 3\nDimSize = 4294967297 1 1\nElementType = MET_SHORT\n"
                 "ElementDataFile = LOCAL\n"),
])
def test_a_size_beyond_what_the_reader_can_index_is_refused_before_reading(tmp_path: Path, name: str, header: str) -> None:
    """ITK reports such a size wrapped or clamped (4294967297 reads as 1) and then reads the real
    one: gigabytes for a tiny file, which used to hang the read. The declared sizes are checked."""
    from MMCAFNetLib.volume import VolumeError, read_volume

    path = tmp_path / name
    path.write_bytes(header.encode("latin-1") + bytes(240))
    with alarm(30), pytest.raises(VolumeError, match="declares the sizes 4294967297 x 1 x 1"):
        read_volume(path)


#: a 352-byte NIfTI found by the fuzz test below (RGB24 datatype, damaged header fields) on which
#: SimpleITK's pixel read crashes the process (segmentation fault); zlib-compressed, base64
RGB_NIFTI_THAT_CRASHED_ITK = (
    "eNqLYWQgCjAzcDCwMPyvz2E4eIIJyEIFDQw8YFrBAcjeDxZg+HWYgeFAPZBpD5ZasM156ZWM4EkXFtz8z37lNsMgAMwMN/8D3fdfC+jQ"
    "iY2mt6Hu3Q9xcwOYfeqTZyHUj2D+Y9tZ7RA2yI8gDGZjgDxtIzANANUHKkg="
)


def test_a_colour_nifti_is_refused_before_its_pixels_are_read(tmp_path: Path) -> None:
    """A CT has one value per voxel, and reading the pixels of this colour file kills the process
    inside ITK; the component count from the header refuses it first."""
    import base64
    import zlib

    from MMCAFNetLib.volume import VolumeError, read_volume

    path = tmp_path / "colour.nii"
    path.write_bytes(zlib.decompress(base64.b64decode(RGB_NIFTI_THAT_CRASHED_ITK)))
    with pytest.raises(VolumeError, match="3 components per voxel"):
        read_volume(path)


def read_or_refuse(name: str, data: bytes) -> None:
    """``data`` written as file ``name`` reads, within 30 s, as a usable volume without NaN or
    infinity, or is refused with the library's own input error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        with alarm(30):
            try:
                volume = read_volume(path)
            except Exception as exc:
                own_error(exc)
                return
        assert_usable(volume)
        assert not (volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)))


# ---------------------------------------------------------------------------------------------
# NIfTI headers

F32 = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.5, float("nan"), float("inf"), -float("inf"), 1e30, -1e-30]),
                st.floats(width=32, allow_nan=True, allow_infinity=True))
I16 = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 7, 8, 32767, -1, -32768]), st.integers(-32768, 32767))
DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 32, 128, 2304, 0, 1, 3, 1024, 32767]


@st.composite
def nifti_file(draw) -> bytes:
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, draw(st.sampled_from([348, 348, 348, 540, 0, -348, 1])))
    ndim = draw(st.sampled_from([3, 3, 3, 4, 2, 0, 1, 7, 8, -1]))
    dims = [draw(st.one_of(st.sampled_from([1, 2, 3, 4]), I16)) for _ in range(7)]
    struct.pack_into("<8h", hdr, 40, ndim, *dims)
    datatype = draw(st.sampled_from(DATATYPES))
    bitpix = draw(st.sampled_from([8, 16, 32, 64, 0, 12, -8]))
    struct.pack_into("<hh", hdr, 70, datatype, bitpix)
    struct.pack_into("<8f", hdr, 76, *[draw(F32) for _ in range(8)])  # pixdim (qfac first)
    struct.pack_into("<f", hdr, 108, draw(st.sampled_from([352.0, 352.0, 0.0, 348.0, 353.0, -352.0, float("nan"),
                                                           1e12, 4096.0])))  # vox_offset
    struct.pack_into("<ff", hdr, 112, draw(F32), draw(F32))  # scl_slope, scl_inter
    struct.pack_into("<hh", hdr, 252, draw(I16), draw(I16))  # qform_code, sform_code
    struct.pack_into("<6f", hdr, 256, *[draw(F32) for _ in range(6)])  # quaternion and offsets
    struct.pack_into("<12f", hdr, 280, *[draw(F32) for _ in range(12)])  # sform rows
    hdr[344:348] = draw(st.sampled_from([b"n+1\0", b"n+1\0", b"ni1\0", b"n+2\0", b"xyz\0"]))
    payload_size = draw(st.sampled_from([0, 4, 64, 256, 1024]))
    return bytes(hdr) + b"\0" * 4 + draw(st.binary(min_size=payload_size, max_size=payload_size))


@fuzz_settings(120)
@given(nifti_file(), st.booleans())
def test_nifti_headers_give_a_volume_or_an_input_error(data: bytes, compressed: bool) -> None:
    read_or_refuse("fuzz.nii.gz" if compressed else "fuzz.nii", gzip.compress(data) if compressed else data)
