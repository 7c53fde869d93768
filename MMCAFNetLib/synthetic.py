"""A synthetic Lung-PET-CT-Dx cohort: phantom chest CTs and clinical records in the real layout.

Why it exists: every test, the demo and the bundled demo model need data that is indistinguishable
in *format* from the real collection (DICOM CT series in the NBIA tree, ``metadata.csv`` with the
real 17 columns, LabelImg VOC annotations keyed by SOPInstanceUID, the clinical ``.xlsx`` with its
verbatim headers) while being small, free to share and deterministic.

Phantom. Each case is an analytic chest in RAS millimetres: body with subcutaneous fat and chest
wall muscle, mediastinal fat, two lungs whose cross-section narrows towards the apex and are cut
by the diaphragm domes, heart, ascending and descending aorta, trachea and main bronchi, spine
(vertebral bodies with cortical rim, discs, canal, spinous process), sternum, sloping ribs, a tree
of pulmonary vessels, scanner noise and, for GE scanners, the -3024 HU padding outside the
reconstruction circle. Body size follows the recorded weight and sex.

Scanners. Manufacturer (SIEMENS, GE, Philips), series description, kernel and slice thickness
(1-5 mm) are drawn from menus modelled on the real collection. At ``size=512`` the pixel spacing is
0.6-0.9 mm (a 310-460 mm field of view). At a smaller ``size`` the *field of view* is kept, so the
pixel spacing grows as ``fov / size`` (2.4-3.6 mm at 128 px): the chest stays a realistic chest
and lesion sizes in mm stay true. To keep small grids small the number of slices is capped at
``max(32, 3 * size // 4)``; a thin-slice scan then covers a slab around the lesion instead of the
whole chest.

Lesions by class (the image evidence):
- A adenocarcinoma: peripheral, ground-glass or part-solid, spiculated, 12-30 mm.
- G squamous cell carcinoma: central (near the hilum), solid, often cavitated, 20-55 mm.
- B small cell carcinoma: central bulky lobulated mass with mediastinal lymph nodes, 30-65 mm.
- E large cell carcinoma: peripheral large well-defined mass with a necrotic centre, 30-60 mm.
- "indeterminate": a smooth solid round nodule at a class-independent place and size.
A share of lesions (``small_lesion_share``) is small (5-10 mm) whatever the class.

Clinical records by class (the record evidence): a *typical* record follows class-specific
distributions (A: mostly never-smoking women with node-negative disease; G: older male smokers;
B: smokers with N3 and frequent M1; E: male smokers with M1a), a *neutral* record follows the
pooled distribution of the whole collection. T stage always follows the lesion's diameter (TNM 8),
weight follows body size; both carry no class evidence of their own beyond what the image shows.

Why fusion wins. Each patient draws an evidence pattern: image typical and record neutral (35 %),
record typical and image indeterminate (35 %), both typical (20 %), neither (10 %). The image alone
is reliable for 55 % of patients and the record alone for 55 %, but for 90 % at least one of them
is; a model that learns *which* modality to trust (an indeterminate nodule says "look at the
record") beats either modality alone. See docs/synthetic.md.

Annotations: one LabelImg VOC file per slice carrying the lesion, named by that slice's
SOPInstanceUID; ``xmin/ymin/xmax/ymax`` are the 0-based column/row indices of the first and last
lesion pixel (inclusive). Their union is the truth box; spiculae and lymph nodes are outside it.

Determinism: every patient's random stream is seeded from (seed, class letter, patient number), so
a patient is identical whatever the cohort size, and the same seed writes byte-identical files
(UIDs come from ``generate_uid`` with entropy derived from the seed).
"""

from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from MMCAFNetLib.dataset.metadata import METADATA_COLUMNS
from MMCAFNetLib.volume import Volume, make_ijk_to_ras

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


# --------------------------------------------------------------------------------------------------
# Drawing plans


def _rng_for(seed: int, label: str, number: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, ord(label), int(number)]))


_SCANNERS = {
    # manufacturer: (model names, study descriptions, [(series description, thickness mm, kernel, sharp)])
    "SIEMENS": (
        ("Biograph64", "SOMATOM Definition AS", "Sensation 64"),
        ("ThoraxAThoraxRoutine Adult", "Chest", "PET03WholebodyFirstHead Adult"),
        (
            ("Thorax  1.0  B70f", 1.0, "B70f", True),
            ("Thorax  1.0  B31f", 1.0, "B31f", False),
            ("ThoraxRoutine  5.0.0  B70f", 5.0, "B70f", True),
            ("ThoraxRoutine  3.0  B40f", 3.0, "B40f", False),
            ("ThoraxRoutine  2.0  B70f", 2.0, "B70f", True),
        ),
    ),
    "GE MEDICAL SYSTEMS": (
        ("LightSpeed VCT", "Discovery CT750 HD", "LightSpeed16"),
        ("lungc", "LUNGC", "Chest", "lung"),
        (
            ("5mm Lung SS50", 5.0, "LUNG", True),
            ("5mm", 5.0, "STANDARD", False),
            ("A phase 5mm Stnd SS50", 5.0, "STANDARD", False),
            ("Recon 2 5mm", 5.0, "STANDARD", False),
            ("1.25mm Lung", 1.25, "LUNG", True),
            ("2.5mm Stnd", 2.5, "STANDARD", False),
        ),
    ),
    "Philips": (
        ("Brilliance 64", "iCT 256", "Ingenuity CT"),
        ("Chest", "Chest  3D IMR", "Chest  3D"),
        (
            ("5mm", 5.0, "B", False),
            ("lung iDose 3", 2.0, "YC", True),
            ("iDose 2", 1.5, "B", False),
            ("lung IDose iDose 4", 1.0, "YC", True),
        ),
    ),
}
_MANUFACTURER_P = {"SIEMENS": 0.6, "GE MEDICAL SYSTEMS": 0.3, "Philips": 0.1}


