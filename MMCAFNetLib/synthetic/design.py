"""What a synthetic cohort is made of: its constants, the evidence design, the plans drawn per
patient and the results returned."""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.volume import Volume

CLASS_LETTERS = ("A", "B", "E", "G")
#: Default class mix: the real collection's order of frequency (A 71 %, G 17 %, B 11 %, E 1 %)
#: with more G so the paper's A-vs-G task has enough positives, and E present at all.
DEFAULT_CLASS_PROPORTIONS = {"A": 0.55, "B": 0.10, "E": 0.05, "G": 0.30}
DEFAULT_SMALL_LESION_SHARE = 0.25

#: The real clinical sheet's headers, verbatim (the M is U+FF2D, FULLWIDTH LATIN CAPITAL LETTER M).
SHEET_HEADERS = (
    "No.",
    "NewPatientID",
    "Sex",
    "Age",
    "weight (kg)",
    "T-Stage",
    "N-Stage",
    "\uff2d-Stage",
    "Histopathological grading",
    "Smoking History",
)
SHEET_NAME = "Clinical Data"
SHEET_FILE = "statistics-clinical-20201221.xlsx"
COLLECTION = "Lung-PET-CT-Dx"
DATA_DESCRIPTION_URI = "https://doi.org/10.7937/TCIA.2020.NNC20461"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
SOP_CLASS_NAMES = {
    CT_IMAGE_STORAGE: "CT Image Storage",
    PET_IMAGE_STORAGE: "Positron Emission Tomography Image Storage",
    SECONDARY_CAPTURE_STORAGE: "Secondary Capture Image Storage",
}
RECORD_FIELDS = ("sex", "age", "weight", "t_stage", "n_stage", "m_stage", "smoking")

AIR_HU = -1000.0
_PADDING_HU = -3024.0  # GE: stored -2000 with intercept -1024 outside the reconstruction circle


# --------------------------------------------------------------------------------------------------
# Evidence design


@dataclass(frozen=True)
class EvidenceDesign:
    """Probabilities of the four evidence patterns (image typical?, record typical?).

    The defaults make each modality reliable for 55 % of patients and at least one reliable for
    90 %, so fusion has something to gain over either modality alone.
    """

    image_only: float = 0.35
    record_only: float = 0.35
    both: float = 0.20
    neither: float = 0.10

    def __post_init__(self) -> None:
        p = (self.image_only, self.record_only, self.both, self.neither)
        if min(p) < 0 or not math.isclose(sum(p), 1.0, abs_tol=1e-6):
            raise ValueError(f"evidence pattern probabilities must be >= 0 and sum to 1, got {p}")

    def draw(self, rng: np.random.Generator) -> tuple[bool, bool]:
        """(image typical, record typical)."""
        choice = rng.choice(4, p=[self.image_only, self.record_only, self.both, self.neither])
        return (bool(choice in (0, 2)), bool(choice in (1, 2)))


DEFAULT_EVIDENCE = EvidenceDesign()


# --------------------------------------------------------------------------------------------------
# Plans: everything random about one patient, drawn before anything is rendered


@dataclass
class ScannerPlan:
    manufacturer: str
    model_name: str
    study_description: str
    series_description: str
    kernel: str
    slice_thickness: float  # mm, also the slice interval
    pixel_spacing: float  # mm, in-plane at the requested size
    fov: float  # mm
    size: int  # in-plane pixels
    num_slices: int
    first_slice_s: float  # RAS S of slice k = 0 (the most inferior)
    grid_center: tuple[float, float]  # RAS (R, A) of the image centre
    noise_hu: float
    signed: bool  # int16 stored values (GE) or uint16 12-bit (SIEMENS, Philips)
    padding_outside_fov: bool
    instance_descending: bool  # instance 1 = most superior slice
    kvp: float


@dataclass
class AnatomyPlan:
    ax: float  # body semi-axis left-right (mm)
    ay: float  # body semi-axis antero-posterior
    fat: float  # subcutaneous fat thickness
    lung_height: float
    z_base: float  # body-frame z of the lung bases (lungs span z_base .. z_base + lung_height)
    body_z0: float  # RAS S of the body frame's z = 0
    contrast: bool
    vessels: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)  # p0, p1, radius
    bronchi: list[tuple[np.ndarray, np.ndarray, float]] = field(default_factory=list)
    texture: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # wave vector, phase, amplitude


