"""The NBIA Data Retriever's ``metadata.csv``: one row per downloaded series."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from MMCAFNetLib.table_files import read_csv_file

#: The 17 columns of an NBIA metadata.csv, in order.
METADATA_COLUMNS = (
    "Series UID",
    "Collection",
    "3rd Party Analysis",
    "Data Description URI",
    "Subject ID",
    "Study UID",
    "Study Description",
    "Study Date",
    "Series Description",
    "Manufacturer",
    "Modality",
    "SOP Class Name",
    "SOP Class UID",
    "Number of Images",
    "File Size",
    "File Location",
    "Download Timestamp",
)
CT_IMAGE_STORAGE_UID = "1.2.840.10008.5.1.4.1.1.2"
CT_IMAGE_STORAGE_NAME = "CT Image Storage"

_SIZE_UNITS = {"b": 1, "bytes": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 1024.0, "mib": 1024.0**2, "gib": 1024.0**3}


def parse_file_size(text: object) -> float:
    """'33.75 MB' -> 33750000.0 bytes; a decimal comma ('14,24 MB') is read as a decimal point. NaN if unreadable."""
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return float("nan")
    match = re.fullmatch(r"\s*([0-9]+(?:[.,][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match:
        return float("nan")
    number = float(match.group(1).replace(",", "."))
    unit = match.group(2).lower() or "b"
    factor = _SIZE_UNITS.get(unit)
    return number * factor if factor is not None else float("nan")


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Read an NBIA metadata.csv with its 17 columns kept verbatim.

    Adds ``file_size_bytes`` (parsed from ``File Size``), ``series_dir`` (``File Location`` made
    absolute against the CSV's folder) and ``is_ct_image`` (SOP Class CT Image Storage). Raises
    ValueError naming the missing columns when the file is not an NBIA metadata.csv.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metadata.csv"
    if not path.is_file():
        raise FileNotFoundError(f"metadata.csv not found: {path} (the NBIA Data Retriever writes it at the download root)")
    df = read_csv_file(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in METADATA_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not an NBIA metadata.csv: missing column(s) {missing}")
    for column in METADATA_COLUMNS:
        df[column] = df[column].str.strip()
    df["Number of Images"] = pd.to_numeric(df["Number of Images"], errors="coerce").fillna(0).astype(int)
    df["file_size_bytes"] = df["File Size"].map(parse_file_size)
    root = path.parent.resolve()

    def _absolute(location: str) -> str:
        rel = location.replace("\\", "/")
        rel = rel[2:] if rel.startswith("./") else rel
        return str((root / rel).resolve() if rel else root)

    df["series_dir"] = df["File Location"].map(_absolute)
    # a File Location that leads outside the download (``..``, an absolute path, a link out) is not
    # followed: its series_dir is empty and the reason is listed, one line per row
    inside = df["series_dir"].map(lambda p: Path(p) == root or root in Path(p).parents)
    problems = [
        f"{path.name} row {n + 2} (series {uid or '?'}): File Location {location!r} leads outside the download "
        f"folder {root}; the series is not read"
        for n, (uid, location, ok) in enumerate(zip(df["Series UID"], df["File Location"], inside)) if not ok
    ]
    df.loc[~inside, "series_dir"] = ""
    df["location_ok"] = inside
    df.attrs["warnings"] = problems
    df["is_ct_image"] = (df["SOP Class UID"] == CT_IMAGE_STORAGE_UID) | (df["SOP Class Name"] == CT_IMAGE_STORAGE_NAME)
    return df


def class_of_subject(subject_id: str) -> str:
    """'Lung_Dx-A0001' -> 'A': the class comes only from the ID letter."""
    short = str(subject_id).strip().rsplit("-", 1)[-1]
    return short[:1].upper()


def short_id(subject_id: str) -> str:
    """'Lung_Dx-A0001' -> 'A0001' (the clinical sheet's and the Annotation folder's form)."""
    return str(subject_id).strip().rsplit("-", 1)[-1].upper()