def _max_slices(size: int) -> int:
    return max(32, 3 * int(size) // 4)


def _draw_scanner(rng: np.random.Generator, size: int, ax: float) -> ScannerPlan:
    names = list(_MANUFACTURER_P)
    manufacturer = names[rng.choice(len(names), p=list(_MANUFACTURER_P.values()))]
    models, studies, series = _SCANNERS[manufacturer]
    desc, thickness, kernel, sharp = series[rng.integers(len(series))]
    fov_min = max(310.0, 2.0 * ax + 25.0)
    fov = float(rng.integers(math.ceil(fov_min), 461)) if fov_min < 460 else 460.0
    return ScannerPlan(
        manufacturer=manufacturer,
        model_name=str(models[rng.integers(len(models))]),
        study_description=str(studies[rng.integers(len(studies))]),
        series_description=desc,
        kernel=kernel,
        slice_thickness=float(thickness),
        pixel_spacing=fov / size,
        fov=fov,
        size=int(size),
        num_slices=0,  # set once the lesion is placed
        first_slice_s=0.0,
        grid_center=(float(rng.uniform(-12, 12)), float(rng.uniform(-20, 15))),
        noise_hu=float(rng.uniform(22, 34) if sharp else rng.uniform(8, 15)),
        signed=manufacturer == "GE MEDICAL SYSTEMS",
        padding_outside_fov=manufacturer == "GE MEDICAL SYSTEMS",
        instance_descending=bool(rng.random() < 0.7),
        kvp=float(rng.choice([100.0, 120.0, 120.0, 140.0])),
    )


def _norm_choice(rng: np.random.Generator, table: dict[Any, float]) -> Any:
    keys = list(table)
    p = np.array(list(table.values()), dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


# Typical (class-specific) and neutral (pooled) record distributions.
_TYPICAL = {
    "A": dict(male=0.25, age=(57.0, 9.0), smoking=0.12, n={0: 0.76, 1: 0.18, 2: 0.03, 3: 0.03},
              m={0: 0.86, 1: 0.05, "1a": 0.05, "1b": 0.03, "1c": 0.01}),
    "G": dict(male=0.92, age=(67.0, 7.0), smoking=0.93, n={0: 0.35, 1: 0.35, 2: 0.20, 3: 0.10},
              m={0: 0.84, 1: 0.04, "1a": 0.08, "1b": 0.03, "1c": 0.01}),
    "B": dict(male=0.70, age=(63.0, 8.0), smoking=0.88, n={0: 0.04, 1: 0.14, 2: 0.20, 3: 0.62},
              m={0: 0.40, 1: 0.20, "1a": 0.10, "1b": 0.18, "1c": 0.12}),
    "E": dict(male=0.82, age=(61.0, 9.0), smoking=0.78, n={0: 0.20, 1: 0.25, 2: 0.25, 3: 0.30},
              m={0: 0.25, 1: 0.05, "1a": 0.60, "1b": 0.10}),
}
_NEUTRAL = dict(male=0.53, age=(61.5, 10.0), smoking=0.45, n={0: 0.52, 1: 0.24, 2: 0.03, 3: 0.21},
                m={0: 0.65, 1: 0.15, "1a": 0.08, "1b": 0.07, "1c": 0.04, 2: 0.003, 3: 0.006})
#: Share of filled ``Histopathological grading`` by class (as in the real sheet: it leaks the class).
_GRADING_FILLED = {"A": 0.35, "B": 0.97, "E": 1.0, "G": 0.25}
_GRADING_VALUES = {"G3": 0.42, "G2-3": 0.23, "G2": 0.19, "G1": 0.08, "G1-2": 0.05, "G1-G2": 0.01,
                   " G3": 0.01, "G2-G3": 0.005, " G1": 0.005}


def _t_stage(diameter_mm: float, kind: str, rng: np.random.Generator) -> Any:
    """TNM-8 T from the lesion diameter; coarse integers as often as the real sheet writes them."""
    if kind == "A" and diameter_mm <= 10 and rng.random() < 0.25:
        return "is"
    if diameter_mm <= 10:
        fine = "1a"
    elif diameter_mm <= 20:
        fine = "1b"
    elif diameter_mm <= 30:
        fine = "1c"
    elif diameter_mm <= 40:
        fine = "2a"
    elif diameter_mm <= 50:
        fine = "2b"
    elif diameter_mm <= 70:
        return 3
    else:
        return 4
    if kind in ("B", "G") and rng.random() < 0.15:
        return 4 if rng.random() < 0.5 else 3  # invasion of the mediastinum: T4 whatever the size
    # coarse staging, written as an integer cell: common for T2 in the real sheet, rare for T1
    if rng.random() < (0.5 if fine.startswith("2") else 0.02):
        return int(fine[0])
    return fine


def _draw_record(label: str, typical: bool, diameter_mm: float, lesion_kind: str, rng: np.random.Generator):
    dist = _TYPICAL[label] if typical else _NEUTRAL
    sex = "M" if rng.random() < dist["male"] else "F"
    age = int(np.clip(round(rng.normal(*dist["age"])), 28, 90))
    weight = float(np.clip(rng.normal(69.0 if sex == "M" else 58.0, 10.0), 35.5, 103.0))
    weight = round(weight * 2) / 2 if rng.random() < 0.3 else float(round(weight))
    smoking = int(rng.random() < dist["smoking"])
    n_stage = int(_norm_choice(rng, dist["n"]))
    m_stage = _norm_choice(rng, dist["m"])
    t_stage = _t_stage(diameter_mm, lesion_kind if lesion_kind != "indeterminate" else "X", rng)
    # realistic gaps: a few ages and weights are not recorded
    age_v: Optional[int] = None if rng.random() < 0.015 else age
    weight_v: Optional[float] = None if rng.random() < 0.03 else weight
    grading = _norm_choice(rng, _GRADING_VALUES) if rng.random() < _GRADING_FILLED[label] else None
    record = {
        "sex": sex,
        "age": age_v,
        "weight": weight_v,
        "t_stage": str(t_stage),
        "n_stage": str(n_stage),
        "m_stage": str(m_stage),
        "smoking": str(smoking),
    }
    sheet = {
        "Sex": sex,
        "Age": age_v,
        "weight (kg)": None if weight_v is None else (int(weight_v) if float(weight_v).is_integer() else weight_v),
        "T-Stage": t_stage,
        "N-Stage": n_stage,
        "\uff2d-Stage": m_stage,
        "Histopathological grading": grading,
        "Smoking History": smoking,
    }
    return record, sheet, weight, sex


def _lung_profile(u: np.ndarray | float) -> np.ndarray:
    """Cross-section scale of the lungs at relative height u (0 = base, 1 = apex)."""
    u = np.clip(u, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - u**2.2, 0.0, 1.0))


def _lung_geometry(an: AnatomyPlan, side: int, z: np.ndarray | float):
    """Centre (cx, cy) and semi-axes (lx, ly) of the lung ellipse on side +1 (right) / -1 (left)."""
    p = _lung_profile((np.asarray(z) - an.z_base) / an.lung_height)
    iax, iay = an.ax - an.fat - 14.0, an.ay - an.fat - 12.0  # inside the chest wall
    cx = side * 0.54 * iax
    cy = -0.04 * iay
    lx = 0.43 * iax * p * (1.0 if side > 0 else 0.93)
    ly = 0.86 * iay * p
    return cx, cy, lx, ly


def _hilum(an: AnatomyPlan, side: int) -> np.ndarray:
    return np.array([side * 0.27 * an.ax, 0.0, an.z_base + 0.55 * an.lung_height])


def _random_unit(rng: np.random.Generator, n: int = 1) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _point_in_lung(an: AnatomyPlan, side: int, u: float, rn: float, angle: float, margin: float) -> np.ndarray:
    """A body-frame point at relative height u, normalised radius rn and angle in one lung."""
    z = an.z_base + u * an.lung_height
    cx, cy, lx, ly = _lung_geometry(an, side, z)
    lx_eff = max(float(lx) - margin, 1.0)
    ly_eff = max(float(ly) - margin, 1.0)
    return np.array([cx + rn * lx_eff * math.cos(angle), cy + rn * ly_eff * math.sin(angle), z])


def _draw_anatomy(rng: np.random.Generator, weight: float, sex: str) -> AnatomyPlan:
    ax = float(np.clip(150.0 * (weight / 65.0) ** 0.3 * (1.04 if sex == "M" else 0.96), 120.0, 185.0))
    ay = ax * float(rng.uniform(0.62, 0.72))
    fat = float(np.clip(6.0 + 0.35 * (weight - 50.0) + (3.0 if sex == "F" else 0.0), 4.0, 28.0))
    lung_height = float(rng.uniform(225.0, 280.0))
    an = AnatomyPlan(
        ax=ax,
        ay=ay,
        fat=fat,
        lung_height=lung_height,
        z_base=-0.5 * lung_height,
        body_z0=float(rng.uniform(-260.0, -60.0)),
        contrast=bool(rng.random() < 0.3),
    )
    # pulmonary vessel tree: hilum -> bend -> periphery, one branch each
    for side in (1, -1):
        hil = _hilum(an, side)
        for _ in range(int(rng.integers(9, 14))):
            target = _point_in_lung(
                an, side, float(rng.uniform(0.08, 0.9)), float(rng.uniform(0.7, 0.92)),
                float(rng.uniform(0, 2 * math.pi)), 4.0,
            )
            mid = 0.5 * (hil + target) + rng.normal(scale=8.0, size=3)
            r0 = float(rng.uniform(3.5, 5.5))
            an.vessels.append((hil, mid, r0))
            an.vessels.append((mid, target, r0 * 0.45))
            branch = _point_in_lung(
                an, side, float(rng.uniform(0.1, 0.85)), float(rng.uniform(0.6, 0.9)),
                float(rng.uniform(0, 2 * math.pi)), 4.0,
            )
            an.vessels.append((mid, branch, r0 * 0.35))
        carina = np.array([0.0, 0.1 * ay, an.z_base + 0.62 * lung_height])
        an.bronchi.append((carina, hil + np.array([0.0, 0.0, 5.0]), 6.0))
    for _ in range(3):
        k = rng.normal(size=3)
        k = k / np.linalg.norm(k) * (2 * math.pi / float(rng.uniform(25.0, 60.0)))
        an.texture.append((k, float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(5.0, 12.0))))
    return an


