"""Writing the DICOM files of a patient: CT, secondary-capture and PET series."""

from __future__ import annotations

import datetime as _dt
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from MMCAFNetLib.synthetic.design import (
    CT_IMAGE_STORAGE,
    PET_IMAGE_STORAGE,
    SECONDARY_CAPTURE_STORAGE,
    PatientPlan,
)
from MMCAFNetLib.synthetic.render import plan_ijk_to_ras

# --------------------------------------------------------------------------------------------------
# Writing the real layout


def _uid(seed: int, *parts: Any) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["mmcafnet-synthetic", str(seed), *map(str, parts)]))


def _folder_date(d: _dt.date) -> str:
    return d.strftime("%m-%d-%Y")


def _file_size_text(nbytes: int) -> str:
    if nbytes >= 1_000_000:
        return f"{nbytes / 1e6:.2f} MB"
    return f"{nbytes / 1e3:.2f} KB"


def _timestamp_text(t: _dt.datetime) -> str:
    """As the NBIA retriever writes it: milliseconds without trailing zeros ('14:14:15.8', '14:14:15')."""
    ms = f"{t.microsecond // 1000:03d}".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{ms}" if ms else "")


def _image_names(n: int) -> list[str]:
    width = max(2, len(str(n)))
    return [f"1-{i:0{width}d}.dcm" for i in range(1, n + 1)]


def _base_dataset(plan: PatientPlan, study_uid: str, series_uid: str, frame_uid: str, sop_class: str,
                  modality: str, series_number: int, series_description: str, study_time: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    sc = plan.scanner
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = plan.study_date.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.StudyTime = study_time
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = sc.manufacturer
    ds.ManufacturerModelName = sc.model_name
    ds.StudyDescription = sc.study_description
    ds.SeriesDescription = series_description
    ds.ReferringPhysicianName = ""
    ds.PatientName = plan.patient_id
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = plan.record["sex"]
    if plan.record["age"] is not None:
        ds.PatientAge = f"{int(plan.record['age']):03d}Y"
    if plan.record["weight"] is not None:
        ds.PatientWeight = f"{float(plan.record['weight']):g}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = ""
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_uid
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom (MMCAFNetLib.synthetic)"
    return ds


def _write_file(ds, path: Path) -> None:
    ds.save_as(path, enforce_file_format=True)


def _element_bytes(tag: int, vr: str, value: bytes) -> bytes:
    """One explicit-VR little-endian element with a 2-byte length (UI, IS, DS, ...)."""
    if len(value) % 2:
        value += b"\0" if vr == "UI" else b" "
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode("ascii"), len(value)) + value


class _SliceWriter:
    """Writes the slices of one series fast: the static header is encoded once by pydicom, the few
    per-slice elements (UID, instance number, position, pixels) are spliced in by tag order."""

    _DYNAMIC = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)

    def __init__(self, ds) -> None:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import correct_ambiguous_vr, write_data_element

        correct_ambiguous_vr(ds, True)
        self.sop_class = str(ds.SOPClassUID).encode("ascii")
        segments: list[list[bytes]] = [[] for _ in range(len(self._DYNAMIC) + 1)]
        for elem in ds:
            tag = int(elem.tag)
            if tag in self._DYNAMIC:
                continue
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = False
            write_data_element(fp, elem)
            idx = sum(1 for d in self._DYNAMIC if d < tag)
            segments[idx].append(fp.getvalue())
        self.segments = [b"".join(seg) for seg in segments]

    def _meta(self, sop_uid: bytes) -> bytes:
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

        body = (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
            + _element_bytes(0x00020002, "UI", self.sop_class)
            + _element_bytes(0x00020003, "UI", sop_uid)
            + _element_bytes(0x00020010, "UI", str(ExplicitVRLittleEndian).encode("ascii"))
            + _element_bytes(0x00020012, "UI", str(PYDICOM_IMPLEMENTATION_UID).encode("ascii"))
        )
        return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body

    def write(self, path: Path, sop_uid: str, instance: int, position_lps: Sequence[float], pixels: np.ndarray) -> None:
        uid = sop_uid.encode("ascii")
        pos = "\\".join(f"{v:.6f}" for v in position_lps).encode("ascii")
        data = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
        s = self.segments
        blob = b"".join(
            (
                self._meta(uid),
                s[0],
                _element_bytes(0x00080018, "UI", uid),
                s[1],
                _element_bytes(0x00200013, "IS", str(int(instance)).encode("ascii")),
                s[2],
                _element_bytes(0x00200032, "DS", pos),
                s[3],
                _element_bytes(0x00201041, "DS", f"{position_lps[2]:.6f}".encode("ascii")),
                s[4],
                struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(data)),
                data,
                s[5],
            )
        )
        with open(path, "wb") as fh:
            fh.write(blob)


