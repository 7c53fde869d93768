"""Drawing a patient's plan: scanner, anatomy, lesion and clinical record, from its own random stream."""

from __future__ import annotations

import datetime as _dt
import math
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.synthetic.design import (
    CLASS_LETTERS,
    DEFAULT_EVIDENCE,
    DEFAULT_SMALL_LESION_SHARE,
    AnatomyPlan,
    EvidenceDesign,
    LesionPlan,
    PatientPlan,
    ScannerPlan,
)

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