def _draw_lesion(
    label: str, image_typical: bool, small: bool, an: AnatomyPlan, rng: np.random.Generator
) -> LesionPlan:
    kind = label if image_typical else "indeterminate"
    side = 1 if rng.random() < 0.55 else -1
    if small:
        diameter = float(rng.uniform(5.0, 10.0))
    else:
        lo, hi = {"A": (12, 30), "G": (20, 55), "B": (30, 65), "E": (30, 60), "indeterminate": (12, 40)}[kind]
        diameter = float(rng.uniform(lo, hi))
    radius = 0.5 * diameter
    lobes: list[tuple[np.ndarray, float]] = []
    spikes: list[tuple[np.ndarray, float, float]] = []
    nodes: list[tuple[np.ndarray, float]] = []
    shell_hu: Optional[float] = None
    core_fraction = 0.0
    cavity = None
    necrosis = None
    solid_hu = float(rng.uniform(25.0, 50.0))

    if kind in ("A", "E"):
        position = "peripheral"
        u = float(rng.uniform(0.2, 0.85))
        rn = float(rng.uniform(0.7, 0.95))
        angle = float(rng.uniform(0, 2 * math.pi))
    elif kind in ("G", "B"):
        position = "central"
        u = float(rng.uniform(0.42, 0.68))
        rn = float(rng.uniform(0.35, 0.65))
        medial = math.pi if side > 0 else 0.0  # towards the mediastinum
        angle = medial + float(rng.uniform(-0.7, 0.7))
    else:
        position = "intermediate"
        u = float(rng.uniform(0.2, 0.8))
        rn = float(rng.uniform(0.3, 0.75))
        angle = float(rng.uniform(0, 2 * math.pi))
    center = _point_in_lung(an, side, u, rn, angle, margin=radius * (0.6 if position == "central" else 1.0))

    if kind == "A":
        shell_hu = float(rng.uniform(-680.0, -450.0))
        core_fraction = float(rng.choice([0.0, rng.uniform(0.2, 0.6)]))
        for d in _random_unit(rng, int(rng.integers(3, 6))):
            lobes.append((d, float(rng.uniform(0.05, 0.15))))
        for d in _random_unit(rng, int(rng.integers(10, 18))):
            spikes.append((d, float(rng.uniform(0.5, 1.2)), float(rng.uniform(0.8, 1.4))))
    elif kind == "G":
        for d in _random_unit(rng, int(rng.integers(2, 5))):
            lobes.append((d, float(rng.uniform(0.05, 0.18))))
        if rng.random() < 0.55 and not small:
            off = _random_unit(rng)[0] * radius * float(rng.uniform(0.0, 0.25))
            cavity = (off, radius * float(rng.uniform(0.3, 0.55)))
    elif kind == "B":
        for d in _random_unit(rng, int(rng.integers(4, 8))):
            lobes.append((d, float(rng.uniform(0.12, 0.3))))
        hil = _hilum(an, side)
        for _ in range(int(rng.integers(2, 4))):
            node_c = np.array([side * float(rng.uniform(0.02, 0.15)) * an.ax, float(rng.uniform(-0.1, 0.3)) * an.ay,
                               hil[2] + float(rng.uniform(-30, 40))])
            nodes.append((node_c, float(rng.uniform(5.0, 9.0))))
    elif kind == "E":
        for d in _random_unit(rng, int(rng.integers(2, 4))):
            lobes.append((d, float(rng.uniform(0.04, 0.1))))
        if not small:
            necrosis = float(rng.uniform(0.35, 0.6))
    else:  # indeterminate: smooth round solid nodule
        for d in _random_unit(rng, 2):
            lobes.append((d, float(rng.uniform(0.0, 0.05))))
    return LesionPlan(
        kind=kind,
        center=center,
        radius=radius,
        lobes=lobes,
        solid_hu=solid_hu,
        shell_hu=shell_hu,
        core_fraction=core_fraction,
        cavity=cavity,
        necrosis=necrosis,
        spikes=spikes,
        nodes=nodes,
        small=small,
        position=position,
    )


def _place_slab(sc: ScannerPlan, an: AnatomyPlan, lesion: LesionPlan, rng: np.random.Generator) -> None:
    """Choose the slices: the whole chest when it fits under the slice cap, else a slab around the lesion."""
    dz = sc.slice_thickness
    chest_lo = an.z_base - 35.0
    chest_hi = an.z_base + an.lung_height + 20.0
    n_full = math.ceil((chest_hi - chest_lo) / dz) + 1
    n_cap = _max_slices(sc.size)
    if n_full <= n_cap:
        n = n_full
        lo = chest_lo + float(rng.uniform(-5.0, 5.0))
    else:
        n = n_cap
        extent = (n - 1) * dz
        frac = float(rng.uniform(0.3, 0.7))
        lo = lesion.center[2] - frac * extent
    sc.num_slices = n
    sc.first_slice_s = float(lo + an.body_z0)


