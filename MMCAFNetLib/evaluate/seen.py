"""Which patients a checkpoint was trained or validated on, stored as salted hashes.

A checkpoint keeps, for its training and validation patients, a hash of the patient ID and a hash
of the (patient ID, CT series UID) pair, never the IDs themselves. ``mmcafnet evaluate`` compares
the evaluated patients against them and refuses to score any patient the model has seen (unless
``--allow-seen``): re-indexing a cohort with another split seed silently moves training patients
into the "test" split, and a score on them flatters the model.

The series is part of the identity because phantom cohorts written with different seeds reuse the
same patient IDs (``Lung_Dx-A0001``) for different patients; a patient ID shared without the series
is reported apart (same person with another scan, or another cohort reusing IDs) and not refused.
The hashes hide IDs from casual reading of a shared checkpoint; an ID space small enough to list
can still be tested against them.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Optional

HASH_FORMAT = "sha256-16/v1"
_PREFIX = "mmcafnet-patient:"


def _digest(text: str) -> str:
    return hashlib.sha256((_PREFIX + text).encode("utf-8")).hexdigest()[:16]


def patient_hash(patient_id: str) -> str:
    return _digest(str(patient_id).strip())


def series_hash(patient_id: str, series_uid: Optional[str]) -> str:
    uid = "" if series_uid is None or (isinstance(series_uid, float)) else str(series_uid).strip()
    return _digest(f"{str(patient_id).strip()}|{uid}")


def _rows(df) -> list[tuple[str, Optional[str]]]:
    uids = df["series_uid"] if "series_uid" in df.columns else [None] * len(df)
    return [(str(p), (u if isinstance(u, str) and u else None)) for p, u in zip(df["patient_id"], uids)]


def seen_patients_record(train_df, val_df) -> dict[str, Any]:
    """The checkpoint's ``seen_patients`` entry: sorted hashes per role (no IDs)."""
    record: dict[str, Any] = {"format": HASH_FORMAT}
    for role, df in (("train", train_df), ("val", val_df)):
        rows = _rows(df)
        record[role] = {
            "patients": sorted({patient_hash(p) for p, _ in rows}),
            "series": sorted({series_hash(p, u) for p, u in rows}),
        }
    return record


def check_seen(payload: dict[str, Any], rows_df) -> dict[str, Any]:
    """Compare the evaluated rows with the checkpoint's record.

    Returns ``{"recorded": bool, "seen": [ids seen in training or validation], "seen_train": n,
    "seen_val": n, "id_only": [ids whose patient ID, but not CT series, was seen]}``;
    ``recorded`` is False for checkpoints written before the record existed.
    """
    record = payload.get("seen_patients")
    rows = _rows(rows_df)
    if not isinstance(record, dict) or record.get("format") != HASH_FORMAT:
        return {"recorded": False, "seen": [], "seen_train": 0, "seen_val": 0, "id_only": []}
    series = {role: set((record.get(role) or {}).get("series", [])) for role in ("train", "val")}
    patients = set()
    for role in ("train", "val"):
        patients |= set((record.get(role) or {}).get("patients", []))
    seen, id_only = [], []
    counts = {"train": 0, "val": 0}
    for pid, uid in rows:
        key = series_hash(pid, uid)
        roles = [role for role in ("train", "val") if key in series[role]]
        if roles:
            seen.append(pid)
            for role in roles:
                counts[role] += 1
        elif patient_hash(pid) in patients:
            id_only.append(pid)
    return {"recorded": True, "seen": seen, "seen_train": counts["train"], "seen_val": counts["val"],
            "id_only": id_only}


def describe(result: dict[str, Any], total: int) -> list[str]:
    """Plain-language lines for the report and the console."""
    if not result["recorded"]:
        return ["The checkpoint does not record its training and validation patients (written before this "
                "check existed): whether the evaluated patients were unseen cannot be verified."]
    lines = [f"{len(result['seen'])} of {total} evaluated patients were seen by the model "
             f"({result['seen_train']} in training, {result['seen_val']} in validation)."]
    if result["id_only"]:
        lines.append(f"{len(result['id_only'])} patient ID(s) match a training or validation patient with another "
                     "CT series (the same person's other scan, or another cohort reusing IDs, as phantom cohorts "
                     "written with different seeds do); they are scored.")
    return lines


def ids_preview(ids: Iterable[str], limit: int = 5) -> str:
    ids = list(ids)
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(ids[:limit]) + more