def _write_ct_series(plan: PatientPlan, hu: np.ndarray, folder: Path, study_uid: str, series_uid: str,
                     frame_uid: str, series_number: int, series_description: str, study_time: str,
                     uid_tag: str) -> list[str]:
    """Write one CT Image Storage series; return SOPInstanceUIDs in k (ascending S) order."""
    sc = plan.scanner
    affine = plan_ijk_to_ras(plan)
    n = hu.shape[0]
    ds = _base_dataset(plan, study_uid, series_uid, frame_uid, CT_IMAGE_STORAGE, "CT", series_number,
                       series_description, study_time)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = f"{sc.slice_thickness:g}"
    ds.SpacingBetweenSlices = f"{sc.slice_thickness:g}"
    ds.KVP = f"{sc.kvp:g}"
    ds.ConvolutionKernel = sc.kernel
    ds.PatientPosition = "FFS" if sc.manufacturer == "SIEMENS" else "HFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = sc.size
    ds.Columns = sc.size
    ds.PixelSpacing = [f"{sc.pixel_spacing:.12g}", f"{sc.pixel_spacing:.12g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if sc.signed else 12
    ds.HighBit = 15 if sc.signed else 11
    ds.PixelRepresentation = 1 if sc.signed else 0
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1600"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    if sc.signed:
        ds.PixelPaddingValue = -2000
    stored = hu.astype(np.int32) + 1024
    if sc.signed:
        stored = stored.astype(np.int16)
    else:
        stored = np.clip(stored, 0, 4095).astype(np.uint16)
    writer = _SliceWriter(ds)
    names = _image_names(n)
    uids: list[str] = [""] * n
    folder.mkdir(parents=True, exist_ok=True)
    for idx in range(n):
        k = (n - 1 - idx) if sc.instance_descending else idx
        ras = affine @ np.array([0.0, 0.0, float(k), 1.0])
        uid = _uid(plan.seed, plan.patient_id, uid_tag, "sop", k)
        uids[k] = uid
        # DICOM positions are LPS: flip R and A
        writer.write(folder / names[idx], uid, idx + 1, (-ras[0], -ras[1], ras[2]), stored[k])
    return uids


def _write_secondary_capture(plan: PatientPlan, hu: np.ndarray, folder: Path, study_uid: str, series_uid: str,
                             frame_uid: str, series_number: int, description: str, study_time: str) -> int:
    """A 'Range' secondary capture (Modality CT, SOP Secondary Capture): a coronal reformat, 1-2 images."""
    ds = _base_dataset(plan, study_uid, series_uid, frame_uid, SECONDARY_CAPTURE_STORAGE, "CT", series_number,
                       description, study_time)
    ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    ds.ConversionType = "WSD"
    coronal = np.clip(hu.max(axis=1)[::-1].astype(np.int32) + 1024, 0, 4095).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(coronal.shape[0]), int(coronal.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    folder.mkdir(parents=True, exist_ok=True)
    count = 1 + int(hu.shape[0] > 40)
    for idx, name in enumerate(_image_names(count)):
        uid = _uid(plan.seed, plan.patient_id, series_uid, "sc", idx)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = idx + 1
        ds.PixelData = np.ascontiguousarray(coronal).tobytes()
        _write_file(ds, folder / name)
    return count


def _write_pet(plan: PatientPlan, hu: np.ndarray, mask: np.ndarray, folder: Path, study_uid: str, series_uid: str,
               frame_uid: str, series_number: int, study_time: str) -> int:
    """A small PET series (uptake in the lesion), which an indexer of CT series must skip."""
    sc = plan.scanner
    ds = _base_dataset(plan, study_uid, series_uid, frame_uid, PET_IMAGE_STORAGE, "PT", series_number,
                       "PET WB Corrected", study_time)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    step = 4
    pet_px = max(8, sc.size // step)
    n = max(1, min(hu.shape[0] // 2, 24))
    ks = np.linspace(0, hu.shape[0] - 1, n).round().astype(int)
    ds.Units = "BQML"
    ds.SliceThickness = f"{sc.slice_thickness * hu.shape[0] / n:.4g}"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [f"{sc.pixel_spacing * step:.12g}"] * 2
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = pet_px
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "0.5"
    affine = plan_ijk_to_ras(plan)
    folder.mkdir(parents=True, exist_ok=True)
    names = _image_names(n)
    for idx, k in enumerate(ks):
        body = (hu[k, ::step, ::step][:pet_px, :pet_px] > -500).astype(np.float32) * 400.0
        uptake = mask[k, ::step, ::step][:pet_px, :pet_px].astype(np.float32) * 6000.0
        ras = affine @ np.array([0.0, 0.0, float(k), 1.0])
        uid = _uid(plan.seed, plan.patient_id, series_uid, "pet", idx)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = idx + 1
        ds.ImagePositionPatient = [f"{-ras[0]:.6f}", f"{-ras[1]:.6f}", f"{ras[2]:.6f}"]
        img = np.zeros((pet_px, pet_px), dtype=np.uint16)
        vals = (body + uptake).astype(np.uint16)
        img[: vals.shape[0], : vals.shape[1]] = vals
        ds.PixelData = img.tobytes()
        _write_file(ds, folder / names[idx])
    return n