def draw_patient(
    label: str,
    seed: int,
    number: int = 1,
    size: int = 128,
    small_lesion_share: float = DEFAULT_SMALL_LESION_SHARE,
    evidence: EvidenceDesign = DEFAULT_EVIDENCE,
) -> PatientPlan:
    """Draw everything random about one patient (no pixels yet)."""
    label = _check_label(label)
    if not 0.0 <= small_lesion_share <= 1.0:
        raise ValueError(f"small_lesion_share must be within [0, 1], got {small_lesion_share}")
    if int(size) < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    rng = _rng_for(seed, label, number)
    image_typical, record_typical = evidence.draw(rng)
    small = bool(rng.random() < small_lesion_share)
    # sex and weight first: the body is drawn to fit them
    provisional_sex = "M" if rng.random() < (_TYPICAL[label] if record_typical else _NEUTRAL)["male"] else "F"
    provisional_weight = float(np.clip(rng.normal(69.0 if provisional_sex == "M" else 58.0, 10.0), 35.5, 103.0))
    anatomy = _draw_anatomy(rng, provisional_weight, provisional_sex)
    lesion = _draw_lesion(label, image_typical, small, anatomy, rng)
    record, sheet, _, _ = _draw_record(label, record_typical, lesion.diameter_mm, lesion.kind, rng)
    # keep the recorded sex/weight consistent with the body that was drawn
    record["sex"] = sheet["Sex"] = provisional_sex
    if record["weight"] is not None:
        w = round(provisional_weight * 2) / 2 if rng.random() < 0.3 else float(round(provisional_weight))
        record["weight"] = w
        sheet["weight (kg)"] = int(w) if float(w).is_integer() else w
    scanner = _draw_scanner(rng, size, anatomy.ax)
    _place_slab(scanner, anatomy, lesion, rng)
    days = int(rng.integers(0, (_dt.date(2011, 12, 31) - _dt.date(2006, 1, 1)).days))
    return PatientPlan(
        patient_id=f"Lung_Dx-{label}{number:04d}",
        label=label,
        number=int(number),
        seed=int(seed),
        image_typical=image_typical,
        record_typical=record_typical,
        record=record,
        sheet_row=sheet,
        scanner=scanner,
        anatomy=anatomy,
        lesion=lesion,
        study_date=_dt.date(2006, 1, 1) + _dt.timedelta(days=days),
    )


def _check_label(label: str) -> str:
    label = str(label).strip().upper()
    if label not in CLASS_LETTERS:
        raise ValueError(f"unknown class {label!r}; choose one of {', '.join(CLASS_LETTERS)}")
    return label


# --------------------------------------------------------------------------------------------------
# Rendering


def plan_ijk_to_ras(plan: PatientPlan) -> np.ndarray:
    """IJK->RAS of the rendered grid: i towards patient left, j posterior, k superior (DICOM axial)."""
    sc = plan.scanner
    d = sc.pixel_spacing
    half = (sc.size - 1) / 2.0 * d
    origin = (sc.grid_center[0] + half, sc.grid_center[1] + half, sc.first_slice_s)
    directions = np.diag([-1.0, -1.0, 1.0])
    return make_ijk_to_ras((d, d, sc.slice_thickness), origin, directions)


class _Grid:
    """Axis coordinates of the grid in the body frame (x = R, y = A, z = S - body_z0)."""

    def __init__(self, plan: PatientPlan) -> None:
        sc = plan.scanner
        m = plan_ijk_to_ras(plan)
        self.affine = m
        self.spacing = np.array([sc.pixel_spacing, sc.pixel_spacing, sc.slice_thickness])
        n = sc.size
        self.x = (m[0, 3] + m[0, 0] * np.arange(n)).astype(np.float32)  # along i
        self.y = (m[1, 3] + m[1, 1] * np.arange(n)).astype(np.float32)  # along j
        self.z = (m[2, 3] + m[2, 2] * np.arange(sc.num_slices) - plan.anatomy.body_z0).astype(np.float32)
        self.shape = (sc.num_slices, n, n)

    def index_range(self, lo: np.ndarray, hi: np.ndarray) -> Optional[tuple[slice, slice, slice]]:
        """Slices (k, j, i) of the voxels whose centres may lie within the body-frame box [lo, hi]."""
        out = []
        for axis_coords, a, b in ((self.z, lo[2], hi[2]), (self.y, lo[1], hi[1]), (self.x, lo[0], hi[0])):
            idx = np.nonzero((axis_coords >= a) & (axis_coords <= b))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)  # type: ignore[return-value]

    def local(self, sl: tuple[slice, slice, slice]):
        return (self.z[sl[0]][:, None, None], self.y[sl[1]][None, :, None], self.x[sl[2]][None, None, :])


def _ellipse(x, y, cx, cy, rx, ry):
    rx = np.maximum(rx, 1e-3)
    ry = np.maximum(ry, 1e-3)
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2


