"""The cohort table: one row per patient, written by ``mmcafnet index`` and read by training."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from MMCAFNetLib.atomic import atomic_output
from MMCAFNetLib.ehr import PAPER_FIELDS, ClinicalSchema
from MMCAFNetLib.results import CLASS_LABELS
from MMCAFNetLib.table_files import read_csv_file

BOX_IJK_COLUMNS = (
    "box_ijk_min_i",
    "box_ijk_min_j",
    "box_ijk_min_k",
    "box_ijk_max_i",
    "box_ijk_max_j",
    "box_ijk_max_k",
)
BOX_RAS_COLUMNS = (
    "box_ras_min_r",
    "box_ras_min_a",
    "box_ras_min_s",
    "box_ras_max_r",
    "box_ras_max_a",
    "box_ras_max_s",
)
#: Columns every cohort table has, in order (the clinical field names sit between boxes and split).
LEADING_COLUMNS = ("patient_id", "label", "series_path", "series_uid", "num_slices", *BOX_IJK_COLUMNS, *BOX_RAS_COLUMNS)
TRAILING_COLUMNS = ("split", "fold")
SPLITS = ("train", "val", "test")


def cohort_columns(field_names: tuple[str, ...] | list[str] = PAPER_FIELDS) -> list[str]:
    return [*LEADING_COLUMNS, *field_names, *TRAILING_COLUMNS]


def write_cohort(df: pd.DataFrame, path: str | Path) -> Path:
    """Write the table as CSV atomically (temporary file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        df.to_csv(handle, index=False)
    return path


def read_cohort(
    path: str | Path, schema: ClinicalSchema | None = None, check_paths: bool = True
) -> pd.DataFrame:
    """Read and check a cohort table.

    Checks: the required columns (and the schema's clinical fields), one row per patient, class
    letters, split names, box min <= max, and (``check_paths``) that every series folder exists.
    A relative ``series_path`` is resolved against the table's folder. Clinical columns stay raw
    strings (e.g. T stage "1a"); age/weight are floats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cohort table not found: {path} (create it with: mmcafnet index ROOT --out {path.name})")
    header = read_csv_file(path, nrows=0, encoding="utf-8-sig").columns.tolist()
    fields = schema.field_names if schema is not None else [f for f in PAPER_FIELDS if f in header]
    required = cohort_columns(fields)
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path} is not a cohort table: missing column(s) {missing} (re-create it with mmcafnet index)")
    continuous = {"age", "weight"}
    if schema is not None:
        continuous = {f.name for f in schema.fields if f.kind == "continuous"}
    dtypes = {c: str for c in fields if c not in continuous}
    dtypes.update({"patient_id": str, "label": str, "series_path": str, "series_uid": str, "split": str})
    df = read_csv_file(path, dtype=dtypes, encoding="utf-8-sig")
    if df.empty:
        raise ValueError(f"{path}: the cohort table has no patients")
    if df["patient_id"].duplicated().any():
        dup = df.loc[df["patient_id"].duplicated(), "patient_id"].tolist()[:5]
        raise ValueError(f"{path}: patients listed more than once: {dup}")
    bad_labels = sorted(set(df["label"]) - set(CLASS_LABELS))
    if bad_labels:
        raise ValueError(f"{path}: unknown class label(s) {bad_labels}; expected one of {sorted(CLASS_LABELS)}")
    bad_splits = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad_splits:
        raise ValueError(f"{path}: unknown split name(s) {bad_splits}; expected {list(SPLITS)}")
    for column in (*BOX_IJK_COLUMNS, "num_slices", "fold"):
        if not pd.api.types.is_integer_dtype(df[column]):
            raise ValueError(f"{path}: column {column!r} must hold whole numbers (found missing or non-integer values)")
    for lo, hi in zip(BOX_IJK_COLUMNS[:3] + BOX_RAS_COLUMNS[:3], BOX_IJK_COLUMNS[3:] + BOX_RAS_COLUMNS[3:]):
        bad = df.loc[df[lo] > df[hi], "patient_id"].tolist()
        if bad:
            raise ValueError(f"{path}: {lo} > {hi} for patient(s) {bad[:5]}")
    base = path.parent.resolve()
    df["series_path"] = [str(p if Path(p).is_absolute() else (base / p).resolve()) for p in df["series_path"]]
    if check_paths:
        absent = [p for p in df["series_path"] if not Path(p).is_dir()]
        if absent:
            raise FileNotFoundError(
                f"{path}: {len(absent)} series folder(s) do not exist, e.g. {absent[0]}; the data moved? "
                "re-run mmcafnet index on the data's current location"
            )
    return df