@dataclass
class LesionPlan:
    kind: str  # "A", "B", "E", "G" or "indeterminate"
    center: np.ndarray  # body frame (x=R, y=A, z) mm
    radius: float  # mm (nominal; diameter = 2 * radius)
    lobes: list[tuple[np.ndarray, float]]  # unit direction, amplitude (fraction of radius)
    solid_hu: float
    shell_hu: Optional[float]  # ground-glass HU outside the solid core (A), else None
    core_fraction: float  # solid core radius / radius when shell_hu is set
    cavity: Optional[tuple[np.ndarray, float]]  # offset (mm), radius (mm)
    necrosis: Optional[float]  # necrotic core radius (fraction) for E
    spikes: list[tuple[np.ndarray, float, float]]  # direction, length (fraction of radius), radius mm
    nodes: list[tuple[np.ndarray, float]]  # lymph nodes (body frame centre, radius)
    small: bool
    position: str  # "peripheral", "central", "intermediate"

    @property
    def diameter_mm(self) -> float:
        return 2.0 * self.radius


@dataclass
class PatientPlan:
    patient_id: str  # "Lung_Dx-A0001"
    label: str
    number: int
    seed: int
    image_typical: bool
    record_typical: bool
    record: dict[str, Any]  # raw clinical values by field name (None = missing)
    sheet_row: dict[str, Any]  # the sheet's verbatim columns
    scanner: ScannerPlan
    anatomy: AnatomyPlan
    lesion: LesionPlan
    study_date: _dt.date


# --------------------------------------------------------------------------------------------------
# Results


@dataclass
class SyntheticCase:
    """One phantom patient in memory: CT volume (HU), clinical record and the lesion's truth."""

    label: str
    patient_id: str
    volume: Volume
    record: dict[str, Any]
    lesion_box_ras: tuple[tuple[float, float, float], tuple[float, float, float]]
    lesion_center_ras: tuple[float, float, float]
    lesion_box_ijk: tuple[tuple[int, int, int], tuple[int, int, int]]
    lesion_mask: np.ndarray  # bool (K, J, I)
    lesion_diameter_mm: float
    lesion_kind: str
    evidence: dict[str, bool]
    sheet_row: dict[str, Any]
    scanner: dict[str, Any]


@dataclass
class SyntheticPatient:
    """What ``write_cohort`` wrote for one patient (the truth an indexer must recover)."""

    patient_id: str
    label: str
    series_uid: str
    series_path: str
    study_uid: str
    num_slices: int
    lesion_box_ijk: tuple[tuple[int, int, int], tuple[int, int, int]]  # k in ascending-S order
    lesion_box_ras: tuple[tuple[float, float, float], tuple[float, float, float]]
    lesion_center_ras: tuple[float, float, float]
    lesion_diameter_mm: float
    lesion_kind: str
    annotated_slices: int
    record: dict[str, Any]
    sheet_row: dict[str, Any]
    evidence: dict[str, bool]
    extra_series: list[str]  # descriptions of the other series written for this patient

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "patient_id": self.patient_id,
            "label": self.label,
            "series_uid": self.series_uid,
            "series_path": self.series_path,
            "num_slices": self.num_slices,
        }
        for name, idx in (("min", 0), ("max", 1)):
            for axis, v in zip("ijk", self.lesion_box_ijk[idx]):
                row[f"box_ijk_{name}_{axis}"] = v
        for name, idx in (("min", 0), ("max", 1)):
            for axis, v in zip("ras", self.lesion_box_ras[idx]):
                row[f"box_ras_{name}_{axis}"] = v
        row.update({k: self.record.get(k) for k in RECORD_FIELDS})
        row.update(
            lesion_diameter_mm=self.lesion_diameter_mm,
            lesion_kind=self.lesion_kind,
            image_typical=self.evidence["image_typical"],
            record_typical=self.evidence["record_typical"],
        )
        return row


@dataclass
class SyntheticCohort:
    root: Path  # the folder holding metadata.csv, Lung-PET-CT-Dx/, Annotation/ and the sheet
    patients: list[SyntheticPatient]
    seed: int
    size: int

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame([p.to_row() for p in self.patients])

    def class_counts(self) -> dict[str, int]:
        counts = {c: 0 for c in CLASS_LETTERS}
        for p in self.patients:
            counts[p.label] += 1
        return {c: n for c, n in counts.items() if n}