def _render_background(plan: PatientPlan, grid: _Grid, k0: int, k1: int) -> np.ndarray:
    """Analytic anatomy of slices k0..k1 (HU, float32)."""
    an = plan.anatomy
    z = grid.z[k0:k1][:, None, None]
    y = grid.y[None, :, None]
    x = grid.x[None, None, :]
    ax, ay = an.ax, an.ay
    shape = (k1 - k0, grid.shape[1], grid.shape[2])
    hu = np.full(shape, AIR_HU, dtype=np.float32)

    body_r = _ellipse(x, y, 0.0, 0.0, ax, ay)
    in_body = np.broadcast_to(body_r <= 1.0, shape)
    hu[in_body] = -100.0  # subcutaneous fat
    wall = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, ax - an.fat, ay - an.fat) <= 1.0, shape)
    hu[wall] = 45.0  # chest wall muscle
    inner = np.broadcast_to(_ellipse(x, y, 0.0, 0.0, ax - an.fat - 14.0, ay - an.fat - 12.0) <= 1.0, shape)
    u = (z - an.z_base) / an.lung_height
    thorax = inner & (u > -0.12)
    hu[thorax] = -70.0  # mediastinal fat
    abdomen = inner & (u <= -0.12)
    hu[abdomen] = 55.0  # liver / abdomen below the domes

    # lungs with diaphragm domes (the right dome sits higher)
    lungs = np.zeros(shape, dtype=bool)
    for side in (1, -1):
        cx, cy, lx, ly = _lung_geometry(an, side, z)
        r = _ellipse(x, y, cx, cy, lx, ly)
        dome = (48.0 if side > 0 else 40.0) * (1.0 - np.clip(r, 0, 1))
        lungs |= (r <= 1.0) & (z > an.z_base + dome - 40.0) & (u <= 1.0)
    lungs &= inner
    # liver dome under the lungs
    hu[inner & (u > -0.12) & (u < 0.15) & ~lungs] = 55.0
    hu[lungs] = -860.0

    # heart (carves the left lung), aorta
    zh = an.z_base + 0.27 * an.lung_height
    heart = ((x + 0.1 * ax) / (0.33 * ax)) ** 2 + ((y - 0.28 * ay) / (0.4 * ay)) ** 2 + (
        (z - zh) / (0.22 * an.lung_height)
    ) ** 2 <= 1.0
    hu[np.broadcast_to(heart, shape)] = 40.0
    blood = 180.0 if an.contrast else 42.0
    z_arch = an.z_base + 0.72 * an.lung_height
    desc = (_ellipse(x, y, -0.1 * ax, -0.45 * ay, 12.0, 12.0) <= 1.0) & (z < z_arch)
    asc = (_ellipse(x, y, 0.03 * ax, 0.18 * ay, 15.0, 15.0) <= 1.0) & (z > zh) & (z < z_arch)
    hu[np.broadcast_to(desc | asc, shape)] = blood
    # trachea above the carina
    carina = an.z_base + 0.62 * an.lung_height
    tr = _ellipse(x, y, 0.0, 0.1 * ay, 9.0, 8.0)
    trachea = (tr <= 1.0) & (z > carina)
    tr_wall = (tr <= 1.5) & (z > carina)
    hu[np.broadcast_to(tr_wall, shape)] = 50.0
    hu[np.broadcast_to(trachea, shape)] = AIR_HU

    # spine: vertebral body with cortical rim and discs, canal, spinous process
    vy = -0.66 * ay
    vb = _ellipse(x, y, 0.0, vy, 19.0, 16.0)
    disc = np.mod(z - 3.0, 28.0) < 5.0
    bone = np.where(disc, 80.0, np.where(vb > 0.72, 750.0, 230.0)).astype(np.float32)
    mask = np.broadcast_to(vb <= 1.0, shape)
    hu[mask] = np.broadcast_to(bone, shape)[mask]
    canal = np.broadcast_to(_ellipse(x, y, 0.0, vy - 25.0, 8.0, 7.0) <= 1.0, shape)
    hu[canal] = 20.0
    process = np.broadcast_to((_ellipse(x, y, 0.0, vy - 42.0, 5.0, 13.0) <= 1.0) & ~disc, shape)
    hu[process] = 600.0
    lamina = np.broadcast_to((_ellipse(x, y, 0.0, vy - 30.0, 17.0, 5.0) <= 1.0) & (np.abs(x) > 7.0) & ~disc, shape)
    hu[lamina] = 550.0
    # sternum
    st = (_ellipse(x, y, 0.0, ay - an.fat - 9.0, 15.0, 6.0) <= 1.0) & (u > 0.25) & (u < 0.95)
    hu[np.broadcast_to(st, shape)] = 420.0
    # ribs: a ring inside the chest wall, sloping down anteriorly, one every 26 mm
    rho = np.sqrt(body_r)
    ring_r = 1.0 - (an.fat + 6.0) / ax
    theta = np.arctan2(y / ay, x / ax)
    slope = -32.0 * np.sin(theta)
    ribs = (np.abs(rho - ring_r) * ax < 4.0) & (np.mod(z - slope, 26.0) < 9.0) & (u > -0.1) & (u < 1.0)
    ribs &= ~((np.abs(x) < 0.14 * ax) & (y > 0))
    hu[np.broadcast_to(ribs, shape)] = 650.0
    return hu


def _stamp_capsule(
    hu: np.ndarray, grid: _Grid, p0: np.ndarray, p1: np.ndarray, radius: float, value: float,
    only_below: Optional[float] = None, max_len: float = 12.0,
) -> None:
    """Blend a tube of ``radius`` (soft edge one voxel wide) into ``hu``, piece by piece."""
    length = float(np.linalg.norm(p1 - p0))
    pieces = max(1, math.ceil(length / max_len))
    edge = float(min(grid.spacing[0], grid.spacing[2]))
    for t in range(pieces):
        a = p0 + (p1 - p0) * (t / pieces)
        b = p0 + (p1 - p0) * ((t + 1) / pieces)
        pad = radius + edge
        sl = grid.index_range(np.minimum(a, b) - pad, np.maximum(a, b) + pad)
        if sl is None:
            continue
        zz, yy, xx = grid.local(sl)
        ab = b - a
        denom = float(ab @ ab) or 1.0
        tt = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1] + (zz - a[2]) * ab[2]) / denom, 0.0, 1.0)
        d2 = (xx - a[0] - tt * ab[0]) ** 2 + (yy - a[1] - tt * ab[1]) ** 2 + (zz - a[2] - tt * ab[2]) ** 2
        w = np.clip((radius - np.sqrt(d2)) / edge + 0.5, 0.0, 1.0)
        sub = hu[sl]
        if only_below is not None:
            w = np.where(sub < only_below, w, 0.0)
        sub += (value - sub) * w.astype(np.float32)


def _render_lesion(hu: np.ndarray, grid: _Grid, lesion: LesionPlan) -> np.ndarray:
    """Blend the lesion into ``hu``; return its mask (bool, grid shape)."""
    mask = np.zeros(grid.shape, dtype=bool)
    for centre, r in lesion.nodes:  # lymph nodes: not part of the annotated lesion
        _stamp_capsule(hu, grid, centre, centre, r, 45.0)
    reach = lesion.radius * (1.0 + sum(a for _, a in lesion.lobes)) + float(grid.spacing.max())
    c = lesion.center
    sl = grid.index_range(c - reach, c + reach)
    if sl is not None:
        zz, yy, xx = grid.local(sl)
        dx, dy, dz = xx - c[0], yy - c[1], zz - c[2]
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        r_eff = np.full(dist.shape, lesion.radius, dtype=np.float64)
        for d, amp in lesion.lobes:
            cosang = (dx * d[0] + dy * d[1] + dz * d[2]) / dist
            r_eff = r_eff + lesion.radius * amp * np.exp((cosang - 1.0) / 0.25)
        edge = max(float(min(grid.spacing[0], grid.spacing[2])) * 0.7, 0.5)
        w = np.clip((r_eff - dist) / edge + 0.5, 0.0, 1.0)
        if lesion.shell_hu is not None:
            wc = np.clip((lesion.core_fraction * r_eff - dist) / edge + 0.5, 0.0, 1.0)
            value = lesion.shell_hu + (lesion.solid_hu - lesion.shell_hu) * wc
        else:
            value = np.full(dist.shape, lesion.solid_hu)
        if lesion.necrosis is not None:
            wn = np.clip((lesion.necrosis * r_eff - dist) / edge + 0.5, 0.0, 1.0)
            value = value + (12.0 - value) * wn
        if lesion.cavity is not None:
            off, rc = lesion.cavity
            dcav = np.sqrt((dx - off[0]) ** 2 + (dy - off[1]) ** 2 + (dz - off[2]) ** 2)
            wcav = np.clip((rc - dcav) / edge + 0.5, 0.0, 1.0)
            value = value + (AIR_HU - value) * wcav
        sub = hu[sl]
        sub += ((value - sub) * w).astype(np.float32)
        mask[sl] = w >= 0.5
    if not mask.any():  # a lesion smaller than a voxel: mark the voxel holding its centre
        k = int(np.clip(np.argmin(np.abs(grid.z - c[2])), 0, grid.shape[0] - 1))
        j = int(np.argmin(np.abs(grid.y - c[1])))
        i = int(np.argmin(np.abs(grid.x - c[0])))
        mask[k, j, i] = True
        hu[k, j, i] = lesion.solid_hu
    for d, frac, r in lesion.spikes:  # spiculation into the surrounding lung, outside the annotation
        start = c + d * lesion.radius * 0.8
        end = c + d * lesion.radius * (1.0 + frac)
        _stamp_capsule(hu, grid, start, end, r, 0.0, only_below=-300.0)
    return mask


