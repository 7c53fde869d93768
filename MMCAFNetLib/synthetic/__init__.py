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

from MMCAFNetLib.dataset.metadata import METADATA_COLUMNS
from MMCAFNetLib.synthetic.composition import class_counts, parse_classes
from MMCAFNetLib.synthetic.design import (
    AIR_HU,
    CLASS_LETTERS,
    COLLECTION,
    CT_IMAGE_STORAGE,
    DATA_DESCRIPTION_URI,
    DEFAULT_CLASS_PROPORTIONS,
    DEFAULT_EVIDENCE,
    DEFAULT_SMALL_LESION_SHARE,
    PET_IMAGE_STORAGE,
    RECORD_FIELDS,
    SECONDARY_CAPTURE_STORAGE,
    SHEET_FILE,
    SHEET_HEADERS,
    SHEET_NAME,
    SOP_CLASS_NAMES,
    AnatomyPlan,
    EvidenceDesign,
    LesionPlan,
    PatientPlan,
    ScannerPlan,
    SyntheticCase,
    SyntheticCohort,
    SyntheticPatient,
)
from MMCAFNetLib.synthetic.draw import draw_patient
from MMCAFNetLib.synthetic.layout import write_cohort
from MMCAFNetLib.synthetic.render import make_case, plan_ijk_to_ras, render_patient

__all__ = [
    "AIR_HU",
    "CLASS_LETTERS",
    "COLLECTION",
    "CT_IMAGE_STORAGE",
    "DATA_DESCRIPTION_URI",
    "DEFAULT_CLASS_PROPORTIONS",
    "DEFAULT_EVIDENCE",
    "DEFAULT_SMALL_LESION_SHARE",
    "METADATA_COLUMNS",
    "PET_IMAGE_STORAGE",
    "RECORD_FIELDS",
    "SECONDARY_CAPTURE_STORAGE",
    "SHEET_FILE",
    "SHEET_HEADERS",
    "SHEET_NAME",
    "SOP_CLASS_NAMES",
    "AnatomyPlan",
    "EvidenceDesign",
    "LesionPlan",
    "PatientPlan",
    "ScannerPlan",
    "SyntheticCase",
    "SyntheticCohort",
    "SyntheticPatient",
    "class_counts",
    "draw_patient",
    "make_case",
    "parse_classes",
    "plan_ijk_to_ras",
    "render_patient",
    "write_cohort",
]