def render_patient(plan: PatientPlan) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16 (K, J, I), lesion mask bool (K, J, I)) for a drawn patient."""
    grid = _Grid(plan)
    k_total = grid.shape[0]
    hu = np.empty(grid.shape, dtype=np.float32)
    chunk = max(1, int(4_000_000 // (grid.shape[1] * grid.shape[2])))
    for k0 in range(0, k_total, chunk):
        hu[k0 : k0 + chunk] = _render_background(plan, grid, k0, min(k_total, k0 + chunk))
    an = plan.anatomy
    for p0, p1, r in an.bronchi:
        _stamp_capsule(hu, grid, p0, p1, r + 1.5, 50.0, only_below=0.0)
        _stamp_capsule(hu, grid, p0, p1, r, AIR_HU)
    for p0, p1, r in an.vessels:
        _stamp_capsule(hu, grid, p0, p1, r, 180.0 if an.contrast else 40.0, only_below=-500.0)
    mask = _render_lesion(hu, grid, plan.lesion)

    # texture of the parenchyma and scanner noise, slice chunk by chunk
    rng = np.random.default_rng(np.random.SeedSequence([plan.seed & 0xFFFFFFFF, ord(plan.label), plan.number, 7]))
    sc = plan.scanner
    out = np.empty(grid.shape, dtype=np.int16)
    fov_mask = None
    if sc.padding_outside_fov:
        yy = (grid.y - sc.grid_center[1])[:, None]
        xx = (grid.x - sc.grid_center[0])[None, :]
        fov_mask = (xx * xx + yy * yy) > (0.5 * sc.fov) ** 2
    for k0 in range(0, k_total, chunk):
        k1 = min(k_total, k0 + chunk)
        block = hu[k0:k1]
        z = grid.z[k0:k1][:, None, None]
        tex = np.zeros(block.shape, dtype=np.float32)
        for kv, phase, amp in an.texture:
            tex += amp * np.cos(kv[0] * grid.x[None, None, :] + kv[1] * grid.y[None, :, None] + kv[2] * z + phase)
        lung_like = block < -400.0
        block += np.where(lung_like & (block > -990.0), tex, 0.0)
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(sc.noise_hu)
        np.clip(block, -1024.0, 3071.0, out=block)
        if fov_mask is not None:
            block[:, fov_mask] = _PADDING_HU
        out[k0:k1] = np.rint(block).astype(np.int16)
    return out, mask


def _box_from_mask(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    k_idx, j_idx, i_idx = (np.nonzero(mask.any(axis=a))[0] for a in ((1, 2), (0, 2), (0, 1)))
    return (
        (int(i_idx[0]), int(j_idx[0]), int(k_idx[0])),
        (int(i_idx[-1]), int(j_idx[-1]), int(k_idx[-1])),
    )


def _box_ras(affine: np.ndarray, box_ijk) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    lo, hi = np.array(box_ijk[0], float), np.array(box_ijk[1], float)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    ras = (corners @ affine.T)[:, :3]
    return tuple(float(v) for v in ras.min(axis=0)), tuple(float(v) for v in ras.max(axis=0))  # type: ignore[return-value]


def _scanner_info(sc: ScannerPlan) -> dict[str, Any]:
    return {
        "manufacturer": sc.manufacturer,
        "model": sc.model_name,
        "series_description": sc.series_description,
        "kernel": sc.kernel,
        "slice_thickness": sc.slice_thickness,
        "pixel_spacing": sc.pixel_spacing,
        "fov": sc.fov,
    }


def make_case(
    label: str,
    seed: int,
    size: int = 128,
    *,
    number: int = 1,
    small_lesion_share: float = DEFAULT_SMALL_LESION_SHARE,
    evidence: EvidenceDesign = DEFAULT_EVIDENCE,
) -> SyntheticCase:
    """One phantom patient in memory (no files): CT in HU, clinical record and lesion truth."""
    plan = draw_patient(label, seed, number, size, small_lesion_share, evidence)
    hu, mask = render_patient(plan)
    affine = plan_ijk_to_ras(plan)
    box_ijk = _box_from_mask(mask)
    box_ras = _box_ras(affine, box_ijk)
    center = plan.lesion.center + np.array([0.0, 0.0, plan.anatomy.body_z0])
    sc = plan.scanner
    volume = Volume(
        hu,
        affine,
        {
            "modality": "CT",
            "series_uid": None,
            "patient_sex": plan.record["sex"],
            "patient_age": None if plan.record["age"] is None else float(plan.record["age"]),
            "patient_weight": plan.record["weight"],
            "source": f"synthetic:{plan.patient_id}:seed={seed}",
            "warnings": [],
            "synthetic": True,
        },
    )
    return SyntheticCase(
        label=plan.label,
        patient_id=plan.patient_id,
        volume=volume,
        record=dict(plan.record),
        lesion_box_ras=box_ras,
        lesion_center_ras=tuple(float(v) for v in center),  # type: ignore[arg-type]
        lesion_box_ijk=box_ijk,
        lesion_mask=mask,
        lesion_diameter_mm=plan.lesion.diameter_mm,
        lesion_kind=plan.lesion.kind,
        evidence={"image_typical": plan.image_typical, "record_typical": plan.record_typical},
        sheet_row=dict(plan.sheet_row),
        scanner=_scanner_info(sc),
    )


# --------------------------------------------------------------------------------------------------
# Cohort composition


def parse_classes(spec: str | dict[str, float] | Sequence[str] | None) -> dict[str, float]:
    """'A,G' or 'A=0.6,G=0.4' (or a dict / list) -> normalised class proportions."""
    if spec is None:
        return dict(DEFAULT_CLASS_PROPORTIONS)
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if str(p).strip()]
        items = []
        for part in parts:
            if "=" in part:
                k, v = part.split("=", 1)
                try:
                    items.append((k, float(v)))
                except ValueError:
                    raise ValueError(f"class weight {part!r} is not a number; write e.g. A=0.6,G=0.4") from None
            else:
                letter = _check_label(part)
                items.append((letter, DEFAULT_CLASS_PROPORTIONS[letter]))
    out: dict[str, float] = {}
    for k, v in items:
        letter = _check_label(k)
        if v < 0:
            raise ValueError(f"class weight for {letter} must be >= 0, got {v}")
        out[letter] = float(v)
    total = sum(out.values())
    if not out or total <= 0:
        raise ValueError("no class with a positive weight; give e.g. --classes A,G or A=0.6,G=0.4")
    return {k: v / total for k, v in out.items() if v > 0}


def class_counts(patients: int, proportions: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of ``patients`` over the classes; every class gets one when possible."""
    if patients < 1:
        raise ValueError(f"patients must be at least 1, got {patients}")
    letters = [c for c in CLASS_LETTERS if c in proportions]
    raw = {c: proportions[c] * patients for c in letters}
    counts = {c: math.floor(raw[c]) for c in letters}
    order = sorted(letters, key=lambda c: (-(raw[c] - counts[c]), -proportions[c]))
    for c in order[: patients - sum(counts.values())]:
        counts[c] += 1
    if patients >= len(letters):  # no requested class left empty
        for c in letters:
            if counts[c] == 0:
                donor = max(letters, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[c] = 1
    return {c: n for c, n in counts.items() if n > 0}


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


def _annotation_xml(patient_folder: str, uid: str, size: int, label: str, box) -> str:
    (xmin, ymin), (xmax, ymax) = box
    return (
        "<annotation>\n"
        f"\t<folder>{patient_folder}</folder>\n"
        f"\t<filename>{uid}.jpg</filename>\n"
        f"\t<path>{patient_folder}/{uid}.jpg</path>\n"
        "\t<source>\n\t\t<database>Unknown</database>\n\t</source>\n"
        "\t<size>\n"
        f"\t\t<width>{size}</width>\n\t\t<height>{size}</height>\n\t\t<depth>3</depth>\n"
        "\t</size>\n"
        "\t<segmented>0</segmented>\n"
        "\t<object>\n"
        f"\t\t<name>{label}</name>\n"
        "\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n"
        "\t\t<bndbox>\n"
        f"\t\t\t<xmin>{xmin}</xmin>\n\t\t\t<ymin>{ymin}</ymin>\n"
        f"\t\t\t<xmax>{xmax}</xmax>\n\t\t\t<ymax>{ymax}</ymax>\n"
        "\t\t</bndbox>\n"
        "\t</object>\n"
        "</annotation>\n"
    )


def _write_sheet(path: Path, patients: list[PatientPlan]) -> None:
    try:
        import openpyxl
        from openpyxl.styles import Font
    except ImportError as exc:  # pragma: no cover - openpyxl ships with the [train] extra
        raise ImportError("writing the clinical sheet needs openpyxl: pip install 'mmcafnet[train]'") from exc
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.title = SHEET_NAME
    font = Font(name="Trebuchet MS", size=11)
    ws.append(list(SHEET_HEADERS))
    for no, plan in enumerate(patients, start=1):
        row = plan.sheet_row
        ws.append([no, plan.patient_id.split("-", 1)[1], *(row[h] for h in SHEET_HEADERS[2:])])
    for row_cells in ws.iter_rows(min_row=1, max_row=ws.max_row, max_col=len(SHEET_HEADERS)):
        for cell in row_cells:
            cell.font = font
    ws.freeze_panes = "A2"
    tmp = path.with_name(path.name + ".part")
    wb.save(tmp)
    os.replace(tmp, path)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def write_cohort(
    out: str | os.PathLike,
    patients: int,
    seed: int,
    size: int = 512,
    *,
    small_lesion_share: float = DEFAULT_SMALL_LESION_SHARE,
    classes: str | dict[str, float] | Sequence[str] | None = None,
    evidence: EvidenceDesign = DEFAULT_EVIDENCE,
    extra_series: bool = True,
    nbia_manifest_folder: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> SyntheticCohort:
    """Write a synthetic cohort in the Lung-PET-CT-Dx layout under ``out``; return what was written.

    ``out`` must be empty or absent. The cohort is built in a temporary folder beside it and moved
    into place at the end, so an interrupted run leaves nothing half-written. With
    ``nbia_manifest_folder`` the NBIA part sits in ``out/manifest-<13 digits>/`` as the NBIA Data
    Retriever writes it, with the annotations and the sheet beside metadata.csv. ``extra_series``
    adds, for some patients, the things a real download holds and an indexer must skip: a second
    unannotated CT reconstruction, a "Smart Prep" series of a few images, a Secondary Capture
    "Range" series and, in a second study, a PET series.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new output folder")
    proportions = parse_classes(classes)
    counts = class_counts(int(patients), proportions)
    plans = [
        draw_patient(letter, seed, number, size, small_lesion_share, evidence)
        for letter in CLASS_LETTERS
        for number in range(1, counts.get(letter, 0) + 1)
    ]
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        root_rel = Path(f"manifest-{1600000000000 + (int(seed) % 99999) * 1000:013d}") if nbia_manifest_folder else Path()
        cohort = _write_cohort_files(staging, root_rel, plans, seed, size, extra_series, progress)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    final_root = out.resolve() / root_rel
    for p in cohort.patients:
        p.series_path = str(final_root / p.series_path)
    cohort.root = final_root
    return cohort


def _write_cohort_files(staging: Path, root_rel: Path, plans: list[PatientPlan], seed: int, size: int,
                        extra_series: bool, progress) -> SyntheticCohort:
    root = staging / root_rel
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    written: list[SyntheticPatient] = []
    stamp = _dt.datetime(2023, 4, 2, 14, 13, 46, 26000)
    for n_done, plan in enumerate(plans):
        rng = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, ord(plan.label), plan.number, 11]))
        hu, mask = render_patient(plan)
        affine = plan_ijk_to_ras(plan)
        sc = plan.scanner
        study_uid = _uid(seed, plan.patient_id, "study", 1)
        frame_uid = _uid(seed, plan.patient_id, "frame", 1)
        study_time = f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}"
        study_folder = f"{_folder_date(plan.study_date)}-NA-{sc.study_description}-{study_uid[-5:]}"
        patient_rel = Path("Lung-PET-CT-Dx") / plan.patient_id
        series_number = 2
        series_list: list[tuple[str, str, str, str, int, Path]] = []  # uid, desc, modality, sop, n, rel folder
        extras: list[str] = []

        def series_folder(number: int, desc: str, uid: str, _study: Path = patient_rel / study_folder) -> Path:
            return _study / f"{number}.000000-{desc}-{uid[-5:]}"

        if extra_series and rng.random() < 0.1:  # scout-like "Smart Prep Series": a few images, to be dropped
            uid = _uid(seed, plan.patient_id, "series", "prep")
            rel = series_folder(series_number - 1, "Smart Prep Series", uid)
            k_mid = hu.shape[0] // 2
            few = hu[max(0, k_mid - 1) : k_mid + 2]
            _write_ct_series(_with_slices(plan, few.shape[0], max(0, k_mid - 1)), few, root / rel, study_uid, uid, frame_uid,
                             series_number - 1, "Smart Prep Series", study_time, "prep")
            series_list.append((uid, "Smart Prep Series", "CT", CT_IMAGE_STORAGE, few.shape[0], rel))
            extras.append("Smart Prep Series")
        series_uid = _uid(seed, plan.patient_id, "series", "ct")
        rel = series_folder(series_number, sc.series_description, series_uid)
        sop_uids = _write_ct_series(plan, hu, root / rel, study_uid, series_uid, frame_uid, series_number,
                                    sc.series_description, study_time, "ct")
        series_list.append((series_uid, sc.series_description, "CT", CT_IMAGE_STORAGE, hu.shape[0], rel))
        ct_rel = rel
        if extra_series and rng.random() < 0.2:  # a second, unannotated reconstruction (thicker slices)
            series_number += 1
            step = 2 if sc.slice_thickness <= 2.5 else 1
            thick = hu[::step]
            desc2 = {"SIEMENS": "ThoraxRoutine  5.0.0  B31f", "GE MEDICAL SYSTEMS": "Recon 3 5mm"}.get(sc.manufacturer, "iDose 2")
            uid = _uid(seed, plan.patient_id, "series", "ct2")
            rel = series_folder(series_number, desc2, uid)
            _write_ct_series(_with_slices(plan, thick.shape[0], 0, step), thick, root / rel, study_uid, uid,
                             frame_uid, series_number, desc2, study_time, "ct2")
            series_list.append((uid, desc2, "CT", CT_IMAGE_STORAGE, thick.shape[0], rel))
            extras.append(desc2)
        if extra_series and rng.random() < 0.25:
            series_number += 1
            uid = _uid(seed, plan.patient_id, "series", "sc")
            rel = series_folder(series_number, "ALPHA Range", uid)
            n_sc = _write_secondary_capture(plan, hu, root / rel, study_uid, uid, frame_uid, series_number,
                                            "ALPHA Range", study_time)
            series_list.append((uid, "ALPHA Range", "CT", SECONDARY_CAPTURE_STORAGE, n_sc, rel))
            extras.append("ALPHA Range")
        pet_study: Optional[tuple[str, str, Path]] = None
        if extra_series and rng.random() < 0.15:  # a later PET/CT study
            pet_study_uid = _uid(seed, plan.patient_id, "study", 2)
            pet_date = plan.study_date + _dt.timedelta(days=int(rng.integers(3, 40)))
            pet_study_folder = f"{_folder_date(pet_date)}-NA-PET03WholebodyFirstHead Adult-{pet_study_uid[-5:]}"
            uid = _uid(seed, plan.patient_id, "series", "pet")
            rel = patient_rel / pet_study_folder / f"3.000000-PET WB Corrected-{uid[-5:]}"
            pet_plan = _with_study(plan, pet_date, "PET03WholebodyFirstHead Adult")
            n_pet = _write_pet(pet_plan, hu, mask, root / rel, pet_study_uid, uid,
                               _uid(seed, plan.patient_id, "frame", 2), 3, study_time)
            series_list.append((uid, "PET WB Corrected", "PT", PET_IMAGE_STORAGE, n_pet, rel))
            pet_study = (pet_study_uid, pet_study_folder, rel)
            extras.append("PET WB Corrected")

        # annotations: one LabelImg file per slice carrying the lesion
        ann_dir = root / "Annotation" / plan.patient_id.split("-", 1)[1]
        ann_dir.mkdir(parents=True, exist_ok=True)
        annotated = 0
        for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
            sl = mask[k]
            rows_idx = np.nonzero(sl.any(axis=1))[0]
            cols_idx = np.nonzero(sl.any(axis=0))[0]
            box = ((int(cols_idx[0]), int(rows_idx[0])), (int(cols_idx[-1]), int(rows_idx[-1])))
            xml = _annotation_xml(ann_dir.name, sop_uids[int(k)], sc.size, plan.label, box)
            (ann_dir / f"{sop_uids[int(k)]}.xml").write_text(xml, encoding="utf-8")
            annotated += 1

        for uid, desc, modality, sop, n_images, rel in series_list:
            is_pet = sop == PET_IMAGE_STORAGE
            stamp += _dt.timedelta(seconds=float(rng.uniform(3.0, 12.0)))
            if pet_study is not None and rel == pet_study[2]:
                st_uid, st_desc, st_date = pet_study[0], "PET03WholebodyFirstHead Adult", pet_date
            else:
                st_uid, st_desc, st_date = study_uid, sc.study_description, plan.study_date
            rows.append(
                {
                    "Series UID": uid,
                    "Collection": COLLECTION,
                    "3rd Party Analysis": "NO" if is_pet else "null",
                    "Data Description URI": DATA_DESCRIPTION_URI,
                    "Subject ID": plan.patient_id,
                    "Study UID": st_uid,
                    "Study Description": st_desc,
                    "Study Date": _folder_date(st_date),
                    "Series Description": desc,
                    "Manufacturer": sc.manufacturer,
                    "Modality": modality,
                    "SOP Class Name": SOP_CLASS_NAMES[sop],
                    "SOP Class UID": sop,
                    "Number of Images": n_images,
                    "File Size": _file_size_text(_folder_bytes(root / rel)),
                    "File Location": "./" + rel.as_posix(),
                    "Download Timestamp": _timestamp_text(stamp),
                }
            )
        box_ijk = _box_from_mask(mask)
        written.append(
            SyntheticPatient(
                patient_id=plan.patient_id,
                label=plan.label,
                series_uid=series_uid,
                series_path=ct_rel.as_posix(),
                study_uid=study_uid,
                num_slices=int(hu.shape[0]),
                lesion_box_ijk=box_ijk,
                lesion_box_ras=_box_ras(affine, box_ijk),
                lesion_center_ras=tuple(float(v) for v in plan.lesion.center + np.array([0.0, 0.0, plan.anatomy.body_z0])),  # type: ignore[arg-type]
                lesion_diameter_mm=plan.lesion.diameter_mm,
                lesion_kind=plan.lesion.kind,
                annotated_slices=annotated,
                record=dict(plan.record),
                sheet_row=dict(plan.sheet_row),
                evidence={"image_typical": plan.image_typical, "record_typical": plan.record_typical},
                extra_series=extras,
            )
        )
        if progress is not None:
            progress(n_done + 1, len(plans))

    with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(METADATA_COLUMNS), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    _write_sheet(root / SHEET_FILE, plans)
    return SyntheticCohort(root=root, patients=written, seed=int(seed), size=int(size))


def _with_slices(plan: PatientPlan, n: int, k_first: int, step: int = 1) -> PatientPlan:
    """A copy of ``plan`` describing a sub-series: ``n`` slices from ``k_first`` every ``step``."""
    import copy

    p = copy.copy(plan)
    sc = copy.copy(plan.scanner)
    sc.first_slice_s = plan.scanner.first_slice_s + k_first * plan.scanner.slice_thickness
    sc.slice_thickness = plan.scanner.slice_thickness * step
    sc.num_slices = n
    p.scanner = sc
    return p


def _with_study(plan: PatientPlan, date: _dt.date, description: str) -> PatientPlan:
    import copy

    p = copy.copy(plan)
    sc = copy.copy(plan.scanner)
    sc.study_description = description
    p.scanner = sc
    p.study_date = date
    return p
